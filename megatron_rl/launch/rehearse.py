"""`megatron-rl submit CONFIG --rehearse`: the same config with the model shrunk, on 4 CPU ranks.

A rehearsal runs a cluster config end to end on one node of a (local) Slurm before its real
submission: the sbatch script rendered the same way (torchrun, engine servers started by the
script, weight sync, routing replay, checkpoints, SIGUSR1 save and requeue, resume), the model
shrunk to a few small layers that keep every architectural feature of the config (MLA with its
q/kv LoRA ranks and YaRN, QK layernorm, GQA and kv_channels, sigmoid group-limited top-k routing
with expert bias and its scaling factor, shared experts, dense first layers and the uneven last
pipeline stage), and the parallel layout scaled to 4 ranks with the same kinds of parallelism
where they fit. What cannot run here is replaced, and said: data and tokenizer (the synthetic
math task of the CPU demo), the checkpoint (random init), bf16 (fp32, for engine/actor
log-prob parity), CPU Adam offload, GPUs (the engines are `megatron-rl serve` processes).

`rehearsal_data` is the pure transform of the raw config (a dict, as read from YAML); the
`--set` overrides of the command line apply after it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from megatron_rl.config import RunConfig, load_config, read_yaml, resolve
from megatron_rl.configurable import ConfigError, from_dict
from megatron_rl.launch.support import Unsupported, unsupported

RANKS = 4
"""Trainer ranks of a rehearsal: one node, 4 CPU processes."""
ENGINES = 2
"""`megatron-rl serve` engines of a rehearsal, on the same node."""
STEPS = 4
SAVE_INTERVAL = 2


def _pow2_at_most(n: int, cap: int) -> int:
    """The largest power of two <= min(n, cap) (>= 1)."""
    out = 1
    while out * 2 <= min(n, cap):
        out *= 2
    return out


def _layout(par: dict[str, Any], orig_world: int | None, notes: list[str]) -> dict[str, Any]:
    """The parallel section scaled to RANKS ranks: tp, pp (then cp) of 2 where the config uses
    them, data parallel from what is left, ep as large as the expert rule allows."""
    budget, new = RANKS, dict(par)
    dropped = []
    for kind in ("tp", "pp", "cp"):
        orig = int(par.get(kind) or 1)
        size = 2 if orig > 1 and budget >= 2 else 1
        if orig > 1 and size == 1:
            dropped.append(f"{kind}={orig}")
        budget //= size
        new[kind] = size
    orig_dp = par.get("dp") or (orig_world // (int(par.get("tp") or 1) * int(par.get("pp") or 1)
                                               * int(par.get("cp") or 1)) if orig_world else 1)
    if orig_dp > 1 and budget == 1:
        dropped.append(f"dp={orig_dp}")
    new["dp"] = None  # derived: what is left of the 4 ranks
    etp = par.get("etp")
    new["etp"] = None if etp is None else (1 if int(etp) == 1 else new["tp"])
    orig_ep = int(par.get("ep") or 1)
    expert_tp = new["tp"] if new["etp"] is None else new["etp"]
    new["ep"] = _pow2_at_most(orig_ep, RANKS // (expert_tp * new["pp"]))
    if orig_ep > 1 and new["ep"] == 1:
        dropped.append(f"ep={orig_ep}")
    if new["tp"] == 1:
        new.pop("sequence_parallel", None)
    if par.get("virtual_pp") is not None:
        dropped.append(f"virtual_pp={par['virtual_pp']}")
        new["virtual_pp"] = None
    if new["pp"] == 1:
        new["pp_last_stage_layers"] = None
    elif par.get("pp_last_stage_layers") is not None:
        new["pp_last_stage_layers"] = 1  # the first stage 2 layers, the last 1
    shown = ", ".join(f"{k}={par.get(k, 1)}->{new[k]}" for k in ("tp", "pp", "cp", "ep"))
    notes.append(f"layout: {shown}, dp derived ({RANKS} ranks)"
                 + (f"; dropped: {', '.join(dropped)} (no room in {RANKS} ranks)"
                    if dropped else ""))
    return new


def _model(model: dict[str, Any], par: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """The model shrunk: layers for the layout (dense first layers kept), small widths, 8
    experts in the same routing (groups, top-k per group), every feature flag kept."""
    m = dict(model)
    pp, uneven = par["pp"], par.get("pp_last_stage_layers") is not None
    layers = 2 * (pp - 1) + 1 if uneven else 2 * pp
    freq = model.get("moe_layer_freq", 1)
    if isinstance(freq, list):
        dense = next((i for i, v in enumerate(freq) if v), len(freq))
        dense = min(dense, 1)
        freq = [0] * dense + [1] * (layers - dense)
    else:
        layers = max(layers, int(freq))
    m.update(num_layers=layers, moe_layer_freq=freq, hidden_size=64, ffn_hidden_size=128,
             num_attention_heads=4, vocab_size=512)
    heads, orig_heads = 4, int(model.get("num_attention_heads", 4))
    if model.get("num_query_groups") is not None:
        m["num_query_groups"] = max(par["tp"], min(2, int(model["num_query_groups"])))
    if model.get("kv_channels") is not None:  # keep head_dim * heads vs hidden_size as it was
        ratio = int(model["kv_channels"]) * orig_heads / int(model.get("hidden_size", 64))
        m["kv_channels"] = max(8, int(round(ratio * 64 / heads)))
    if model.get("multi_latent_attention"):
        if model.get("q_lora_rank") is not None:
            m["q_lora_rank"] = 32
        m.update(kv_lora_rank=16, qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16)
    experts = int(model.get("num_experts") or 0)
    if experts:
        m.update(num_experts=8, moe_ffn_hidden_size=32)
        if model.get("moe_shared_expert_intermediate_size") is not None:
            m["moe_shared_expert_intermediate_size"] = 32
        topk, groups = int(model.get("moe_router_topk", 2)), model.get("moe_router_num_groups")
        if groups is not None:
            group_topk = int(model["moe_router_group_topk"])
            new_groups = min(int(groups), 4)
            new_group_topk = max(1, group_topk * new_groups // int(groups))
            per_group = 8 // new_groups  # experts per group; top-k takes topk/group_topk of each
            m.update(moe_router_num_groups=new_groups, moe_router_group_topk=new_group_topk,
                     moe_router_topk=new_group_topk * min(max(1, topk // group_topk),
                                                          per_group))
        else:
            m["moe_router_topk"] = min(topk, 2)
    kept = [name for name, on in (
        ("MLA", model.get("multi_latent_attention")),
        ("q LoRA", model.get("q_lora_rank") is not None),
        ("YaRN", model.get("rope_scaling") == "yarn"), ("QK layernorm", model.get("qk_layernorm")),
        ("GQA", model.get("num_query_groups") is not None),
        ("kv_channels", model.get("kv_channels") is not None),
        (f"{model.get('moe_router_score_function', 'softmax')} routing", experts),
        ("expert bias", model.get("moe_router_enable_expert_bias")),
        ("group-limited top-k", model.get("moe_router_num_groups") is not None),
        ("top-k scaling", model.get("moe_router_topk_scaling_factor") is not None),
        ("shared experts", model.get("moe_shared_expert_intermediate_size") is not None),
        ("dense first layers", isinstance(freq, list) and 0 in freq),
        ("uneven last stage", uneven)) if on]
    width = (f"{m['num_experts']} experts top-{m['moe_router_topk']}"
             + (f" in {m['moe_router_num_groups']} groups (top-{m['moe_router_group_topk']})"
                if m.get("moe_router_num_groups") else "")) if experts else "dense"
    notes.append(f"model: {model.get('num_layers')} -> {layers} layers, hidden "
                 f"{model.get('hidden_size')} -> 64, vocab {model.get('vocab_size')} -> 512, "
                 f"{width}; kept: {', '.join(kept) or 'nothing special'}")
    return m


def rehearsal_data(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The raw config of a rehearsal of `data` (a raw config), and lines saying what changed."""
    out = copy.deepcopy(data)
    notes: list[str] = []
    slurm = dict(out.get("slurm") or {})
    orig_world = (int(slurm.get("nodes", 1)) - int(slurm.get("engine_nodes", 0))) * int(
        slurm.get("nproc_per_node") or slurm.get("gpus_per_node") or 1)
    out["parallel"] = _layout(dict(out.get("parallel") or {}), orig_world, notes)
    out["model"] = _model(dict(out.get("model") or {}), out["parallel"], notes)

    actor = dict(out.get("actor") or {})
    actor.update(params_dtype="float32", optimizer_cpu_offload=False, seq_length=128,
                 micro_batch_size=min(int(actor.get("micro_batch_size", 1)), 2), lr=1e-3)
    out["actor"] = actor
    rollout = dict(out.get("rollout") or {})
    own_nodes = int(slurm.get("engine_nodes", 0)) > 0
    rollout.update(prompts_per_step=2, n_samples_per_prompt=4, max_new_tokens=16,
                   over_sampling=1.0, engine_urls=[])
    if rollout.get("engine") == "sglang" and own_nodes:
        rollout["colocate"] = False  # engines on nodes of their own: here beside the trainer
    out["rollout"] = rollout
    algorithm = dict(out.get("algorithm") or {})
    algorithm.update(dynamic_sampling=False, overlong_cache_len=None, overlong_max_len=None,
                     mini_batches=1)
    out["algorithm"] = algorithm
    out["rewards"] = {**(out.get("rewards") or {}), "num_workers": 1,
                      "functions": [{"name": "reasoning_gym", "weight": 1.0}]}
    out["data"] = {"source": "reasoning_gym", "task": "basic_arithmetic", "train_size": 100,
                   "eval_size": 10, "chat_template": "r1_zero",
                   **{k: v for k, v in (out.get("data") or {}).items()
                      if k in ("seed", "shuffle", "tokenizer_cache")}}
    out["eval"] = {**(out.get("eval") or {}), "size": 0}
    out["pretrain"] = {**(out.get("pretrain") or {}), "steps": 0}
    out["logging"] = {**(out.get("logging") or {}), "tensorboard": False, "plot": False}
    out["checkpoint"] = {**(out.get("checkpoint") or {}), "load": None,
                         "save_interval": SAVE_INTERVAL, "resume": True}
    out["train"] = {**(out.get("train") or {}), "steps": STEPS, "eval_interval": 0}

    name = f"{slurm.get('job_name', 'megatron-rl')}-rehearsal"
    engine = rollout.get("engine") == "sglang"
    slurm.update(job_name=name, nodes=1, gpus_per_node=0, nproc_per_node=RANKS, mem=None,
                 cpus_per_task=None, partition=None, account=None, time="00:20:00",
                 signal_lead_s=60, container_image=None, container_mounts=[], setup=[],
                 extra_sbatch=[], engine_nodes=0, engine_server="megatron-rl",
                 engine_tp=RANKS // ENGINES, engine_ep=1, engine_model_path=None, engine_args=[],
                 env={**(slurm.get("env") or {}), "OMP_NUM_THREADS": "1"})
    out["slurm"] = slurm
    where = ("beside the trainer, not colocated (the config gives them nodes of their own)"
             if own_nodes else "colocated with the trainer")
    notes.append(f"job: {name}, 1 node, {RANKS} CPU ranks"
                 + (f", {ENGINES} `megatron-rl serve` engines {where}, weight sync "
                    f"{rollout.get('weight_sync', 'tensor')}" if engine else "")
                 + f"; {STEPS} steps, a checkpoint every {SAVE_INTERVAL}")
    notes.append("replaced: data/tokenizer -> synthetic basic_arithmetic + its demo tokenizer "
                 "(reasoning_gym reward), checkpoint.load -> random init, bf16 -> fp32, CPU "
                 "Adam offload -> off, GPUs -> CPU; 2 prompts x 4 samples, 16 new tokens, "
                 "seq 128, lr 1e-3 (the weights move each step), no eval, no dynamic sampling")
    _fit_to_cpu(out, notes)
    return out, notes


def _with_engine_urls(cfg: RunConfig) -> RunConfig:
    """`cfg` with the engine URLs its sbatch script fills in (`launch/slurm.py`)."""
    ro = cfg.rollout
    if ro.engine != "sglang" or ro.engine_urls:
        return cfg
    urls = [f"http://engine:{30000 + i}" for i in range(ENGINES)]
    return dataclasses.replace(cfg, rollout=dataclasses.replace(ro, engine_urls=urls))


def _refused_on_cpu(data: dict[str, Any]) -> list[Unsupported]:
    """What the trainer would refuse in the raw rehearsal config on CPU ranks without
    Transformer Engine (`launch/support.unsupported`)."""
    cfg = resolve(from_dict(RunConfig, data), RANKS)
    return unsupported(_with_engine_urls(cfg), cuda=False, te=False)


def _fit_to_cpu(data: dict[str, Any], notes: list[str]) -> None:
    """Turn off, in place, what the trainer refuses on CPU ranks, as `launch/support.py` says it
    at the time: context parallelism (the portable layer spec has none), the distributed
    optimizer (its state reloads only with Transformer Engine's Adam), activation recompute under
    routing replay (while replay refuses it). What is left is `warnings`' to say."""
    actor, par = data["actor"], data["parallel"]
    for _ in range(3):  # a fix can clear another rule's item (cp=1 also clears replay's cp)
        fixed = False
        for item in _refused_on_cpu(data):
            if item.key == "parallel.cp" and par.get("cp", 1) > 1:
                notes.append(f"dropped: parallel.cp={par['cp']} (on CPU: {item.why})")
                par["cp"], fixed = 1, True
            elif item.key == "actor.use_distributed_optimizer" and actor.get(
                    "use_distributed_optimizer"):
                notes.append(f"replaced: distributed optimizer -> off (on CPU: {item.why})")
                actor["use_distributed_optimizer"], fixed = False, True
            elif (item.key == "rollout.routing_replay" and "recompute" in item.why
                  and actor.get("recompute", "none") != "none"):
                notes.append(f"replaced: actor.recompute={actor['recompute']} -> none "
                             f"({item.why})")
                actor["recompute"], fixed = "none", True
        if not fixed:
            return


def rehearsal_config(path: str, overrides: Sequence[str] = (), world_size: int = RANKS
                     ) -> RunConfig:
    """The rehearsal of the config at `path`, `overrides` applied after, loaded and validated
    for `world_size` ranks (as `megatron-rl train` would). Raises ConfigError."""
    with rehearsal_file(path) as (rehearsal, _):
        return load_config(rehearsal, list(overrides), world_size=world_size)


@contextlib.contextmanager
def rehearsal_file(path: str) -> Iterator[tuple[Path, list[str]]]:
    """The rehearsal config of `path` written to a temporary file (the job embeds the resolved
    config, so nothing needs to outlive the submission), and the lines saying what changed."""
    data, notes = rehearsal_data(read_yaml(path))
    with tempfile.TemporaryDirectory(prefix="megatron-rl-rehearsal-") as tmp:
        out = Path(tmp) / f"{data['slurm']['job_name']}.yaml"
        out.write_text(f"# The rehearsal of {path} (megatron-rl submit --rehearse)\n"
                       + yaml.safe_dump(data, sort_keys=False))
        yield out, notes


def warnings(path: str, rehearsal: RunConfig, workdir: Path) -> list[str]:
    """What the trainer would refuse (`launch/support.unsupported`): in the config at `path` as
    written, on its cluster (GPUs and Transformer Engine when it asks for GPUs), and in the
    rehearsal on CPU ranks with the engine URLs its script fills in."""
    from megatron_rl.launch.slurm import load_job_config

    lines = []
    try:
        cfg = load_job_config(path, [], workdir)
    except ConfigError as err:
        lines.append(f"WARNING: {path} as written does not load: {err}")
    else:
        lines += [f"WARNING: {path} as written would be refused on its cluster: {item}"
                  for item in unsupported(cfg, cuda=cfg.slurm.gpus_per_node > 0)]
    lines += [f"WARNING: the rehearsal would be refused: {item}"
              for item in unsupported(_with_engine_urls(rehearsal), cuda=False, te=False)]
    return lines
