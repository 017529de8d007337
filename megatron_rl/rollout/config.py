"""Config section owned by rollout: the generation engine and sampling settings."""

from dataclasses import field
from typing import Literal

from megatron_rl.configurable import require, require_non_negative, require_positive, section


@section
class RolloutConfig:
    """How responses are generated: engine, group size, sampling parameters, weight sync."""

    engine: Literal["transformers", "sglang"] = "transformers"
    """Generation engine: embedded transformers (CPU/tests) or SGLang."""
    prompts_per_step: int = 8
    """Prompts (groups) per training step."""
    n_samples_per_prompt: int = 8
    """Responses per prompt (the group size G)."""
    over_sampling: float = 1.0
    """Draw this many times prompts_per_step per generation batch (>= 1; for dynamic sampling)."""
    temperature: float = 1.0
    """Sampling temperature (the actor applies the same one to its log-probs)."""
    top_p: float = 1.0
    """Nucleus sampling mass; 1 = off."""
    top_k: int = -1
    """Top-k sampling; -1 = off."""
    max_new_tokens: int = 64
    """Longest response, in tokens."""
    engine_urls: list[str] = field(default_factory=list)
    """SGLang server URLs; empty = the engine runs in-process."""
    weight_sync: Literal["tensor", "distributed", "disk"] = "tensor"
    """How the actor's weights reach the engines after an update (docs/design.md section 6):
    'tensor' sends each bucket in the request (in-process engines; served engines over HTTP);
    'distributed' broadcasts each pipeline stage's buckets over an update group of its writer
    rank and every engine rank (NCCL on GPUs, gloo on CPU; served engines only); 'disk' writes
    an HF checkpoint to `weight_sync_dir` that every engine reloads."""
    weight_sync_dir: str | None = None
    """Directory every engine can read, for `weight_sync=disk`; None = `<output_dir>/weights`."""
    weight_sync_bucket_mb: int = 64
    """Size of one weight-sync bucket, in MiB."""
    colocate: bool | None = None
    """Engines share the actor's devices: while the actor trains the engines release their
    memory, while they generate the actor's parameters, gradients and optimizer state wait in
    host memory. None = colocated for an in-process engine, not for `engine_urls`."""
    request_timeout_s: float = 60.0
    """Timeout of one request to an engine server, in seconds; a whole engine call (retries
    included, or one generate of the embedded engine) may take `call_timeout_s`."""
    max_retries: int = 3
    """Retries of a failed engine request before the step fails."""
    routing_replay: bool = False
    """Replay the engine's routed experts in the actor's forward (MoE only)."""
    save_dir: str | None = None
    """Write every step's samples (prompt, response, rewards, log-probs, routed experts) to
    `<save_dir>/step_<N>.pt`; None = off (slime's debug rollouts)."""
    load_dir: str | None = None
    """Train from the samples a run saved in `save_dir` instead of generating: no engine, no
    weight sync; None = generate."""
    async_generation: bool = False
    """One-step off-policy (slime's async mode, verl's one-step off-policy): step t+1's samples
    are generated while step t trains, by the engine holding the weights of step t-1's update.
    Samples record the weights they came from (`rollout/staleness`); the loss corrects with the
    engine's log-probs as the behaviour policy (needs `algorithm.tis_cap`). Engines do not
    share the actor's devices then (`colocate` defaults to false)."""

    @property
    def colocated(self) -> bool:
        """`colocate`, with its default resolved."""
        if self.colocate is None:
            return not self.engine_urls and not self.async_generation
        return self.colocate

    @property
    def call_timeout_s(self) -> float:
        """Bound on one engine call: every retry timing out, with as much again in backoff."""
        return self.request_timeout_s * (self.max_retries + 1) * 2

    def validate(self) -> None:
        """Sampling parameters in range; URLs only for SGLang."""
        require_positive(self, "prompts_per_step", "n_samples_per_prompt", "max_new_tokens",
                         "weight_sync_bucket_mb", "request_timeout_s")
        require_non_negative(self, "max_retries")
        require(not (self.async_generation and self.colocate), "async_generation",
                "generating while the actor trains needs devices of their own",
                "set rollout.colocate=false (or leave it unset) or async_generation=false")
        require(not (self.async_generation and self.load_dir), "async_generation",
                "saved rollouts (load_dir) are not generated", "set async_generation=false")
        require(self.over_sampling >= 1.0, "over_sampling",
                f"must be >= 1, got {self.over_sampling}", "use 1.0 to draw exactly what is needed")
        require(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}",
                "use 1.0 for plain sampling")
        require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}",
                "use 1.0 to disable nucleus sampling")
        require(self.top_k == -1 or self.top_k >= 1, "top_k", f"got {self.top_k}",
                "use -1 (off) or a value >= 1")
        require(all(url.strip() for url in self.engine_urls), "engine_urls",
                "contains an empty URL", "e.g. [http://host:30000]")
        require(not self.engine_urls or self.engine == "sglang", "engine_urls",
                "given but engine is 'transformers', which runs in-process",
                "set rollout.engine=sglang or rollout.engine_urls=[]")
