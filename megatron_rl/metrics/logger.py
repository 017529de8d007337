"""The per-step metrics sink on rank 0: console line, tensorboard scalars, JSON lines, plot.

The trainer calls `MetricsLogger.log(step, metrics)` once per step with metrics named in `/`
groups (docs/design.md section 8: `reward/mean`, `actor/grad_norm`, `eval/accuracy`, ...), and
`close()` at the end. On every rank other than 0 each method does nothing.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
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

METRICS_FILE = "metrics.jsonl"
CURVE_FILE = "learning_curve.png"
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
        self._step_times: deque[float] = deque(maxlen=ETA_WINDOW)
        self._start = self._last = clock()
        self._writer: Any = None
        self._jsonl: TextIO | None = None
        if not self.active:
            return
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, METRICS_FILE)
        _keep_rows_through(path, start_step)
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
        if values.get("actor/skipped", 0.0) > 0:  # say why nothing trained
            parts.append("skipped: no informative group" if "actor/grad_norm" not in values
                         else "skipped: non-finite loss or gradient")
        return " | ".join(parts)

    def _write_jsonl(self, step: int, elapsed: float, values: Mapping[str, float]) -> None:
        """One JSON object per step; non-finite values become null so the line stays valid JSON."""
        assert self._jsonl is not None
        row: dict[str, Any] = {"step": step, "time": round(elapsed, 3)}
        row.update({k: v if math.isfinite(v) else None for k, v in values.items()})
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        """Flush and close the sinks; save `learning_curve.png` (from the whole `metrics.jsonl`,
        earlier runs of a resumed one included) when `cfg.plot`. Idempotent."""
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
                rows = read_metrics(os.path.join(self.run_dir, METRICS_FILE))
                plot_learning_curve(rows, os.path.join(self.run_dir, CURVE_FILE))

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def record_eval(cfg: LoggingConfig, run_dir: str, step: int,
                metrics: Mapping[str, float]) -> None:
    """Held-out eval metrics measured outside the step loop (`train`'s evals before and after
    RL) as their own row of `metrics.jsonl` at `step` and as tensorboard scalars, then the
    learning curve redrawn (when `cfg.plot`), so its accuracy panel shows them."""
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, METRICS_FILE)
    row = {"step": step, **{k: float(v) if math.isfinite(v) else None
                            for k, v in metrics.items()}}
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    if cfg.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(log_dir=cfg.log_dir) as writer:
            for key, value in metrics.items():
                writer.add_scalar(key, float(value), step)
    if cfg.plot:
        plot_learning_curve(read_metrics(path), os.path.join(run_dir, CURVE_FILE))


def _lines(path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(line, row) of each readable step row of a JSON-lines metrics file; unreadable lines (a
    crash mid-write) are skipped, a missing file has none."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                yield line, row


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The rows of a `metrics.jsonl` (one dict per step; nulls where a value was not finite)."""
    return [row for _, row in _lines(path)]


def _keep_rows_through(path: str, step: int) -> None:
    """Rewrite the JSON-lines file at `path` (if any) keeping the rows of steps <= `step` (a
    resumed run drops what a crashed one logged past its checkpoint)."""
    if not os.path.isfile(path):
        return
    lines = [line if line.endswith("\n") else line + "\n"
             for line, row in _lines(path) if row["step"] <= step]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)
    os.replace(tmp, path)


# (panel title, [(metric, label, style)]) of the learning curve, in reading order. Per-reward
# columns (`reward/<function>`) join the reward panel when there are several.
PANELS: tuple[tuple[str, tuple[tuple[str, str, dict[str, Any]], ...]], ...] = (
    ("train reward", (("reward/mean", "mean", {"linewidth": 2}),)),
    ("accuracy", (("eval/accuracy", "held-out eval", {"marker": "o"}),
                  ("accuracy", "train rollouts", {"linestyle": "--", "alpha": 0.6}))),
    ("response length (tokens)", (("response_length/mean", "mean", {}),
                                  ("response_length/max", "max", {"alpha": 0.6}))),
    ("entropy", (("actor/entropy", "entropy", {}),)),
    ("clip fraction", (("actor/clip_frac_low", "low (ratio < 1 - eps)", {}),
                       ("actor/clip_frac_high", "high (ratio > 1 + eps_high)", {}))),
    ("routing agreement", (("routing/agreement", "routing agreement", {}),)),
)
_REWARD_SUMMARIES = {"reward/mean", "reward/std"}


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` over the rows where it is a finite number."""
    points = [(row["step"], float(row[key])) for row in rows
              if isinstance(row.get(key), (int, float)) and math.isfinite(row[key])]
    return [p[0] for p in points], [p[1] for p in points]


def _reward_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The per-reward columns (`reward/<function>`, shaping columns included) in first-seen
    order, when there are several; with one it is the mean's own curve."""
    keys: dict[str, None] = {}
    for row in rows:
        keys.update((k, None) for k in row
                    if k.startswith("reward/") and k not in _REWARD_SUMMARIES)
    return list(keys) if len(keys) > 1 else []


def learning_curve_figure(rows: Sequence[Mapping[str, Any]]) -> Any:
    """The learning curve of the `metrics.jsonl` rows: one panel per entry of `PANELS` that has
    data (eval accuracy as points at the steps it was measured), two panels a row. Returns a
    matplotlib `Figure` on the Agg canvas (no pyplot state, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # heavy: only at the end of a run
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = []
    for title, curves in PANELS:
        if title == "train reward":
            curves = curves + tuple((k, k.removeprefix("reward/"), {"alpha": 0.7})
                                    for k in _reward_columns(rows))
        lines = [(_series(rows, key), label, style) for key, label, style in curves]
        lines = [line for line in lines if line[0][0]]
        if lines:
            panels.append((title, lines))
    cols = 2 if len(panels) > 1 else 1
    nrows = max(1, -(-len(panels) // cols))
    fig = Figure(figsize=(5.5 * cols, 3.2 * nrows), dpi=100)
    FigureCanvasAgg(fig)
    if not panels:
        ax = fig.add_subplot()
        ax.set_title("no metrics yet")
        ax.set_axis_off()
        return fig
    for i, (title, lines) in enumerate(panels):
        ax = fig.add_subplot(nrows, cols, i + 1)
        for (steps, values), label, style in lines:
            if len(steps) < 5:  # a short run: a line of one or two points would not show
                style = {"marker": "o", "markersize": 4, **style}
            ax.plot(steps, values, label=label, **style)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
        if len(lines) > 1 or lines[0][1] != title:  # say what a lone curve is, when not
            ax.legend(loc="best", fontsize="small")  # the panel's own title
    fig.tight_layout()
    return fig


def plot_learning_curve(rows: Sequence[Mapping[str, Any]], path: str) -> None:
    """Save `learning_curve_figure(rows)` as a PNG at `path`."""
    learning_curve_figure(rows).savefig(path)
