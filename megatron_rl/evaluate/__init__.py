"""Evaluation on held-out prompts: pass@k, cons@k and avg@k (docs/design.md sections 4 and 8).

    megatron-rl eval CONFIG [--set K=V ...] (--checkpoint DIR | --hf DIR) [--out FILE]

Each problem gets `eval.n_samples` responses from a rollout engine; each response is scored by
the configured rewards, and it is *correct* when the score of the accuracy reward
(`RewardsConfig.accuracy_function`: `rewards.accuracy`, by default the first function) reaches
`rewards.correct_reward`, as the trainer's accuracy counts it. Per problem, with c correct of n:
pass@k = 1 - C(n-c, k)/C(n, k) (Chen et al. 2021), cons@k = the majority answer of the first k
samples is correct (R1's cons@64), avg@k = mean correctness of the first k samples (DAPO's
avg@32); the benchmark value is the mean over problems. cons@k votes on the answer that the
rewards' own extractor finds (`rewards.extract.extract_answer`), whitespace removed.

Sampling is plain temperature sampling (no top-p/top-k), seeded per batch of prompts from
`seed`, so a run is reproducible for a fixed engine, batch size and seed. No stop strings by
default: the model sees the same sampling it was trained with (responses end at EOS).

Names are imported on first use (PEP 562; the code is `evaluation.py`), so importing
`megatron_rl.evaluate.config` (the run config does) imports neither torch nor the rollout code.
"""

from __future__ import annotations

from megatron_rl.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(["METRICS_FILE", "RESULTS_FILE", "EvalResult", "EvalRow", "eval_data",
                     "eval_metrics", "evaluate", "run_eval"], "evaluation"),
    "EvalConfig": "config",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
