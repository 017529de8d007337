"""The run config: composes the components' sections and loads them from YAML.

    cfg = load_config("configs/tiny_moe_cpu.yaml", ["parallel.tp=2"], world_size=2)

YAML file -> dict -> dotted overrides -> typed frozen sections (`configurable.from_dict`: each
section is type-checked and runs its own `validate()` as it is built) -> cross-section checks
against the world size, which also fill in derived values (parallel.dp, the overlong lengths) so
the returned config is explicit. Sections live next to the component that owns them; this module
only composes and loads.
"""

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import field
from pathlib import Path
from typing import Any

import yaml

from megatron_rl.actor.config import ActorConfig, CheckpointConfig, ModelConfig, ParallelConfig
from megatron_rl.algorithms.config import AlgorithmConfig
from megatron_rl.configurable import (
    ConfigError,
    apply_overrides,
    config_error,
    divisors,
    from_dict,
    one_of,
    require,
    section,
    to_dict,
    yaml_load,
)
from megatron_rl.data.config import DataConfig
from megatron_rl.evaluate.config import EvalConfig
from megatron_rl.launch.config import SlurmConfig
from megatron_rl.metrics.config import LoggingConfig
from megatron_rl.pretrain.config import PretrainConfig
from megatron_rl.rewards.config import RewardFunctionConfig, RewardsConfig
from megatron_rl.rollout.config import RolloutConfig

__all__ = [
    "ActorConfig", "AlgorithmConfig", "CheckpointConfig", "ConfigError", "DataConfig",
    "EvalConfig", "LoggingConfig", "ModelConfig", "ParallelConfig", "PretrainConfig",
    "RewardFunctionConfig", "RewardsConfig", "RolloutConfig", "RunConfig", "TrainConfig",
    "dump_yaml", "load_config", "to_dict",
]


@section
class TrainConfig:
    """The outer RL loop: length, seed, evaluation cadence, output location."""

    steps: int = 100
    """RL steps to run."""
    seed: int = 1234
    """Global seed (model init, sampling); data has its own seed."""
    eval_interval: int = 0
    """Evaluate every N steps; 0 = never during training."""
    output_dir: str = "outputs/run"
    """Directory of the run: resolved config, rollouts, plots."""

    def validate(self) -> None:
        """Positive step count, non-negative interval."""
        require(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}", "e.g. 100")
        require(self.eval_interval >= 0, "eval_interval", f"must be >= 0, got {self.eval_interval}",
                "use 0 to disable evaluation")
        require(bool(self.output_dir.strip()), "output_dir", "is empty", "give a directory path")


@section
class RunConfig:
    """Everything one run needs, one section per component."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Model architecture."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout (dp resolved against the world size at load time)."""
    actor: ActorConfig = field(default_factory=ActorConfig)
    """Optimizer and micro-batching of the policy."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Generation engine and sampling."""
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    """Advantages, loss, KL, shaping."""
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    """Reward functions."""
    data: DataConfig = field(default_factory=DataConfig)
    """Prompt dataset."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics output."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint saving and initial weights."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The outer loop."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation (pass@k, cons@k, avg@k)."""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    """The demo's base model, pre-trained when no checkpoint.load is given."""
    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """The sbatch job of `megatron-rl submit` (ignored by `train`)."""


def load_config(
    path: str | os.PathLike[str] | None,
    overrides: Sequence[str] = (),
    world_size: int | None = None,
    model: ModelConfig | None = None,
) -> RunConfig:
    """Load, override, type-check, validate and resolve a run config.

    `model`, when given, replaces the model section (e.g. the architecture read from a
    checkpoint) before validation, so the cross-checks use it.

    `path` None means all defaults. `overrides` are `a.b.c=value` strings (values read as YAML),
    applied in order after the file. `world_size` None reads the WORLD_SIZE environment variable
    (default 1); this is the only place in the project that reads it for configuration.
    Raises ConfigError (a ValueError) with a one-line message naming the key and the fix.
    """
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(RunConfig, data, overrides)
    cfg = from_dict(RunConfig, data)
    if model is not None:
        cfg = dataclasses.replace(cfg, model=model)
    return resolve(cfg, _world_size(world_size))


def resolve(cfg: RunConfig, world_size: int) -> RunConfig:
    """Cross-section checks for `world_size` ranks; returns cfg with derived values filled in."""
    parallel = _resolve_parallel(cfg.parallel, world_size)
    if parallel.sequence_parallel is None:
        parallel = dataclasses.replace(
            parallel, sequence_parallel=cfg.model.num_experts > 0 and parallel.tp > 1)
    _check_model_parallel(cfg.model, parallel, world_size)
    _check_lengths(dataclasses.replace(cfg, parallel=parallel))
    algorithm = _resolve_algorithm(cfg.algorithm, cfg.rollout)
    return dataclasses.replace(cfg, parallel=parallel, algorithm=algorithm)


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML config file into a dict; errors name the file."""
    name = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise config_error(name, "config file not found",
                           "pass an existing YAML file, e.g. configs/tiny_moe_cpu.yaml") from None
    except OSError as err:
        raise config_error(name, f"cannot read config file ({err.strerror})",
                           "check the path and its permissions") from None
    try:
        data = yaml_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise config_error(name, f"invalid YAML{where}", "fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise config_error(name, f"top level is a {type(data).__name__}, not a mapping",
                           "write sections as `model:`, `parallel:`, ... at the top level")
    return data


def dump_yaml(cfg: RunConfig, path: str | os.PathLike[str]) -> None:
    """Write the resolved config as YAML (e.g. beside a run); `load_config` reads it back equal."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
    out.write_text(text, encoding="utf-8")


def _world_size(world_size: int | None) -> int:
    if world_size is None:
        raw = os.environ.get("WORLD_SIZE", "1")
        try:
            world_size = int(raw)
        except ValueError:
            raise config_error("WORLD_SIZE", f"environment variable is {raw!r}",
                               "set it to a positive integer or unset it") from None
    if world_size < 1:
        raise config_error("world_size", f"must be >= 1, got {world_size}", "use 1 or more ranks")
    return world_size


def _resolve_parallel(par: ParallelConfig, world: int) -> ParallelConfig:
    """Check tp*pp*cp*dp == world (deriving dp when unset) and Megatron's expert-parallel rule."""
    model_par = par.tp * par.pp * par.cp
    fits = [world // model_par] if world % model_par == 0 else []
    if par.dp is None:
        require(bool(fits), "parallel",
                f"tp*pp*cp = {par.tp}*{par.pp}*{par.cp} = {model_par} does not divide "
                f"world size {world}",
                f"choose tp, pp, cp whose product divides {world}, or run on a multiple of "
                f"{model_par} ranks")
        par = dataclasses.replace(par, dp=fits[0])
    total = model_par * par.dp
    require(total == world, "parallel.dp",
            f"tp*pp*cp*dp = {par.tp}*{par.pp}*{par.cp}*{par.dp} = {total} != world size {world}",
            f"choose dp in {{{', '.join(map(str, fits))}}} or dp=null to derive it" if fits
            else f"choose tp*pp*cp dividing {world}")
    expert_par = par.expert_tp * par.ep * par.pp
    require(world % expert_par == 0, "parallel.ep",
            f"etp*ep*pp = {par.expert_tp}*{par.ep}*{par.pp} = {expert_par} does not divide "
            f"world size {world} (Megatron expert-parallel rule)",
            f"choose ep in {one_of(divisors(world // (par.expert_tp * par.pp)))}"
            if world % (par.expert_tp * par.pp) == 0 else "choose etp*pp dividing the world size")
    if par.virtual_pp is not None:
        require(par.pp > 1, "parallel.virtual_pp", "the interleaved schedule needs pp > 1",
                "set parallel.pp > 1 or parallel.virtual_pp=null")
    return par


def _divisible(n: int, by: int, key: str, what: str, fix_key: str, fits: int | None = None
               ) -> None:
    """Require n % by == 0 with a message listing the sizes of `fix_key` that would work: the
    divisors of `fits` (every size `fix_key` must divide, e.g. all of tp's) or else of n."""
    require(n % by == 0, key, f"{what}={n} is not divisible by {fix_key.split('.')[-1]}={by}",
            f"choose {fix_key} in {one_of(divisors(fits or n))}")


def _check_model_parallel(model: ModelConfig, par: ParallelConfig, world: int) -> None:
    """Shapes must split evenly over tp, pp (and vpp), ep and etp (Megatron's requirements)."""
    groups = model.num_query_groups or model.num_attention_heads
    by_tp = [model.num_attention_heads, groups, model.ffn_hidden_size]
    if model.num_experts and model.moe_shared_expert_intermediate_size is not None:
        by_tp.append(model.moe_shared_expert_intermediate_size)
    tp_fits = math.gcd(*by_tp)  # a tp that divides one of them must divide them all
    _divisible(model.num_attention_heads, par.tp, "parallel.tp", "model.num_attention_heads",
               "parallel.tp", tp_fits)
    _divisible(groups, par.tp, "parallel.tp", "model.num_query_groups", "parallel.tp", tp_fits)
    _divisible(model.ffn_hidden_size, par.tp, "parallel.tp", "model.ffn_hidden_size",
               "parallel.tp", tp_fits)
    last = par.pp_last_stage_layers
    if last is not None:  # Megatron: the other pp-1 stages split the rest evenly
        rest = model.num_layers - last
        require(0 < last < model.num_layers and rest % (par.pp - 1) == 0,
                "parallel.pp_last_stage_layers",
                f"{last} leaves {rest} of model.num_layers={model.num_layers} layers, not a "
                f"positive multiple of pp-1={par.pp - 1}",
                "choose it so that num_layers - pp_last_stage_layers splits over pp-1 stages")
    stages = par.pp * (par.virtual_pp or 1)
    require(last is not None or model.num_layers % stages == 0, "parallel.pp",
            f"model.num_layers={model.num_layers} is not divisible by pp*virtual_pp={stages}",
            f"choose pp*virtual_pp in {one_of(divisors(model.num_layers))} or set "
            "parallel.pp_last_stage_layers")
    if model.num_experts == 0:
        require(par.ep == 1, "parallel.ep", f"ep={par.ep} needs an MoE model",
                "set model.num_experts > 0 or parallel.ep=1")
        return
    _divisible(model.num_experts, par.ep, "parallel.ep", "model.num_experts", "parallel.ep")
    moe_ffn = model.moe_ffn_hidden_size or model.ffn_hidden_size
    _divisible(moe_ffn, par.expert_tp, "parallel.etp", "model.moe_ffn_hidden_size",
               "parallel.etp")
    if model.moe_shared_expert_intermediate_size is not None:
        _divisible(model.moe_shared_expert_intermediate_size, par.tp, "parallel.tp",
                   "model.moe_shared_expert_intermediate_size", "parallel.tp", tp_fits)
    require(par.sequence_parallel or par.tp == 1, "parallel.sequence_parallel",
            "Megatron's MoE layer refuses to train with tp > 1 without sequence parallelism",
            "set parallel.sequence_parallel=true (or leave it unset: it then follows tp)")


def _check_lengths(cfg: RunConfig) -> None:
    """Response, sequence and position lengths fit each other; cp splits the sequence evenly."""
    seq = cfg.actor.seq_length
    require(cfg.rollout.max_new_tokens < seq, "rollout.max_new_tokens",
            f"{cfg.rollout.max_new_tokens} leaves no room for the prompt in "
            f"actor.seq_length={seq}", "use rollout.max_new_tokens < actor.seq_length")
    require(seq <= cfg.model.max_position_embeddings, "actor.seq_length",
            f"{seq} exceeds model.max_position_embeddings={cfg.model.max_position_embeddings}",
            "shorten actor.seq_length or raise model.max_position_embeddings")
    cp = cfg.parallel.cp
    if cp > 1:
        require(seq % (2 * cp) == 0, "actor.seq_length",
                f"{seq} is not divisible by 2*cp={2 * cp} (context parallel load balancing)",
                f"use a multiple of {2 * cp}")
    require(not cfg.rollout.async_generation or cfg.algorithm.tis_cap is not None,
            "rollout.async_generation", "one-step-stale samples need the importance-sampling "
            "correction against the engine's log-probs",
            "set algorithm.tis_cap (e.g. 2.0) or rollout.async_generation=false")
    require(cfg.actor.max_tokens_per_micro_batch is None or cfg.parallel.pp == 1,
            "actor.max_tokens_per_micro_batch", "token-budget micro-batches change shape, and "
            f"a pipeline schedule (parallel.pp={cfg.parallel.pp}) needs one shape",
            "use actor.micro_batch_size (rows are still cut to the update's longest) or pp=1")
    require(not (cfg.actor.share_prompts and cfg.model.multi_latent_attention),
            "actor.share_prompts", "multi-latent attention applies its RoPE inside the "
            "attention, which takes no per-token positions here",
            "set actor.share_prompts=false for this model")
    if cfg.rollout.routing_replay:
        require(cfg.model.num_experts > 0, "rollout.routing_replay", "needs an MoE model",
                "set model.num_experts > 0 or rollout.routing_replay=false")
    samples = cfg.rollout.prompts_per_step * cfg.rollout.n_samples_per_prompt
    per_update = cfg.actor.micro_batch_size * (cfg.parallel.dp or 1)
    require(samples >= cfg.algorithm.mini_batches * per_update, "algorithm.mini_batches",
            f"{cfg.algorithm.mini_batches} mini-batches of at least micro_batch_size*dp = "
            f"{per_update} samples do not fit in a step's {samples} samples",
            f"use algorithm.mini_batches <= {max(1, samples // per_update)}")
    require(cfg.rollout.over_sampling == 1.0 or cfg.algorithm.dynamic_sampling,
            "rollout.over_sampling", f"{cfg.rollout.over_sampling} draws extra prompts only for "
            "dynamic sampling, which is off (every drawn group is kept)",
            "set algorithm.dynamic_sampling=true or rollout.over_sampling=1.0")
    group = cfg.rollout.n_samples_per_prompt
    needs_group = cfg.algorithm.advantage_estimator == "rloo" or cfg.algorithm.dynamic_sampling
    require(group >= 2 or not needs_group, "rollout.n_samples_per_prompt",
            f"{group} sample per prompt cannot give a group baseline (rloo/dynamic sampling)",
            "use rollout.n_samples_per_prompt >= 2")


def _resolve_algorithm(alg: AlgorithmConfig, rollout: RolloutConfig) -> AlgorithmConfig:
    """Fill the lengths left open: Dr.GRPO's normalising length and DAPO's overlong lengths
    default to max_new_tokens (L_cache = L_max // 4)."""
    if alg.loss_agg == "seq_mean_token_sum_norm" and alg.loss_norm_len is None:
        alg = dataclasses.replace(alg, loss_norm_len=rollout.max_new_tokens)
    if not alg.overlong_penalty:
        return alg
    max_len = alg.overlong_max_len or rollout.max_new_tokens
    cache_len = alg.overlong_cache_len or max(1, max_len // 4)
    require(cache_len < max_len, "algorithm.overlong_cache_len",
            f"{cache_len} is not below overlong_max_len={max_len}",
            "use a cache shorter than the maximum length")
    return dataclasses.replace(alg, overlong_max_len=max_len, overlong_cache_len=cache_len)
