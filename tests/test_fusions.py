"""Fusions and grouped GEMM follow the device (`actor.compat.fusion_settings`): on with CUDA and
the provider of each kernel (Transformer Engine, Apex), each switchable off in `actor.*`, off
under the CPU compatibility layer, and an explicit true the device cannot honour is refused
naming the field. The `TransformerConfig` is built here as a CUDA + TE + Apex run builds it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.transformer.moe import moe_utils

from megatron_rl.actor import compat
from megatron_rl.actor.model import transformer_config
from megatron_rl.config import load_config
from megatron_rl.configurable import ConfigError

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_moe_cpu.yaml")

# our field -> Megatron's TransformerConfig field
FUSIONS = {
    "grouped_gemm": "moe_grouped_gemm",
    "permute_fusion": "moe_permute_fusion",
    "rope_fusion": "apply_rope_fusion",
    "bias_dropout_fusion": "bias_dropout_fusion",
    "masked_softmax_fusion": "masked_softmax_fusion",
    "gradient_accumulation_fusion": "gradient_accumulation_fusion",
}
GPU = compat.Device(cuda=True, te=True, te_grouped_gemm=True, te_permute=True, te_rope=True,
                    mla_rope=True, apex_grad_accum=True)
"""An H100 node with Transformer Engine and Apex, as `probe_device` reports it there."""
CPU = compat.Device(cuda=False)


def _cfg(*overrides: str):
    return load_config(TINY, list(overrides), world_size=1)


@pytest.fixture
def te_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stand-ins for the TE kernels whose presence `TransformerConfig.__post_init__` checks
    (fused RoPE, fused permutation); nothing else of CUDA or TE is faked."""
    def kernel(*args: object, **kwargs: object) -> None:
        raise AssertionError("a stand-in kernel; this test builds configs only")

    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", kernel)
    for name in compat._PERMUTE_KERNELS:
        monkeypatch.setattr(moe_utils, name, kernel, raising=False)


def test_a_cuda_run_with_te_gets_every_fusion_and_te_layers(te_kernels: None) -> None:
    cfg = _cfg()
    config = transformer_config(cfg.model, cfg.parallel, cfg.actor, GPU)
    assert config.transformer_impl == "transformer_engine"
    for ours, megatron in FUSIONS.items():
        assert getattr(config, megatron) is True, ours


@pytest.mark.parametrize("field", FUSIONS)
def test_each_fusion_can_be_switched_off_on_cuda(te_kernels: None, field: str) -> None:
    cfg = _cfg(f"actor.{field}=false")
    config = transformer_config(cfg.model, cfg.parallel, cfg.actor, GPU)
    for ours, megatron in FUSIONS.items():
        assert getattr(config, megatron) is (ours != field), ours
    assert config.transformer_impl == "transformer_engine"


def test_cpu_gets_every_fusion_off_and_local_layers() -> None:
    cfg = _cfg()
    config = transformer_config(cfg.model, cfg.parallel, cfg.actor, CPU)
    assert config.transformer_impl == "local"
    for ours, megatron in FUSIONS.items():
        assert getattr(config, megatron) is False, ours
    if not torch.cuda.is_available():  # this machine: the probe finds the compatibility layer
        assert compat.probe_device() == CPU
        config = transformer_config(cfg.model, cfg.parallel, cfg.actor)
        assert not any(getattr(config, megatron) for megatron in FUSIONS.values())


@pytest.mark.parametrize("field", FUSIONS)
def test_an_explicit_true_on_cpu_is_refused_naming_the_field(field: str) -> None:
    cfg = _cfg(f"actor.{field}=true")
    with pytest.raises(ConfigError) as err:
        transformer_config(cfg.model, cfg.parallel, cfg.actor, CPU)
    assert err.value.key == f"actor.{field}"
    assert str(err.value).startswith(f"config error: actor.{field}: is true but needs CUDA")
    assert "CPU compatibility layer" in str(err.value)


def test_cuda_without_te_or_apex_turns_on_only_what_it_has() -> None:
    cfg = _cfg()
    bare = compat.Device(cuda=True)
    settings = compat.fusion_settings(cfg.actor, cfg.model, bare)
    assert settings == {"transformer_impl": "local", "bias_dropout_fusion": True,
                        **{m: False for m in FUSIONS.values() if m != "bias_dropout_fusion"}}
    no_apex = compat.Device(**{**GPU.__dict__, "apex_grad_accum": False})
    assert not compat.fusion_settings(cfg.actor, cfg.model, no_apex)[
        "gradient_accumulation_fusion"]
    with pytest.raises(ConfigError, match=r"actor\.gradient_accumulation_fusion: .*Apex"):
        compat.fusion_settings(_cfg("actor.gradient_accumulation_fusion=true").actor,
                               cfg.model, no_apex)
    with pytest.raises(ConfigError, match=r"^config error: actor\.grouped_gemm: "):
        compat.fusion_settings(_cfg("actor.grouped_gemm=true").actor, cfg.model, bare)


def test_moe_settings_reach_only_moe_models_and_mla_rope_fusion_is_opt_in() -> None:
    dense = _cfg("model.num_experts=0", "model.hf_architecture=null").model
    settings = compat.fusion_settings(_cfg().actor, dense, GPU)
    assert "moe_grouped_gemm" not in settings and "moe_permute_fusion" not in settings
    mla = _cfg("model.multi_latent_attention=true", "model.hf_architecture=null").model
    assert compat.fusion_settings(_cfg().actor, mla, GPU)["apply_rope_fusion"] is False
    with pytest.raises(ConfigError, match=r"actor\.rope_fusion: .*rope_scaling=yarn"):
        compat.fusion_settings(_cfg("actor.rope_fusion=true").actor, mla, GPU)
