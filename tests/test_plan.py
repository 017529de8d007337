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
from rank_batches import ok, run_batch
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


PARAM_CASES = [
    (DSV3, 671.0, 37.5),   # DeepSeek-V3 report: 671B total, 37B activated
    (QWEN, 30.5, 3.35),    # Qwen3-30B-A3B model card: 30.5B total, 3.3B activated
]


def _short_kinds(path: str) -> list[int]:
    """One layer of each kind of the config's model: [0, 1] or [1]."""
    return sorted(set(moe_pattern(load_config(path, ONE_RANK, world_size=1).model)))


@pytest.fixture(scope="module")
def counted() -> dict:
    """`megatron_counts` of every PARAM_CASES config, in turn in one 1-rank spawn:
    {path: result}."""
    paths = [path for path, _, _ in PARAM_CASES]
    calls = [(megatron_counts, (path, [f"model.num_layers={len(_short_kinds(path))}",
                                       f"model.moe_layer_freq={_short_kinds(path)}"]))
             for path in paths]
    return {path: res for path, (res,) in zip(paths, run_batch(1, calls, timeout_s=900),
                                               strict=True)}


@pytest.mark.parametrize(("path", "total_b", "active_b"), PARAM_CASES)
def test_param_counts_equal_megatron_core(path, total_b, active_b, counted):
    m = load_config(path, ONE_RANK, world_size=1).model
    kinds = moe_pattern(m)
    short = sorted(set(kinds))  # one layer of each kind: [0, 1] or [1]
    mc = ok(counted[path])
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
    # Which verdict is the config's business (the H100 configs change); that there is one is ours.
    assert re.search(r"^verdict  (FITS|DOES NOT FIT|CANNOT START): ", out, re.M)


def test_deepseek_v3_layout_and_memory():
    cfg, plan = _plan(DSV3, gpus=128)
    assert plan.layout.world == 128 and plan.layout.stage_layers == [16, 16, 16, 13]
    assert plan.engine.count == 1 and not plan.engine.colocated and plan.fits  # own nodes
    assert plan.can_start, plan.unsupported
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
    # The verdict line, or the memory line under CANNOT START (the config's settings may change).
    assert re.search(rf"^(verdict  DOES NOT FIT|memory   does not fit): over in rollout by "
                     rf"{over:.2f} GiB", out, re.M)
    assert "verdict  FITS" not in out


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


# --------------------------------------------------------------------------------------------
# Settings the trainer would refuse: `launch/support.py` and the CANNOT START verdict
# --------------------------------------------------------------------------------------------

TINY = str(CONFIGS / "tiny_moe_cpu.yaml")
# The settings the tests below rely on, pinned: the shipped H100 config may change, these not.
QWEN_SUPPORTED = ["rollout.routing_replay=false", "rollout.weight_sync=tensor",
                  "rollout.engine_urls=[]", "actor.recompute=full", "parallel.pp=1",
                  "parallel.cp=1", "slurm.nodes=1", "slurm.engine_nodes=0",
                  "slurm.gpus_per_node=8", "slurm.engine_tp=8", "slurm.engine_ep=8"]
ROOMY = ["--gpu-mem-gib", "1000"]  # memory fits whatever the config: only the settings decide


def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def _keys(overrides: list[str], world: int = 1, **kw) -> list[str]:  # noqa: ANN003
    from megatron_rl.launch.support import unsupported

    return [u.key for u in unsupported(load_config(TINY, overrides, world_size=world), **kw)]


def test_supported_config_that_fits_is_fits(capsys):
    assert main(["plan", QWEN, *_sets(QWEN_SUPPORTED), *ROOMY]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^verdict  FITS: ", out, re.M) and "CANNOT START" not in out
    cfg = load_config(QWEN, QWEN_SUPPORTED, world_size=8)
    plan = make_plan(cfg, Hardware(gpu_mem_gib=1000.0))
    assert plan.fits and plan.can_start and plan.unsupported == ()


def test_unsupported_setting_is_not_fits_and_is_named(capsys):
    replay = [*QWEN_SUPPORTED, "parallel.cp=2"]
    assert main(["plan", QWEN, *_sets(replay), *ROOMY]) == 0  # as for DOES NOT FIT
    out = capsys.readouterr().out
    assert "verdict  FITS" not in out
    line = next(x for x in out.splitlines() if x.startswith("verdict  "))
    assert line.startswith("verdict  CANNOT START: parallel.cp=2: ")
    assert "parallel.cp=1" in line  # the fix
    assert re.search(r"^memory   fits: ", out, re.M)  # the memory verdict is still given
    assert "weights (bf16)" in out and "spare" in out  # and the memory table
    # Both refused and over in memory: still CANNOT START, with the memory's overshoot.
    assert main(["plan", QWEN, *_sets(replay), "--gpu-mem-gib", "20"]) == 0
    out = capsys.readouterr().out
    assert "verdict  CANNOT START: parallel.cp=2" in out
    assert re.search(r"^memory   does not fit: over in ", out, re.M)
    cfg = load_config(QWEN, replay, world_size=8)
    plan = make_plan(cfg, Hardware(gpu_mem_gib=1000.0))
    assert plan.fits and not plan.can_start
    assert [u.key for u in plan.unsupported] == ["parallel.cp"]


def test_every_refusal_is_listed_on_its_own_line(capsys):
    two = [*QWEN_SUPPORTED, "rollout.routing_replay=true", "parallel.cp=2", "slurm.engine_tp=16",
           "slurm.nodes=2", "slurm.engine_ep=16"]
    assert main(["plan", QWEN, *_sets(two), *ROOMY]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("verdict  ")]
    assert [x.split(":")[1].strip() for x in lines] == ["rollout.weight_sync=tensor",
                                                        "parallel.cp=2"]


def test_support_is_torch_free():
    import subprocess
    import sys

    code = ("import sys; import megatron_rl.launch.support, megatron_rl.launch.plan; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_shipped_cpu_configs_start_here():
    from megatron_rl.launch.support import unsupported

    for name in ("tiny_moe_cpu.yaml", "demo_cpu.yaml", "smollm2_countdown.yaml"):
        cfg = load_config(str(CONFIGS / name), world_size=1)
        assert unsupported(cfg, cuda=False) == [], name


GPU_JOB = ["slurm.gpus_per_node=8", "slurm.engine_model_path=/models/tiny"]


def test_tensor_sync_needs_the_engine_on_the_senders_host():
    # Engines on nodes of their own: CUDA IPC handles do not open there (fine without CUDA).
    own = [*GPU_JOB, "slurm.nodes=2", "slurm.engine_nodes=1"]
    assert _keys(own, cuda=True) == ["rollout.weight_sync"]
    assert _keys(own, cuda=False) == []
    assert _keys([*own, "rollout.weight_sync=disk"], cuda=True) == []
    # One engine over two nodes, colocated.
    wide = [*GPU_JOB, "slurm.nodes=2", "slurm.engine_tp=16", "rollout.engine=sglang"]
    assert _keys(wide, cuda=True) == ["rollout.weight_sync"]
    assert _keys([*GPU_JOB, "rollout.engine=sglang"], cuda=True) == []  # one node: fine
    # Pipeline stages other than the engine's, colocated (the embedded engine here).
    pp = ["parallel.pp=2", "parallel.dp=1"]
    assert _keys(pp, world=2, cuda=True) == ["rollout.weight_sync"]
    assert _keys(pp, world=2, cuda=False) == []
    from megatron_rl.launch.support import unsupported

    (item,) = unsupported(load_config(TINY, wide, world_size=1), cuda=True)
    assert "spans 2 nodes" in item.why and "weight_sync=distributed" in item.fix
    assert str(item).startswith("rollout.weight_sync=tensor: ")


def test_distributed_sync_needs_engines_apart_from_the_trainer_gpus():
    urls = ["rollout.engine=sglang", "rollout.engine_urls=[http://node0:30000]",
            "rollout.weight_sync=distributed"]
    # Servers the sbatch script starts on the trainer's GPUs: NCCL cannot pair ranks on a GPU.
    assert _keys([*GPU_JOB, *urls], cuda=True) == ["rollout.weight_sync"]
    assert _keys([*GPU_JOB, *urls], cuda=False) == []  # gloo on CPU
    # Engines on nodes of their own, or user-given servers of a CPU job: fine.
    assert _keys([*GPU_JOB, *urls, "slurm.nodes=2", "slurm.engine_nodes=1"], cuda=True) == []


def test_distributed_sync_needs_served_engines():
    """The cross-section rule (engine_urls, or engine servers the sbatch script starts).
    RolloutConfig.validate may refuse the plainest case first, so the field is set after."""
    from megatron_rl.launch.support import unsupported

    cfg = load_config(TINY, world_size=1)
    object.__setattr__(cfg.rollout, "weight_sync", "distributed")
    (item,) = unsupported(cfg, cuda=False)
    assert item.key == "rollout.weight_sync" and "served engines" in item.why


def test_sglang_servers_of_the_sbatch_script_need_a_model():
    own = ["slurm.gpus_per_node=8", "slurm.nodes=2", "slurm.engine_nodes=1",
           "rollout.weight_sync=distributed", "rollout.engine=sglang",
           "rollout.engine_urls=[http://node1:30000]"]
    assert _keys(own, cuda=True) == ["slurm.engine_model_path"]
    assert _keys([*own, "checkpoint.load=/models/tiny"], cuda=True) == []
    cpu_servers = ["slurm.nodes=2", "slurm.engine_nodes=1", "slurm.engine_server=megatron-rl"]
    assert _keys(cpu_servers, cuda=False) == []


def test_routing_replay_refusals():
    assert _keys(["rollout.routing_replay=true"], cuda=False) == []
    for recompute in ("selective", "full"):  # replay follows the recomputed routers
        assert _keys(["rollout.routing_replay=true", f"actor.recompute={recompute}"],
                     cuda=False) == []



def test_context_parallel_is_refused_on_every_device():
    cp = ["parallel.cp=2", "parallel.dp=1"]
    assert _keys(cp, world=2, cuda=True) == ["parallel.cp"]
    assert _keys(cp, world=2, cuda=True, te=False) == ["parallel.cp"]
    assert _keys(cp, world=2, cuda=False) == ["parallel.cp"]


def test_distributed_optimizer_reload_needs_transformer_engine():
    resume = ["actor.use_distributed_optimizer=true", "checkpoint.resume=true"]
    assert _keys(resume, cuda=False) == ["actor.use_distributed_optimizer"]
    assert _keys(resume, cuda=True) == []
    assert _keys(resume[:1], cuda=False) == []  # no reload, no problem


def test_hf_architecture_must_express_the_model():
    assert _keys(["model.hf_architecture=null"], cuda=False) == ["model.hf_architecture"]
    assert _keys(["model.hf_architecture=null", "rollout.load_dir=/saved", "eval.size=0"],
                 cuda=False) == []  # no engine: nothing to export to
    assert _keys(["model.hf_architecture=llama"], cuda=False) == ["model.hf_architecture"]


def test_reward_named_like_the_overlong_column():
    from megatron_rl.launch.support import OVERLONG_COLUMN
    from megatron_rl.trainer import OVERLONG_COLUMN as TRAINER_COLUMN

    assert OVERLONG_COLUMN == TRAINER_COLUMN
    clash = ["rewards.functions=[{name: reasoning_gym}, {name: overlong_penalty}]"]
    assert _keys(clash, cuda=False) == ["rewards.functions"]  # the dapo preset punishes length
    assert _keys([*clash, "algorithm.overlong_penalty=false"], cuda=False) == []


def test_evaluation_needs_an_engine_and_prompts():
    saved = ["rollout.load_dir=/saved"]
    assert _keys(saved, cuda=False) == ["rollout.load_dir"]  # eval.size unset: train evaluates
    assert _keys([*saved, "eval.size=0"], cuda=False) == []
    files = ["data.source=jsonl", "data.path=/data/train.jsonl"]
    assert _keys(files, cuda=False) == ["data.eval_path"]
    assert _keys([*files, "data.eval_path=/data/eval.jsonl"], cuda=False) == []
    assert _keys(["data.eval_size=0"], cuda=False) == ["data.eval_size"]
    assert _keys(["data.eval_size=0", "eval.size=0"], cuda=False) == []


def test_script_started_sglang_servers_need_a_model():
    served = ["rollout.engine=sglang"]  # no engine nodes: servers on the trainer's nodes
    assert _keys(served, cuda=True) == ["slurm.engine_model_path"]
    assert _keys([*served, "checkpoint.load=/models/tiny"], cuda=True) == []
    assert _keys([*served, "slurm.engine_server=megatron-rl"], cuda=False) == []  # CPU serve
