"""Routing replay (R3) and routing agreement: the actor's MoE routers and the engine's experts.

Megatron-Core 0.16 has the mechanism (`megatron/core/transformer/moe/router_replay.py`): each
`TopKRouter` may own a `RouterReplay`; in action REPLAY_FORWARD its top-k step takes
`target_topk_idx` instead of computing one, and gathers the router's own scores at those
indices, so gradients still flow into the router (R3, "Rollout Routing Replay"). We give every
router a `RouterReplay` that also keeps the experts the router itself would have chosen (one
top-k over [N, E] scores, no second forward), so the same pass that replays the engine's
experts measures how often the actor agrees with them (docs/design.md section 6).

`engine_routing(actor, microbatches, replay)` drives both for a pass over micro-batches that
carry the engine's experts (`MicroBatch.routed_experts`): each router is fed its target for
every forward call in order (one per micro-batch), and agreement is counted on the positions
whose log-prob enters the loss.

Activation recompute (`actor.recompute`): Megatron's full recompute runs each layer's forward
under no_grad and runs it again inside backward (`CheckpointFunction`), so the router is called
a second time per micro-batch, from the autograd engine (`torch._C._current_graph_task_id() !=
-1` only then). Such a call is fed, as Megatron's REPLAY_BACKWARD, the experts of the
micro-batch being recomputed: every router keeps a FIFO of its forward calls awaiting their
backward, and every schedule Megatron has backs a model chunk's micro-batches in the order it
ran their forwards (no pipelining: forward i then backward i; 1F1B and interleaved 1F1B pop
each chunk's saved tensors with `pop(0)`), and a router belongs to one chunk. The recompute
pass does not count agreement (the forward counted it). Recompute that does not re-run the
router (selective: attention only) never enters this path.

Token order: a Megatron router sees its micro-batch as [s, b] flattened (token s * b + j), and
with sequence parallelism only its TP rank's slice of s. Engine experts come per sample as
[T, L, K] (T = prompt + response tokens; L = MoE layers of the whole model, in order).
"""

from __future__ import annotations

import collections
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from megatron.core import parallel_state as ps
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction


class AgreementRouterReplay(RouterReplay):
    """Megatron's `RouterReplay` that also records the router's own top-k [N, K] whenever an
    action is set (RECORD or REPLAY_FORWARD), in `own_topk`; without an action it is inert."""

    def __init__(self) -> None:
        super().__init__()
        self.own_topk: torch.Tensor | None = None

    def get_replay_topk(self, scores, topk, num_groups=None, group_topk=None,
                        default_compute_topk=None):  # noqa: ANN001, ANN201 - Megatron's API
        if self.router_replay_action is None:
            return default_compute_topk(scores, topk, num_groups, group_topk)
        probs, own = default_compute_topk(scores, topk, num_groups=num_groups,
                                          group_topk=group_topk)
        self.own_topk = own.detach()
        if self.router_replay_action == RouterReplayAction.RECORD:
            return probs, own
        return super().get_replay_topk(scores, topk, num_groups, group_topk,
                                       default_compute_topk)


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
    if ps.get_context_parallel_world_size() > 1:
        raise ValueError("routing replay with parallel.cp > 1 is not supported")
    actor.config.moe_enable_routing_replay = True
    install_agreement(actor)


def install_agreement(actor: Any) -> None:
    """Give every MoE router of the actor an `AgreementRouterReplay` (inert until an action is
    set): what lets any forward measure routing agreement, replay on or off."""
    for _, router in moe_routers(actor):
        if not isinstance(router.router_replay, AgreementRouterReplay):
            router.router_replay = AgreementRouterReplay()


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


def _in_backward() -> bool:
    """Inside a backward pass (the autograd engine is running a graph task): where activation
    recompute re-runs a layer's forward."""
    return torch._C._current_graph_task_id() != -1


def _check_tokens(layer: int, args: tuple, target: torch.Tensor) -> None:
    tokens = args[0].shape[0] * args[0].shape[1]
    if target.shape[0] != tokens:
        raise ValueError(f"routing replay: MoE layer {layer} sees {tokens} tokens but "
                         f"the engine's experts cover {target.shape[0]}")


def to_router_order(x_bs: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """[b, s, ...] -> [s * b, ...] in Megatron's token order, this TP rank's slice under SP."""
    sb = x_bs.transpose(0, 1)
    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1 and sequence_parallel:
        r, chunk = ps.get_tensor_model_parallel_rank(), sb.shape[0] // tp
        sb = sb[r * chunk : (r + 1) * chunk]
    return sb.reshape(-1, *sb.shape[2:])


@contextmanager
def engine_routing(actor: Any, microbatches: Sequence[Any], replay: bool
                   ) -> Iterator[torch.Tensor]:
    """A pass over `microbatches` (each with `routed_experts` [b, s, L, K] and `loss_mask`):
    with `replay` every router uses the engine's experts; either way the block yields a
    float64 tensor [2] that holds, on exit, (positions x MoE layers where the router's own
    top-k set equals the engine's, positions x MoE layers counted) over this rank's loss
    positions. Inert (yields zeros) when the model has no router or a micro-batch lacks
    engine experts."""
    counts = torch.zeros(2, dtype=torch.float64)
    routers = moe_routers(actor)
    if not routers or any(mb.input_experts() is None for mb in microbatches):
        yield counts
        return
    sp = bool(actor.config.sequence_parallel)
    # in the layout the model is fed (a shared prompt's positions once)
    targets = [to_router_order(mb.input_experts(), sp).long() for mb in microbatches]  # [N, L, K]
    masks = [to_router_order(mb.input_loss_mask(), sp) != 0 for mb in microbatches]  # [N]
    matches: list[torch.Tensor] = []
    action = RouterReplayAction.REPLAY_FORWARD if replay else RouterReplayAction.RECORD
    handles = []
    for layer, router in routers:
        # i: the next forward call (= micro-batch); pending: forward calls awaiting their
        # recompute in backward, oldest first; current: (micro-batch, recompute?) of the call
        # between pre and post.
        state: dict[str, Any] = {"i": 0, "pending": collections.deque(), "current": None}

        def pre(_module, args, layer=layer, router=router, state=state) -> None:
            rr = router.router_replay
            rr.clear_indices()
            if _in_backward():  # activation recompute re-running this router's forward
                if not state["pending"]:
                    raise RuntimeError(f"routing replay: MoE layer {layer} recomputed a forward "
                                       "in backward that it had not run")
                i = state["pending"].popleft()
                state["current"] = (i, True)
                _check_tokens(layer, args, targets[i])
                if replay:
                    rr.replay_backward_list.append(targets[i][:, layer])
                    rr.set_router_replay_action(RouterReplayAction.REPLAY_BACKWARD)
                else:
                    rr.clear_router_replay_action()  # its own choice again; nothing to count
                return
            i = state["i"]
            state["i"] += 1
            if i >= len(targets):
                raise RuntimeError(f"routing replay: MoE layer {layer} ran more forwards than "
                                   f"the {len(targets)} micro-batches given")
            _check_tokens(layer, args, targets[i])
            state["pending"].append(i)
            state["current"] = (i, False)
            rr.set_target_indices(targets[i][:, layer])
            rr.set_router_replay_action(action)

        def post(_module, _args, _output, layer=layer, router=router, state=state) -> None:
            i, recomputed = state["current"]
            state["current"] = None
            if recomputed:
                return
            own = router.router_replay.own_topk.sort(-1).values
            engine = targets[i][:, layer].to(own.device).sort(-1).values
            same = (own == engine).all(-1)[masks[i].to(own.device)]
            matches.append(same.sum())  # stays on the device: one sync at the end, not per layer
            counts[1] += same.numel()

        handles.append(router.register_forward_pre_hook(pre))
        handles.append(router.register_forward_hook(post))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()
        counts[0] = float(torch.stack(matches).sum()) if matches else 0.0
        for _, router in routers:
            router.router_replay.clear_indices()
            router.router_replay.clear_router_replay_action()
            router.router_replay.own_topk = None
