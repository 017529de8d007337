"""Routing replay: make the actor's MoE routers use the experts the rollout engine chose.

Megatron-Core 0.16 has the mechanism (`megatron/core/transformer/moe/router_replay.py`): with
`moe_enable_routing_replay` each `TopKRouter` owns a `RouterReplay`; in action REPLAY_FORWARD
its top-k step takes `target_topk_idx` instead of computing one, and gathers the router's own
scores at those indices, so gradients still flow into the router (R3, "Rollout Routing
Replay"). Here we attach those objects to an already built actor, feed each router the target
of every forward call in order (one per micro-batch), and capture what the routers chose.

Token order: a Megatron router sees its micro-batch as [s, b] flattened (token s * b + j), and
with sequence parallelism only its TP rank's slice of s. Engine experts come per sample as
[T, L, K] (T = prompt + response tokens; L = MoE layers of the whole model, in order).
Activation recompute re-runs routers in backward: not supported with replay yet.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from megatron.core import parallel_state as ps
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction


def moe_routers(actor: Any) -> list[tuple[int, TopKRouter]]:
    """(index among all MoE layers of the model, router) for this rank's MoE layers."""
    m = actor.model_cfg
    freq = m.moe_layer_freq
    pattern = freq if isinstance(freq, list) else [int(i % freq == 0) for i in range(m.num_layers)]
    moe_index = {layer: i for i, layer in enumerate(j for j, v in enumerate(pattern) if v)}
    out = []
    for chunk in actor.model:
        for module in chunk.modules():
            router = getattr(getattr(module, "mlp", None), "router", None)
            if isinstance(router, TopKRouter) and hasattr(module, "layer_number"):
                out.append((moe_index[module.layer_number - 1], router))
    return out


def enable_routing_replay(actor: Any) -> None:
    """What `moe_enable_routing_replay=True` does at build time, on a built actor."""
    if actor.actor_cfg.recompute != "none":
        raise ValueError("routing replay with actor.recompute != none is not supported: "
                         "recomputed routers would need REPLAY_BACKWARD; set actor.recompute=none")
    if ps.get_context_parallel_world_size() > 1:
        raise ValueError("routing replay with parallel.cp > 1 is not supported")
    actor.config.moe_enable_routing_replay = True
    for _, router in moe_routers(actor):
        if router.router_replay is None:
            router.router_replay = RouterReplay()


def router_order(experts: Sequence[torch.Tensor], seq_len: int,
                 sequence_parallel: bool = False) -> torch.Tensor:
    """Per-sample experts [T_j, L, K] of one micro-batch -> [L, s * b, K] in Megatron's token
    order, cut to this rank's slice when `sequence_parallel` (the actor's
    `parallel.sequence_parallel`). Positions past a sample's end (padding,
    masked out of the loss) get the sample's last token's experts."""
    rows = []
    for ex in experts:
        if ex.shape[0] >= seq_len:
            rows.append(ex[:seq_len])
        else:
            rows.append(torch.cat([ex, ex[-1:].expand(seq_len - ex.shape[0], -1, -1)]))
    sbLK = torch.stack(rows, dim=1)  # [s, b, L, K]
    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1 and sequence_parallel:
        r, chunk = ps.get_tensor_model_parallel_rank(), seq_len // tp
        sbLK = sbLK[r * chunk : (r + 1) * chunk]
    s, b, L, K = sbLK.shape
    return sbLK.reshape(s * b, L, K).permute(1, 0, 2).contiguous().long()


@contextmanager
def replaying(actor: Any, per_microbatch: Sequence[torch.Tensor]) -> Iterator[None]:
    """Within the block, forward number i of each router uses `per_microbatch[i]` [L, N, K]
    (from `router_order`); call `actor.logprobs` / `actor.train_step` inside."""
    routers = moe_routers(actor)
    if not routers or routers[0][1].router_replay is None:
        raise RuntimeError("routing replay is off: call enable_routing_replay(actor) first")
    handles = []
    for layer, router in routers:
        queue = [mb[layer] for mb in per_microbatch]
        handles.append(router.register_forward_pre_hook(_feed(router, layer, queue)))
        router.router_replay.set_router_replay_action(RouterReplayAction.REPLAY_FORWARD)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for _, router in routers:
            router.router_replay.clear_indices()
            router.router_replay.clear_router_replay_action()


def _feed(router: TopKRouter, layer: int, queue: list[torch.Tensor]):
    def hook(_module, args) -> None:
        tokens = args[0].shape[0] * args[0].shape[1]
        if not queue:
            raise RuntimeError(f"routing replay: MoE layer {layer} ran more forwards than "
                               "micro-batches were given")
        target = queue.pop(0)
        if target.shape[0] != tokens:
            raise ValueError(f"routing replay: MoE layer {layer} sees {tokens} tokens but the "
                             f"replayed experts cover {target.shape[0]}")
        router.router_replay.clear_indices()
        router.router_replay.set_target_indices(target)
    return hook


@contextmanager
def recording(actor: Any) -> Iterator[list[dict[int, torch.Tensor]]]:
    """Capture the experts every router chose: per forward call, {MoE layer: [N, K] sorted}."""
    calls: list[dict[int, torch.Tensor]] = []
    counts: dict[int, int] = {}
    handles = []
    for layer, router in moe_routers(actor):
        def hook(_module, _args, output, layer=layer, k=router.topk) -> None:
            n = counts.get(layer, 0)
            counts[layer] = n + 1
            if len(calls) <= n:
                calls.append({})
            routing_map = output[1]  # [N, E] bool
            calls[n][layer] = routing_map.float().topk(k, dim=-1).indices.sort(-1).values
        handles.append(router.register_forward_hook(hook))
    try:
        yield calls
    finally:
        for h in handles:
            h.remove()


def routing_agreement(engine_experts: torch.Tensor, actor_experts: torch.Tensor,
                      mask: torch.Tensor | None = None) -> list[float]:
    """Per MoE layer, the fraction of the actor's top-k picks the engine also made.

    Both [L, N, K] (any order within K); `mask` [N] selects the tokens that count.
    """
    if engine_experts.shape != actor_experts.shape:
        raise ValueError(f"expert tensors differ in shape: {tuple(engine_experts.shape)} vs "
                         f"{tuple(actor_experts.shape)}")
    same = (engine_experts[..., :, None] == actor_experts[..., None, :]).any(-1)  # [L, N, K]
    per_token = same.float().mean(-1)  # [L, N]
    if mask is not None:
        per_token = per_token[:, mask.bool()]
    return per_token.mean(-1).tolist()
