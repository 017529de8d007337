"""The contract between rollout engines and the rest: sampling parameters, one generation's
output, and the typed `Sample` that rollout produces and training consumes.

Field names follow SGLang's `/generate` API where one exists (`max_new_tokens`, `top_p`, `top_k`,
`stop`, `stop_token_ids`, `n`; `finish_reason` as `{"type": "stop" | "length" | "abort"}`).
Shape legend: T = generated tokens, P = prompt tokens, L = MoE layers, K = experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

FinishType = Literal["stop", "length", "abort"]


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How to sample one request (SGLang's `sampling_params`)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    """-1 = no top-k truncation (SGLang's convention)."""
    max_new_tokens: int = 64
    stop: list[str] = field(default_factory=list)
    """Stop strings; the stop string is kept in the output text and ids."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Stop token ids in addition to the tokenizer's EOS."""
    n: int = 1
    """Samples per prompt."""
    seed: int | None = None
    """Sampling seed; None = the engine's own random state."""

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"sampling temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"top_k must be -1 or >= 1, got {self.top_k}")
        if self.max_new_tokens < 1 or self.n < 1:
            raise ValueError("max_new_tokens and n must be >= 1")

    def to_sglang(self) -> dict[str, Any]:
        """The `sampling_params` JSON object of SGLang's /generate."""
        out: dict[str, Any] = {"temperature": self.temperature, "top_p": self.top_p,
                               "top_k": self.top_k, "max_new_tokens": self.max_new_tokens,
                               "n": self.n}
        if self.stop:
            out["stop"] = list(self.stop)
        if self.stop_token_ids:
            out["stop_token_ids"] = list(self.stop_token_ids)
        if self.seed is not None:
            out["sampling_seed"] = self.seed
        return out


@dataclass(frozen=True, kw_only=True)
class GenerateOutput:
    """One generated response."""

    output_ids: list[int]
    """Generated token ids [T] (prompt excluded)."""
    output_logprobs: list[float]
    """log p(token) of each generated token under the sampling temperature, before top-p/top-k
    truncation (what the trainer recomputes) [T]."""
    finish_reason: FinishType
    text: str = ""
    routed_experts: torch.Tensor | None = None
    """Experts chosen per token and MoE layer [P + T, L, K] (int), when routing capture is on."""
    prompt_ids: list[int] = field(default_factory=list)


@dataclass(kw_only=True)
class Sample:
    """One response to one prompt, from rollout to training (mutable: rewards come later)."""

    group: int
    """Index of the prompt's group within the step (same prompt = same group)."""
    prompt: Any
    """The prompt as the dataset gave it (text or chat messages)."""
    prompt_ids: list[int]
    response_ids: list[int]
    rollout_logprobs: list[float]
    finish_reason: FinishType
    response_text: str = ""
    label: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    rewards: dict[str, float] = field(default_factory=dict)
    """Score per reward function (several for GDPO)."""
    reward: float = 0.0
    """Weighted total reward."""
    routed_experts: torch.Tensor | None = None

    @property
    def truncated(self) -> bool:
        """Stopped by the length limit (overlong shaping applies)."""
        return self.finish_reason == "length"
