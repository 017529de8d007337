"""Our trainer vs TRL's `GRPOTrainer`: the same tiny model, task and budget, side by side.

Both sides start from the embedded default's base model (`configs/demo_cpu.yaml`, the `make demo`
run: a tiny Qwen3-MoE pre-trained on chain_sum answers, `megatron_rl.pretrain`, cached), see
the same r1_zero prompts of the same train records, get the same reward (`RewardComputer` over the
config's reward functions, plus DAPO's soft overlong punishment), and run the same number of
optimizer steps of the same size: `rollout.prompts_per_step` prompts x `n_samples_per_prompt`
responses of at most `max_new_tokens` tokens, temperature, lr, AdamW, grad clip, micro-batch size.
The loss is DAPO's on both (clip 0.2/0.28, token-level mean over the step, no KL); dynamic
sampling is turned off on our side, as TRL has none. Each side runs in its own fresh process,
with one torch thread by default (`--threads`).

Measured per side, as medians over the steps: wall seconds per step, generation seconds per step,
generated tokens/s (during generation), trained tokens/s (prompt + response tokens over the rest
of the step: rewards, log-probs, forward/backward, optimizer, weight sync) and total tokens/s
(prompt + response tokens over the whole step); the train-batch accuracy of the first and last
5 steps, and held-out accuracy before and after the N steps, by the same evaluator
(`megatron_rl.evaluate.run_eval` on a `TransformersEngine`) on the same held-out problems.

    .venv/bin/python benchmarks/vs_trl.py [--steps 20] [--seeds 1234,1235] [--markdown]

Needs the `bench` extra (`pip install -e .[bench]`: trl, datasets). A measurement: nothing here
asserts on time. Other processes on the machine change the timings a lot; the load average is
printed before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CONFIG = str(ROOT / "configs" / "demo_cpu.yaml")
SIDES = ("ours", "trl")
LAST_STEPS = 5
"""Train accuracy is reported as the mean over this many final steps."""
HEAD_TO_HEAD = (
    "algorithm.dynamic_sampling=false",  # TRL has no dynamic sampling: same samples per step
    "logging.tensorboard=false",         # TRL runs with report_to=none
)


@dataclasses.dataclass
class StepLog:
    """Per optimizer step: wall and generation seconds, token counts, train accuracy."""

    step_s: list[float] = dataclasses.field(default_factory=list)
    gen_s: list[float] = dataclasses.field(default_factory=list)
    prompt_tokens: list[int] = dataclasses.field(default_factory=list)
    gen_tokens: list[int] = dataclasses.field(default_factory=list)
    accuracy: list[float] = dataclasses.field(default_factory=list)
    response_length: list[float] = dataclasses.field(default_factory=list)

    def summary(self) -> dict[str, float]:
        """Medians over the steps (a step that another process stalled, or the machine paused,
        does not move them) and accuracy over the first and last `LAST_STEPS` steps."""
        n = len(self.step_s)
        if n == 0:
            return {}
        tokens = [p + g for p, g in zip(self.prompt_tokens, self.gen_tokens, strict=True)]
        first, last = self.accuracy[:LAST_STEPS], self.accuracy[-LAST_STEPS:]
        lengths = self.response_length[-LAST_STEPS:]
        return {
            "steps": float(n),
            "step_s": statistics.median(self.step_s),
            "gen_s": statistics.median(self.gen_s),
            "gen_tok_s": statistics.median(
                g / max(s, 1e-9) for g, s in zip(self.gen_tokens, self.gen_s, strict=True)),
            "train_tok_s": statistics.median(
                t / max(s - g, 1e-9) for t, s, g in zip(tokens, self.step_s, self.gen_s,
                                                        strict=True)),
            "total_tok_s": statistics.median(
                t / max(s, 1e-9) for t, s in zip(tokens, self.step_s, strict=True)),
            "sum_step_s": sum(self.step_s),
            "train_acc_first": sum(first) / len(first),
            "train_acc_last": sum(last) / len(last),
            "response_length_last": sum(lengths) / len(lengths),
        }


# ---- the driver ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=CONFIG,
                   help="run config with a pretrain section or checkpoint.load (default "
                        "configs/demo_cpu.yaml, the embedded default run)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per side (default 20)")
    p.add_argument("--seeds", default="1234", help="comma-separated train seeds (default 1234)")
    p.add_argument("--sides", default=",".join(SIDES), help="ours,trl (default both)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for both sides, e.g. rollout.prompts_per_step=4")
    p.add_argument("--json", default=str(ROOT / "outputs" / "bench" / "vs_trl.json"),
                   help="where the results are written (default outputs/bench/vs_trl.json)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per side, 0 = torch's default (default 1: on a shared "
                        "2-core machine two busy-waiting OpenMP threads per process collapse)")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker, Path(args.spec))
    from megatron_rl.config import dump_yaml, to_dict

    sides = [s for s in args.sides.split(",") if s]
    bad = [s for s in sides if s not in SIDES]
    if bad or not sides:
        raise SystemExit(f"--sides: unknown {bad}; choose from {', '.join(SIDES)}")
    if "trl" in sides:
        _check_trl()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    cfg, base = _config_and_base(args.config, args.overrides)
    load_before = os.getloadavg()
    print(f"[vs_trl] base model {base}; load average {_load(load_before)}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="vs_trl-") as tmp:
        snapshot = Path(tmp) / "config.yaml"  # both sides read this, whatever happens to the file
        dump_yaml(cfg, snapshot)
        for i, seed in enumerate(seeds):
            # Alternate which side runs first, so a change in machine load does not always hit
            # the same side.
            order = sides if i % 2 == 0 else sides[::-1]
            for side in order:
                results.append(_run_side(side, seed, args.steps, snapshot,
                                         Path(tmp) / f"{side}-{seed}", args.threads))
    load_after = os.getloadavg()
    table = format_table(results, args.markdown)
    print(table)
    print(f"load average before {_load(load_before)}, after {_load(load_after)}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    if set(SIDES) <= set(sides):
        png = out.with_suffix(".png")
        plot_curves(results, png)
        print(f"[vs_trl] accuracy vs wall clock: {png}")
    out.write_text(json.dumps({
        "config_file": args.config, "steps": args.steps, "seeds": seeds, "threads": args.threads,
        "overrides": HEAD_TO_HEAD + tuple(args.overrides),
        "base_model": str(base), "config": to_dict(cfg), "versions": _versions(),
        "load_average": {"before": load_before, "after": load_after},
        "trl_options": trl_options_doc(), "table": table, "results": results,
    }, indent=1) + "\n")
    print(f"[vs_trl] wrote {out}")
    if set(SIDES) <= set(sides):
        print(ratio_lines(results))  # its last line: ours/TRL end-to-end tokens/s: R
    return 0


def _check_trl() -> None:
    try:
        import datasets  # noqa: F401
        import trl  # noqa: F401
    except ImportError as err:
        raise SystemExit(f"vs_trl: {err}; install the benchmark extra: pip install -e .[bench]") \
            from None


def _load(avg: tuple[float, float, float]) -> str:
    return " / ".join(f"{x:.1f}" for x in avg)


def _config_and_base(path: str, extra: list[str]) -> tuple[Any, Path]:
    """The head-to-head config starting from the pre-trained base (built and cached on first
    use, as `megatron-rl train` does), and the base's HF directory."""
    from megatron_rl.config import load_config
    from megatron_rl.pretrain import ensure_base_model

    caches = [f"pretrain.cache_dir={ROOT / 'outputs' / 'base_model'}",
              f"data.tokenizer_cache={ROOT / 'outputs' / 'tokenizer'}"]
    cfg = load_config(path, [*HEAD_TO_HEAD, *caches, *extra])
    if cfg.checkpoint.load:  # a user's --set checkpoint.load=DIR (an HF dir) wins
        return cfg, Path(cfg.checkpoint.load)
    if cfg.pretrain.steps == 0:
        raise SystemExit(f"vs_trl: {path} has no pretrain section and no checkpoint.load; give "
                         "an HF base with --set checkpoint.load=DIR")
    base = ensure_base_model(cfg, log=lambda line: print(line, flush=True))
    return dataclasses.replace(cfg, checkpoint=dataclasses.replace(
        cfg.checkpoint, load=str(base))), base


def _run_side(side: str, seed: int, steps: int, config: Path, work: Path,
              threads: int) -> dict[str, Any]:
    """One side in a fresh interpreter; returns its result dict."""
    work.mkdir(parents=True)
    overrides = [f"train.seed={seed}", f"train.steps={steps}", f"train.output_dir={work / 'run'}",
                 f"checkpoint.dir={work / 'checkpoints'}", f"logging.log_dir={work / 'tb'}"]
    spec = work / "spec.json"
    result_file = work / "result.json"
    spec.write_text(json.dumps({"config": str(config), "overrides": overrides, "seed": seed,
                                "out": str(result_file), "work": str(work), "threads": threads}))
    print(f"[vs_trl] {side}, seed {seed}: {steps} steps", flush=True)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads > 0 else {}))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", side,
                           "--spec", str(spec)], cwd=ROOT, env=env)
    if proc.returncode != 0 or not result_file.is_file():
        raise SystemExit(f"vs_trl: the {side} run (seed {seed}) failed with exit code "
                         f"{proc.returncode}; see its output above")
    result = json.loads(result_file.read_text())
    result["process_s"] = time.perf_counter() - start
    result["summary"] = StepLog(**result["per_step"]).summary()
    return result


# ---- the table -------------------------------------------------------------------------------

COLUMNS = [
    ("trainer", "side", "{}"), ("seed", "seed", "{}"), ("steps", "steps", "{:.0f}"),
    ("s/step", "step_s", "{:.2f}"), ("gen s/step", "gen_s", "{:.2f}"),
    ("gen tok/s", "gen_tok_s", "{:,.0f}"), ("train tok/s", "train_tok_s", "{:,.0f}"),
    ("total tok/s", "total_tok_s", "{:,.0f}"),
    ("train acc first 5", "train_acc_first", "{:.3f}"),
    ("train acc last 5", "train_acc_last", "{:.3f}"),
    ("eval acc before", "eval_before", "{:.3f}"), ("eval acc after", "eval_after", "{:.3f}"),
    ("eval pass@8 after", "pass8_after", "{:.3f}"),
    ("resp len last 5", "response_length_last", "{:.1f}"),
]


def _row(result: dict[str, Any]) -> dict[str, Any]:
    before, after = result["eval_before"], result["eval_after"]
    return {"side": result["side"], "seed": result["seed"], **result["summary"],
            "eval_before": before.get("eval/accuracy", math.nan),
            "eval_after": after.get("eval/accuracy", math.nan),
            "pass8_after": after.get("eval/pass@8", math.nan)}


def format_table(results: list[dict[str, Any]], markdown: bool = False) -> str:
    """One row per (side, seed), plus a mean row per side when there are several seeds."""
    rows = [_row(r) for r in results]
    for side in SIDES:
        mine = [r for r in rows if r["side"] == side]
        if len(mine) > 1:
            mean = {k: sum(r[k] for r in mine) / len(mine) for k in mine[0]
                    if isinstance(mine[0][k], float)}
            rows.append({**mean, "side": side, "seed": "mean"})
    cells = [[fmt.format(r[key]) if key in r else "-" for _, key, fmt in COLUMNS] for r in rows]
    heads = [h for h, _, _ in COLUMNS]
    if markdown:
        align = ["---" if i < 2 else "--:" for i in range(len(heads))]
        lines = ["| " + " | ".join(heads) + " |", "|" + "|".join(align) + "|"]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(heads)]
    fmt_line = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt_line.format(*heads)] + [fmt_line.format(*c) for c in cells])


def ratio_lines(results: list[dict[str, Any]]) -> str:
    """Per seed: ours/TRL end-to-end tokens/s and held-out accuracy after the same steps; the
    last line is the median ratio over the seeds run."""
    by = {(r["side"], r["seed"]): _row(r) for r in results}
    seeds = sorted({seed for side, seed in by if (("ours", seed) in by and ("trl", seed) in by)})
    lines, ratios = [], []
    for seed in seeds:
        ours, trl = by["ours", seed], by["trl", seed]
        ratio = ours["total_tok_s"] / trl["total_tok_s"]
        ratios.append(ratio)
        lines.append(f"seed {seed}: ours/TRL end-to-end tokens/s {ratio:.2f}; held-out accuracy "
                     f"after {ours['steps']:.0f} steps: ours {ours['eval_after']:.3f}, TRL "
                     f"{trl['eval_after']:.3f}")
    if seeds:
        mean = {side: statistics.mean(by[side, seed]["eval_after"] for seed in seeds)
                for side in SIDES}
        lines.append(f"held-out accuracy after, mean over {len(seeds)} seed(s): ours "
                     f"{mean['ours']:.3f}, TRL {mean['trl']:.3f}")
        lines.append(f"ours/TRL end-to-end tokens/s: {statistics.median(ratios):.2f}")
    return "\n".join(lines)


def plot_curves(results: list[dict[str, Any]], path: Path) -> None:
    """Train-batch accuracy per step against cumulative wall clock, and the held-out accuracy
    before (t=0) and after (t=end), for every (side, seed): one PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colors = {"ours": "tab:blue", "trl": "tab:orange"}
    for r in results:
        steps = r["per_step"]["step_s"]
        clock = [sum(steps[: i + 1]) for i in range(len(steps))]
        label = f"{r['side']} seed {r['seed']}"
        ax.plot(clock, r["per_step"]["accuracy"], color=colors[r["side"]], alpha=0.6,
                label=f"{label}: train batch")
        ends = [0.0, clock[-1] if clock else 0.0]
        accs = [r["eval_before"].get("eval/accuracy", math.nan),
                r["eval_after"].get("eval/accuracy", math.nan)]
        ax.plot(ends, accs, "o--", color=colors[r["side"]], label=f"{label}: held-out")
    ax.set_xlabel("wall clock of the steps (s)")
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy vs wall clock: ours vs TRL (same model, task, budget)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _versions() -> dict[str, str]:
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__}
    try:
        import trl

        out["trl"] = trl.__version__
    except ImportError:
        pass
    return out


# ---- workers (each in its own process) -------------------------------------------------------


def worker(side: str, spec_file: Path) -> int:
    spec = json.loads(spec_file.read_text())
    import torch

    from megatron_rl.config import load_config

    if spec["threads"] > 0:
        torch.set_num_threads(spec["threads"])

    cfg = load_config(spec["config"], spec["overrides"])
    result = run_ours(cfg) if side == "ours" else run_trl(cfg, Path(spec["work"]))
    result.update(side=side, seed=spec["seed"], threads=torch.get_num_threads())
    Path(spec["out"]).write_text(json.dumps(result, indent=1))
    return 0


def run_ours(cfg: Any) -> dict[str, Any]:
    """`megatron-rl train`'s path (`checkpoint.load` = the base): held-out eval, N steps, eval.
    The step's generation time and token counts are read off `Trainer.sample`."""
    from megatron_rl.actor.parallel import destroy_distributed
    from megatron_rl.trainer import Trainer

    log = StepLog()
    trainer = Trainer(cfg)
    try:
        sample = trainer.sample

        def timed_sample() -> Any:
            samples, report = sample()
            log.gen_s.append(report["generate_seconds"])
            log.prompt_tokens.append(sum(len(s.prompt_ids) for s in samples))
            log.gen_tokens.append(sum(len(s.response_ids) for s in samples))
            return samples, report

        trainer.sample = timed_sample
        before = trainer.evaluate()
        start = time.perf_counter()
        history = trainer.run(cfg.train.steps)
        run_s = time.perf_counter() - start
        after = trainer.evaluate()
    finally:
        destroy_distributed()
    for h in history:
        log.step_s.append(h["throughput/step_seconds"])
        log.accuracy.append(h.get("accuracy", math.nan))
        log.response_length.append(h.get("response_length/mean", math.nan))
    return {"per_step": dataclasses.asdict(log), "run_s": run_s,
            "eval_before": before, "eval_after": after,
            "own_metrics": {k: [h.get(k, math.nan) for h in history] for k in (
                "throughput/rollout_tokens_per_s", "throughput/train_tokens_per_s",
                "weight_sync/seconds", "actor/loss", "actor/grad_norm")}}


def trl_options_doc() -> dict[str, str]:
    """How each setting of ours maps onto GRPOConfig (written into the JSON)."""
    return {
        "num_generations": "rollout.n_samples_per_prompt",
        "per_device_train_batch_size": "actor.micro_batch_size (completions per micro-batch)",
        "gradient_accumulation_steps": "prompts_per_step * n_samples / micro_batch_size: one "
                                       "generation batch = one optimizer step",
        "max_completion_length": "rollout.max_new_tokens",
        "temperature/top_p/top_k": "rollout.temperature/top_p/top_k (-1 -> 0)",
        "learning_rate, lr_scheduler_type=constant, warmup_steps=0": "actor.lr (constant)",
        "adam_beta1/2, adam_epsilon, weight_decay, max_grad_norm, optim=adamw_torch":
            "actor.adam_*, weight_decay, clip_grad",
        "loss_type=dapo, epsilon, epsilon_high": "algorithm.loss_agg=token_mean, eps_low/high",
        "beta": "algorithm.kl_coef (0: no reference model)",
        "scale_rewards=group": "algorithm.advantage_estimator=grpo (std-normalised)",
        "mask_truncated_completions": "algorithm.overlong_filter",
        "reward_funcs": "RewardComputer(rewards) + get_soft_overlong_punishment(L_max, L_cache) "
                        "when algorithm.overlong_penalty",
        "router_aux_loss_coef": "model.moe_aux_loss_coeff",
        "num_iterations=1": "one update per batch (ours: one actor step per RL step)",
        "use_cpu, bf16=False, gradient_checkpointing=False, report_to=none, use_vllm=False":
            "fp32 on CPU, recompute none, tensorboard off",
    }


def trl_config(cfg: Any, out_dir: Path) -> Any:
    """`GRPOConfig` with our config's budget and DAPO loss settings."""
    from trl import GRPOConfig

    ro, alg, actor = cfg.rollout, cfg.algorithm, cfg.actor
    completions = ro.prompts_per_step * ro.n_samples_per_prompt
    if completions % actor.micro_batch_size:
        raise SystemExit(f"vs_trl: prompts_per_step * n_samples_per_prompt = {completions} is "
                         f"not a multiple of actor.micro_batch_size={actor.micro_batch_size}")
    if alg.advantage_estimator != "grpo" or alg.loss_agg != "token_mean":
        raise SystemExit("vs_trl: the TRL side maps only advantage_estimator=grpo with "
                         f"loss_agg=token_mean (got {alg.advantage_estimator}, {alg.loss_agg})")
    if actor.optimizer != "adam" or actor.lr_decay_style != "constant":
        raise SystemExit("vs_trl: the TRL side maps only actor.optimizer=adam with a constant lr")
    return GRPOConfig(
        output_dir=str(out_dir), use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, report_to="none", use_vllm=False, seed=cfg.train.seed,
        max_steps=cfg.train.steps, save_strategy="no", logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0,
        # budget: one generation batch of prompts_per_step x G completions per optimizer step
        num_generations=ro.n_samples_per_prompt, per_device_train_batch_size=actor.micro_batch_size,
        gradient_accumulation_steps=completions // actor.micro_batch_size,
        max_completion_length=ro.max_new_tokens, temperature=ro.temperature, top_p=ro.top_p,
        top_k=0 if ro.top_k == -1 else ro.top_k,
        # optimizer
        learning_rate=actor.lr, lr_scheduler_type="constant", warmup_steps=actor.lr_warmup_steps,
        optim="adamw_torch", adam_beta1=actor.adam_beta1, adam_beta2=actor.adam_beta2,
        adam_epsilon=actor.adam_eps, weight_decay=actor.weight_decay,
        max_grad_norm=actor.clip_grad,
        # loss (DAPO)
        loss_type="dapo", epsilon=alg.eps_low, epsilon_high=alg.eps_high, beta=alg.kl_coef,
        scale_rewards="group", num_iterations=1,
        mask_truncated_completions=alg.overlong_filter,
        router_aux_loss_coef=cfg.model.moe_aux_loss_coeff,
    )


def run_trl(cfg: Any, work: Path) -> dict[str, Any]:
    """TRL's GRPOTrainer on the base HF dir: held-out eval, N steps, the same eval."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOTrainer
    from trl.rewards import get_soft_overlong_punishment

    if not hasattr(GRPOTrainer, "_generate_single_turn"):  # the hook that times generation
        raise SystemExit(f"vs_trl: this TRL ({GRPOTrainer.__module__}) has no "
                         "GRPOTrainer._generate_single_turn; use the bench extra's trl>=1.16,<2")

    from megatron_rl.data import apply_template, build_dataset, load_tokenizer
    from megatron_rl.evaluate import run_eval
    from megatron_rl.rewards import RewardComputer, RewardInput
    from megatron_rl.rollout.transformers_engine import TransformersEngine

    torch.manual_seed(cfg.train.seed)
    base = cfg.checkpoint.load
    tok = load_tokenizer(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    records = build_dataset(cfg.data, "train").records
    by_index = {r.index: r for r in records}
    prompts = [apply_template(cfg.data.chat_template, r.prompt, tok) for r in records]
    _check_prompt_ids(tok, prompts[:64])
    dataset = Dataset.from_dict({"prompt": prompts, "record": [r.index for r in records]})
    before = run_eval(cfg, TransformersEngine(model, tokenizer=tok)).metrics
    log = StepLog()
    correct = cfg.rewards.correct_reward - 1e-6

    class Timed(GRPOTrainer):
        """Times each generation batch and counts its tokens (one per optimizer step here)."""

        def _generate_single_turn(self, prompt_ids: Any, *args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
            log.gen_s.append(time.perf_counter() - start)
            log.prompt_tokens.append(sum(len(p) for p in prompt_ids))
            log.gen_tokens.append(sum(len(c) for c in completion_ids))
            log.response_length.append(log.gen_tokens[-1] / max(len(completion_ids), 1))
            return completion_ids, logprobs

    class StepTimer(TrainerCallback):
        """Wall seconds between optimizer steps, and a console line per step."""

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.last = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            now = time.perf_counter()
            log.step_s.append(now - self.last)
            self.last = now
            print(f"[trl] step {state.global_step}/{state.max_steps}  {log.step_s[-1]:.1f} s  "
                  f"accuracy {log.accuracy[-1]:.3f}  response {log.response_length[-1]:.1f}",
                  flush=True)

    with RewardComputer(cfg.rewards) as rewards:
        def accuracy(completion_ids: list[list[int]], record: list[int],
                     **_: Any) -> list[float]:
            """The config's rewards, via the same `RewardComputer` as ours, on the response text
            as our engine decodes it (TRL's `completions` drop special tokens such as EOS)."""
            recs = [by_index[i] for i in record]
            batch = rewards([RewardInput(prompt=r.prompt, response=tok.decode(ids), label=r.label,
                                         metadata={"data_source": r.data_source, **r.metadata})
                             for r, ids in zip(recs, completion_ids, strict=True)])
            scores = batch.scores[cfg.rewards.accuracy_function.name]
            log.accuracy.append(sum(s >= correct for s in scores) / len(scores))
            return [float(t) for t in batch.total]

        accuracy.__name__ = cfg.rewards.accuracy_function.name
        funcs: list[Any] = [accuracy]
        alg = cfg.algorithm
        if alg.overlong_penalty:
            funcs.append(get_soft_overlong_punishment(alg.overlong_max_len,
                                                      alg.overlong_cache_len))
        trainer = Timed(model=model, processing_class=tok, reward_funcs=funcs,
                        args=trl_config(cfg, work / "trl"), train_dataset=dataset,
                        callbacks=[StepTimer()])
        trainer.remove_callback(PrinterCallback)
        start = time.perf_counter()
        trainer.train()
        run_s = time.perf_counter() - start
    trained = trainer.accelerator.unwrap_model(trainer.model)
    after = run_eval(cfg, TransformersEngine(trained, tokenizer=tok)).metrics
    keys = ("loss", "grad_norm", "entropy", "clip_ratio/region_mean", "aux_loss")
    steps = [h for h in trainer.state.log_history if "loss" in h]
    return {"per_step": dataclasses.asdict(log), "run_s": run_s,
            "eval_before": before, "eval_after": after,
            "own_metrics": {k: [h.get(k, math.nan) for h in steps] for k in keys}}


def _check_prompt_ids(tok: Any, prompts: list[str]) -> None:
    """TRL tokenises plain-text prompts with `tok(text=...)`; ours with `tok.encode`: the
    comparison is only fair if they agree."""
    batch = tok(text=prompts)["input_ids"]
    if any(list(b) != tok.encode(p) for b, p in zip(batch, prompts, strict=True)):
        raise SystemExit("vs_trl: TRL's prompt tokenisation differs from ours")


if __name__ == "__main__":
    sys.exit(main())
