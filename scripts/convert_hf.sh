#!/usr/bin/env bash
# Convert a Hugging Face checkpoint to a Megatron-Core dist checkpoint (or back).
#   scripts/convert_hf.sh HF_DIR MCORE_DIR [NPROC] [--tp 2 --pp 2 --ep 2 --dtype bfloat16 ...]
#   DIRECTION=mcore-to-hf scripts/convert_hf.sh MCORE_DIR HF_DIR [NPROC] [--hf-source HF_DIR ...]
# Any `megatron-rl convert` option passes through (--overwrite, --set KEY=VALUE).
# NPROC > 1 runs under torchrun on this node; each rank reads only its own slices.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
src=${1:?usage: scripts/convert_hf.sh SRC DST [NPROC] [--set KEY=VALUE ...]}
dst=${2:?usage: scripts/convert_hf.sh SRC DST [NPROC] [--set KEY=VALUE ...]}
shift 2
nproc=1
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then nproc=$1; shift; fi
direction=${DIRECTION:-hf-to-mcore}
py=.venv/bin/python
[[ -x $py ]] || py=python3
if [[ $nproc -gt 1 ]]; then
  exec "$py" -m torch.distributed.run --standalone --nproc-per-node "$nproc" \
    -m megatron_rl convert "$direction" "$src" "$dst" "$@"
fi
exec "$py" -m megatron_rl convert "$direction" "$src" "$dst" "$@"
