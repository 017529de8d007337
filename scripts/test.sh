#!/usr/bin/env bash
# The test suite: set up .venv (idempotent), lint with ruff, then run pytest on tests/.
# Extra arguments go to pytest, e.g. scripts/test.sh -k cli -x
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
echo "[test] ruff check ."
.venv/bin/ruff check .
# The slow end-to-end tests (the real SmolLM2 checkpoint: ~2.5 min more) run too, as in CI;
# MEGATRON_RL_SLOW=0 skips them while iterating.
export MEGATRON_RL_SLOW=${MEGATRON_RL_SLOW:-1}
echo "[test] pytest tests (MEGATRON_RL_SLOW=$MEGATRON_RL_SLOW)"
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 tests "$@"
