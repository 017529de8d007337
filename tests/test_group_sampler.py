"""GroupSampler: dynamic sampling across generation batches, max_gen_batches, over-sampling,
reports, and failover when an engine fails or hangs (deterministic fake engines)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from megatron_rl.rollout.engine import EngineError, RolloutEngine
from megatron_rl.rollout.sampler import GroupSampler, computer_reward_fn, reward_inputs
from megatron_rl.rollout.types import GenerateOutput, Sample, SamplingParams

G = 4


class FakeEngine:
    """Prompt [k] -> sample j = [k, 100 + j]; logprob -0.1 * (j + 1). Records what it served."""

    def __init__(self, address: str, fail: bool = False, hang_s: float = 0.0) -> None:
        self.address, self.fail, self.hang_s = address, fail, hang_s
        self.served: list[int] = []

    def generate(self, input_ids: Sequence[Sequence[int]] | None = None,
                 sampling_params: SamplingParams | None = None, prompt: Sequence[str] | None = None,
                 return_routed_experts: bool = False) -> list[list[GenerateOutput]]:
        if self.hang_s:
            time.sleep(self.hang_s)
        if self.fail:
            raise EngineError(f"engine at {self.address} failed: connection refused")
        n = sampling_params.n
        self.served += [ids[0] for ids in input_ids]
        return [[GenerateOutput(output_ids=[ids[0], 100 + j], output_logprobs=[-0.1 * (j + 1)] * 2,
                                finish_reason="stop", prompt_ids=list(ids)) for j in range(n)]
                for ids in input_ids]

    # The rest of the protocol: not used by the sampler.
    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True): ...
    def init_weights_update_group(self, *args, **kwargs): ...
    def update_weights_from_distributed(self, *args, **kwargs): ...
    def update_weights_from_disk(self, model_path, load_format=None): ...
    def release_memory_occupation(self, tags=None): ...
    def resume_memory_occupation(self, tags=None): ...
    def flush_cache(self): ...

    def health(self) -> bool:
        return not self.fail


def reward(samples: list[Sample]) -> list[float]:
    """Prompts k % 3 == 0 get the same reward for every sample (a zero-std group)."""
    return [1.0 if s.prompt_ids[0] % 3 == 0 else float(s.response_ids[1] % 2) for s in samples]


def sampler(engines: list[FakeEngine], target: int, **kw) -> GroupSampler:
    prompts = ([k] for k in itertools.count())
    return GroupSampler(engines, SamplingParams(max_new_tokens=2), group_size=G,
                        target_groups=target, prompts=prompts, reward_fn=reward,
                        backoff_s=0.01, **kw)


def test_fake_engine_is_a_rollout_engine() -> None:
    assert isinstance(FakeEngine("fake://0"), RolloutEngine)


def test_dynamic_sampling_fills_the_target_across_batches() -> None:
    s = sampler([FakeEngine("fake://0")], target=4, max_gen_batches=5)
    samples, rep = s.sample()
    # batch 1: prompts 0..3, groups 0 and 3 agree -> 2 kept; batch 2: 2 more prompts (4, 5)
    assert (rep.gen_batches, rep.prompts_drawn, rep.groups_seen) == (2, 6, 6)
    assert (rep.groups_kept, rep.dropped_zero_std, rep.dropped_surplus) == (4, 2, 0)
    assert rep.filled and rep.samples == len(samples) == 4 * G
    assert [s.prompt_ids[0] for s in samples[::G]] == [1, 2, 4, 5]
    assert [s.group for s in samples] == [g for g in range(4) for _ in range(G)]
    first = samples[:G]
    assert [x.response_ids for x in first] == [[1, 100 + j] for j in range(G)]
    assert [x.reward for x in first] == [0.0, 1.0, 0.0, 1.0]
    assert first[2].rollout_logprobs == pytest.approx([-0.3, -0.3])
    assert rep.response_tokens == 6 * G * 2 and rep.prompt_tokens == 6 * G
    assert rep.engine_failures == []


def test_max_gen_batches_bounds_the_step() -> None:
    s = GroupSampler([FakeEngine("fake://0")], SamplingParams(), group_size=G, target_groups=2,
                     prompts=lambda n: [[3 * k] for k in range(n)], reward_fn=reward,
                     max_gen_batches=3)
    samples, rep = s.sample()
    assert samples == [] and rep.gen_batches == 3 and not rep.filled
    assert rep.groups_seen == rep.dropped_zero_std == 6 and rep.groups_kept == 0


def test_over_sampling_draws_more_prompts_and_drops_surplus() -> None:
    s = sampler([FakeEngine("fake://0")], target=4, over_sampling=2.0, max_gen_batches=5)
    samples, rep = s.sample()
    # 8 prompts in one batch: 0, 3, 6 agree; 1, 2, 4, 5, 7 informative -> 4 kept, 1 surplus
    assert (rep.gen_batches, rep.prompts_drawn) == (1, 8)
    assert (rep.groups_kept, rep.dropped_zero_std, rep.dropped_surplus) == (4, 3, 1)
    assert [x.prompt_ids[0] for x in samples[::G]] == [1, 2, 4, 5]


def test_without_dynamic_sampling_every_group_is_kept() -> None:
    s = sampler([FakeEngine("fake://0")], target=3, dynamic_sampling=False, over_sampling=2.0)
    samples, rep = s.sample()
    assert [x.prompt_ids[0] for x in samples[::G]] == [0, 1, 2]
    assert rep.groups_kept == 3 and rep.dropped_zero_std == 0 and rep.gen_batches == 1


def test_work_is_split_across_engines() -> None:
    engines = [FakeEngine("fake://0"), FakeEngine("fake://1")]
    s = sampler(engines, target=4, dynamic_sampling=False)
    s.sample()
    assert engines[0].served == [0, 1] and engines[1].served == [2, 3]


def test_a_failing_engine_is_reported_and_another_one_used() -> None:
    bad, good = FakeEngine("http://10.0.0.9:30000", fail=True), FakeEngine("fake://good")
    s = sampler([bad, good], target=4, dynamic_sampling=False)
    samples, rep = s.sample()
    assert [x.prompt_ids[0] for x in samples[::G]] == [0, 1, 2, 3]
    assert sorted(good.served) == [0, 1, 2, 3]
    assert len(rep.engine_failures) == 1
    assert rep.engine_failures[0].startswith("http://10.0.0.9:30000: EngineError")
    samples, rep = s.sample()  # next step: the failed engine gets another chance
    assert len(samples) == 4 * G


def test_a_hung_engine_does_not_hang_the_step() -> None:
    hung, good = FakeEngine("fake://hung", hang_s=30), FakeEngine("fake://good")
    s = sampler([hung, good], target=2, dynamic_sampling=False, timeout_s=0.5)
    t0 = time.perf_counter()
    samples, rep = s.sample()
    assert time.perf_counter() - t0 < 10  # not the 30 s of the hung call
    assert len(samples) == 2 * G and good.served == [1, 0]
    assert rep.engine_failures == ["fake://hung: EngineError: engine at fake://hung did not "
                                   "answer within 0.5 s"]
    s.close()


def test_all_engines_failing_names_every_address() -> None:
    engines = [FakeEngine("http://a:1", fail=True), FakeEngine("http://b:2", fail=True)]
    s = sampler(engines, target=2, dynamic_sampling=False, max_retries=1)
    with pytest.raises(EngineError, match="all 2 rollout engines failed") as exc:
        s.sample()
    assert "http://a:1" in str(exc.value) and "http://b:2" in str(exc.value)


@dataclass
class FakeRewardBatch:
    total: list[float]
    scores: dict[str, list[float]]


def test_reward_columns_from_a_reward_computer() -> None:
    seen = []

    def computer(inputs: list) -> FakeRewardBatch:
        seen.extend(inputs)
        acc = [float(x.response.endswith("1")) for x in inputs]
        return FakeRewardBatch(total=[a + 0.5 for a in acc], scores={"acc": acc, "fmt": [1.0] *
                                                                     len(inputs)})

    class TextEngine(FakeEngine):
        def generate(self, *a, **k):
            groups = super().generate(*a, **k)
            return [[GenerateOutput(output_ids=o.output_ids, output_logprobs=o.output_logprobs,
                                    finish_reason=o.finish_reason, text=f"ans {j % 2}")
                     for j, o in enumerate(g)] for g in groups]

    @dataclass
    class Record:
        prompt: str
        label: str
        metadata: dict
        data_source: str = "synthetic"

    s = GroupSampler(TextEngine("fake://0"), SamplingParams(), group_size=2, target_groups=1,
                     prompts=iter([Record("2+2=", "4", {"task": "add"})]),
                     reward_fn=computer_reward_fn(computer), encode=lambda r: [len(r.prompt)])
    samples, rep = s.sample()
    assert [x.reward for x in samples] == [0.5, 1.5]
    assert samples[1].rewards == {"acc": 1.0, "fmt": 1.0}
    assert samples[0].prompt == "2+2=" and samples[0].label == "4"
    assert samples[0].metadata == {"task": "add", "data_source": "synthetic"}
    assert seen[0].prompt == "2+2=" and seen[0].response == "ans 0" and seen[0].label == "4"
    assert reward_inputs(samples)[1].response == "ans 1"


def test_from_config() -> None:
    from megatron_rl.config import load_config

    cfg = load_config("configs/tiny_moe_cpu.yaml", ["rollout.over_sampling=1.5"])
    s = GroupSampler.from_config([FakeEngine("fake://0")], cfg.rollout, cfg.algorithm,
                                 prompts=lambda n: [[1]] * n, reward_fn=reward)
    assert (s.group_size, s.target_groups, s.over_sampling) == (8, 8, 1.5)
    assert s.sampling.n == 8 and s.sampling.max_new_tokens == cfg.rollout.max_new_tokens
    assert s.dynamic_sampling == cfg.algorithm.dynamic_sampling
    assert s.timeout_s == cfg.rollout.request_timeout_s * (cfg.rollout.max_retries + 1) * 2
