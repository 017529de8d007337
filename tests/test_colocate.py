"""Colocation (docs/design.md section 6): the engines and the actor time-share the devices.

Through `Trainer` with the embedded engine (SGLang's stand-in on CPU, which keeps SGLang's
release/resume rules): every step runs offload(grads, optimizer) -> resume engine weights ->
sync -> offload(params) -> resume KV cache -> generate -> release engine -> onload -> train,
and the engine ends up with the actor's weights. `Actor.offload` really releases the storage:
a forward while offloaded fails, and after `onload` the weights and a training step are bitwise
those of an actor that was never offloaded (plain and distributed optimizer).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from rank_batches import ok, run_batch

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/tiny_moe_cpu.yaml")


def _record(log: list[str], obj, name: str, label: str | None = None) -> None:
    fn = getattr(obj, name)

    def wrapped(*args, **kwargs):
        tags = args[0] if name.endswith("memory_occupation") and args else kwargs.get("tags")
        log.append(f"{label or name}({tags})" if name.endswith("occupation")
                   else label or name)
        return fn(*args, **kwargs)

    setattr(obj, name, wrapped)


def colocated_worker(out: str) -> dict:
    from megatron_rl.config import load_config
    from megatron_rl.trainer import Trainer

    cfg = load_config(TINY, [
        "rollout.prompts_per_step=2", "rollout.n_samples_per_prompt=4",
        "rollout.max_new_tokens=8", "actor.seq_length=64", "actor.micro_batch_size=2",
        "data.train_size=100", "data.eval_size=10", "rewards.num_workers=0",
        "algorithm.dynamic_sampling=false", f"data.tokenizer_cache={out}/tok",
        f"train.output_dir={out}/run", "logging.tensorboard=false", "logging.plot=false",
        f"checkpoint.dir={out}/ckpt", "checkpoint.save_interval=0",
    ], world_size=int(os.environ["WORLD_SIZE"]))
    trainer = Trainer(cfg)
    assert cfg.rollout.colocated  # the in-process engine's default
    log: list[str] = []
    engine, actor = trainer.engine, trainer.actor
    for name in ("generate", "release_memory_occupation", "resume_memory_occupation",
                 "flush_cache"):
        _record(log, engine, name)
    _record(log, engine, "update_weights_from_tensor", "sync")
    _record(log, actor, "train_step")
    original = actor.offload

    def offload(params: bool = True) -> None:
        log.append("offload(params)" if params else "offload(grads, optimizer)")
        original(params)

    actor.offload = offload
    _record(log, actor, "onload")
    trainer.run(steps=2)
    steps_log = list(log)
    trainer.to_rollout()
    trainer.to_training()
    from megatron_rl.actor.step import MicroBatch

    ids = torch.arange(1, 17)[None]
    engine_lp = torch.log_softmax(engine.model(ids[:, :-1]).logits.float(), -1)
    engine_lp = engine_lp.gather(-1, ids[:, 1:, None])[..., 0]
    actor_lp = actor.logprobs([MicroBatch(ids[:, :-1], ids[:, 1:], torch.ones(1, 15))])[0]
    return {"log": steps_log, "gap": float((engine_lp - actor_lp).abs().max())}


def _squash(log: list[str]) -> list[str]:
    """Runs of the same call as one (a sync is many buckets; a step many generate calls)."""
    out: list[str] = []
    for x in log:
        if not out or out[-1] != x:
            out.append(x)
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """This module's workers in turn in one 1-rank spawn: {name: result}."""
    calls = {"colocated": (colocated_worker, (str(tmp_path_factory.mktemp("colocated")),))}
    for dist_opt in (False, True):
        calls[f"offload-{dist_opt}"] = (offload_worker, (dist_opt,))
        calls[f"reference-{dist_opt}"] = (reference_worker, (dist_opt,))
    return {name: res for name, (res,) in zip(calls, run_batch(1, list(calls.values())),
                                                strict=True)}


def test_trainer_runs_the_colocated_sequence(runs: dict) -> None:
    result = ok(runs["colocated"])
    step = ["offload(grads, optimizer)", "resume_memory_occupation(['weights'])", "sync",
            "flush_cache", "offload(params)", "resume_memory_occupation(['kv_cache'])",
            "generate", "release_memory_occupation(None)", "onload", "train_step"]
    assert _squash(result["log"]) == step + step
    assert result["gap"] < 1e-4  # the engine holds the actor's latest weights


def _trained_actor(distributed_optimizer: bool):
    """The tiny MoE actor after one training step (optimizer state exists), its micro-batch
    and loss."""
    from megatron_rl.actor.actor import Actor
    from megatron_rl.actor.config import ActorConfig, ModelConfig, ParallelConfig
    from megatron_rl.actor.parallel import init_distributed
    from megatron_rl.actor.step import MicroBatch, nll_loss
    from megatron_rl.config import read_yaml

    model_cfg = ModelConfig(**read_yaml(ROOT / "configs/tiny_moe_cpu.yaml")["model"])
    par = ParallelConfig(timeout_s=60, dp=None)
    init_distributed(par, seed=1)
    acfg = ActorConfig(seq_length=16, micro_batch_size=1, lr=1e-2,
                       use_distributed_optimizer=distributed_optimizer)
    torch.manual_seed(0)
    actor = Actor(model_cfg, par, acfg)
    ids = torch.randint(1, model_cfg.vocab_size, (1, 17),
                        generator=torch.Generator().manual_seed(3))
    mbs = [MicroBatch(ids[:, :-1], ids[:, 1:], torch.ones(1, 16))]
    actor.train_step(mbs, nll_loss(16.0))
    return actor, mbs, nll_loss(16.0)


def _weights(actor) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in actor.model[0].named_parameters()}


def offload_worker(distributed_optimizer: bool) -> dict:
    """Offload, check nothing reads the actor meanwhile, onload, train a second step."""
    actor, mbs, loss = _trained_actor(distributed_optimizer)
    before = actor.logprobs(mbs)[0]
    actor.offload(params=False)
    with pytest.raises(RuntimeError, match="offloaded"):
        actor.logprobs(mbs)
    buckets = [[(n, t.clone()) for n, t in b] for b in actor.hf_buckets(actor.arch, 2**20)]
    actor.offload(params=True)
    with pytest.raises(RuntimeError, match="offloaded"):
        list(actor.hf_buckets(actor.arch, 2**20))
    released = all(p.untyped_storage().size() == 0 or p.numel() == 0
                   for p in actor.model[0].parameters())
    actor.onload()
    after = actor.logprobs(mbs)[0]
    step = actor.train_step(mbs, loss)
    return {"before": before, "after": after, "released": released, "grad_norm": step.grad_norm,
            "weights": _weights(actor), "buckets": buckets}


def reference_worker(distributed_optimizer: bool) -> dict:
    """The same second training step without offloading."""
    actor, mbs, loss = _trained_actor(distributed_optimizer)
    step = actor.train_step(mbs, loss)
    return {"grad_norm": step.grad_norm, "weights": _weights(actor)}


@pytest.mark.parametrize("distributed_optimizer", [False, True], ids=["adam", "distopt"])
def test_offload_releases_and_restores_the_actor_exactly(distributed_optimizer: bool,
                                                        runs: dict) -> None:
    got = ok(runs[f"offload-{distributed_optimizer}"])
    ref = ok(runs[f"reference-{distributed_optimizer}"])
    assert got["released"]  # the parameters' memory was really given up
    assert torch.equal(got["before"], got["after"])
    assert got["buckets"] and all(t.numel() > 0 for b in got["buckets"] for _, t in b)
    assert got["grad_norm"] == ref["grad_norm"]
    for name, w in ref["weights"].items():
        assert torch.equal(got["weights"][name], w), name
