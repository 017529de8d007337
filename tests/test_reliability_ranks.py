"""A stalled or dead rank ends the job within `parallel.timeout_s`, with one line naming the rank
and what the job was doing, instead of hanging in a broadcast for `rank0_work_timeout_s`
(an hour by default); and an error in rank 0's host work stops every rank with its message."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_rl.launch.spawn import RankFailure, run_ranks

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny_moe_cpu.yaml")


def _trainer(out: str, extra: list[str]):
    import os

    from megatron_rl.config import load_config
    from megatron_rl.trainer import Trainer

    return Trainer(load_config(TINY, [
        "rollout.prompts_per_step=2", "rollout.n_samples_per_prompt=4",
        "rollout.max_new_tokens=8", "actor.seq_length=160", "actor.micro_batch_size=2",
        "data.train_size=200", "data.eval_size=20", "eval.size=0", "rewards.num_workers=0",
        "algorithm.dynamic_sampling=false", f"data.tokenizer_cache={out}/tok",
        f"train.output_dir={out}/run", f"checkpoint.dir={out}/ckpt",
        "logging.tensorboard=false", "parallel.timeout_s=10",
    ] + extra, world_size=int(os.environ["WORLD_SIZE"])))


def stalled_worker(out: str) -> None:
    import os
    import signal

    import torch.distributed as dist

    trainer = _trainer(out, [])
    trainer.train_step()  # one step
    if dist.get_rank() == 1:
        os.kill(os.getpid(), signal.SIGSTOP)  # stalled: alive, but never answers again
    trainer.train_step()


def test_a_stalled_rank_is_named_within_the_timeout(tmp_path):
    with pytest.raises(RankFailure) as failure:
        # The default rank0_work_timeout_s is an hour: finishing within this deadline means
        # rank 0 found the stalled rank by parallel.timeout_s (10 s) instead.
        run_ranks(stalled_worker, 2, str(tmp_path), timeout_s=240)
    message = str(failure.value)
    assert "rank 0 failed" in message and "RankTimeoutError" in message
    # the first point after step 1 where rank 0 waits for every rank: the colocated engine
    # takes its weights' memory back before the sync
    assert "after step 1: engines resume_memory_occupation(['weights']): rank(s) 1 did not " \
           "answer within parallel.timeout_s=10 s" in message


def failing_work_worker(out: str) -> str:
    trainer = _trainer(out, ["rollout.load_dir=" + out + "/nothing-here"])
    try:
        trainer.run(steps=1)
    except ValueError as err:
        return str(err)
    return "no error"


def test_an_error_in_rank_0s_work_stops_every_rank_with_its_message(tmp_path):
    messages = run_ranks(failing_work_worker, 2, str(tmp_path), timeout_s=240)
    assert messages[0] == messages[1] and "has no step_1.pt" in messages[0]
