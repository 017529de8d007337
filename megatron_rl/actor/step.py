"""Forward/backward over micro-batches through Megatron-Core's own schedules (PP included).

The loss contract (docs/design.md section 4): a `LossFn` returns, per micro-batch, the *sum* of its
per-token (or per-sequence) terms already divided by the step's global denominator, so the
step loss is the plain sum over micro-batches and DP ranks whatever the split. Megatron
averages over micro-batches and DP replicas; we multiply by both counts to undo that average.

Shape legend: b = micro-batch size, s = sequence length, v = vocabulary slice of this TP rank.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_rl.actor.logprobs import token_logprobs, token_logprobs_and_entropy
from megatron_rl.actor.shared_prompts import SharedPrompts, row_positions


@dataclass(eq=False)
class MicroBatch:
    """One micro-batch: tokens and per-token tensors the loss needs, all [b, s]."""

    tokens: torch.Tensor
    """Input ids [b, s] (int64)."""
    labels: torch.Tensor
    """Target id per position [b, s]: the next token."""
    loss_mask: torch.Tensor
    """1.0 where the token counts in the loss [b, s] (float32)."""
    position_ids: torch.Tensor | None = None
    """Positions [b, s]; None = 0..s-1 for every row."""
    advantages: torch.Tensor | None = None
    """Advantage per row [b] or per token [b, s] (RL losses)."""
    old_logprobs: torch.Tensor | None = None
    """Log-probs of the sampling policy [b, s]: the ratio's denominator."""
    rollout_logprobs: torch.Tensor | None = None
    """The engine's log-probs [b, s] (truncated importance sampling, mismatch metrics)."""
    ref_logprobs: torch.Tensor | None = None
    """Log-probs of the KL reference policy [b, s]."""
    entropy: torch.Tensor | None = None
    """Token entropy [b, s], filled in by the forward step for a loss with `needs_entropy`."""
    routed_experts: torch.Tensor | None = None
    """Experts the engine chose per position [b, s, L, E] (L = MoE layers of the whole model):
    replayed by the routers when routing replay is on, compared with theirs otherwise."""
    shared: SharedPrompts | None = None
    """The model input with each group's prompt once (`actor.share_prompts`), or None: the
    rows themselves are the input. With it the [b, s] fields above hold each row's response
    window (from its last prompt position, `shared_prompts.response_window`), and the engine's
    experts are in `shared.experts`."""

    def positions(self) -> torch.Tensor:
        if self.position_ids is not None:
            return self.position_ids
        b, s = self.tokens.shape
        return torch.arange(s, device=self.tokens.device).expand(b, s)

    @property
    def input_tokens(self) -> torch.Tensor:
        """What the model is fed [b, s] (or the packed [g, t])."""
        return self.tokens if self.shared is None else self.shared.tokens

    def input_experts(self) -> torch.Tensor | None:
        """The engine's experts in the layout the model is fed."""
        return self.routed_experts if self.shared is None else self.shared.experts

    def input_loss_mask(self) -> torch.Tensor:
        """`loss_mask` in the layout the model is fed (a shared prompt position once)."""
        if self.shared is None or self.shared.loss_mask is None:
            return self.loss_mask
        return self.shared.loss_mask


LossFn = Callable[[torch.Tensor, MicroBatch], tuple[torch.Tensor, dict[str, torch.Tensor]]]
"""(logprobs [b, s], micro-batch) -> (loss of this micro-batch over the global denominator,
statistics to combine over micro-batches and DP ranks: sums, or maxima for keys ending in
`_max`). A loss with `needs_entropy = True` also finds the per-token entropy [b, s] in
`mb.entropy`."""


def nll_loss(global_tokens: float) -> LossFn:
    """Token-mean negative log-likelihood over `global_tokens` loss tokens of the whole step."""

    def fn(logprobs: torch.Tensor, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = -(logprobs * mb.loss_mask).sum() / global_tokens
        return loss, {"tokens": mb.loss_mask.sum()}

    return fn


@dataclass(frozen=True)
class StepShape:
    """What the pipeline schedule needs to size its p2p buffers, and how log-probs are taken."""

    seq_length: int
    micro_batch_size: int
    vocab_size: int
    temperature: float = 1.0
    kernels: str = "auto"
    """Kernel backend of the log-prob pass (`ActorConfig.kernels`)."""


def _forward_step(
    shape: StepShape,
    loss_fn: LossFn | None,
    scale: float,
    data_iterator: Iterator[MicroBatch],
    model: torch.nn.Module,
):
    mb = next(data_iterator)
    shared = mb.shared
    if shared is None:
        output = model(mb.tokens, mb.positions(), None)
    else:
        with row_positions(model, shared.positions):
            output = model(shared.tokens, shared.positions, shared.attention_mask)

    def loss_func(logits_bsv: torch.Tensor):
        batch = mb
        if shared is not None:  # the packed logits, back in the rows' layout
            logits_bsv = shared.rows_from_packed(logits_bsv)
        if getattr(loss_fn, "needs_entropy", False):  # entropy bonus: one pass gives both
            logprobs, entropy = token_logprobs_and_entropy(
                logits_bsv, mb.labels, shape.vocab_size, shape.temperature,
                backend=shape.kernels)
            batch = dataclasses.replace(mb, entropy=entropy)
        else:
            logprobs = token_logprobs(logits_bsv, mb.labels, shape.vocab_size, shape.temperature,
                                      backend=shape.kernels)
        if loss_fn is None:  # forward only: hand back the log-probs
            return torch.zeros((), device=logits_bsv.device), {"logprobs": logprobs.detach()}
        loss, stats = loss_fn(logprobs, batch)
        stats = {k: v.detach().float() for k, v in stats.items()}
        stats["loss"] = loss.detach().float()
        return loss * scale, stats

    return output, loss_func


def _reduce_stats(per_mb: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """Combine statistics over micro-batches and DP ranks, then share them along the pipeline.

    Keys ending in `_max` are maxima; every other key is a sum (the algorithms' contract).
    """
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    box = [sorted(per_mb[0]) if per_mb else []]
    dist.broadcast_object_list(box, src=last, group=pp_group)
    keys = box[0]
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    out: dict[str, float] = {}
    for is_max in (False, True):
        names = [k for k in keys if k.endswith("_max") == is_max]
        if not names:
            continue
        if per_mb:
            per_key = [torch.stack([d[k].float() for d in per_mb]) for k in names]
            vec = torch.stack([v.max() if is_max else v.sum() for v in per_key])
        else:
            vec = torch.zeros(len(names))
        op = dist.ReduceOp.MAX if is_max else dist.ReduceOp.SUM
        dist.all_reduce(vec, op=op, group=dp_group)
        dist.broadcast(vec, src=last, group=pp_group)
        out.update(zip(names, vec.tolist(), strict=True))
    return out


def _run_schedule(
    model: list[torch.nn.Module],
    microbatches: Sequence[MicroBatch],
    shape: StepShape,
    loss_fn: LossFn | None,
    scale: float,
) -> list[dict[str, torch.Tensor]]:
    """Megatron's schedule for this layout (1F1B, interleaved or none); forward only when there
    is no loss. Returns the per-micro-batch dicts of the last pipeline stage."""
    return get_forward_backward_func()(
        forward_step_func=partial(_forward_step, shape, loss_fn, scale),
        data_iterator=[iter(microbatches) for _ in model],
        model=model,
        num_microbatches=len(microbatches),
        seq_length=shape.seq_length,
        micro_batch_size=shape.micro_batch_size,
        forward_only=loss_fn is None,
    )


def forward_backward(
    model: list[torch.nn.Module],
    microbatches: Sequence[MicroBatch],
    loss_fn: LossFn,
    shape: StepShape,
) -> dict[str, float]:
    """Run forward+backward on all micro-batches; gradients land in the DDP grad buffers.

    Returns the summed statistics (including `loss`, the step loss) on every rank.
    """
    dp = parallel_state.get_data_parallel_world_size()
    scale = float(len(microbatches) * dp)
    return _reduce_stats(_run_schedule(model, microbatches, shape, loss_fn, scale))


@torch.no_grad()
def forward_logprobs(
    model: list[torch.nn.Module], microbatches: Sequence[MicroBatch], shape: StepShape
) -> list[torch.Tensor]:
    """Log-probs [b, s] of each micro-batch's labels, available on every pipeline rank."""
    out = _run_schedule(model, microbatches, shape, None, 1.0)
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    last = parallel_state.get_pipeline_model_parallel_last_rank()
    result = []
    for i, mb in enumerate(microbatches):
        buf = out[i]["logprobs"] if out else torch.empty(mb.tokens.shape, dtype=torch.float32)
        dist.broadcast(buf, src=last, group=pp_group)
        result.append(buf)
    return result
