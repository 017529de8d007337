#!/usr/bin/env bash
# The test suite: set up .venv (idempotent), lint with ruff, then run pytest on tests/.
# Extra arguments go to pytest, e.g. scripts/test.sh -k cli -x
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
echo "[test] ruff check ."
.venv/bin/ruff check .
echo "[test] pytest tests"
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 tests "$@"
