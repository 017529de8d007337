"""Typed config: loading the shipped YAML, overrides, type checks, cross-section checks."""

import dataclasses
from pathlib import Path

import pytest

from megatron_rl.config import (
    AlgorithmConfig,
    ConfigError,
    ModelConfig,
    RunConfig,
    dump_yaml,
    load_config,
    to_dict,
)
from megatron_rl.configurable import apply_overrides, from_dict

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_moe_cpu.yaml")


def load_error(overrides: list[str], world_size: int = 1, path: str | None = TINY) -> str:
    """Load a config expected to fail; return its message after checking it is one line."""
    with pytest.raises(ConfigError, match=r"^config error: [^:]+: .+") as info:
        load_config(path, overrides, world_size=world_size)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("config error: ")
    return message


def write_yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return str(path)


# ---- the shipped config ------------------------------------------------------------------


def test_tiny_config_loads_at_world_size_1() -> None:
    cfg = load_config(TINY, world_size=1)
    assert isinstance(cfg, RunConfig)
    assert cfg.model.num_experts == 8 and cfg.model.moe_router_topk == 2
    assert cfg.model.num_query_groups == 2 and cfg.model.hf_architecture == "qwen3_moe"
    assert cfg.parallel.dp == 1  # derived from the world size and filled in
    assert cfg.actor.lr == pytest.approx(1e-3) and cfg.actor.micro_batch_size == 4
    assert cfg.rollout.max_new_tokens == 48 and cfg.train.steps == 60
    assert cfg.rewards.functions[0].name == "reasoning_gym"


@pytest.mark.parametrize(
    ("overrides", "world", "dp"),
    [([], 2, 2), (["parallel.tp=2"], 2, 1), (["parallel.ep=2"], 2, 2),
     (["parallel.pp=2"], 4, 2), (["parallel.tp=2", "parallel.ep=2",
                                 "parallel.sequence_parallel=true"], 4, 2)],
)
def test_tiny_config_loads_at_larger_world_sizes(overrides: list[str], world: int,
                                                 dp: int) -> None:
    assert load_config(TINY, overrides, world_size=world).parallel.dp == dp


def test_world_size_read_from_env_when_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert load_config(TINY).parallel.dp == 4
    monkeypatch.delenv("WORLD_SIZE")
    assert load_config(TINY).parallel.dp == 1


def test_no_file_means_defaults() -> None:
    assert load_config(None, world_size=1).model == ModelConfig()


# ---- overrides -----------------------------------------------------------------------------


def test_overrides_change_values() -> None:
    cfg = load_config(TINY, ["actor.lr=1e-4", "rollout.engine=sglang",
                             "rollout.engine_urls=[http://a:1, http://b:2]",
                             "algorithm.dual_clip_c=3", "algorithm.dual_clip_c=null",
                             "rewards.functions.0.weight=2", "data.task_kwargs.max_value=9",
                             "model.moe_layer_freq=[0, 1]"], world_size=1)
    assert cfg.actor.lr == pytest.approx(1e-4) and isinstance(cfg.actor.lr, float)
    assert cfg.rollout.engine_urls == ["http://a:1", "http://b:2"]
    assert cfg.algorithm.dual_clip_c is None  # later overrides win
    assert cfg.rewards.functions[0].weight == 2.0
    assert cfg.data.task_kwargs == {"max_value": 9}
    assert cfg.model.moe_layer_freq == [0, 1]


def test_overrides_are_typed() -> None:
    message = load_error(["parallel.tp=two"])
    assert "parallel.tp" in message and "int" in message and "'two'" in message
    assert "parallel.sequence_parallel" in load_error(["parallel.sequence_parallel=1"])
    assert "bool" in load_error(["parallel.sequence_parallel=1"])


def test_int_accepted_for_float_but_not_bool_for_int() -> None:
    assert load_config(TINY, ["rollout.temperature=1"], world_size=1).rollout.temperature == 1.0
    assert "model.num_layers" in load_error(["model.num_layers=true"])


def test_unknown_override_key_names_dotted_key_and_valid_keys() -> None:
    message = load_error(["parallel.tpp=2"])
    assert "parallel.tpp" in message and "unknown key" in message
    assert "tp, virtual_pp" in message  # the valid keys of the section are listed
    assert "paralel" in load_error(["paralel.tp=2"])
    assert "not an index" in load_error(["rewards.functions.3.weight=1"])
    assert "model.hidden_size" in load_error(["model.hidden_size.x=1"])


def test_malformed_override() -> None:
    assert "key=value" in load_error(["parallel.tp"])


# ---- YAML errors ----------------------------------------------------------------------------


def test_unknown_yaml_key_names_dotted_key_and_valid_keys(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "model:\n  hiden_size: 64\n")
    message = load_error([], path=path)
    assert "model.hiden_size" in message and "did you mean 'hidden_size'" in message
    assert "num_experts" in message  # valid keys listed


def test_unknown_key_in_list_of_sections(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "rewards:\n  functions:\n    - name: math\n      wieght: 2\n")
    assert "rewards.functions[0].wieght" in load_error([], path=path)


def test_missing_required_key(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "rewards:\n  functions:\n    - weight: 2\n")
    assert "rewards.functions[0].name: missing required key" in load_error([], path=path)


def test_literal_violation_lists_allowed_values() -> None:
    message = load_error(["algorithm.loss_agg=mean"])
    assert "algorithm.loss_agg" in message
    assert "token_mean, seq_mean_token_mean, seq_mean_token_sum_norm" in message
    message = load_error(["algorithm.preset=ppo"])
    assert "grpo, dapo, dr_grpo, gdpo, null" in message


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    assert missing in load_error([], path=missing)


def test_yaml_not_a_mapping_names_the_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "- a\n- b\n")
    message = load_error([], path=path)
    assert path in message and "mapping" in message


def test_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "model: [unclosed\n")
    assert path in load_error([], path=path)


def test_exponent_floats_without_dot_are_floats(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "actor:\n  lr: 1e-6\n  adam_eps: 1E-8\n")
    cfg = load_config(path, world_size=1)
    assert cfg.actor.lr == pytest.approx(1e-6) and cfg.actor.adam_eps == pytest.approx(1e-8)


# ---- field-level checks ----------------------------------------------------------------------


def test_sequence_parallel_needs_tp() -> None:
    message = load_error(["parallel.sequence_parallel=true"])
    assert "parallel.sequence_parallel" in message and "tp > 1" in message


def test_moe_layer_freq_wrong_length() -> None:
    message = load_error(["model.moe_layer_freq=[1, 0, 1]"])
    assert "model.moe_layer_freq" in message and "num_layers=2" in message
    assert "0 or 1" in load_error(["model.moe_layer_freq=[1, 2]"])


def test_group_routing_consistency() -> None:
    assert "model.moe_router_group_topk" in load_error(["model.moe_router_num_groups=2"])
    message = load_error(["model.moe_router_num_groups=3", "model.moe_router_group_topk=1"])
    assert "model.moe_router_num_groups" in message and "{1, 2, 4, 8}" in message
    message = load_error(["model.moe_router_num_groups=2", "model.moe_router_group_topk=3"])
    assert "model.moe_router_group_topk" in message


def test_topk_range_and_query_groups() -> None:
    assert "model.moe_router_topk" in load_error(["model.moe_router_topk=9"])
    message = load_error(["model.num_query_groups=3"])
    assert "model.num_query_groups" in message and "{1, 2, 4}" in message


def test_data_file_source_needs_path() -> None:
    message = load_error(["data.source=jsonl"])
    assert "data.path" in message


def test_algorithm_ranges() -> None:
    assert "algorithm.dual_clip_c" in load_error(["algorithm.dual_clip_c=0.5"])
    assert "algorithm.eps_low" in load_error(["algorithm.eps_low=1.5"])
    message = load_error(["algorithm.overlong_max_len=40", "algorithm.overlong_cache_len=40"])
    assert "algorithm.overlong_cache_len" in message


# ---- cross-section checks --------------------------------------------------------------------


def test_parallel_product_must_match_world_size() -> None:
    message = load_error(["parallel.dp=2"], world_size=1)
    assert "parallel.dp" in message and "world size 1" in message and "{1}" in message
    message = load_error(["parallel.tp=2"], world_size=3)
    assert "parallel" in message and "does not divide world size 3" in message


def test_num_experts_divisible_by_ep() -> None:
    message = load_error(["parallel.ep=3"], world_size=3)
    assert "parallel.ep" in message and "model.num_experts=8" in message
    assert "{1, 2, 4, 8}" in message
    message = load_error(["model.num_experts=0", "parallel.ep=2"], world_size=2)
    assert "parallel.ep" in message and "model.num_experts" in message


def test_heads_divisible_by_tp() -> None:
    """4 heads but 2 query groups: tp=3 is refused on the heads, and the sizes offered must
    also split the query groups (not {1, 2, 4}, which would then refuse tp=4)."""
    message = load_error(["parallel.tp=3"], world_size=3)
    assert "parallel.tp" in message and "num_attention_heads=4 is not divisible by tp=3" in message
    assert "choose parallel.tp in {1, 2}" in message, message
    assert load_config(TINY, ["parallel.tp=2"], world_size=2).parallel.tp == 2


def test_moe_with_tp_gets_sequence_parallel_unless_turned_off() -> None:
    """Megatron's MoE layer refuses tp > 1 without SP: unset follows tp, false is an error."""
    assert load_config(TINY, ["parallel.tp=2"], world_size=2).parallel.sequence_parallel
    assert not load_config(TINY, world_size=2).parallel.sequence_parallel
    dense = load_config(TINY, ["parallel.tp=2", "model.num_experts=0"], world_size=2)
    assert dense.parallel.sequence_parallel is False
    message = load_error(["parallel.tp=2", "parallel.sequence_parallel=false"], world_size=2)
    assert "parallel.sequence_parallel" in message and "sequence_parallel=true" in message


def test_layers_divisible_by_pipeline_stages() -> None:
    message = load_error(["parallel.pp=2", "parallel.virtual_pp=2"], world_size=2)
    assert "parallel.pp" in message and "num_layers=2" in message


def test_response_must_fit_sequence() -> None:
    message = load_error(["rollout.max_new_tokens=256"])
    assert "rollout.max_new_tokens" in message and "actor.seq_length" in message


def test_context_parallel_needs_even_split() -> None:
    message = load_error(["parallel.cp=2", "actor.seq_length=250"], world_size=2)
    assert "actor.seq_length" in message and "2*cp=4" in message


# ---- presets and resolution -------------------------------------------------------------------


def test_dapo_preset_fills_unset_fields_only() -> None:
    cfg = load_config(TINY, world_size=1)
    assert cfg.algorithm.preset == "dapo"
    assert cfg.algorithm.eps_high == pytest.approx(0.28)
    assert cfg.algorithm.loss_agg == "token_mean" and cfg.algorithm.dynamic_sampling
    cfg = load_config(TINY, ["algorithm.eps_high=0.3"], world_size=1)
    assert cfg.algorithm.eps_high == pytest.approx(0.3)  # explicit value wins
    assert cfg.algorithm.loss_agg == "token_mean"  # the rest of the preset still applies


def test_explicit_yaml_value_wins_over_preset(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "algorithm:\n  preset: grpo\n  kl_coef: 0.0\n")
    alg = load_config(path, world_size=1).algorithm
    assert alg.kl_coef == 0.0 and alg.loss_agg == "seq_mean_token_mean"


def test_dapo_overlong_lengths_resolved_from_rollout() -> None:
    alg = load_config(TINY, world_size=1).algorithm
    assert alg.overlong_penalty and (alg.overlong_max_len, alg.overlong_cache_len) == (48, 12)
    alg = load_config(TINY, ["algorithm.overlong_cache_len=8"], world_size=1).algorithm
    assert (alg.overlong_max_len, alg.overlong_cache_len) == (48, 8)


def test_preset_machinery_is_generic() -> None:
    data = apply_overrides(RunConfig, {}, ["algorithm.preset=dr_grpo", "algorithm.eps_low=0.1"])
    alg = from_dict(AlgorithmConfig, data["algorithm"], "algorithm")
    assert alg.advantage_estimator == "dr_grpo" and alg.eps_low == pytest.approx(0.1)


# ---- frozen, round trip -----------------------------------------------------------------------


def test_resolved_config_is_frozen() -> None:
    cfg = load_config(TINY, world_size=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.actor.lr = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.parallel = cfg.parallel  # type: ignore[misc]


def test_dump_then_load_gives_equal_config(tmp_path: Path) -> None:
    cfg = load_config(TINY, ["rewards.functions=[{name: math, kwargs: {strict: true}}]",
                             "model.moe_layer_freq=[1, 1]"], world_size=2)
    out = tmp_path / "run" / "config.yaml"
    dump_yaml(cfg, out)
    again = load_config(str(out), world_size=2)
    assert again == cfg
    assert to_dict(again) == to_dict(cfg)


def test_section_errors_name_the_full_dotted_key() -> None:
    """A section checks itself as it is built; from_dict puts the section path in front."""
    with pytest.raises(ConfigError, match=r"^config error: num_layers: must be > 0"):
        ModelConfig(num_layers=0)
    with pytest.raises(ConfigError, match=r"^config error: model\.num_layers: must be > 0"):
        from_dict(RunConfig, {"model": {"num_layers": 0}})
    with pytest.raises(ConfigError, match=r"^config error: rewards\.functions\[1\]\.name: is"):
        from_dict(RunConfig, {"rewards": {"functions": [{"name": "a"}, {"name": " "}]}})


# ---- sections built in Python behave like YAML ones --------------------------------------------


def test_python_construction_validates_and_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"^config error: eps_low: must be in \[0, 1\)"):
        AlgorithmConfig(eps_low=2.0)
    with pytest.raises(ConfigError, match=r"^config error: eps_lo: unknown key; did you mean "
                                          r"'eps_low'\?"):
        AlgorithmConfig(eps_lo=0.1)  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match=r"^config error: num_layers: got str '2'; expected int"):
        ModelConfig(num_layers="2")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^config error: model: got dict"):
        RunConfig(model={"num_layers": 2})  # type: ignore[arg-type]


def test_python_preset_fills_only_fields_not_given() -> None:
    alg = AlgorithmConfig(preset="dapo", eps_high=0.3)
    assert alg.eps_high == pytest.approx(0.3)
    assert (alg.eps_low, alg.loss_agg, alg.dynamic_sampling, alg.overlong_penalty) == (
        0.2, "token_mean", True, True)
    assert AlgorithmConfig(preset="grpo").kl_coef == pytest.approx(0.001)
    assert AlgorithmConfig(preset="grpo", kl_coef=0.0).kl_coef == 0.0  # a given default wins
    yaml_alg = load_config(None, ["algorithm.preset=dapo", "algorithm.eps_high=0.3"],
                           world_size=1).algorithm
    assert dataclasses.replace(yaml_alg, overlong_max_len=None, overlong_cache_len=None) == alg


def test_replace_revalidates_and_keeps_the_values_set() -> None:
    alg = AlgorithmConfig(preset="dapo", eps_high=0.3, kl_coef=0.01)
    again = dataclasses.replace(alg, eps_low=0.1)
    assert (again.eps_low, again.eps_high, again.kl_coef) == (0.1, 0.3, 0.01)
    assert dataclasses.replace(alg, kl_coef=0.0).kl_coef == 0.0  # preset not re-applied
    with pytest.raises(ConfigError, match=r"^config error: eps_low: "):
        dataclasses.replace(alg, eps_low=-1.0)
    with pytest.raises(ConfigError, match=r"^config error: mini_batches: got float"):
        dataclasses.replace(alg, mini_batches=2.0)
    cfg = load_config(TINY, world_size=1)
    with pytest.raises(ConfigError, match=r"^config error: steps: must be >= 1"):
        dataclasses.replace(cfg.train, steps=0)


def test_yaml_numbers_keep_todays_coercions(tmp_path: Path) -> None:
    """int for float (stored as float), exponent floats without a dot; no bool as a number, no
    string parsed into one."""
    path = write_yaml(tmp_path, "algorithm:\n  kl_coef: 0\n  dual_clip_c: 3\nactor:\n"
                                "  lr: 1e-4\n  min_lr: 0\nrollout:\n  temperature: 1\n")
    cfg = load_config(path, world_size=1)
    for value in (cfg.algorithm.kl_coef, cfg.algorithm.dual_clip_c, cfg.actor.lr,
                  cfg.actor.min_lr, cfg.rollout.temperature):
        assert type(value) is float
    assert (cfg.algorithm.kl_coef, cfg.algorithm.dual_clip_c, cfg.actor.lr) == (0.0, 3.0, 1e-4)
    assert "algorithm.kl_coef: got bool True; expected float" in load_error(
        ["algorithm.kl_coef=true"])
    assert "actor.lr: got str '1e-4x'; expected float" in load_error(["actor.lr=1e-4x"])
    assert "actor.lr: got str '0.1'; expected float" in load_error(["actor.lr='0.1'"])
    assert "model.moe_layer_freq: got list [1, 'a']; expected int or list[int]" in load_error(
        ["model.moe_layer_freq=[1, a]"])
    assert "eval.k[1]: got str 'a'; expected int" in load_error(["eval.k=[1, a]"])
    assert "data.task_kwargs (key 1)" in load_error(["data.task_kwargs={1: 2}"])
    assert "rewards.functions[0]: got int 5; expected a mapping" in load_error(
        ["rewards.functions=[5]"])
    assert from_dict(AlgorithmConfig, {"kl_coef": 0}).kl_coef == 0.0
    assert from_dict(RunConfig, {"eval": {"k": (1, 2)}}).eval.k == [1, 2]  # tuple as list


def test_configs_survive_pickle_and_deepcopy() -> None:
    import copy
    import pickle

    cfg = load_config(TINY, world_size=1)
    assert pickle.loads(pickle.dumps(cfg)) == cfg and copy.deepcopy(cfg) == cfg


def test_settings_that_nothing_would_read_are_refused() -> None:
    """No silent settings: a value only another mode reads is an error naming it."""
    message = load_error(["algorithm.overlong_penalty=false", "algorithm.overlong_max_len=40"])
    assert "algorithm.overlong_max_len" in message and "overlong_penalty" in message
    message = load_error(["algorithm.loss_norm_len=40"])  # tiny: token_mean
    assert "algorithm.loss_norm_len" in message and "seq_mean_token_sum_norm" in message
    message = load_error(["algorithm.dynamic_sampling=false", "rollout.over_sampling=2"])
    assert "rollout.over_sampling" in message and "dynamic_sampling" in message
    message = load_error(["model.kv_lora_rank=256"])  # tiny: no multi-latent attention
    assert "model.kv_lora_rank" in message and "multi_latent_attention=true" in message
    message = load_error(["model.yarn_beta_fast=16"])
    assert "model.yarn_beta_fast" in message and "rope_scaling=yarn" in message

