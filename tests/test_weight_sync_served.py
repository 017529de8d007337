"""Weight sync into served engines over the wire a cluster uses (docs/design.md section 6).

`torchrun --nproc-per-node 2 -m megatron_rl train` at PP=2, TP=2 (+SP) and EP=2, with two
`megatron-rl serve` processes as its engines (random weights until the first sync), and
`rollout.weight_sync=distributed`: each pipeline stage's writer forms its own gloo update group
with both servers and broadcasts its layers. After every sync the engines sample with the
actor's weights: the actor's log-probs of the engines' samples equal the engines' own (fp32),
step after step, so generation goes on with the new weights; `tensor` runs the same check with
the colocated in-process engine, stage 1 relaying to rank 0. A server killed while it receives
fails the step within the timeout, naming its URL; with a server back the run resumes from its
checkpoint, syncing by `disk` (the actor's HF checkpoint, reloaded by every engine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from megatron_rl.launch.spawn import ServeProcess

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/tiny_moe_cpu.yaml"
PARITY = 1e-3
"""Largest |actor - engine| log-prob on a trained token: fp32 with the same weights gives
~1e-6; an engine one update behind gives > 1e-2 at this learning rate."""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK")}
    return env | {"OMP_NUM_THREADS": "1"}


def _sets(tok: Path) -> list[str]:
    return [f"data.tokenizer_cache={tok}", "data.train_size=100", "data.eval_size=10"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo tokenizer, trained once before any server or trainer reads it."""
    from megatron_rl.config import load_config
    from megatron_rl.data import tokenizer_dir

    path = tmp_path_factory.mktemp("tok")
    cfg = load_config(CONFIG, _sets(path))
    tokenizer_dir(cfg.data, cfg.model.vocab_size)
    return path


class Server(ServeProcess):
    """A `megatron-rl serve --config` process (random weights of the config's model)."""

    def __init__(self, tok: Path, port: int = 0) -> None:
        super().__init__(["--config", CONFIG, "--port", str(port),
                          *[a for s in _sets(tok) for a in ("--set", s)]], ROOT, _env())
        self.url()  # waits until it listens


@pytest.fixture(scope="module")
def servers(tok: Path) -> Iterator[list[Server]]:
    """Two engines shared by the layout tests: each trainer's first sync overwrites whatever
    weights the previous one left, and forms its update groups anew."""
    both = [Server(tok), Server(tok)]
    yield both
    for s in both:
        s.stop()


def _train(tmp: Path, tok: Path, urls: list[str], *sets: str, steps: int = 2,
           timeout_s: float = 600) -> subprocess.CompletedProcess:
    engine = (["rollout.engine=sglang", f"rollout.engine_urls={json.dumps(urls)}"] if urls
              else ["rollout.engine=transformers"])
    base = [*_sets(tok), *engine, "rollout.prompts_per_step=2", "rollout.n_samples_per_prompt=4",
            "rollout.max_new_tokens=12", "actor.seq_length=64", "actor.micro_batch_size=2",
            "rewards.num_workers=0", "algorithm.dynamic_sampling=false", "eval.size=0",
            "train.eval_interval=0", f"train.steps={steps}", "checkpoint.save_interval=1",
            "rollout.request_timeout_s=20", "rollout.max_retries=0", "parallel.timeout_s=60",
            f"train.output_dir={tmp}/run", f"checkpoint.dir={tmp}/ck",
            "logging.tensorboard=false", "logging.plot=false", *sets]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "megatron_rl", "train", CONFIG, *[a for s in base for a in ("--set", s)]]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout_s)


def _steps(tmp: Path) -> list[dict]:
    rows = [json.loads(x) for x in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "mismatch/logp_abs_diff_max" in r]


LAYOUTS = {  # (served engines, settings)
    "pp2-distributed": (True, ["parallel.pp=2", "rollout.weight_sync=distributed"]),
    "tp2sp-distributed": (True, ["parallel.tp=2", "parallel.sequence_parallel=true",
                                 "rollout.weight_sync=distributed"]),
    "ep2-distributed": (True, ["parallel.ep=2", "rollout.weight_sync=distributed"]),
    # the in-process engine on rank 0, stage 1's buckets relayed to it; colocated
    "pp2-tensor-embedded": (False, ["parallel.pp=2", "rollout.weight_sync=tensor"]),
}


def _parity(tmp: Path, steps: list[int]) -> None:
    rows = _steps(tmp)
    assert [r["step"] for r in rows] == steps
    for r in rows:  # each step sampled right after a sync: engine == actor
        assert r["weight_sync/bytes"] > 0 and r["actor/skipped"] == 0.0
        assert r["mismatch/logp_abs_diff_max"] < PARITY, r
        assert r["response_length/mean"] > 0


@pytest.mark.timeout(900)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_engines_sample_with_the_actors_weights(tok: Path, servers: list[Server], layout: str,
                                                tmp_path: Path) -> None:
    served, sets = LAYOUTS[layout]
    proc = _train(tmp_path, tok, [s.url() for s in servers] if served else [], *sets, steps=2)
    assert proc.returncode == 0, proc.stderr[-4000:]
    _parity(tmp_path, [1, 2])


@pytest.mark.timeout(900)
def test_a_server_killed_mid_broadcast_fails_the_step_and_the_run_resumes(
        tok: Path, tmp_path: Path) -> None:
    """Kill one server as soon as a broadcast starts; the trainer names that URL within the
    timeout; with a server back on the same port, `--resume` continues from the checkpoint,
    now syncing by disk (every engine reloads the HF checkpoint the actor writes)."""
    servers = [Server(tok), Server(tok)]
    victim = servers[1]
    sets = ["parallel.pp=2", "rollout.weight_sync_bucket_mb=1"]
    done = threading.Event()

    def kill_at_second_sync() -> None:
        # the second sync follows step 1's checkpoint: kill the server once it exists
        ck = tmp_path / "ck"
        while not done.is_set():
            if any(ck.glob("*1*")):
                time.sleep(0.3)  # into the next step's sync
                victim.proc.kill()
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_at_second_sync, daemon=True)
    killer.start()
    try:
        start = time.monotonic()
        failed = _train(tmp_path, tok, [s.url() for s in servers], *sets,
                        "rollout.weight_sync=distributed", steps=3)
        took = time.monotonic() - start
    finally:
        done.set()
    assert failed.returncode != 0
    assert victim.url() in failed.stderr, failed.stderr[-3000:]
    assert took < 300, took
    back = Server(tok, port=victim.port)
    try:
        resumed = _train(tmp_path, tok, [servers[0].url(), back.url()], *sets,
                         "rollout.weight_sync=disk", "checkpoint.resume=true", steps=3)
    finally:
        for s in (servers[0], back):
            s.stop()
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stdout
    rows = _steps(tmp_path)
    assert rows[-1]["step"] == 3 and rows[-1]["mismatch/logp_abs_diff_max"] < PARITY
    assert list((tmp_path / "run" / "weights").glob("v*")) == [tmp_path / "run" / "weights"
                                                                 / "v2"]  # older ones removed
