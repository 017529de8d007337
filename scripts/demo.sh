#!/usr/bin/env bash
# The tiny CPU RL run: set up .venv (idempotent), then train on the embedded default config.
# Extra arguments go to `megatron-rl train`, e.g. scripts/demo.sh --set trainer.steps=5
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
exec .venv/bin/megatron-rl train configs/demo_cpu.yaml "$@"
