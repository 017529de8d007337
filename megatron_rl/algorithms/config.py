"""Config section owned by the algorithms: advantages, policy loss, KL and sample shaping.

A `preset` (grpo, dapo, dr_grpo, gdpo) fills only the fields the user did not set explicitly;
see `PRESETS` and docs/design.md section 4 for the numbers.
"""

from typing import Any, ClassVar, Literal

from megatron_rl.configurable import require, require_non_negative, require_positive, section


@section
class AlgorithmConfig:
    """RL objective: advantage estimator, clipped policy loss, aggregation, KL, shaping."""

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # Each preset sets every knob its paper fixes; the loader puts it under the user's keys.
        # DeepSeek-R1 / GRPO: symmetric clip 0.2, per-sequence token means, k3 KL (beta 0.001 as
        # in DeepSeek-R1; DeepSeekMath used 0.04: override kl_coef).
        "grpo": {"advantage_estimator": "grpo", "eps_low": 0.2, "eps_high": 0.2,
                 "loss_agg": "seq_mean_token_mean", "kl_coef": 0.001, "kl_estimator": "k3",
                 "dynamic_sampling": False, "overlong_filter": False, "overlong_penalty": False},
        # DAPO: clip-higher 0.2/0.28, token-level loss, dynamic sampling, no KL, soft overlong
        # punishment (L_max/L_cache). Overlong filtering instead: overlong_penalty=false,
        # overlong_filter=true.
        "dapo": {"advantage_estimator": "grpo", "eps_low": 0.2, "eps_high": 0.28,
                 "loss_agg": "token_mean", "kl_coef": 0.0, "dynamic_sampling": True,
                 "overlong_filter": False, "overlong_penalty": True},
        # Dr.GRPO: no std normalisation, per-sequence token sums over a constant length, no KL.
        "dr_grpo": {"advantage_estimator": "dr_grpo", "eps_low": 0.2, "eps_high": 0.2,
                    "loss_agg": "seq_mean_token_sum_norm", "kl_coef": 0.0,
                    "dynamic_sampling": False, "overlong_filter": False,
                    "overlong_penalty": False},
        # GDPO: per-reward group normalisation, then batch normalisation of the weighted sum.
        "gdpo": {"advantage_estimator": "gdpo", "eps_low": 0.2, "eps_high": 0.2,
                 "loss_agg": "token_mean", "kl_coef": 0.0, "dynamic_sampling": False,
                 "overlong_filter": False, "overlong_penalty": False},
    }

    preset: Literal["grpo", "dapo", "dr_grpo", "gdpo"] | None = None
    """Named recipe filling the fields not set explicitly; None = use the field defaults."""
    advantage_estimator: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp_baseline", "gdpo"] = (
        "grpo")
    """How group rewards become advantages."""
    adv_eps: float = 1e-6
    """Epsilon added to the std in advantage normalisation."""
    eps_low: float = 0.2
    """Lower clip range: ratio >= 1 - eps_low."""
    eps_high: float = 0.2
    """Upper clip range: ratio <= 1 + eps_high (DAPO clip-higher uses 0.28)."""
    dual_clip_c: float | None = None
    """Dual-clip bound c (> 1) for negative advantages; None = off."""
    sequence_level_ratio: bool = False
    """Use the per-sequence geometric-mean ratio (GSPO) instead of per-token ratios."""
    tis_cap: float | None = None
    """Truncated importance-sampling cap on the engine/actor ratio; None = off."""
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = (
        "seq_mean_token_mean")
    """How token losses are aggregated (denominators are global over the step)."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to the reference model; 0 = no reference model."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """KL estimator (k3 = exp(ref - logp) - (ref - logp) - 1)."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus; 0 = off."""
    dynamic_sampling: bool = False
    """Drop groups whose rewards all agree and draw more prompts (DAPO)."""
    max_gen_batches: int = 4
    """Most generation batches per step when dynamic sampling refills the batch."""
    overlong_filter: bool = False
    """Mask the loss of truncated responses."""
    overlong_penalty: bool = False
    """Soft overlong punishment (DAPO) with overlong_max_len and overlong_cache_len."""
    overlong_max_len: int | None = None
    """L_max of the soft punishment; None = rollout.max_new_tokens (resolved at load time)."""
    overlong_cache_len: int | None = None
    """L_cache of the soft punishment; None = max(1, L_max // 4) (resolved at load time)."""
    loss_norm_len: int | None = None
    """Constant length dividing per-sequence token sums in `seq_mean_token_sum_norm` (Dr.GRPO's
    MAX_TOKENS); None = rollout.max_new_tokens (resolved at load time)."""
    mini_batches: int = 1
    """Optimizer steps per RL step: the step's samples are split into this many mini-batches,
    one update each, all against the same old log-probs (verl's train_batch_size /
    ppo_mini_batch_size, slime's num_steps_per_rollout; DAPO used 16). With 1 the update is
    on-policy, the ratio is exactly 1 and the clip (so clip-higher) never acts."""
    old_logprob_forward: bool = False
    """Run the separate forward for the old log-probs even with one update per step (its
    result equals the update's own, detached: it only costs time; for comparisons). Off: that
    forward runs only when `mini_batches > 1`."""

    def validate(self) -> None:
        """Ranges of the clip, KL and shaping settings."""
        require(0 <= self.eps_low < 1, "eps_low", f"must be in [0, 1), got {self.eps_low}",
                "e.g. 0.2")
        require_non_negative(self, "eps_high", "kl_coef", "entropy_coef")
        require_positive(self, "adv_eps", "tis_cap", "max_gen_batches", "overlong_max_len",
                         "overlong_cache_len", "loss_norm_len", "mini_batches")
        require(self.dual_clip_c is None or self.dual_clip_c > 1, "dual_clip_c",
                f"must be > 1, got {self.dual_clip_c}", "e.g. 3.0, or null to disable")
        if self.overlong_max_len is not None and self.overlong_cache_len is not None:
            require(self.overlong_cache_len < self.overlong_max_len, "overlong_cache_len",
                    f"{self.overlong_cache_len} is not below overlong_max_len="
                    f"{self.overlong_max_len}", "use a cache shorter than the maximum length")
        # No silent settings: lengths that only one mode reads are refused in the others.
        for name in ("overlong_max_len", "overlong_cache_len"):
            require(self.overlong_penalty or getattr(self, name) is None, name,
                    "is set but overlong_penalty is false, so nothing reads it",
                    "set algorithm.overlong_penalty=true or leave it null")
        require(self.loss_norm_len is None or self.loss_agg == "seq_mean_token_sum_norm",
                "loss_norm_len", f"is read only by loss_agg=seq_mean_token_sum_norm, not "
                f"{self.loss_agg}", "set loss_agg=seq_mean_token_sum_norm or leave it null")
