"""Reward functions on correct, wrong, malformed and adversarial responses; registry; pool."""

import logging
import time

import pytest

from megatron_rl.rewards import REWARDS, RewardComputer, RewardInput, bind, resolve
from megatron_rl.rewards.config import RewardFunctionConfig, RewardsConfig
from megatron_rl.rewards.extract import boxed_all, extract_answer, strip_think
from megatron_rl.rewards.format import format_reward
from megatron_rl.rewards.gym import reasoning_gym_reward
from megatron_rl.rewards.language import language_reward
from megatron_rl.rewards.length import length_reward
from megatron_rl.rewards.math import math_reward


def mr(response: str, label: object, **kw) -> float:
    return math_reward("", response, label, {}, **kw)


# --- extraction -------------------------------------------------------------------------------

def test_boxed_nested_braces():
    assert boxed_all(r"so \boxed{\frac{1}{2}} and \boxed{2^{10}}") == [r"\frac{1}{2}", "2^{10}"]
    assert boxed_all(r"\boxed{\{1,2\}}") == [r"\{1,2\}"]
    assert boxed_all(r"\boxed{unclosed") == []


def test_think_block_is_ignored():
    assert strip_think("<think>\\boxed{1}</think> \\boxed{2}") == " \\boxed{2}"
    assert strip_think("reasoning \\boxed{1}</think>") == ""  # template opened <think>
    assert strip_think("<think>never closed \\boxed{1}") is None
    assert extract_answer("<think>\\boxed{1}</think>The answer is 7.") == "7"


def test_extractor_order():
    resp = "<answer>3</answer>\nAnswer: 4\nthen 5"
    assert extract_answer(resp) == "3"
    assert extract_answer(resp, ["answer_line", "answer_tag"]) == "4"
    assert extract_answer(resp, ["last_number"]) == "5"
    assert extract_answer("<answer>\\boxed{9}</answer>", ["answer_tag"]) == "9"
    with pytest.raises(ValueError, match="unknown answer extractor"):
        extract_answer("1", ["nope"])


# --- math -------------------------------------------------------------------------------------

@pytest.mark.parametrize("response, gold", [
    (r"<think>half</think> \boxed{\frac{1}{2}}", "0.5"),
    (r"\boxed{0.5}", r"\frac{1}{2}"),
    (r"\boxed{2^{10}}", "1024"),
    (r"\boxed{\frac{\sqrt{2}}{2}}", r"\sqrt{2}/2"),
    ("<answer>34</answer>", "34"),
    ("Answer: 1,024", 1024),
    ("so it is 17.", "17"),
])
def test_math_correct(response, gold):
    assert mr(response, gold) == 1.0


def test_math_wrong_and_dapo_values():
    assert mr(r"\boxed{3}", "4") == 0.0
    assert mr(r"\boxed{3}", "4", correct_reward=1.0, incorrect_reward=-1.0) == -1.0
    assert mr(r"\boxed{4}", "4", correct_reward=1.0, incorrect_reward=-1.0) == 1.0


def test_math_malformed():
    assert mr("", "4") == 0.0
    assert mr(r"\boxed{", "4") == 0.0
    assert mr("no numbers here", "4") == 0.0
    assert mr("<think>it is \\boxed{4}", "4") == 0.0  # think never closed


def test_math_boxed_only_inside_think_does_not_count():
    assert mr(r"<think>\boxed{4}</think> I am not sure.", "4") == 0.0
    assert mr(r"<think>\boxed{4}</think> \boxed{5}", "4") == 0.0


def test_math_two_answers():
    both = r"maybe \boxed{3} or \boxed{4}"
    assert mr(both, "4") == 1.0  # default: the last one, as DAPO
    assert mr(both, "3") == 0.0
    assert mr(both, "4", multiple="wrong") == 0.0
    assert mr(r"\boxed{4} so \boxed{ 4 }", "4", multiple="wrong") == 1.0  # same answer twice


def test_math_unparsable_gold_raises():
    with pytest.raises(ValueError, match="gold"):
        mr(r"\boxed{4}", "")


# --- format -----------------------------------------------------------------------------------

def test_format():
    assert format_reward("", "<think>hmm</think><answer>4</answer>", None, {}) == 1.0
    assert format_reward("...<think>", "hmm</think> <answer>4</answer>", None, {}) == 1.0
    assert format_reward("", "<think>hmm</think> \\boxed{4}", None, {}, answer="boxed") == 1.0
    bad = ["<answer>4</answer>", "<think></think><answer>4</answer>",
           "<think>a</think><answer>4</answer> trailing", "<think>a</think><answer></answer>",
           "<think>a<think>b</think><answer>4</answer>",
           "<think>a</think><answer>4</answer><think>b</think>",
           "<think>a</think>\\boxed{4", "<think>never closed"]
    for r in bad:
        assert format_reward("", r, None, {}) == 0.0, r
    bad_boxed = ["\\boxed{4}", "<think>a</think> 4", "<think>a</think>\\boxed{4",
                 "<think>\\boxed{4}</think>", "<think></think>\\boxed{4}"]
    for r in bad_boxed:
        assert format_reward("", r, None, {}, answer="boxed") == 0.0, r


# --- length and language ----------------------------------------------------------------------

def test_length():
    assert length_reward("", "x" * 25, None, {}, max_len=100) == 0.75
    assert length_reward("", "x" * 500, None, {}, max_len=100) == 0.0
    assert length_reward("", "a b c d", None, {}, target=4, unit="words") == 1.0
    assert length_reward("", "a b", None, {}, target=4, unit="words") == 0.5
    assert length_reward("", "", None, {"response_length": 50}, max_len=100,
                         unit="tokens") == 0.5
    with pytest.raises(ValueError, match="response_length"):
        length_reward("", "", None, {}, unit="tokens")


def test_language():
    assert language_reward("", "The answer is 4.", None, {}) == 1.0
    assert language_reward("", "答案是四", None, {}, script="cjk") == 1.0
    assert language_reward("", "abcd答案是四", None, {}) == 0.5
    assert language_reward("", "123 + 4", None, {}) == 0.0  # no letters
    mixed = "<think>先想一想</think>The answer"
    assert language_reward("", mixed, None, {}, part="think") == 0.0
    with pytest.raises(ValueError, match="unknown script"):
        language_reward("", "x", None, {}, script="klingon")


# --- reasoning-gym ----------------------------------------------------------------------------

def test_reasoning_gym_scorer():
    import reasoning_gym

    entry = reasoning_gym.create_dataset("basic_arithmetic", size=1, seed=3)[0]
    meta = {"task": "basic_arithmetic", "entry": entry}
    good = f"<think>compute</think><answer>{entry['answer']}</answer>"
    assert reasoning_gym_reward("", good, entry["answer"], meta) == 1.0
    assert reasoning_gym_reward("", "<answer>999999</answer>", None, meta) == 0.0
    inside = f"<think><answer>{entry['answer']}</answer></think> no idea"
    assert reasoning_gym_reward("", inside, None, meta) == 0.0
    assert reasoning_gym_reward("", "<answer>999999</answer>", None, meta,
                                incorrect_reward=-1.0) == -1.0
    with pytest.raises(ValueError, match="metadata lacks"):
        reasoning_gym_reward("", good, None, {})


def test_reasoning_gym_near_misses_get_no_partial_credit_by_default():
    entry = {"question": "q", "answer": "-9", "metadata": {}}
    meta = {"task": "chain_sum", "entry": entry}
    assert reasoning_gym_reward("", "<answer>-90</answer>", None, meta) == 0.0
    graded = reasoning_gym_reward("", "<answer>-90</answer>", None, meta, partial_credit=True)
    assert 0.0 < graded < 1.0  # the task's own string-similarity credit
    assert reasoning_gym_reward("", "<answer>-9</answer>", None, meta) == 1.0


# --- registry ---------------------------------------------------------------------------------

def test_registry_names_and_errors():
    assert {"math", "format", "code", "length", "language", "reasoning_gym"} <= set(REWARDS)
    with pytest.raises(ValueError, match="unknown reward function 'mth'.*registered: code"):
        resolve("mth")
    with pytest.raises(ValueError, match="cannot import module"):
        resolve("no_such_module_xyz:f")
    with pytest.raises(ValueError, match="has no callable"):
        resolve("megatron_rl.rewards.math:nope")
    with pytest.raises(ValueError, match=r"bad kwargs \['tolerance'\].*it takes: correct_reward"):
        bind(RewardFunctionConfig(name="math", kwargs={"tolerance": 1}), RewardsConfig())


def test_config_reward_values_are_passed():
    fn = bind(RewardFunctionConfig(name="math"), RewardsConfig(incorrect_reward=-1.0))
    assert fn("", r"\boxed{1}", "2", {}) == -1.0
    user = bind(RewardFunctionConfig(name="megatron_rl.rewards.length:length_reward",
                                     kwargs={"max_len": 10}), RewardsConfig())
    assert user("", "x" * 5, None, {}) == 0.5


# --- pool -------------------------------------------------------------------------------------

def boom(prompt, response, label, metadata):
    """A user reward that raises on one sample."""
    if response == "boom":
        raise RuntimeError("kaboom")
    return 1.0


def sleepy(prompt, response, label, metadata):
    """A user reward that hangs on one sample."""
    if response == "hang":
        time.sleep(600)
    return {"score": 0.5, "calls": 1.0}


def _config(workers: int) -> RewardsConfig:
    return RewardsConfig(functions=[
        RewardFunctionConfig(name="test_rewards:boom", weight=1.0),
        RewardFunctionConfig(name="test_rewards:sleepy", weight=2.0),
        RewardFunctionConfig(name="length", weight=1.0, kwargs={"max_len": 10}),
    ], num_workers=workers, timeout_s=1.5)


def test_pool_failures_give_zero_and_keep_the_rest(caplog):
    samples = [RewardInput("", r, None) for r in ["ok", "boom", "hang", "fine"]]
    with caplog.at_level(logging.WARNING), RewardComputer(_config(2)) as rc:
        t = time.monotonic()
        batch = rc(samples)
        assert time.monotonic() - t < 30
        again = rc(samples[:1])  # the killed worker was replaced
    assert batch.scores["test_rewards:boom"] == [1.0, 0.0, 1.0, 1.0]
    assert batch.scores["test_rewards:sleepy"] == [0.5, 0.5, 0.0, 0.5]
    assert batch.scores["length"] == [0.8, 0.6, 0.6, 0.6]
    assert batch.total == pytest.approx([2.8, 1.6, 1.6, 2.6])
    assert batch.extras["test_rewards:sleepy/calls"][0] == 1.0
    assert batch.failures == 2
    assert any("kaboom" in e for e in batch.errors)
    assert any("timed out" in e for e in batch.errors)
    assert "kaboom" in caplog.text and "timed out" in caplog.text
    assert again.failures == 0 and again.total == pytest.approx([2.8])


def test_in_process_catches_exceptions():
    cfg = RewardsConfig(functions=[RewardFunctionConfig(name="test_rewards:boom")],
                        num_workers=0)
    batch = RewardComputer(cfg)([RewardInput("", "boom", None), RewardInput("", "x", None)])
    assert batch.scores["test_rewards:boom"] == [0.0, 1.0] and batch.failures == 1


def test_computer_rejects_bad_config_at_construction():
    with pytest.raises(ValueError, match="unknown reward function"):
        RewardComputer(RewardsConfig(functions=[RewardFunctionConfig(name="nope")]))


def always_boom(prompt, response, label, metadata):
    """A broken user reward: raises on every sample."""
    raise RuntimeError("kaboom")


def test_a_reward_raising_on_every_sample_is_one_error_naming_it(caplog):
    from megatron_rl.rewards.pool import RewardFunctionError

    cfg = RewardsConfig(functions=[RewardFunctionConfig(name="test_rewards:always_boom")],
                        num_workers=0)
    samples = [RewardInput("", r, None) for r in ["a", "b", "c"]]
    expected = ("'test_rewards:always_boom' raised on all 3 samples of the batch, e.g. "
                "RuntimeError: kaboom")
    with pytest.raises(RewardFunctionError, match=expected):
        RewardComputer(cfg)(samples)
    # Failing on some samples is not broken: one warning line per function, scores 0 there.
    cfg = RewardsConfig(functions=[RewardFunctionConfig(name="test_rewards:boom")],
                        num_workers=0)
    with caplog.at_level(logging.WARNING):
        batch = RewardComputer(cfg)([RewardInput("", r, None) for r in ["boom", "x", "boom"]])
    assert batch.scores["test_rewards:boom"] == [0.0, 1.0, 0.0]
    lines = [r.getMessage() for r in caplog.records if "failed on" in r.getMessage()]
    assert lines == ["reward 'test_rewards:boom' failed on 2 of 3 samples (scored 0), e.g. "
                     "sample 0: RuntimeError: kaboom [RuntimeError: kaboom]"]
