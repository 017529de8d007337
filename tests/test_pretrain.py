"""The demo's base model: worked-solution corpus and the cached short pre-training."""

import random

import pytest

from megatron_rl.config import load_config
from megatron_rl.data import build_dataset
from megatron_rl.data.records import DataError, PromptRecord
from megatron_rl.data.worked import (
    GUESS_SPREAD,
    expression_terms,
    guessed_solution,
    solution,
    worked_solution,
)
from megatron_rl.rewards.gym import reasoning_gym_reward

CHAIN = ["data.task=chain_sum", "data.train_size=200", "data.eval_size=10",
         "data.task_kwargs={min_terms: 2, max_terms: 5, min_digits: 1, max_digits: 1}"]


def _records(tmp_path, n=50):
    cfg = load_config("configs/tiny_moe_cpu.yaml", CHAIN)
    return build_dataset(cfg.data, "train").records[:n]


def test_worked_solutions_are_right_at_step_accuracy_one(tmp_path):
    rng = random.Random(0)
    for rec in _records(tmp_path):
        text = worked_solution(rec, rng, 1.0)
        assert text.startswith(" <think> ") and text.endswith(" </answer>")
        assert text.count("=") == len(expression_terms(rec)[1])
        assert reasoning_gym_reward(rec.prompt, text, rec.label, rec.metadata) == 1.0


def test_worked_solutions_slip_at_the_given_rate(tmp_path):
    rng = random.Random(0)
    recs = _records(tmp_path, 200)
    right = [reasoning_gym_reward(r.prompt, worked_solution(r, rng, 0.5), r.label, r.metadata)
             for r in recs]
    # each step slips half the time, and chains have 1-4 steps: well below 1, above 0
    assert 0.15 < sum(right) / len(right) < 0.7


def test_guesses_skip_the_reasoning_and_land_near_the_answer(tmp_path):
    rng = random.Random(0)
    recs = _records(tmp_path, 200)
    for rec in recs[:20]:
        text = guessed_solution(rec, rng)
        assert text.startswith(" <think> </think> <answer> ")
        guess = int(text.split("<answer>")[1].split("</answer>")[0])
        assert abs(guess - int(rec.label)) <= GUESS_SPREAD
    right = [reasoning_gym_reward(r.prompt, guessed_solution(r, rng), r.label, r.metadata)
             for r in recs]
    assert 0.03 < sum(right) / len(right) < 0.25  # about 1 in 2 * GUESS_SPREAD + 1


def test_work_fraction_mixes_worked_and_guessed(tmp_path):
    rng = random.Random(0)
    recs = _records(tmp_path, 200)
    worked = [" = " in solution(r, rng, 0.3, 1.0) for r in recs]
    assert 0.2 < sum(worked) / len(worked) < 0.4
    assert all(" = " in solution(r, rng, 1.0, 1.0) for r in recs[:20])
    assert not any(" = " in solution(r, rng, 0.0, 1.0) for r in recs[:20])


def test_non_chain_records_are_refused():
    rec = PromptRecord(prompt="Calculate 3 * 4.", label="12", data_source="x",
                       metadata={"entry": {"metadata": {"expression": "3 * 4"}}}, index=7)
    with pytest.raises(DataError, match="record 7.*chain_sum"):
        expression_terms(rec)
    with pytest.raises(DataError, match="metadata.expression"):
        expression_terms(PromptRecord("q", "1", "x", {}, index=0))


def test_base_model_is_pretrained_once_and_cached(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_rl.pretrain import ensure_base_model

    cfg = load_config("configs/tiny_moe_cpu.yaml", CHAIN + [
        "pretrain.steps=60", "pretrain.warmup_steps=5", "pretrain.batch_size=8",
        f"pretrain.cache_dir={tmp_path / 'base'}", f"data.tokenizer_cache={tmp_path / 'tok'}"])
    lines: list[str] = []
    out = ensure_base_model(cfg, log=lines.append)
    assert any("pretrain step 60/60" in x for x in lines)
    import json
    loss = json.loads((out / "pretrain.json").read_text())["loss"]
    assert len(loss) == 60 and loss[-1] < 0.5 * loss[0]  # it learns
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == cfg.model.vocab_size
    assert AutoTokenizer.from_pretrained(out).vocab_size <= cfg.model.vocab_size
    lines.clear()
    assert ensure_base_model(cfg, log=lines.append) == out
    assert lines == [f"base model: cached at {out}"]
