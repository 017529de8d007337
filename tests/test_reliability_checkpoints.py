"""Checkpoints verified, not assumed (issue 15), each case through `Trainer` on the tiny config:

- a checkpoint saved before the first optimizer update (every step so far skipped) resumes, and
  the resumed run continues bit for bit;
- a damaged newest checkpoint (truncated, empty, deleted or garbage `.distcp`, missing
  `.metadata`, truncated `trainer_state.pt` or `common.pt`; one without a manifest that fails
  in Megatron's loader; one missing `rng_rank0.pt`) is skipped, with one line saying which and
  why, for the previous one, and the resumed run continues bit for bit;
- pruning interrupted mid-delete leaves no partial `step_<N>`, and the leftovers go at the
  next save;
- `checkpoint.load` of a damaged checkpoint or one of another model shape is one line naming
  the path and what is wrong.

One 3-step run (step 1 skipped: NaN loss) saves every step; the damage cases are copies of its
step 2 and a damaged step 3.
"""

from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path

import pytest
from test_resume import build, deterministic

from megatron_rl.launch.spawn import run_ranks

STEPS = 3
BASE = ["algorithm.dynamic_sampling=false", "rollout.over_sampling=1.0",
        "rollout.prompts_per_step=2", "rollout.n_samples_per_prompt=2",
        f"train.steps={STEPS}", "checkpoint.keep_last=0"]


def _poison_step_1(trainer) -> None:
    """Step 1's loss is NaN: its update is skipped, so step_1 holds no optimizer state."""
    make_loss = trainer.loss_fn

    def poisoned_loss(mbs):
        fn = make_loss(mbs)
        step = trainer.step

        def wrapped(logprobs, mb):
            loss, stats = fn(logprobs, mb)
            return (loss * math.nan, stats) if step == 1 else (loss, stats)

        wrapped.needs_entropy = fn.needs_entropy
        return wrapped

    trainer.loss_fn = poisoned_loss


def run_worker(extra: list[str], out: str) -> dict:
    trainer = build(BASE + extra, out)
    _poison_step_1(trainer)
    history = trainer.run()
    return {"history": history, "step": trainer.step,
            "resumed_from": str(trainer.resumed_from) if trainer.resumed_from else None}


def resume_only_worker(dirs: list[str], out: str) -> list[dict]:
    """A trainer per checkpoint dir, resuming (the run has nothing left to do): where from, or
    the error."""
    found = []
    for d in dirs:
        try:
            trainer = build(BASE + ["checkpoint.resume=true", f"checkpoint.dir={d}"], out)
            found.append({"resumed_from": str(trainer.resumed_from), "step": trainer.step})
        except Exception as e:  # noqa: BLE001 - reported to the test
            found.append({"error": f"{type(e).__name__}: {e}"})
    return found


def load_worker(cases: list[tuple[str, list[str]]], out: str) -> list[str]:
    """Build a trainer per (checkpoint.load, extra overrides); the error each raised."""
    errors = []
    for path, extra in cases:
        try:
            build(BASE + [f"checkpoint.load={path}", f"checkpoint.dir={out}/none", *extra], out)
            errors.append("")
        except Exception as e:  # noqa: BLE001 - reported to the test
            errors.append(f"{type(e).__name__}: {e}")
    return errors


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp("full")
    res = run_ranks(run_worker, 1, ["checkpoint.save_interval=1"], str(out), timeout_s=400)[0]
    history = res["history"]
    assert [m["actor/skipped"] for m in history] == [1.0, 0.0, 0.0]
    ckpt = out / "ckpt"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_1", "step_2", "step_3"]
    return history, ckpt


def test_checkpoint_before_the_first_update_resumes_exactly(full, tmp_path):
    history, ckpt = full
    shutil.copytree(ckpt / "step_1", tmp_path / "ckpt" / "step_1")
    res = run_ranks(run_worker, 1, ["checkpoint.resume=true"], str(tmp_path), timeout_s=400)[0]
    assert res["resumed_from"] == str(tmp_path / "ckpt" / "step_1") and res["step"] == STEPS
    assert deterministic(res["history"]) == deterministic(history[1:])


def _truncate(f: Path, size: int | None = None) -> None:
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2 if size is None else size])


def _garbage(f: Path) -> None:
    f.write_bytes(os.urandom(f.stat().st_size))


def _distcp(d: Path) -> Path:
    return sorted(d.glob("*.distcp"))[0]


DAMAGE = {  # name: (damage step_3, the reason its skip line gives)
    "truncated_distcp": (lambda d: _truncate(_distcp(d)), r"__0_0\.distcp is \d+ bytes, "
                                                          r"manifest says \d+"),
    "empty_distcp": (lambda d: _truncate(_distcp(d), 0), r"__0_0\.distcp is 0 bytes"),
    "deleted_distcp": (lambda d: _distcp(d).unlink(), r"__0_0\.distcp is missing"),
    "garbage_distcp": (lambda d: _garbage(_distcp(d)), r"__0_0\.distcp has CRC32 \w+, manifest "
                                                       r"says \w+"),
    "missing_metadata": (lambda d: (d / ".metadata").unlink(), r"\.metadata is missing"),
    "truncated_trainer_state": (lambda d: _truncate(d / "trainer_state.pt"),
                                r"trainer_state\.pt is \d+ bytes"),
    "truncated_common": (lambda d: _truncate(d / "common.pt"), r"common\.pt is \d+ bytes"),
    # saved before manifests: judged by its files, then Megatron's loader fails on it
    "no_manifest_garbage_distcp": (lambda d: ((d / "manifest.json").unlink(missing_ok=True),
                                              _garbage(_distcp(d))), r"failed to load \("),
    "no_manifest_missing_rng": (lambda d: ((d / "manifest.json").unlink(missing_ok=True),
                                           (d / "rng_rank0.pt").unlink()),
                                r"rng_rank0\.pt is missing$"),
}


def _damaged_copy(ckpt: Path, root: Path, damage) -> Path:
    shutil.copytree(ckpt / "step_2", root / "step_2")
    shutil.copytree(ckpt / "step_3", root / "step_3")
    damage(root / "step_3")
    return root


def test_damaged_newest_checkpoint_falls_back_to_the_previous(full, tmp_path, capfd):
    _, ckpt = full
    dirs = [_damaged_copy(ckpt, tmp_path / name, damage) for name, (damage, _) in DAMAGE.items()]
    capfd.readouterr()
    found = run_ranks(resume_only_worker, 1, [str(d) for d in dirs], str(tmp_path),
                      timeout_s=500)[0]
    console = capfd.readouterr().out
    for (name, (_, why)), d, res in zip(DAMAGE.items(), dirs, found, strict=True):
        assert res == {"resumed_from": str(d / "step_2"), "step": 2}, (name, res)
        assert re.search(f"^checkpoint step_3 skipped: {why}", console, re.M), (name, console)
    assert console.count("checkpoint step_3 skipped:") == len(DAMAGE)
    assert "Traceback" not in console


def test_damaged_resume_continues_exactly_and_cleans_leftovers(full, tmp_path, capfd):
    """A truncated newest checkpoint: the run resumes from step 2 and repeats step 3 bit for
    bit; leftovers of an interrupted prune and save are gone after its save."""
    history, ckpt = full
    root = _damaged_copy(ckpt, tmp_path / "ckpt", lambda d: _truncate(_distcp(d)))
    shutil.copytree(ckpt / "step_1", root / ".deleting-step_1")
    shutil.copytree(ckpt / "step_1", root / ".staging-step_5")
    res = run_ranks(run_worker, 1, ["checkpoint.resume=true", "checkpoint.save_interval=0"],
                    str(tmp_path), timeout_s=400)[0]
    assert "checkpoint step_3 skipped: __0_0.distcp is" in capfd.readouterr().out
    assert res["resumed_from"] == str(root / "step_2") and res["step"] == STEPS
    assert deterministic(res["history"]) == deterministic(history[2:])
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_2", "step_3"]


def test_every_checkpoint_damaged_is_one_error_not_a_fresh_start(full, tmp_path):
    _, ckpt = full
    root = tmp_path / "ckpt"
    shutil.copytree(ckpt / "step_2", root / "step_2")
    _truncate(root / "step_2" / "trainer_state.pt")
    res = run_ranks(resume_only_worker, 1, [str(root)], str(tmp_path), timeout_s=300)[0]
    assert res[0]["error"].startswith(f"CheckpointDamaged: checkpoint.resume: no checkpoint in "
                                      f"{root} could be loaded"), res


def test_interrupted_prune_leaves_no_partial_checkpoint(full, tmp_path, monkeypatch):
    """A prune killed mid-delete (after the tensors went, before the rest) must not leave a
    `step_<N>` that still looks complete."""
    from megatron_rl import run_state

    _, ckpt = full
    for step in (1, 2, 3):
        shutil.copytree(ckpt / f"step_{step}", tmp_path / f"step_{step}")

    def killed_rmtree(path, ignore_errors=False):
        path = Path(path)
        if not path.exists():
            return
        for f in path.glob("*.distcp"):
            f.unlink()
        raise KeyboardInterrupt("killed mid-delete")

    monkeypatch.setattr(run_state.shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        run_state.prune(tmp_path, 2)
    monkeypatch.undo()
    assert [s for s, _ in run_state.complete_checkpoints(tmp_path)] == [2, 3]
    assert run_state.latest_checkpoint(tmp_path, below=2) is None
    run_state.clean_leftovers(tmp_path)  # what the next save does first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_2", "step_3"]


def test_checkpoint_load_of_a_damaged_or_other_shaped_checkpoint_is_one_line(full, tmp_path):
    _, ckpt = full
    truncated = tmp_path / "truncated"
    shutil.copytree(ckpt / "step_2", truncated)
    _truncate(_distcp(truncated))
    old_truncated = tmp_path / "old_truncated"  # no manifest: Megatron's loader fails
    shutil.copytree(truncated, old_truncated)
    (old_truncated / "manifest.json").unlink(missing_ok=True)
    errors = run_ranks(load_worker, 1, [(str(truncated), []), (str(old_truncated), []),
                                        (str(ckpt / "step_2"), ["model.hidden_size=32"])],
                       str(tmp_path), timeout_s=400)[0]
    for e in errors:
        assert e.startswith("ValueError: checkpoint.load=") and "\n" not in e, e
    assert re.match(rf"ValueError: checkpoint.load='{truncated}': {truncated} is damaged: "
                    r"__0_0\.distcp is \d+ bytes, manifest says \d+$", errors[0]), errors[0]
    assert errors[1].startswith(f"ValueError: checkpoint.load='{old_truncated}': cannot load "
                                f"the weights of {old_truncated}: "), errors[1]
    assert "the model differs: hidden_size=64 saved, 32 here" in errors[2], errors[2]


def test_manifest_lists_every_file_and_verifies(full):
    import json

    from megatron_rl.run_state import MANIFEST, verify

    _, ckpt = full
    for step in (1, 2, 3):
        d = ckpt / f"step_{step}"
        listed = json.loads((d / MANIFEST).read_text())["files"]
        assert sorted(listed) == sorted(f.name for f in d.iterdir() if f.name != MANIFEST)
        assert verify(d) is None


def test_interrupted_prune_of_actor_checkpoints_leaves_no_partial_one(tmp_path, monkeypatch):
    """The same for `actor.checkpoint.prune` (checkpoints saved by `Actor.save`)."""
    from megatron_rl.actor import checkpoint

    for i, name in enumerate(["a", "b", "c"]):
        (tmp_path / name).mkdir()
        for f in ("metadata.json", "__0_0.distcp"):
            (tmp_path / name / f).write_text("x")
        os.utime(tmp_path / name, (i, i))

    def killed_rmtree(path, ignore_errors=False):
        path = Path(path)
        if path.exists():
            (path / "__0_0.distcp").unlink()
            raise KeyboardInterrupt("killed mid-delete")

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.prune(tmp_path, 2)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".deleting-a", "b", "c"]
    checkpoint.prune(tmp_path, 1)  # the leftover is not a checkpoint, and goes with b
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
