"""Metrics: console line, jsonl, tensorboard, plot, and the pure helpers computed by hand."""

import io
import json
import math
from pathlib import Path

import pytest
import torch

from megatron_rl.metrics import (
    LoggingConfig,
    MetricsLogger,
    format_duration,
    format_value,
    logprob_mismatch,
    reflection_frequency,
    response_stats,
    reward_stats,
)
from megatron_rl.metrics.logger import learning_curve_figure, plot_learning_curve, read_metrics

STEP = {
    "reward/mean": 0.41, "accuracy": 0.375, "response_length/mean": 23.12,
    "throughput/rollout_tokens_per_s": 812.4, "actor/loss": -0.0123, "actor/grad_norm": 1.5,
}


class FakeClock:
    """Each call advances 10 s, so every step takes 10 s."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 10.0
        return self.t


def make_logger(tmp_path: Path, *, tensorboard: bool = False, plot: bool = False, interval: int = 1,
                total: int = 60, rank: int = 0, start: int = 0
                ) -> tuple[MetricsLogger, io.StringIO]:
    """A logger writing under `tmp_path`, printing to a buffer, on a 10 s-per-step clock."""
    cfg = LoggingConfig(tensorboard=tensorboard, log_dir=str(tmp_path / "tb"),
                        log_interval=interval, plot=plot)
    out = io.StringIO()
    return MetricsLogger(cfg, str(tmp_path / "run"), total, rank, stream=out,
                         clock=FakeClock(), start_step=start), out


def test_console_line_content_and_eta(tmp_path: Path) -> None:
    logger, out = make_logger(tmp_path)
    for step in range(1, 13):
        logger.log(step, STEP)
    logger.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 12
    # 48 steps left at 10 s each = 480 s.
    assert lines[-1] == ("step 12/60 | ETA 8m00s | reward 0.41 | acc 0.375 | len 23.1 | "
                         "tok/s 812 | loss -0.0123")


def test_console_interval_and_last_step(tmp_path: Path) -> None:
    logger, out = make_logger(tmp_path, interval=4, total=10)
    for step in range(1, 11):
        logger.log(step, {"reward/mean": float(step)})
    logger.close()
    steps = [line.split(" | ")[0] for line in out.getvalue().splitlines()]
    assert steps == ["step 4/10", "step 8/10", "step 10/10"]
    assert "ETA 0s" in out.getvalue().splitlines()[-1]


def test_jsonl(tmp_path: Path) -> None:
    logger, _ = make_logger(tmp_path)
    logger.log(1, STEP)
    logger.log(2, {"reward/mean": math.nan, "eval/accuracy": 0.5})
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines()]
    assert rows[0]["step"] == 1 and rows[0]["actor/grad_norm"] == 1.5
    assert rows[0]["reward/mean"] == pytest.approx(0.41)
    assert rows[1] == {"step": 2, "time": 20.0, "reward/mean": None, "eval/accuracy": 0.5}


def test_tensorboard_scalars_readable(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger, _ = make_logger(tmp_path, tensorboard=True)
    for step in (1, 2, 3):
        logger.log(step, {"reward/mean": 0.1 * step, "actor/lr": 1e-6})
    logger.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert {"reward/mean", "actor/lr"} <= set(acc.Tags()["scalars"])
    events = acc.Scalars("reward/mean")
    assert [e.step for e in events] == [1, 2, 3]
    assert [e.value for e in events] == pytest.approx([0.1, 0.2, 0.3])


def test_resumed_run_records_each_step_once(tmp_path: Path) -> None:
    """A run that reached step 5 resumes from its step-3 checkpoint: steps 4-5 are rewritten,
    not duplicated, in metrics.jsonl and tensorboard; steps 1-3 stay and are plotted."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger, _ = make_logger(tmp_path, tensorboard=True)
    for step in range(1, 6):
        logger.log(step, {"reward/mean": float(step)})
    logger.close()
    logger, _ = make_logger(tmp_path, tensorboard=True, start=3)
    assert [r["step"] for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl"))] == [1, 2, 3]
    for step in (4, 5, 6):
        logger.log(step, {"reward/mean": 10.0 * step})
    logger.close()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["reward/mean"]) for r in rows] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("reward/mean")] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]


def test_plot_png(tmp_path: Path) -> None:
    logger, _ = make_logger(tmp_path, plot=True, total=4)
    for step in range(1, 5):
        metrics = {"reward/mean": 0.2 * step, "accuracy": 0.1 * step}
        if step % 2 == 0:
            metrics["eval/accuracy"] = 0.15 * step
        logger.log(step, metrics)
    logger.close()
    logger.close()  # idempotent
    png = tmp_path / "run" / "learning_curve.png"
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def _rl_rows(steps: int = 6, routing: bool = True) -> list[dict]:
    """metrics.jsonl rows as the trainer writes them: two reward columns, eval every 3 steps."""
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "time": 3.0 * step, "reward/mean": 0.1 * step, "reward/std": 0.2,
               "reward/reasoning_gym": 0.1 * step, "reward/overlong_penalty": -0.01 * step,
               "accuracy": 0.1 * step, "response_length/mean": 20.0 + step,
               "response_length/max": 40.0 + step, "actor/entropy": 1.0 / step,
               "actor/clip_frac_low": 0.01, "actor/clip_frac_high": 0.02 * step,
               "actor/grad_norm": None}
        if routing:
            row["routing/agreement"] = 1.0 - 0.01 * step
        if step % 3 == 0:
            row["eval/accuracy"] = 0.2 * step
        rows.append(row)
    return rows


def _panels(fig) -> dict[str, list[str]]:
    """Axes title -> the labels of its lines."""
    return {ax.get_title(): [line.get_label() for line in ax.get_lines()] for ax in fig.axes}


def test_learning_curve_has_the_panels_an_rl_user_reads(tmp_path: Path) -> None:
    fig = learning_curve_figure(_rl_rows())
    assert _panels(fig) == {
        "train reward": ["mean", "reasoning_gym", "overlong_penalty"],
        "accuracy": ["held-out eval", "train rollouts"],
        "response length (tokens)": ["mean", "max"],
        "entropy": ["entropy"],
        "clip fraction": ["low (ratio < 1 - eps)", "high (ratio > 1 + eps_high)"],
        "routing agreement": ["routing agreement"],
    }
    eval_line = next(ax for ax in fig.axes if ax.get_title() == "accuracy").get_lines()[0]
    assert list(eval_line.get_xdata()) == [3, 6]  # only the rows where eval ran
    assert list(eval_line.get_ydata()) == pytest.approx([0.6, 1.2])
    # Written from metrics.jsonl at the end of the run.
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rl_rows()))
    logger, _ = make_logger(tmp_path, plot=True, total=6, start=6)
    logger.close()
    assert (run / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_learning_curve_skips_panels_without_data(tmp_path: Path) -> None:
    rows = [{k: v for k, v in r.items() if not k.startswith(("actor/", "reward/overlong"))}
            for r in _rl_rows(routing=False)]
    titles = list(_panels(learning_curve_figure(rows)))
    assert titles == ["train reward", "accuracy", "response length (tokens)"]
    assert _panels(learning_curve_figure(rows))["train reward"] == ["mean"]  # one column: no split
    path = tmp_path / "curve.png"
    plot_learning_curve(rows, str(path))
    assert path.read_bytes()[:4] == b"\x89PNG"
    plot_learning_curve([], str(path))  # an empty file still plots
    assert path.stat().st_size > 0


def test_nonzero_rank_does_nothing(tmp_path: Path) -> None:
    logger, out = make_logger(tmp_path, tensorboard=True, plot=True, rank=1)
    logger.log(1, STEP)
    logger.close()
    assert out.getvalue() == ""
    assert not (tmp_path / "run").exists() and not (tmp_path / "tb").exists()


def test_formatting() -> None:
    assert [format_duration(s) for s in (0, 12.4, 185, 3725)] == ["0s", "12s", "3m05s", "1h02m"]
    assert [format_value(v) for v in (0.0, 0.4123, 23.12, 812.4, 12345.6, 2e-5)] == [
        "0", "0.412", "23.1", "812", "12346", "2.00e-05"]


def test_reward_stats() -> None:
    out = reward_stats({"accuracy": [1.0, 0.0, 1.0, 0.0], "format": [0.5, math.nan, 0.5, 0.2]},
                       [1.5, 0.0, 1.5, 0.2])
    assert out["reward/mean"] == pytest.approx(0.8)
    # population variance: (0.49 + 0.64 + 0.49 + 0.36) / 4 = 0.495
    assert out["reward/std"] == pytest.approx(math.sqrt(0.495))
    assert out["reward/accuracy"] == pytest.approx(0.5)
    assert out["reward/format"] == pytest.approx(0.4)  # NaN skipped: 1.2 / 3


def test_response_stats() -> None:
    assert response_stats([10, 20, 32, 32], max_len=32) == {
        "response_length/mean": 23.5, "response_length/max": 32.0,
        "response_length/clip_ratio": 0.5}
    assert response_stats([], 8)["response_length/mean"] == 0.0


def test_reflection_frequency() -> None:
    texts = ["Wait, let me verify.", "waiting is not the word", "I CHECK: ok", "no reflection"]
    assert reflection_frequency(texts) == {
        "reflection/wait": 0.25, "reflection/verify": 0.25, "reflection/check": 0.25}
    assert reflection_frequency(texts, words=("let me",)) == {"reflection/let me": 0.25}


def test_logprob_mismatch() -> None:
    train = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]])
    rollout = torch.tensor([[-1.1, -2.0, -2.5], [-0.7, -0.5, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = logprob_mismatch(train, rollout, mask)
    # masked |diff| = 0.1, 0, 0.5, 0.2, 0 (the 9.0 is padding)
    assert out["mismatch/logp_abs_diff_mean"] == pytest.approx(0.8 / 5)
    assert out["mismatch/logp_abs_diff_max"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shapes differ"):
        logprob_mismatch(train, rollout[:, :2], mask)
