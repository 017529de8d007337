"""The per-step metrics sink on rank 0: console line, tensorboard scalars, JSON lines, plot.

The trainer calls `MetricsLogger.log(step, metrics)` once per step with metrics named in `/`
groups (DESIGN.md section 8: `reward/mean`, `actor/grad_norm`, `eval/accuracy`, ...), and
`close()` at the end. On every rank other than 0 each method does nothing.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, TextIO

from megatron_rl.metrics.config import LoggingConfig

CONSOLE_KEYS = (
    ("reward/mean", "reward"),
    ("accuracy", "acc"),
    ("response_length/mean", "len"),
    ("throughput/rollout_tokens_per_s", "tok/s"),
    ("actor/loss", "loss"),
    ("loss", "loss"),
    ("eval/accuracy", "eval acc"),
)
"""(metric, console label) printed in this order when present; the rest go to tensorboard only."""

PLOT_KEYS = ("reward/mean", "accuracy", "eval/accuracy")
ETA_WINDOW = 20
"""Steps in the moving average of step time behind the ETA."""


def format_value(value: float) -> str:
    """Three significant digits, without exponents for everyday magnitudes."""
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:.0f}"
    if abs(value) < 1e-3:
        return f"{value:.2e}"
    return f"{value:.3g}"


def format_duration(seconds: float) -> str:
    """`1h02m`, `3m05s` or `12s`."""
    s = max(int(round(seconds)), 0)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class MetricsLogger:
    """Writes one step's metrics to the console, tensorboard, `metrics.jsonl` and a final plot.

    `step` counts completed steps from 1 to `total_steps`. The console line is printed when
    `step % cfg.log_interval == 0` and at the last step; JSON lines and tensorboard every step.

    `start_step` is the step the run (re)starts after: records of later steps, left by a run
    that went past the checkpoint it is resumed from, are dropped from `metrics.jsonl` and
    purged from tensorboard, so every step appears once; earlier ones stay and are plotted.
    """

    def __init__(self, cfg: LoggingConfig, run_dir: str, total_steps: int, rank: int = 0,
                 stream: TextIO | None = None,
                 clock: Callable[[], float] = time.perf_counter, start_step: int = 0) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.total_steps = total_steps
        self.active = rank == 0
        self.stream = stream
        self.clock = clock
        self.history: dict[str, list[tuple[int, float]]] = {k: [] for k in PLOT_KEYS}
        self._step_times: deque[float] = deque(maxlen=ETA_WINDOW)
        self._start = self._last = clock()
        self._writer: Any = None
        self._jsonl: TextIO | None = None
        if not self.active:
            return
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, "metrics.jsonl")
        for row in _keep_rows_through(path, start_step):
            for key, points in self.history.items():
                if isinstance(row.get(key), (int, float)):
                    points.append((row["step"], float(row[key])))
        self._jsonl = open(path, "a", encoding="utf-8")
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=cfg.log_dir, purge_step=start_step + 1)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record the metrics of completed step `step` (rank 0 only)."""
        if not self.active:
            return
        now = self.clock()
        self._step_times.append(now - self._last)
        self._last = now
        values = {k: float(v) for k, v in metrics.items()}
        for key, points in self.history.items():
            if key in values and math.isfinite(values[key]):
                points.append((step, values[key]))
        self._write_jsonl(step, now - self._start, values)
        if self._writer is not None:
            for key, value in values.items():
                self._writer.add_scalar(key, value, step)
        if step % self.cfg.log_interval == 0 or step >= self.total_steps:
            print(self.console_line(step, values), file=self.stream or sys.stdout, flush=True)

    def eta_seconds(self, step: int) -> float:
        """Remaining steps times the moving-average step time."""
        if not self._step_times:
            return 0.0
        mean = sum(self._step_times) / len(self._step_times)
        return mean * max(self.total_steps - step, 0)

    def console_line(self, step: int, values: Mapping[str, float]) -> str:
        """`step 12/60 | ETA 3m05s | reward 0.41 | acc 0.38 | len 23.1 | tok/s 812 | loss ...`."""
        eta = format_duration(self.eta_seconds(step))
        parts = [f"step {step}/{self.total_steps}", f"ETA {eta}"]
        labels_seen = set()
        for key, label in CONSOLE_KEYS:
            if key in values and label not in labels_seen:
                labels_seen.add(label)
                parts.append(f"{label} {format_value(values[key])}")
        return " | ".join(parts)

    def _write_jsonl(self, step: int, elapsed: float, values: Mapping[str, float]) -> None:
        """One JSON object per step; non-finite values become null so the line stays valid JSON."""
        assert self._jsonl is not None
        row: dict[str, Any] = {"step": step, "time": round(elapsed, 3)}
        row.update({k: v if math.isfinite(v) else None for k, v in values.items()})
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        """Flush and close the sinks; save `learning_curve.png` when `cfg.plot`. Idempotent."""
        if not self.active:
            return
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
            if self.cfg.plot:
                plot_learning_curve(self.history, os.path.join(self.run_dir, "learning_curve.png"))

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _keep_rows_through(path: str, step: int) -> list[dict[str, Any]]:
    """Rewrite the JSON-lines file at `path` (if any) keeping the rows of steps <= `step`;
    returns them. Unreadable lines (a crash mid-write) are dropped."""
    if not os.path.isfile(path):
        return []
    kept, lines = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                kept.append(row)
                lines.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.replace(tmp, path)
    return kept


def plot_learning_curve(history: Mapping[str, list[tuple[int, float]]], path: str) -> None:
    """Reward and accuracy vs step as lines, eval accuracy as points; one PNG at `path`."""
    # The object API with the Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    styles = {"reward/mean": {"label": "reward/mean"},
              "accuracy": {"label": "accuracy"},
              "eval/accuracy": {"label": "eval/accuracy", "marker": "o", "linestyle": "none"}}
    for key, style in styles.items():
        points = history.get(key, [])
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, **style)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path)
