"""Evaluation: pass@k / cons@k / avg@k computed by hand on scripted responses, and
`megatron-rl eval` end to end on a tiny random model through `--hf` and `--checkpoint` (which must
agree on the same weights), with one-line errors for bad paths."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from megatron_rl import cli
from megatron_rl.config import ConfigError, RunConfig, load_config
from megatron_rl.data import PromptRecord, apply_template, build_dataset
from megatron_rl.evaluate import METRICS_FILE, EvalResult, eval_data, evaluate, run_eval
from megatron_rl.evaluate.config import EvalConfig
from megatron_rl.launch.spawn import run_ranks
from megatron_rl.rewards import RewardBatch
from megatron_rl.rewards.extract import extract_answer
from megatron_rl.rollout.types import GenerateOutput

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_moe_cpu.yaml")
KS = [1, 2, 4]
KEYS = {f"eval/{m}@{k}" for m in ("pass", "cons", "avg") for k in KS} | {
    "eval/accuracy", "eval/response_length"}

# ---- metric math on scripted responses ------------------------------------------------------

# Per problem: (label, the answers of its 4 responses; None = a response without an answer).
SCRIPT = [
    ("3", ["3", "5", "3", "5"]),    # c=2; votes tie 2-2 -> first seen ("3") wins
    ("7", ["1", "1", "7", None]),   # c=1; the majority ("1") is wrong
    ("2", [None, "2", "2", "9"]),   # c=2; the first sample has no answer to vote with
]


class ScriptedEngine:
    """Answers prompt [10 + i] with SCRIPT[i]'s responses; response j has j + 1 tokens."""

    address = "scripted"

    def __init__(self) -> None:
        self.calls: list = []

    def generate(self, input_ids=None, sampling_params=None, prompt=None,
                 return_routed_experts=False):
        self.calls.append((input_ids, sampling_params))
        out = []
        for (pid,) in input_ids:
            _, answers = SCRIPT[pid - 10]
            texts = ["<think>hm</think> no idea" if a is None else
                     f"<think>hm</think> <answer> {a} </answer>" for a in answers]
            out.append([GenerateOutput(output_ids=[0] * (j + 1), output_logprobs=[0.0] * (j + 1),
                                       finish_reason="stop", text=t, prompt_ids=[pid])
                        for j, t in enumerate(texts[:sampling_params.n])])
        return out


def exact_match_rewards(inputs) -> RewardBatch:
    """Column 1 (accuracy): 1 if the tagged answer equals the label; column 2 (format): always 1,
    so a total or any other column would call every response correct."""
    acc = [1.0 if extract_answer(s.response) == s.label else 0.0 for s in inputs]
    fmt = [1.0] * len(inputs)
    return RewardBatch(scores={"accuracy": acc, "format": fmt},
                       total=[a + f for a, f in zip(acc, fmt, strict=True)], extras={},
                       failures=0, errors=[])


def _records() -> list[PromptRecord]:
    return [PromptRecord(prompt=f"q{i}", label=label, data_source="scripted", index=i)
            for i, (label, _) in enumerate(SCRIPT)]


def test_metrics_by_hand_on_scripted_responses():
    engine = ScriptedEngine()
    cfg = EvalConfig(n_samples=4, k=KS, temperature=0.6, batch_prompts=2)
    result = evaluate(engine, _records(), lambda rec: [10 + rec.index], exact_match_rewards, cfg,
                      max_new_tokens=8, accuracy="accuracy", correct_reward=1.0, seed=5)
    # correct: [1,0,1,0], [0,0,1,0], [0,1,1,0]; pass@2 = 1 - C(n-c,2)/C(4,2): 5/6, 1/2, 5/6.
    expected = {
        "eval/pass@1": (0.5 + 0.25 + 0.5) / 3, "eval/pass@2": (5 / 6 + 1 / 2 + 5 / 6) / 3,
        "eval/pass@4": 1.0,
        "eval/cons@1": (1 + 0 + 0) / 3, "eval/cons@2": (1 + 0 + 1) / 3,
        "eval/cons@4": (1 + 0 + 1) / 3,
        "eval/avg@1": (1 + 0 + 0) / 3, "eval/avg@2": (0.5 + 0 + 0.5) / 3,
        "eval/avg@4": (0.5 + 0.25 + 0.5) / 3,
        "eval/accuracy": 5 / 12, "eval/response_length": 2.5,
    }
    assert result.metrics == pytest.approx(expected)
    assert list(result.metrics) == list(expected)
    assert [r.correct for r in result.rows] == [[True, False, True, False],
                                                [False, False, True, False],
                                                [False, True, True, False]]
    assert result.rows[2].answers == [None, "2", "2", "9"]
    # Two batches of prompts (2 + 1), each sampled as configured, with its own seed.
    assert [len(ids) for ids, _ in engine.calls] == [2, 1]
    params = [p for _, p in engine.calls]
    assert all(p.n == 4 and p.temperature == 0.6 and p.max_new_tokens == 8 for p in params)
    assert params[0].seed is not None and params[0].seed != params[1].seed


def test_eval_config_is_validated_when_loaded():
    assert load_config(TINY, world_size=1).eval == EvalConfig()
    with pytest.raises(ConfigError, match=r"^config error: eval\.k: \[4, 8\] not in 1\.\.n_samp"):
        load_config(TINY, ["eval.n_samples=2"], world_size=1)
    with pytest.raises(ConfigError, match=r"^config error: eval\.batch_prompts: must be > 0"):
        load_config(TINY, ["eval.batch_prompts=0"], world_size=1)
    assert load_config(TINY, ["eval.size=0"], world_size=1).eval.size == 0  # train skips eval
    with pytest.raises(ConfigError, match=r"^config error: eval\.size: is -1"):
        load_config(TINY, ["eval.size=-1"], world_size=1)


# ---- which reward is accuracy: rewards.accuracy ----------------------------------------------

TWO_REWARDS = ["rewards.functions=[{name: format}, {name: reasoning_gym}]", "rewards.num_workers=0",
               "data.train_size=20", "data.eval_size=3", "eval.n_samples=4", "eval.k=[1, 4]"]


class FirstRightEngine:
    """Answers every prompt with `n` well-formatted responses of which only the first carries the
    record's label, so the format reward scores all of them 1 and reasoning_gym only the first.
    It is its own tokenizer: a prompt text encodes to its index."""

    address = "first-right"

    def __init__(self, labels: dict[str, str]) -> None:
        self.tokenizer = self
        self.texts = list(labels)
        self.labels = labels

    def encode(self, text: str) -> list[int]:
        return [self.texts.index(text)]

    def generate(self, input_ids=None, sampling_params=None, **_):
        out = []
        for (pid,) in input_ids:
            answers = [self.labels[self.texts[pid]]] + ["-987654"] * (sampling_params.n - 1)
            out.append([GenerateOutput(output_ids=[1, 2], output_logprobs=[0.0, 0.0],
                                       finish_reason="stop", prompt_ids=[pid],
                                       text=f"<think> adding up </think> <answer> {a} </answer>")
                        for a in answers])
        return out


def _first_right_eval(*overrides: str) -> tuple[RunConfig, EvalResult]:
    cfg = load_config(TINY, [*TWO_REWARDS, *overrides], world_size=1)
    records = build_dataset(eval_data(cfg), "eval").records
    labels = {apply_template(cfg.data.chat_template, r.prompt): r.label for r in records}
    return cfg, run_eval(cfg, FirstRightEngine(labels))


def test_accuracy_comes_from_the_reward_rewards_accuracy_names():
    cfg, result = _first_right_eval("rewards.accuracy=reasoning_gym")
    assert cfg.rewards.accuracy_function.name == "reasoning_gym"
    assert [r.correct for r in result.rows] == [[True, False, False, False]] * 3
    assert result.metrics["eval/accuracy"] == pytest.approx(0.25)
    assert result.metrics["eval/pass@4"] == pytest.approx(1.0)
    # Unset, the first function (format) decides: every response is well formed.
    cfg, result = _first_right_eval()
    assert cfg.rewards.accuracy is None and cfg.rewards.accuracy_function.name == "format"
    assert result.metrics["eval/accuracy"] == pytest.approx(1.0)


def test_accuracy_naming_no_configured_function_is_a_one_line_error():
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [*TWO_REWARDS, "rewards.accuracy=math"], world_size=1)
    message = str(err.value)
    assert message.startswith("config error: rewards.accuracy: 'math' is not a configured "
                              "reward function; use one of ['format', 'reasoning_gym']")
    assert "\n" not in message


# ---- `megatron-rl eval` end to end ----------------------------------------------------------


def _sets(tmp: Path | str, *extra: str) -> list[str]:
    """Tiny eval overrides: 4 problems x 4 samples x 8 tokens; tokenizer cached under tmp."""
    sets = ["data.train_size=50", "data.eval_size=4", "rewards.num_workers=0",
            f"data.tokenizer_cache={tmp}/tok", "eval.n_samples=4", f"eval.k={KS}",
            "eval.max_new_tokens=8", f"train.output_dir={tmp}/run", *extra]
    return [a for s in sets for a in ("--set", s)]


def _read(out: Path) -> tuple[list[dict], dict]:
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    return rows, json.loads((out.parent / METRICS_FILE).read_text())


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A random Qwen3-MoE of the tiny config's shape, written by `save_pretrained`."""
    import torch
    import transformers as tf

    from megatron_rl.convert.registry import ARCHS

    model_cfg = load_config(TINY, world_size=1).model
    torch.manual_seed(0)
    hf_cfg = tf.AutoConfig.for_model(**ARCHS["qwen3_moe"].hf_config(model_cfg))
    path = tmp_path_factory.mktemp("hf")
    tf.AutoModelForCausalLM.from_config(hf_cfg).save_pretrained(path)
    return path


def test_hf_model_end_to_end(hf_dir, tmp_path, capsys):
    out = tmp_path / "a" / "results.jsonl"
    assert cli.main(["eval", TINY, *_sets(tmp_path), "--hf", str(hf_dir),
                     "--out", str(out)]) == 0
    rows, metrics = _read(out)
    assert set(metrics) == KEYS
    assert 1 <= len(rows) <= 4 and all(len(r["responses"]) == 4 for r in rows)
    assert all(len(r["correct"]) == len(r["answers"]) == 4 for r in rows)
    assert metrics["eval/pass@1"] <= metrics["eval/pass@2"] <= metrics["eval/pass@4"]
    assert metrics["eval/avg@4"] == pytest.approx(metrics["eval/accuracy"])  # k = n
    assert 0 < metrics["eval/response_length"] <= 8
    table = capsys.readouterr().out
    assert "eval/pass@4" in table and "eval/response_length" in table
    # Same seed: the same responses; another seed: others.
    again = tmp_path / "b" / "results.jsonl"
    assert cli.main(["eval", TINY, *_sets(tmp_path), "--hf", str(hf_dir),
                     "--out", str(again)]) == 0
    assert _read(again) == (rows, metrics)
    reseeded = tmp_path / "c" / "results.jsonl"
    assert cli.main(["eval", TINY, *_sets(tmp_path, "train.seed=7"), "--hf", str(hf_dir),
                     "--out", str(reseeded)]) == 0
    assert [r["responses"] for r in _read(reseeded)[0]] != [r["responses"] for r in rows]


def test_hf_dir_tokenizer_is_preferred(hf_dir, tmp_path):
    """With a tokenizer in the model dir, the config's tokenizer (here a missing dir) is unused."""
    import shutil

    from megatron_rl.data import build_tokenizer

    cfg = load_config(TINY, ["data.train_size=50", f"data.tokenizer_cache={tmp_path}/tok"],
                      world_size=1)
    model_dir = tmp_path / "with_tok"
    shutil.copytree(hf_dir, model_dir)
    build_tokenizer(cfg.data, cfg.model.vocab_size).save_pretrained(model_dir)
    sets = _sets(tmp_path, f"data.tokenizer={tmp_path}/missing")
    assert cli.main(["eval", TINY, *sets, "--hf", str(hf_dir)]) == 1  # uses the config's
    assert cli.main(["eval", TINY, *sets, "--hf", str(model_dir)]) == 0
    rows, _ = _read(tmp_path / "run" / "eval_results.jsonl")
    assert len(rows) >= 1


def checkpoint_worker(tmp: str, save: bool, out: str, extra: list[str]) -> list[int]:
    """(at 1 rank, `save`) write an actor checkpoint and its HF export; then run the eval
    command through `--checkpoint` (and at 1 rank also `--hf`)."""
    import torch.distributed as dist

    from megatron_rl.actor.actor import Actor
    from megatron_rl.actor.parallel import destroy_distributed, init_distributed

    if save:
        cfg = load_config(TINY, ["actor.seq_length=64"], world_size=1)
        init_distributed(cfg.parallel, seed=3)
        actor = Actor(cfg.model, cfg.parallel, cfg.actor)
        actor.save(f"{tmp}/ckpt", "step1", with_optimizer=False)
        actor.save_hf(f"{tmp}/hf", actor.arch)
        destroy_distributed()
    codes = [cli.main(["eval", TINY, *_sets(tmp, *extra), "--checkpoint", f"{tmp}/ckpt",
                       "--out", f"{tmp}/{out}/results.jsonl"])]
    assert not dist.is_initialized()  # the command left its process groups
    if save:
        codes.append(cli.main(["eval", TINY, *_sets(tmp), "--hf", f"{tmp}/hf",
                               "--out", f"{tmp}/hf_eval/results.jsonl"]))
    return codes


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """At 1 rank: a random actor's checkpoint and HF export, each evaluated by the command."""
    tmp = tmp_path_factory.mktemp("actor")
    assert run_ranks(checkpoint_worker, 1, str(tmp), True, "ckpt_eval", [],
                     timeout_s=300) == [[0, 0]]
    return tmp


def test_checkpoint_equals_hf_export(saved):
    hf = _read(saved / "hf_eval" / "results.jsonl")
    ckpt = _read(saved / "ckpt_eval" / "results.jsonl")
    assert set(ckpt[1]) == KEYS and len(ckpt[0]) >= 1
    assert ckpt == hf  # same weights, same seed: the same responses and metrics


@pytest.mark.skipif(os.environ.get("MEGATRON_RL_SLOW") != "1",
                    reason="two more ranks (~15 s of CPU): set MEGATRON_RL_SLOW=1")
def test_checkpoint_under_two_ranks_resharded(saved):
    """As under torchrun with EP=2 (re-sharded on load): rank 0 evaluates, rank 1 only takes
    part in the weight sync, and the results equal the 1-rank HF export's."""
    extra = ["parallel.ep=2", "parallel.timeout_s=120"]
    assert run_ranks(checkpoint_worker, 2, str(saved), False, "ep2_eval", extra,
                     timeout_s=300) == [[0], [0]]
    assert _read(saved / "ep2_eval" / "results.jsonl") == _read(saved / "hf_eval" /
                                                                  "results.jsonl")


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flag", "make", "message"), [
    ("--hf", None, "not a Hugging Face model directory (directory not found)"),
    ("--hf", "dir", "not a Hugging Face model directory (no config.json)"),
    ("--hf", "config", "cannot load a Hugging Face causal LM"),
    ("--checkpoint", None, "checkpoint directory not found"),
    ("--checkpoint", "dir", "not a Megatron dist checkpoint"),
    ("--checkpoint", "metadata", "no model config/architecture recorded"),
], ids=["hf-missing", "hf-empty", "hf-no-weights", "ckpt-missing", "ckpt-empty",
        "ckpt-foreign"])
def test_bad_paths_fail_in_one_line(flag, make, message, tmp_path, capsys):
    path = tmp_path / "model"
    if make:
        path.mkdir()
    if make == "config":
        (path / "config.json").write_text(json.dumps({"model_type": "qwen3_moe"}))
    if make == "metadata":
        (path / "metadata.json").write_text("{}")
    assert cli.main(["eval", TINY, *_sets(tmp_path), flag, str(path)]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("megatron-rl eval:")]
    assert len(lines) == 1 and lines[0].startswith(f"megatron-rl eval: {path}: ")
    assert message in lines[0] and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_bad_config_and_missing_model_flag(hf_dir, tmp_path, capsys):
    assert cli.main(["eval", TINY, *_sets(tmp_path, "eval.k=[8]"), "--hf", str(hf_dir)]) == 1
    assert "config error: eval.k: [8] not in 1..n_samples=4" in capsys.readouterr().err
    assert cli.main(["eval", TINY]) == 2
    assert capsys.readouterr().err == ("megatron-rl eval: give the model to evaluate: "
                                       "--checkpoint DIR or --hf DIR\n")
    with pytest.raises(SystemExit) as info:
        cli.main(["eval", TINY, "--hf", str(hf_dir), "--checkpoint", str(hf_dir)])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
