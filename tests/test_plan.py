"""`megatron-rl plan`: parameter counts against Megatron-Core's own, the table for every shipped
config, the verdict, and errors for bad flags.

Megatron-Core's count: the repo's builder (`actor.model.build_gpt`) builds the GPTModel at one
rank with the parameters on the meta device (no memory), and we sum `p.numel()`. It builds one
layer of each kind (dense, MoE) rather than all 61 / 48 (Megatron's layers of a kind are alike;
the whole models take 30 s and 20 s to build and count the same), and the full model's count
is the layers' counts times how many of each kind it has, plus what lies outside the layers.
Activated = total - n_moe * (num_experts - topk) * (numel of one routed expert, read off the
model). MTP is not built (our builder has none); the planner counts it only with `--mtp-layers`.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from torch.overrides import TorchFunctionMode

from megatron_rl.actor.config import padded_vocab_size
from megatron_rl.cli import main
from megatron_rl.config import load_config
from megatron_rl.launch.plan import (
    Hardware,
    count_params,
    layer_params,
    make_plan,
    moe_pattern,
    render,
)
from megatron_rl.launch.spawn import run_ranks

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DSV3 = str(CONFIGS / "deepseek_v3_h100.yaml")
QWEN = str(CONFIGS / "qwen3_30b_a3b_h100.yaml")
ONE_RANK = ["parallel.tp=1", "parallel.pp=1", "parallel.pp_last_stage_layers=null",
            "parallel.cp=1", "parallel.dp=1", "parallel.ep=1", "parallel.etp=1",
            "parallel.sequence_parallel=false", "parallel.timeout_s=60"]


class _MetaDevice(TorchFunctionMode):
    """Every tensor created with a `device` argument lands on meta (entered inside the CPU
    compat layer's mode, so it sees the call first)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def megatron_counts(path: str, overrides: list[str]) -> dict:
    """Build `path`'s model (with `overrides`) on meta at one rank; parameters per layer,
    outside layers, and of one routed expert."""
    from megatron_rl.actor.model import build_gpt, transformer_config
    from megatron_rl.actor.parallel import init_distributed

    cfg = load_config(path, ONE_RANK + overrides, world_size=1)
    kinds = moe_pattern(cfg.model)
    init_distributed(cfg.parallel)
    with _MetaDevice():
        gpt = build_gpt(transformer_config(cfg.model, cfg.parallel, cfg.actor), cfg.model)
    per_layer = [0] * len(kinds)
    rest = expert = 0
    one_expert = f"decoder.layers.{kinds.index(1)}.mlp.experts.local_experts.0."
    for name, p in gpt.named_parameters():
        hit = re.match(r"decoder\.layers\.(\d+)\.", name)
        if hit:
            per_layer[int(hit.group(1))] += p.numel()
        else:
            rest += p.numel()
        expert += p.numel() if name.startswith(one_expert) else 0
    meta = sum(p.is_meta for p in gpt.parameters())
    return {"per_layer": per_layer, "rest": rest, "expert": expert, "meta": meta,
            "vocab": gpt.vocab_size, "kinds": kinds}


@pytest.mark.parametrize(("path", "total_b", "active_b"), [
    (DSV3, 671.0, 37.5),   # DeepSeek-V3 report: 671B total, 37B activated
    (QWEN, 30.5, 3.35),    # Qwen3-30B-A3B model card: 30.5B total, 3.3B activated
])
def test_param_counts_equal_megatron_core(path, total_b, active_b):
    m = load_config(path, ONE_RANK, world_size=1).model
    kinds = moe_pattern(m)
    short = sorted(set(kinds))  # one layer of each kind: [0, 1] or [1]
    (mc,) = run_ranks(megatron_counts, 1, path, [f"model.num_layers={len(short)}",
                                                 f"model.moe_layer_freq={short}"],
                      timeout_s=600)
    assert mc["meta"] > 0  # the experts really were built on meta
    assert mc["kinds"] == short
    per_kind = dict(zip(short, mc["per_layer"], strict=True))
    plan = count_params(m)
    # Each kind of layer, exactly, and what lies outside the layers.
    for kind, count in per_kind.items():
        want = plan.moe_layer.dense + plan.moe_layer.experts if kind else plan.dense_layer.dense
        assert count == want, f"{'MoE' if kind else 'dense'} layer"
    assert mc["rest"] == plan.embedding + plan.output + plan.final_norm
    assert mc["vocab"] == padded_vocab_size(m.vocab_size, 1)
    total = mc["rest"] + sum(per_kind[k] for k in kinds)
    active = total - kinds.count(1) * (m.num_experts - m.moe_router_topk) * mc["expert"]
    assert plan.total == total and plan.active == active
    assert abs(total / 1e9 - total_b) < 0.05 * total_b
    assert abs(active / 1e9 - active_b) < 0.05 * active_b


def test_deepseek_v3_counts_by_hand():
    """DeepSeek-V3's published split: 671B total (MTP not included), ~37B activated; its MTP
    module adds one MoE layer plus a 2h x h projection and three norms (HF ships 685B with it,
    counting the MTP's own copies of embedding and head)."""
    m = load_config(DSV3, ONE_RANK, world_size=1).model
    c = count_params(m)
    assert round(c.total / 1e9) == 671 and round(c.active / 1e9) in (37, 38)
    expert = 3 * 7168 * 2048
    assert c.moe_layer.experts == 256 * expert and c.moe_layer.active_experts == 8 * expert
    with_mtp = count_params(m, mtp_layers=1)
    assert with_mtp.total - c.total == layer_params(m, True).dense + 256 * expert \
        + 2 * 7168**2 + 3 * 7168


def _plan(path: str, *overrides: str, gpus: int, **hw):  # noqa: ANN202
    cfg = load_config(path, list(overrides), world_size=gpus)
    return cfg, make_plan(cfg, Hardware(**hw))


@pytest.mark.parametrize("path", sorted(str(p) for p in CONFIGS.glob("*.yaml")))
def test_table_prints_for_every_shipped_config(path, capsys):
    assert main(["plan", path]) == 0
    out = capsys.readouterr().out
    for row in ("weights", "gradients", "optimizer", "activations", "engine KV cache", "total",
                "verdict", "generate", "log-probs", "train", "weight sync"):
        assert row in out, row
    assert "FITS" in out


def test_deepseek_v3_layout_and_memory():
    cfg, plan = _plan(DSV3, gpus=128)
    assert plan.layout.world == 128 and plan.layout.stage_layers == [16, 16, 16, 13]
    assert plan.engine.count == 2 and plan.engine.colocated and plan.fits
    # The optimizer is on the host; weights bf16 (2 B) and fp32 grads (4 B) per parameter.
    assert plan.worst.optimizer == 0 and plan.worst.optimizer_host > 0
    assert plan.worst.grads == 2 * plan.worst.weights
    text = render(plan, cfg, DSV3)
    assert "671.03 B params" in text and "16,16,16,13" in text


def test_verdict_flips_when_memory_is_too_small(capsys):
    _, plan = _plan(QWEN, gpus=8)
    assert plan.fits
    _, small = _plan(QWEN, gpus=8, gpu_mem_gib=40.0)
    assert not small.fits and small.spare["rollout"] < 0
    assert main(["plan", QWEN, "--gpu-mem-gib", "40"]) == 0
    out = capsys.readouterr().out
    over = -small.spare["rollout"] / 2**30
    assert f"DOES NOT FIT: over in rollout by {over:.2f} GiB" in out


def test_memory_moves_the_right_way():
    _, base = _plan(QWEN, gpus=8)
    _, gpu_opt = _plan(QWEN, "actor.optimizer_cpu_offload=false", gpus=8)
    assert gpu_opt.worst.optimizer > 0 and gpu_opt.worst.train > base.worst.train
    _, no_recompute = _plan(QWEN, "actor.recompute=none", gpus=8)
    assert no_recompute.worst.activations > 5 * base.worst.activations
    _, less_tp = _plan(QWEN, "parallel.tp=2", "parallel.dp=4", gpus=8)
    assert less_tp.worst.weights > base.worst.weights


@pytest.mark.parametrize(("argv", "message"), [
    (["--mfu", "1.5"], "--mfu: must be in (0, 1]"),
    (["--gpu-mem-gib", "0"], "--gpu-mem-gib: must be > 0"),
    (["--gpus", "many"], "--gpus: expected a int"),
])
def test_bad_flag_fails_naming_it(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["plan", QWEN, *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_bad_config_fails_naming_the_field(capsys):
    assert main(["plan", QWEN, "--gpus", "12"]) == 1
    err = capsys.readouterr().err
    assert "parallel" in err and "world size 12" in err
    assert main(["plan", DSV3, "--set", "parallel.pp_last_stage_layers=14"]) == 1
    assert "parallel.pp_last_stage_layers" in capsys.readouterr().err
    bad_tp = ["--set", "slurm.engine_tp=3", "--set", "slurm.engine_ep=1"]
    assert main(["plan", QWEN, *bad_tp]) == 1
    assert "slurm.engine_tp: 3 does not divide the 8 engine GPUs" in capsys.readouterr().err
    bad_args = ["--set", "slurm.engine_args=[--mem-fraction-static, lots]"]
    assert main(["plan", QWEN, *bad_args]) == 1
    assert "slurm.engine_args" in capsys.readouterr().err


def test_engines_on_their_own_nodes(capsys):
    two_nodes = ["--set", "slurm.nodes=2", "--set", "slurm.engine_nodes=1"]
    assert main(["plan", QWEN, *two_nodes]) == 0
    out = capsys.readouterr().out
    assert "actor    8 GPUs" in out and "on their own nodes" in out and "InfiniBand" in out
    cfg = load_config(QWEN, two_nodes[1::2], world_size=8)
    plan = make_plan(cfg, Hardware())
    assert not plan.engine.colocated and plan.rollout_peak == plan.engine_pool


def test_padded_vocab_matches_the_builder():
    """The planner counts the embedding at the vocabulary the builder pads to."""
    for path in (DSV3, QWEN):
        m = load_config(path, ONE_RANK, world_size=1).model
        assert count_params(m).embedding == padded_vocab_size(m.vocab_size, 1) * m.hidden_size
    for vocab, tp in ((129280, 8), (151936, 4), (512, 1), (49152, 3), (1000, 6)):
        padded = padded_vocab_size(vocab, tp)
        assert padded % tp == 0 and padded % 128 == 0 and 0 <= padded - vocab < 128 * tp


def uneven_pp_worker() -> list[int]:
    from megatron.core import parallel_state

    from megatron_rl.actor.model import build_gpt, transformer_config
    from megatron_rl.actor.parallel import init_distributed

    tiny = str(CONFIGS / "tiny_moe_cpu.yaml")
    layout = ["model.num_layers=3", "parallel.pp=2", "parallel.pp_last_stage_layers=1"]
    small = ["parallel.timeout_s=120", "actor.seq_length=16", "rollout.max_new_tokens=8"]
    cfg = load_config(tiny, layout + small, world_size=2)
    init_distributed(cfg.parallel)
    gpt = build_gpt(transformer_config(cfg.model, cfg.parallel, cfg.actor), cfg.model)
    return [parallel_state.get_pipeline_model_parallel_rank(), len(gpt.decoder.layers)]


def test_uneven_last_pipeline_stage_builds():
    """parallel.pp_last_stage_layers reaches Megatron: 3 layers over pp=2 as 2 + 1."""
    assert run_ranks(uneven_pp_worker, 2, timeout_s=300) == [[0, 2], [1, 1]]
