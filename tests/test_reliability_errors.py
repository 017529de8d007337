"""Issue 15, one clear line for every error a user can cause, also during training: each case
reproduced (one line naming the culprit, exit 1, no traceback; with --debug, the traceback) and
the NaN reward that used to crash a step, the served engine without a tokenizer, the empty data
file and the config check that used to wait for torch and Megatron-Core."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

from megatron_rl import cli
from megatron_rl.data import DataConfig, DataError, build_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = "configs/tiny_moe_cpu.yaml"


def _env(**extra: str) -> dict[str, str]:
    """A single-process environment (no torchrun variables), offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    return {**env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **extra}


def _cli(*argv: str, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megatron_rl", *argv], cwd=ROOT, env=_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def _one_line(proc: subprocess.CompletedProcess, command: str, *culprits: str) -> str:
    """The error is one `megatron-rl <command>:` line naming every culprit; exit 1."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith(f"megatron-rl {command}:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    for culprit in culprits:
        assert culprit in lines[0], lines[0]
    return lines[0]


# ---- errors raised while training: one line, --debug shows the traceback -------------------


def _errors() -> list[BaseException]:
    from megatron_rl.rollout.engine import EngineError
    from megatron_rl.trainer import NonFiniteError

    return [EngineError("engine at http://10.0.0.7:30000 failed: connection refused"),
            NonFiniteError("3 steps in a row had a non-finite loss (step 4)"),
            ValueError("rollout.save_dir: /x already holds saved rollouts"),
            FileNotFoundError("checkpoint.load: /ck/step_9 not found")]


class _FailingTrainer:
    """Stands in for `Trainer`: builds, then fails in `run()` as a step would."""

    error: BaseException = RuntimeError("unset")

    def __init__(self, cfg: object) -> None:
        self.cfg, self.rank, self.resumed_from = cfg, int(os.environ.get("RANK", "0")), None

    def run(self) -> None:
        raise self.error


@pytest.fixture
def failing_trainer(monkeypatch: pytest.MonkeyPatch) -> type[_FailingTrainer]:
    import megatron_rl.trainer

    monkeypatch.setattr(megatron_rl.trainer, "Trainer", _FailingTrainer)
    return _FailingTrainer


_NO_EVAL = ["--set", "eval.size=0", "--set", "pretrain.steps=0"]


@pytest.mark.parametrize("index", range(4), ids=["EngineError", "NonFiniteError", "ValueError",
                                                  "FileNotFoundError"])
def test_training_errors_are_one_line(index: int, failing_trainer: type[_FailingTrainer],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    err = _errors()[index]
    failing_trainer.error = err
    assert cli.main(["train", TINY, *_NO_EVAL]) == 1
    captured = capsys.readouterr().err
    assert captured.strip() == f"megatron-rl train: {err}", captured
    failing_trainer.error = _errors()[index]
    with pytest.raises(type(err)):  # --debug: the error itself, with its traceback
        cli.main(["train", TINY, *_NO_EVAL, "--debug"])
    with pytest.raises(type(err)):  # also as a global flag
        cli.main(["--debug", "train", TINY, *_NO_EVAL])


def test_other_ranks_exit_quietly_with_the_same_code(failing_trainer: type[_FailingTrainer],
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    failing_trainer.error = _errors()[0]
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["train", TINY, *_NO_EVAL]) == 1
    assert capsys.readouterr().err == ""


def test_bugs_keep_their_traceback(failing_trainer: type[_FailingTrainer]) -> None:
    failing_trainer.error = KeyError("optimizer.state")
    with pytest.raises(KeyError):
        cli.main(["train", TINY, *_NO_EVAL])


_FAIL_IN_STEP = textwrap.dedent("""
    import sys
    import megatron_rl.trainer as t
    from megatron_rl.cli import main
    from megatron_rl.rollout.engine import EngineError

    class Failing:
        def __init__(self, cfg):
            self.rank, self.resumed_from = 0, None
        def run(self):
            raise EngineError("engine at http://10.0.0.7:30000 failed: connection refused")

    t.Trainer = Failing
    sys.exit(main(sys.argv[1:]))
""")


def test_training_error_in_a_process_is_one_line_and_debug_shows_the_traceback() -> None:
    args = [sys.executable, "-c", _FAIL_IN_STEP, "train", TINY, *_NO_EVAL]
    plain = subprocess.run(args, cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=300)
    _one_line(plain, "train", "http://10.0.0.7:30000")
    debug = subprocess.run([*args, "--debug"], cwd=ROOT, env=_env(), capture_output=True,
                           text=True, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert "EngineError: engine at http://10.0.0.7:30000" in debug.stderr


# ---- a reward returning NaN scores 0 and is counted, never crashes the step -----------------


def test_nan_reward_scores_zero_and_is_counted(caplog: pytest.LogCaptureFixture) -> None:
    import itertools
    import math

    from test_group_sampler import FakeEngine

    from megatron_rl.rollout.sampler import GroupSampler
    from megatron_rl.rollout.types import SamplingParams

    class Batch:  # what the trainer's reward function returns: totals and columns
        def __init__(self, samples: list) -> None:
            acc = [math.nan if s.response_ids[1] == 101 else float(s.response_ids[1] % 2)
                   for s in samples]
            self.scores = {"accuracy": acc, "overlong_penalty": [-0.5] * len(samples)}
            self.total = [a - 0.5 for a in acc]

    prompts = ([k] for k in itertools.count())
    sampler = GroupSampler([FakeEngine("fake:0")], SamplingParams(max_new_tokens=2),
                           group_size=4, target_groups=2, prompts=prompts, reward_fn=Batch)
    with caplog.at_level("WARNING"):
        samples, report = sampler.sample()  # NaN used to fail check_finite in the filter
    assert len(samples) == 8 and report.nonfinite_rewards == 2
    assert all(math.isfinite(s.reward) for s in samples)
    hit = [s for s in samples if s.response_ids[1] == 101]
    assert [(s.reward, s.rewards) for s in hit] == [
        (0.0, {"accuracy": 0.0, "overlong_penalty": -0.5})] * 2  # the other column still counts
    assert "'accuracy' for 2 of 8 samples" in caplog.text

    plain = GroupSampler([FakeEngine("fake:0")], SamplingParams(max_new_tokens=2), group_size=4,
                         target_groups=1, prompts=([k] for k in itertools.count()),
                         reward_fn=lambda s: [math.inf] + [1.0] * (len(s) - 1),
                         dynamic_sampling=False)
    samples, report = plain.sample()
    assert report.nonfinite_rewards == 1 and samples[0].reward == 0.0


def test_training_with_a_nan_reward_runs(tmp_path: Path) -> None:
    """A reward function returning NaN for half the responses: the run trains to the end (it
    used to stop at step 1 with a traceback from dynamic sampling), warning which reward."""
    (tmp_path / "nanreward.py").write_text(
        "def score(prompt, response, label, metadata):\n"
        "    return float('nan') if len(response) % 2 else 1.0\n")
    sets = {"rewards.functions": '[{name: "nanreward:score"}]', "rewards.num_workers": 0,
            "train.steps": 1, "eval.size": 0, "rollout.prompts_per_step": 2,
            "rollout.n_samples_per_prompt": 4, "rollout.max_new_tokens": 8,
            "data.train_size": 50, "data.tokenizer_cache": tmp_path / "tok",
            "train.output_dir": tmp_path / "run", "checkpoint.dir": tmp_path / "ck",
            "logging.tensorboard": "false", "logging.plot": "false"}
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    proc = _cli("train", TINY, *args, timeout=600, PYTHONPATH=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "reward not a finite number (NaN or inf), scored 0: 'nanreward:score'" in proc.stderr
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    assert rows[0]["rewards/nonfinite"] > 0  # counted in the step's metrics


# ---- serve -----------------------------------------------------------------------------------


def test_serve_on_a_port_in_use_is_one_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = _cli("serve", "--config", TINY, "--port", str(port))
    _one_line(proc, "serve", f"127.0.0.1:{port}", "in use")


def test_serve_missing_model_path_is_one_line(tmp_path: Path) -> None:
    _one_line(_cli("serve", "--model-path", str(tmp_path / "nope")), "serve",
              str(tmp_path / "nope"), "no such directory")
    _one_line(_cli("serve", "--model-path", str(tmp_path)), "serve", str(tmp_path),
              "config.json")


def test_serve_bad_config_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("algorithm:\n  eps_low: 2\n")
    _one_line(_cli("serve", "--config", str(bad)), "serve", "algorithm.eps_low")
    _one_line(_cli("serve", "--config", str(tmp_path / "nope.yaml")), "serve", "nope.yaml")
    debug = _cli("serve", "--config", str(bad), "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_serve_from_a_config_carries_the_trainers_tokenizer(tmp_path: Path) -> None:
    """`serve --config` builds the tokenizer `train` builds for that config (same cache): the
    engine answers text, not only ids (it used to answer "" and never stop at EOS)."""
    import yaml

    raw = yaml.safe_load((ROOT / TINY).read_text())
    raw["data"].update(train_size=200, tokenizer_cache=str(tmp_path / "tok"))
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen(
        [sys.executable, "-m", "megatron_rl", "serve", "--config", str(config), "--port", "0"],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        assert "ready at " in line, line
        url = line.split("ready at ")[1].strip()
        body = json.dumps({"text": "1 + 1 =", "sampling_params": {"max_new_tokens": 6,
                                                                   "temperature": 0}}).encode()
        with urllib.request.urlopen(f"{url}/generate", body, timeout=120) as r:
            out = json.loads(r.read())
        with urllib.request.urlopen(f"{url}/model_info", timeout=30) as r:
            info = json.loads(r.read())
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert out["output_ids"] and out["text"].strip(), out
    from megatron_rl.config import load_config
    from megatron_rl.data import tokenizer_dir

    cfg = load_config(str(config))
    assert info["tokenizer_path"] == str(tokenizer_dir(cfg.data, cfg.model.vocab_size))


# ---- messages that name the culprit ----------------------------------------------------------


def test_empty_data_file_is_named(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    cfg = DataConfig(source="jsonl", path=str(empty))
    with pytest.raises(DataError, match=r"empty\.jsonl: the prompt file has no rows"):
        build_dataset(cfg)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": 3}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: no usable rows: all 1 rows are malformed"):
        build_dataset(DataConfig(source="jsonl", path=str(bad), skip_malformed=True))


# ---- validation before Megatron-Core ---------------------------------------------------------


def test_config_loads_without_torch() -> None:
    code = ("import sys; import megatron_rl.config as c; c.load_config('configs/tiny_moe_cpu.yaml'"
            ", ['parallel.tp=1']); assert 'torch' not in sys.modules, 'torch imported'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("argv", [["train"], ["eval", "--hf", "/tmp"]], ids=["train", "eval"])
def test_bad_config_value_is_refused_before_torch(argv: list[str]) -> None:
    """`train --set algorithm.eps_low=2` (and `eval --hf`) is refused from the config alone
    (about a second; it used to import torch and Megatron-Core first)."""
    code = (f"import sys; from megatron_rl.cli import main; rc = main({argv!r} + ["
            "'configs/tiny_moe_cpu.yaml', '--set', 'algorithm.eps_low=2']); "
            "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    _one_line(proc, argv[0], "algorithm.eps_low")


# ---- inputs found by a user trying 50 bad ones -------------------------------------------------


def test_convert_never_replaces_a_destination_that_holds_files(tmp_path: Path) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "mine.txt").write_text("keep me")
    proc = _cli("convert", "mcore-to-hf", str(tmp_path / "src"), str(dst))
    _one_line(proc, "convert", str(dst), "not empty")
    assert (dst / "mine.txt").read_text() == "keep me"


def test_convert_names_a_garbage_config_json(tmp_path: Path) -> None:
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text("{garbage")
    _one_line(_cli("convert", "hf-to-mcore", str(src), str(tmp_path / "out")), "convert",
              str(src / "config.json"), "not valid JSON")


@pytest.mark.parametrize(("argv", "culprit"), [
    (["profile", "--tokens", "-5"], "--tokens: must be > 0"),
    (["profile", "--tp", "0"], "--tp: must be > 0"),
    (["profile", "--vocab", "0"], "--vocab: must be > 0"),
    (["serve", "--model-path", "x", "--port", "99999"], "--port: must be 0-65535"),
])
def test_bad_numbers_in_arguments_are_refused_by_name(argv: list[str], culprit: str) -> None:
    proc = _cli(*argv)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert culprit in proc.stderr.strip().splitlines()[-1]


def test_a_data_path_the_source_would_not_read_is_refused() -> None:
    proc = _cli("train", TINY, "--set", "data.path=prompts.jsonl")
    _one_line(proc, "train", "data.path", "reasoning_gym")


def test_plan_config_errors_exit_1_like_the_other_commands() -> None:
    _one_line(_cli("plan", TINY, "--set", "parallel.ep=3"), "plan", "parallel.ep")
