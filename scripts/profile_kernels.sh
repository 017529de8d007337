#!/usr/bin/env bash
# Standard kernel sweep: AOT resources for sm_90a, then timings for the production shapes
# (vocab 129280 / 152064, TP 1 and 8). On CPU the torch reference paths are timed at fewer
# tokens (pass TOKENS="..." to override). Usage: scripts/profile_kernels.sh [extra profile args]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}
"$PY" -m megatron_rl.kernels.profile --compile-only
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  TOKENS=${TOKENS:-"4096 16384"}
else
  TOKENS=${TOKENS:-"512"}
fi
# shellcheck disable=SC2086
"$PY" -m megatron_rl.kernels.profile --tokens $TOKENS --vocab 129280 152064 --tp 1 8 "$@"
