"""What a newcomer sees: Megatron-Core's Apex / Transformer Engine fallback warnings give way to
one line saying what runs the model; every other warning still shows."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

from megatron_rl.actor import compat, ignore_megatron_fallback_warnings

ROOT = Path(__file__).resolve().parents[1]

BUILD = """
from megatron_rl.actor.actor import Actor
from megatron_rl.actor.parallel import destroy_distributed, init_distributed
from megatron_rl.config import load_config

cfg = load_config("configs/tiny_moe_cpu.yaml", world_size=1)
init_distributed(cfg.parallel, seed=1)
Actor(cfg.model, cfg.parallel, cfg.actor)
Actor(cfg.model, cfg.parallel, cfg.actor)  # a second model (a reference policy) says nothing
destroy_distributed()
"""


def test_building_a_model_prints_one_backend_line_and_no_fallback_warnings():
    unset = {"RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK", "TRITON_INTERPRET"}
    env = {k: v for k, v in os.environ.items() if k not in unset}
    proc = subprocess.run([sys.executable, "-c", BUILD], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    if compat.needed():
        assert lines[0].startswith("megatron-rl: CPU compatibility layer (gloo collectives, "
                                   "torch kernels); Transformer Engine ")
    else:
        assert lines[0].startswith("megatron-rl: CUDA (") and "nccl collectives" in lines[0]


def test_only_megatrons_fallback_messages_are_ignored():
    def warn(message: str, module: str) -> None:
        warnings.warn_explicit(message, UserWarning, f"{module}.py", 1, module=module)

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # pytest resets filters per test: set them here
        ignore_megatron_fallback_warnings()
        warn("Apex is not installed. Falling back to Torch Norm", "megatron.core.models.backends")
        warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
             "megatron.core.optimizer")
        warn("Apex is not installed. Falling back to Torch Norm", "someone_else")
        warn("full scope is deprecated.", "megatron.core.transformer.transformer_config")
    assert [(str(w.message), w.filename) for w in seen] == [
        ("Apex is not installed. Falling back to Torch Norm", "someone_else.py"),
        ("full scope is deprecated.", "megatron.core.transformer.transformer_config.py")]


def test_backend_line_names_the_kernels():
    line = compat.backend_summary("torch")
    assert "torch kernels" in line
    if compat.needed():
        assert line.startswith("megatron-rl: CPU compatibility layer (")
        assert line.endswith("Transformer Engine not installed") or "unused on CPU" in line
    else:
        assert line.startswith("megatron-rl: CUDA (")
        assert "Triton kernels" in compat.backend_summary("auto")
