"""Which settings of a run config the trainer path would refuse, or could not run, on the target
machine: the one list that `megatron-rl plan` turns into its CANNOT START verdict and that the
trainer can refuse a run by, before it builds anything.

    from megatron_rl.launch.support import unsupported
    for item in unsupported(cfg, cuda=True):
        print(item)   # rollout.weight_sync=tensor: <why>; <fix>

A field's own range and the checks between sections that loading a config runs (each section's
`validate()`, `config.resolve`) are not repeated here: a config that does not load never gets
this far. What is here depends on where the run goes (CUDA or not, Transformer Engine or not,
the engines of the `slurm` section) or is refused by the code that builds and runs the trainer:
`Trainer` (reward columns, saved rollouts), `Actor` (`model.hf_architecture`, routing replay,
the distributed optimizer's reload), the portable layer spec (context parallel), weight sync
and the sbatch script of `megatron-rl submit` (`launch/slurm.py`).

Where the engines are (docs/design.md sections 6-7), as both `plan` and the trainer see it:
- `rollout.load_dir`: no engine at all (nothing generates, nothing syncs);
- `slurm.engine_nodes > 0`: engine servers on nodes of their own, started by the sbatch script
  (which also sets `rollout.engine=sglang` and `rollout.engine_urls` for the trainer);
- `rollout.engine=sglang` and no engine nodes: engine servers on the trainer's nodes, started by
  the sbatch script (SGLang on GPUs, `megatron-rl serve` on CPU), which sets
  `rollout.engine_urls` to them. (Run without `submit`, the trainer uses the URLs given, or
  starts SGLang in its own process with CUDA, or the embedded engine);
- `rollout.engine=transformers`: the embedded engine on rank 0.

Torch-free, as config loading is: it reads the config and nothing else (no filesystem, no
imports of torch, Megatron-Core or SGLang), so `plan` runs anywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from megatron_rl.convert import arch_of
from megatron_rl.rewards.pool import column_names

if TYPE_CHECKING:
    from megatron_rl.config import RunConfig

OVERLONG_COLUMN = "overlong_penalty"
"""The reward column of DAPO's soft overlong punishment (`trainer.OVERLONG_COLUMN`, which
imports torch; tests/test_plan.py checks the two agree)."""


@dataclass(frozen=True)
class Unsupported:
    """One setting the trainer path would refuse or could not run."""

    key: str
    """The dotted config field, e.g. "rollout.weight_sync"."""
    value: str
    """Its value in the config, as YAML would write it (e.g. "tensor", "true", "4")."""
    why: str
    """One sentence: what fails, and where."""
    fix: str
    """One sentence: which settings would run."""

    def __str__(self) -> str:
        return f"{self.key}={self.value}: {self.why}; {self.fix}"


@dataclass(frozen=True)
class _Engines:
    """Where the rollout engines run (see the module docstring)."""

    kind: Literal["none", "embedded", "served"]
    own_nodes: bool = False
    """Served on nodes of their own (`slurm.engine_nodes > 0`)."""
    by_script: bool = False
    """Servers the sbatch script starts on the trainer's own nodes and GPUs."""
    nodes_per_engine: int = 1
    """Nodes one engine spans (`slurm.engine_tp / slurm.gpus_per_node`, at least 1)."""

    @property
    def colocated(self) -> bool:
        """The engines share the trainer's host and GPUs."""
        return self.kind == "embedded" or self.by_script


def _engines(cfg: RunConfig, cuda: bool) -> _Engines:
    ro, slurm = cfg.rollout, cfg.slurm
    if ro.load_dir is not None:
        return _Engines("none")
    span = max(1, slurm.engine_tp // slurm.gpus_per_node) if slurm.gpus_per_node else 1
    if slurm.engine_nodes > 0:
        return _Engines("served", own_nodes=True, nodes_per_engine=span)
    if ro.engine != "sglang":
        return _Engines("embedded")
    # submit's script starts the servers on the trainer's nodes (SGLang on GPUs, `megatron-rl
    # serve` on CPU) and sets rollout.engine_urls to them (launch/slurm.py)
    return _Engines("served", by_script=True, nodes_per_engine=span)


def unsupported(cfg: RunConfig, *, cuda: bool = True, te: bool | None = None
                ) -> list[Unsupported]:
    """Every setting of the loaded config `cfg` that the trainer path would refuse or could not
    run on the target machine, in the order of the rules below; empty = it can start.

    `cuda`: the target has GPUs (`plan`: `slurm.gpus_per_node > 0`; the trainer:
    `torch.cuda.is_available()`). `te`: Transformer Engine really imports there
    (`actor.compat.te_available()`); None = as `cuda` (GPU installs take `.[gpu]`)."""
    te = cuda if te is None else te
    engines = _engines(cfg, cuda)
    out: list[Unsupported] = []
    for rule in _RULES:
        out += rule(cfg, engines, cuda, te)
    return out


# --------------------------------------------------------------------------------------------
# The rules: each takes (cfg, engines, cuda, te) and returns what it refuses
# --------------------------------------------------------------------------------------------

Rule = Callable[["RunConfig", "_Engines", bool, bool], list[Unsupported]]


def _architecture(cfg: RunConfig, engines: _Engines, cuda: bool, te: bool) -> list[Unsupported]:
    """`Actor` maps its weights through `model.hf_architecture` (`convert.arch_of`, which refuses
    an architecture that cannot express the model); the embedded engine is built from it, and
    the trainer's weight sync needs it when it is built (before any checkpoint loads)."""
    m = cfg.model
    if m.hf_architecture is not None:
        try:
            arch_of(m)
        except ValueError as err:
            why = str(err).removeprefix("model.hf_architecture: ")
            return [Unsupported("model.hf_architecture", m.hf_architecture, why,
                                "name the architecture of the checkpoint (e.g. qwen3_moe, "
                                "deepseek_v3, llama) and give the model section its shapes")]
        return []
    if engines.kind == "none":
        return []
    where = ("the embedded engine is built from it, and " if engines.kind == "embedded" else "")
    return [Unsupported("model.hf_architecture", "null",
                        f"{where}weight sync exports the actor's weights under its HF names",
                        "set model.hf_architecture (e.g. qwen3_moe)")]


def _weight_sync(cfg: RunConfig, engines: _Engines, cuda: bool, te: bool) -> list[Unsupported]:
    """The contract of `rollout.weight_sync` (docs/design.md section 6)."""
    ro, slurm, pp = cfg.rollout, cfg.slurm, cfg.parallel.pp
    if engines.kind == "none":
        return []
    if ro.weight_sync == "distributed":
        if engines.kind != "served":
            return [Unsupported(
                "rollout.weight_sync", "distributed",
                "it broadcasts over an update group to served engines, and this run has none "
                f"(the {engines.kind} engine on rank 0)",
                "set rollout.engine_urls or slurm.engine_nodes > 0, or "
                "rollout.weight_sync=tensor")]
        if cuda and engines.by_script:
            return [Unsupported(
                "rollout.weight_sync", "distributed",
                "the engine servers share the trainer's GPUs (slurm.engine_nodes=0), and NCCL "
                "refuses an update group with two ranks on one GPU (the writer rank's and the "
                "engine's)",
                "set rollout.weight_sync=tensor, or give the engines nodes of their own "
                "(slurm.engine_nodes > 0)")]
        return []
    if ro.weight_sync != "tensor" or not cuda:
        return []
    reasons = []
    if engines.own_nodes:
        reasons.append(f"the engines run on nodes of their own (slurm.engine_nodes="
                       f"{slurm.engine_nodes})")
    if engines.nodes_per_engine > 1:
        reasons.append(f"one engine spans {engines.nodes_per_engine} nodes (slurm.engine_tp="
                       f"{slurm.engine_tp} > gpus_per_node={slurm.gpus_per_node})")
    if pp > 1 and engines.colocated:
        reasons.append(f"the actor's {pp} pipeline stages (parallel.pp={pp}) each send their "
                       "own layers, from ranks other than the colocated engine's")
    if not reasons:
        return []
    return [Unsupported(
        "rollout.weight_sync", "tensor",
        "it passes CUDA IPC handles, which open only on the sender's host, but "
        + " and ".join(reasons),
        "set rollout.weight_sync=distributed with the engines on nodes of their own "
        "(slurm.engine_nodes > 0)")]


def _engine_model(cfg: RunConfig, engines: _Engines, cuda: bool, te: bool) -> list[Unsupported]:
    """SGLang servers load a Hugging Face model at start: `slurm.engine_model_path`, else
    `checkpoint.load` (`launch/slurm.py`)."""
    slurm = cfg.slurm
    starts = engines.own_nodes or engines.by_script
    if not starts or slurm.engine_server != "sglang" or slurm.engine_model_path \
            or cfg.checkpoint.load:
        return []
    return [Unsupported("slurm.engine_model_path", "null",
                        "the SGLang servers `megatron-rl submit` starts need a Hugging Face model "
                        "to load, and checkpoint.load is not set either",
                        "set slurm.engine_model_path (or checkpoint.load) to an HF model dir")]


def _context_parallel(cfg: RunConfig, engines: _Engines, cuda: bool, te: bool
                      ) -> list[Unsupported]:
    """`Actor` (docs/design.md section 7): Megatron-Core's context parallelism expects each CP
    rank to be fed its own slices of every sequence (and the loss reduced over CP); the trainer
    feeds whole sequences, so cp > 1 is refused on every device."""
    cp = cfg.parallel.cp
    if cp == 1:
        return []
    return [Unsupported("parallel.cp", str(cp),
                        "context parallelism is not wired: the trainer feeds every rank whole "
                        "sequences, and Megatron-Core needs each CP rank's slices",
                        "set parallel.cp=1 (spread the sequence's memory with tp + "
                        "sequence_parallel and recompute instead)")]


def _optimizer_reload(cfg: RunConfig, engines: _Engines, cuda: bool, te: bool
                      ) -> list[Unsupported]:
    """`Actor._check_optimizer_compatible`: Megatron-Core 0.16 reloads distributed-optimizer
    state only with Transformer Engine's Adam; resuming reloads it."""
    if te or not cfg.actor.use_distributed_optimizer or not cfg.checkpoint.resume:
        return []
    return [Unsupported("actor.use_distributed_optimizer", "true",
                        "checkpoint.resume reloads the optimizer state, and without Transformer "
                        "Engine's Adam Megatron-Core 0.16 cannot reload the distributed "
                        "optimizer's",
                        "set actor.use_distributed_optimizer=false, or checkpoint.resume=false")]


def _reward_columns(cfg: RunConfig, engines: _Engines, cuda: bool, te: bool
                    ) -> list[Unsupported]:
    """`trainer.reward_columns`: DAPO's overlong column must not collide with a reward's."""
    if not cfg.algorithm.overlong_penalty:
        return []
    if OVERLONG_COLUMN not in column_names(list(cfg.rewards.functions)):
        return []
    return [Unsupported("rewards.functions", f"[..., {OVERLONG_COLUMN}, ...]",
                        f"a reward function's column is named {OVERLONG_COLUMN!r}, the column "
                        "of algorithm.overlong_penalty",
                        "rename that reward function")]


def _evaluation(cfg: RunConfig, engines: _Engines, cuda: bool, te: bool) -> list[Unsupported]:
    """`Trainer._check_saved_rollouts` (no engine to evaluate with) and `evaluate.run_eval` (no
    prompts to evaluate): `train.eval_interval > 0` evaluates during training, and `megatron-rl
    train` evaluates before and after unless `eval.size=0`."""
    ro, data = cfg.rollout, cfg.data
    evaluates = cfg.train.eval_interval > 0 or cfg.eval.size != 0
    if not evaluates:
        return []
    if ro.load_dir is not None:
        return [Unsupported("rollout.load_dir", ro.load_dir,
                            "training from saved samples runs no engine, so it cannot evaluate",
                            "set train.eval_interval=0 and eval.size=0")]
    size = data.eval_size if cfg.eval.size is None else cfg.eval.size
    if data.source in ("jsonl", "parquet") and data.eval_path is None:
        key, value, why = "data.eval_path", "null", f"a {data.source} dataset has no held-out " \
            "prompts without it, and the run evaluates"
    elif size == 0:
        key, value, why = ("eval.size" if cfg.eval.size is not None else "data.eval_size", "0",
                           "the run evaluates on no prompts")
    else:
        return []
    return [Unsupported(key, value, why, "set data.eval_path / a positive eval size, or "
                        "train.eval_interval=0 and eval.size=0")]


_RULES: tuple[Rule, ...] = (_architecture, _weight_sync, _engine_model,
                            _context_parallel, _optimizer_reload, _reward_columns, _evaluation)
