"""Weight sync and routing replay against a Megatron-Core actor of `configs/tiny_moe_cpu.yaml`
(random weights, perturbed away from init) at 1 rank, TP=2 (sequence parallel) and EP=2.

- After `sync_weights` the engine's log-probs of a fixed sequence, and of its own samples, equal
  `actor.logprobs` (fp32), every checkpoint tensor arrives, and buckets respect their size.
- With replay on, the actor's routers choose exactly the engine's experts (forward and a
  training step); with it off, `routing/agreement` reports how far they differ.
- `update_weights_from_distributed` receives a bucket over a gloo group of its own.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import pytest
import torch
from rank_batches import ok, run_cases

from megatron_rl.launch.spawn import run_ranks

ROOT = Path(__file__).resolve().parents[1]
SEQ, BUCKET = 16, 150_000  # the largest tensor (embedding 512 x 64 fp32) is 131,072 bytes
TEMP = 0.8


class Recorder:
    """A stand-in engine that records what it is sent."""

    address = "recorder"

    def __init__(self) -> None:
        self.buckets: list[list[tuple[str, torch.Tensor]]] = []
        self.flushed = 0

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        self.buckets.append(list(named_tensors))

    def flush_cache(self) -> None:
        self.flushed += 1


def _model_cfg():
    from megatron_rl.actor.config import ModelConfig
    from megatron_rl.config import read_yaml

    return ModelConfig(**read_yaml(ROOT / "configs/tiny_moe_cpu.yaml")["model"])


def _perturb(actor, only: str = "", salt: int = 0) -> None:
    """Deterministic new weights; equal on ranks that hold the same tensor."""
    from megatron.core import parallel_state as ps

    for name, p in actor.model[0].module.named_parameters():
        if only not in name:
            continue
        seed = zlib.crc32(name.encode()) + salt
        if getattr(p, "tensor_model_parallel", False):
            seed += 1000 * ps.get_tensor_model_parallel_rank()
        if "local_experts" in name:
            seed += 7 * ps.get_expert_model_parallel_rank()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif "router" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _engine_logprobs(engine, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = engine.model(tokens[:, :-1]).logits.float() / TEMP
    return logits.log_softmax(-1).gather(-1, tokens[:, 1:, None])[..., 0]


def _mb(tokens: torch.Tensor):
    from megatron_rl.actor.step import MicroBatch

    return MicroBatch(tokens[:, :-1], tokens[:, 1:], torch.ones(tokens.shape[0], SEQ))


def sync_worker(parallel: dict, tmp: str) -> dict:
    import torch.distributed as dist

    from megatron_rl.actor import replay
    from megatron_rl.actor.actor import Actor
    from megatron_rl.actor.config import ActorConfig, ParallelConfig
    from megatron_rl.actor.parallel import init_distributed
    from megatron_rl.actor.step import nll_loss
    from megatron_rl.rollout.transformers_engine import TransformersEngine
    from megatron_rl.rollout.types import SamplingParams
    from megatron_rl.rollout.weight_sync import sync_weights

    model_cfg = _model_cfg()
    par = ParallelConfig(timeout_s=60, dp=None, **parallel)
    init_distributed(par, seed=1)
    actor = Actor(model_cfg, par, ActorConfig(seq_length=SEQ, micro_batch_size=1, lr=1e-2))
    _perturb(actor)
    rank0 = dist.get_rank() == 0
    engine = TransformersEngine.from_model_config(model_cfg) if rank0 else None
    recorder = Recorder()
    tokens = torch.randint(0, model_cfg.vocab_size, (2, SEQ + 1),
                           generator=torch.Generator().manual_seed(0))
    out: dict = {}
    if rank0:
        out["before"] = _engine_logprobs(engine, tokens)
    report = sync_weights(actor, [engine, recorder] if rank0 else [], bucket_bytes=BUCKET)
    out["report"] = report
    out["actor"] = torch.cat(actor.logprobs([_mb(tokens[i : i + 1]) for i in range(2)], TEMP))
    if rank0:
        out["after"] = _engine_logprobs(engine, tokens)
        out["buckets"] = [[(n, t.numel() * t.element_size()) for n, t in b]
                          for b in recorder.buckets]
        out["flushed"] = recorder.flushed
        engine.model.save_pretrained(tmp)
        from safetensors import safe_open

        with safe_open(str(Path(tmp) / "model.safetensors"), "pt") as f:
            out["checkpoint_names"] = sorted(f.keys())
        # The engine's own sample, with its experts: prompt 5 tokens + 12 generated.
        o = engine.generate(input_ids=[tokens[0, :5].tolist()], return_routed_experts=True,
                            sampling_params=SamplingParams(max_new_tokens=12, seed=2,
                                                           temperature=TEMP))[0][0]
        box = [(o.prompt_ids + o.output_ids, o.output_logprobs, o.routed_experts)]
    else:
        box = [None]
    dist.broadcast_object_list(box, src=0)
    ids, engine_lp, experts = box[0]
    sample = torch.tensor([ids + [0] * (SEQ + 1 - len(ids))])
    lp = actor.logprobs([_mb(sample)], TEMP)[0][0, 4 : len(ids) - 1]
    out["sample"] = (lp, torch.tensor(engine_lp))
    out.update(_replay(actor, sample, experts[: SEQ], replay, nll_loss))
    return out


def _replay(actor, sample, experts, replay, nll_loss) -> dict:
    """Route the actor away from the engine, then replay the engine's experts through the
    actor's own API (`enable_routing_replay`, `MicroBatch.routed_experts`)."""
    n = experts.shape[0]  # tokens the engine routed that the actor's forward sees
    engine_LNK = experts.permute(1, 0, 2).sort(-1).values
    # New router weights: the actor's own routing now differs from the engine's.
    _perturb(actor, only="router", salt=1)
    mb = _mb(sample)
    mb.loss_mask[:, n:] = 0.0  # positions the engine routed
    mb.routed_experts = torch.cat([experts, experts[-1:].expand(SEQ - n, -1, -1)])[None].long()
    with replay.recording(actor) as calls:
        _, agreement_off = actor.logprobs_and_routing([mb], TEMP)
    own = _gathered(calls[0], n)
    actor.enable_routing_replay()
    with replay.recording(actor) as calls:
        actor.logprobs([mb], TEMP)
    replayed = _gathered(calls[0], n)
    with replay.recording(actor) as calls:
        step = actor.train_step([mb], nll_loss(float(SEQ)), TEMP)
    trained = _gathered(calls[0], n)
    return {"engine_experts": engine_LNK, "own": own, "replayed": replayed, "trained": trained,
            "agreement_off": agreement_off, "step_updated": step.updated}


def _gathered(call: dict[int, torch.Tensor], n: int) -> torch.Tensor:
    """[L, n, K] of the first sample's first n tokens, whole sequence (gathers the SP slices)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    layers = []
    for layer in sorted(call):
        x = call[layer]
        tp = ps.get_tensor_model_parallel_world_size()
        if tp > 1 and x.shape[0] * tp == SEQ:
            parts = [torch.empty_like(x) for _ in range(tp)]
            dist.all_gather(parts, x.contiguous(), group=ps.get_tensor_model_parallel_group())
            x = torch.cat(parts)
        layers.append(x[:n])
    return torch.stack(layers)


CASES = [(1, {}), (2, {"tp": 2, "sequence_parallel": True}), (2, {"ep": 2})]


@pytest.fixture(scope="module")
def sync_runs(tmp_path_factory) -> list[list]:
    """Every case's worker; the 2-rank cases in turn in one spawn."""
    return run_cases([(world, sync_worker, (parallel, str(tmp_path_factory.mktemp("hf"))))
                      for world, parallel in CASES], timeout_s=600)


@pytest.mark.parametrize(("world", "parallel"), CASES, ids=["single", "tp2-sp", "ep2"])
def test_sync_parity_and_replay(world, parallel, sync_runs):
    results = [ok(res) for res in sync_runs[CASES.index((world, parallel))]]
    r0 = results[0]
    # Not vacuous: before the sync the engine's random init disagrees with the actor.
    assert (r0["before"] - r0["actor"]).abs().max() > 0.5
    for res in results:
        torch.testing.assert_close(res["actor"], r0["after"], rtol=1e-4, atol=1e-4)
        lp, engine_lp = res["sample"]
        torch.testing.assert_close(lp, engine_lp, rtol=1e-4, atol=1e-4)
    # Every tensor of the HF checkpoint arrived exactly once, in buckets of at most BUCKET bytes.
    names = [n for b in r0["buckets"] for n, _ in b]
    assert sorted(names) == r0["checkpoint_names"]
    sizes = [sum(s for _, s in b) for b in r0["buckets"]]
    assert max(sizes) <= BUCKET and len(sizes) > 5 and r0["flushed"] == 1
    report = r0["report"]
    assert report.bytes == sum(sizes) and report.tensors == len(names)
    assert report.max_bucket_bytes == max(sizes)
    assert results[-1]["report"].bytes == report.bytes  # summed over ranks: the same on all
    # Replay: the actor's routers picked exactly the engine's experts, forward and training.
    for res in results:
        assert torch.equal(res["replayed"], res["engine_experts"])
        assert torch.equal(res["trained"], res["engine_experts"])
        # The actor's agreement: the share of (position, layer) where its own top-k set is the
        # engine's, counted here from the recorded choices.
        expected = float((res["own"] == res["engine_experts"]).all(-1).float().mean())
        assert res["agreement_off"] == pytest.approx(expected, abs=1e-9)
        assert res["agreement_off"] < 0.9  # own routing (new router weights) differs
        assert res["step_updated"]


def test_single_oversized_tensor_gets_its_own_bucket():
    """A bucket smaller than one tensor: that tensor travels alone; order is kept."""
    from megatron_rl.convert.export import bucketed

    tensors = [("a", torch.zeros(10)), ("b", torch.zeros(100)), ("c", torch.zeros(5)),
               ("d", torch.zeros(5))]
    buckets = list(bucketed(iter(tensors), bucket_bytes=60))
    assert [[n for n, _ in b] for b in buckets] == [["a"], ["b"], ["c", "d"]]


def dist_worker(port: int) -> list[float]:
    """Rank 0 plays the trainer, rank 1 an engine; only the update group connects them."""
    import os

    from megatron_rl.rollout.weight_sync import broadcast_bucket, bucket_meta, open_update_group

    rank = int(os.environ["RANK"])
    bucket = [("model.norm.weight", torch.arange(32.0)),
              ("model.layers.0.mlp.experts.1.up_proj.weight", torch.full((16, 32), 2.0))]
    if rank == 0:
        pg, _store = open_update_group("127.0.0.1", port, 0, 2, timeout_s=30)
        broadcast_bucket(pg, bucket, timeout_s=30)
        return []
    from test_rollout_engine import _model

    from megatron_rl.rollout.transformers_engine import TransformersEngine

    engine = TransformersEngine(_model(), timeout_s=30)
    engine.init_weights_update_group("127.0.0.1", port, 1, 2, backend="gloo")
    engine.update_weights_from_distributed(**bucket_meta(bucket))
    experts = engine.model.model.layers[0].mlp.experts
    return [float(engine.model.model.norm.weight.sum()), float(experts.gate_up_proj[1, 16:].mean()),
            float(experts.gate_up_proj[1, :16].abs().sum() != 0)]


def test_update_weights_from_distributed():
    from megatron_rl.actor.parallel import free_port

    _, got = run_ranks(dist_worker, 2, free_port(), timeout_s=120)
    assert got[:2] == [496.0, 2.0] and got[2] == 1.0  # the gate half is left alone
