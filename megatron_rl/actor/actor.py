"""The policy being trained: Megatron-Core model chunks, optimizer, LR schedule, checkpoints.

Process groups must exist before an `Actor` is built (`parallel.init_distributed`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_rl.actor import checkpoint, compat, offload, replay
from megatron_rl.actor.config import ActorConfig, ModelConfig, ParallelConfig
from megatron_rl.actor.model import build_model, padded_vocab_size
from megatron_rl.actor.step import LossFn, MicroBatch, StepShape, forward_backward, forward_logprobs
from megatron_rl.convert import arch_of
from megatron_rl.convert.export import iter_hf_buckets, save_hf
from megatron_rl.convert.load import load_hf
from megatron_rl.convert.maps import Arch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step did."""

    stats: dict[str, float]
    grad_norm: float
    lr: float
    updated: bool
    """False when the step was skipped (non-finite loss or gradients)."""
    nonfinite: str | None = None
    """What was not finite when the step was skipped: "loss" or "grad_norm"; None otherwise."""
    routing: float = math.nan
    """Routing agreement measured by this step's forward (`train_step(measure_routing=True)`):
    the share of (loss position, MoE layer) pairs where the routers' own top-k equals the
    engine's; NaN when not measured or nothing to compare."""


def _optimizer_config(actor: ActorConfig, params_dtype: torch.dtype) -> OptimizerConfig:
    return OptimizerConfig(
        optimizer=actor.optimizer,
        lr=actor.lr,
        min_lr=actor.min_lr,
        weight_decay=actor.weight_decay,
        adam_beta1=actor.adam_beta1,
        adam_beta2=actor.adam_beta2,
        adam_eps=actor.adam_eps,
        clip_grad=actor.clip_grad,
        bf16=params_dtype == torch.bfloat16,
        params_dtype=params_dtype,
        use_distributed_optimizer=actor.use_distributed_optimizer,
        optimizer_cpu_offload=actor.optimizer_cpu_offload,
        optimizer_offload_fraction=1.0 if actor.optimizer_cpu_offload else 0.0,
    )


class Actor:
    """Megatron-Core policy with its optimizer; every method is collective over all ranks."""

    def __init__(
        self,
        model: ModelConfig,
        parallel: ParallelConfig,
        actor: ActorConfig,
        total_steps: int = 1,
    ) -> None:
        self.model_cfg, self.parallel_cfg, self.actor_cfg = model, parallel, actor
        if parallel.cp > 1:  # launch/support.py says the same to `plan`
            raise ValueError(f"parallel.cp={parallel.cp}: context parallelism is not wired (the "
                             "trainer feeds every rank whole sequences); set parallel.cp=1")
        self.arch: Arch | None = arch_of(model) if model.hf_architecture else None
        """The Hugging Face architecture of the weights (from the config, or set by `load_hf`)."""
        self.model, self.config = build_model(model, parallel, actor)
        self.optimizer = get_megatron_optimizer(
            _optimizer_config(actor, self.config.params_dtype),
            self.model,
            # init_distributed makes no duplicate gloo groups when the default backend is gloo.
            use_gloo_process_groups=dist.get_backend() != "gloo",
        )
        # Megatron's schedules call these hooks: grad sync at the end of backward, loss scale.
        self.config.finalize_model_grads_func = finalize_model_grads
        self.config.grad_scale_func = self.optimizer.scale_loss
        self.config.no_sync_func = (
            self.model[0].no_sync if len(self.model) == 1 else [m.no_sync for m in self.model]
        )
        self.scheduler = OptimizerParamScheduler(
            self.optimizer,
            init_lr=0.0 if actor.lr_warmup_steps else actor.lr,
            max_lr=actor.lr,
            min_lr=actor.min_lr,
            lr_warmup_steps=actor.lr_warmup_steps,
            lr_decay_steps=max(total_steps, actor.lr_warmup_steps + 1),
            lr_decay_style=actor.lr_decay_style,
            start_wd=actor.weight_decay,
            end_wd=actor.weight_decay,
            # A resumed run follows its config (e.g. train.steps raised to run longer); only the
            # position in the schedule comes from the checkpoint.
            override_opt_param_scheduler=True,
            use_checkpoint_opt_param_scheduler=False,
            wd_incr_steps=max(total_steps, 1),
            wd_incr_style="constant",
        )
        self._device = next(self.model[0].parameters()).device
        self._host: offload.HostCopy | None = None  # what offload() moved, until onload()
        self.replays_routing = False
        """Routers use the engine's experts of micro-batches that carry them (R3)."""
        replay.install_agreement(self)  # MoE: any forward can measure routing agreement

    # ---- colocation: hand the device to the engines and take it back --------------------------

    def offload(self, params: bool = True) -> None:
        """Move gradients and optimizer state (and, with `params`, the parameters) to host
        memory, so that colocated engines can use the device (`actor/offload.py`). Repeated
        calls move what is still on the device."""
        if self._host is None:
            self._host = offload.HostCopy()
            offload.offload_grads([c for c in self.model], self._host)
            if not self.actor_cfg.optimizer_cpu_offload:
                offload.offload_optimizer(self.optimizer, self._host, self.device)
        if params and not self._host.params and not self._host.loose:
            offload.offload_params([c for c in self.model], self._host)

    def onload(self) -> None:
        """Bring back whatever `offload` moved (no-op when nothing is offloaded)."""
        if self._host is not None:
            host, self._host = self._host, None
            offload.onload(host, self.optimizer, self._device)

    @property
    def offloaded(self) -> bool:
        """Some of the actor's state is in host memory (`offload`)."""
        return self._host is not None

    def _require_onloaded(self, what: str) -> None:
        if self._host is not None and (self._host.params or self._host.loose
                                       or what != "weights"):
            raise RuntimeError(f"actor: {what} while offloaded to host; call onload() first")

    def enable_routing_replay(self) -> None:
        """From now on every forward of a micro-batch carrying the engine's experts
        (`MicroBatch.routed_experts`) routes its tokens to exactly those experts."""
        replay.enable_routing_replay(self)
        self.replays_routing = True

    def shape(self, seq_length: int, micro_batch_size: int, temperature: float = 1.0) -> StepShape:
        """The static shapes of a batch of micro-batches."""
        return StepShape(seq_length, micro_batch_size, self.model_cfg.vocab_size, temperature,
                         kernels=self.actor_cfg.kernels)

    def train_step(
        self, microbatches: Sequence[MicroBatch], loss_fn: LossFn, temperature: float = 1.0,
        *, measure_routing: bool = False
    ) -> StepResult:
        """Forward+backward over all micro-batches, then one optimizer step. With
        `measure_routing` the forward also measures the routing agreement (as
        `logprobs_and_routing` does), for a step that runs no separate forward."""
        self._require_onloaded("train_step")
        mb0 = microbatches[0].input_tokens
        for chunk in self.model:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        routed = self.replays_routing or measure_routing
        with replay.engine_routing(self, microbatches, replay=self.replays_routing) if routed \
                else contextlib.nullcontext(torch.zeros(2, dtype=torch.float64)) as counts:
            stats = forward_backward(self.model, microbatches, loss_fn,
                                     self.shape(mb0.shape[1], mb0.shape[0], temperature))
        agreement = math.nan
        if measure_routing:
            counts = counts.to(self.device)
            dist.all_reduce(counts)  # disjoint tokens or layers on every rank
            agreement = float(counts[0] / counts[1]) if counts[1] > 0 else math.nan
        grad_norm, nonfinite = self._optimizer_step(stats.get("loss", 0.0))
        if nonfinite is None:
            self.scheduler.step(increment=1)
        return StepResult(stats, grad_norm, self.lr, nonfinite is None, nonfinite, agreement)

    @torch.no_grad()
    def _optimizer_step(self, loss: float) -> tuple[float, str | None]:
        """Megatron's `ChainedOptimizer.step` (grad norm, clip by it, step), except that a
        non-finite loss or grad norm skips the update and zeroes the gradients: Megatron's fp32
        optimizer does not check, and Adam would write NaN into every weight and moment.
        Returns (grad norm, None) or (grad norm, "loss" | "grad_norm"); the same on every rank."""
        found_inf = self.optimizer.prepare_grads()  # fp16 loss-scale overflow only
        grad_norm = float("inf") if found_inf else float(self.optimizer.get_grad_norm())
        nonfinite = ("loss" if not math.isfinite(loss) else
                     "grad_norm" if not math.isfinite(grad_norm) else None)
        # Every rank must take the same branch (the distributed optimizer gathers after it).
        flag = torch.tensor([0.0 if nonfinite is None else 2.0 if nonfinite == "loss" else 1.0],
                            device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0:
            for chunk in self.model:
                chunk.zero_grad_buffer()
            self.optimizer.zero_grad()
            return grad_norm, "loss" if flag.item() == 2.0 else "grad_norm"
        from megatron.core.optimizer import optimizer as mcore_optimizer  # compat patches it

        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            params = [] if getattr(opt, "is_stub_optimizer", False) else opt.get_parameters()
            if params and opt.config.clip_grad > 0.0:
                mcore_optimizer.clip_grad_by_total_norm_fp32(
                    params, max_norm=opt.config.clip_grad, total_norm=grad_norm,
                    use_decoupled_grad=opt.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)
        self.optimizer.step_with_ready_grads()
        return grad_norm, None

    def logprobs(
        self, microbatches: Sequence[MicroBatch], temperature: float = 1.0
    ) -> list[torch.Tensor]:
        """Log-probs [b, s] of each micro-batch's labels under the current weights."""
        return self.logprobs_and_routing(microbatches, temperature)[0]

    def logprobs_and_routing(
        self, microbatches: Sequence[MicroBatch], temperature: float = 1.0
    ) -> tuple[list[torch.Tensor], float]:
        """Log-probs [b, s] of each micro-batch's labels, and the routing agreement: the share
        of (loss position, MoE layer) pairs, over all ranks, where the routers' own top-k set
        equals the engine's (`MicroBatch.routed_experts`); NaN when there is nothing to compare.
        With routing replay on, the forward uses the engine's experts."""
        self._require_onloaded("a forward")
        for chunk in self.model:
            chunk.eval()
        mb0 = microbatches[0].input_tokens
        with replay.engine_routing(self, microbatches, self.replays_routing) as counts:
            logprobs = forward_logprobs(
                self.model, microbatches, self.shape(mb0.shape[1], mb0.shape[0], temperature)
            )
        counts = counts.to(self.device)
        dist.all_reduce(counts)  # disjoint tokens or layers on every rank (SP slices, stages)
        agreement = float(counts[0] / counts[1]) if counts[1] > 0 else math.nan
        return logprobs, agreement

    @property
    def dp_size(self) -> int:
        """Data-parallel replicas: how many ranks share one step's samples."""
        return parallel_state.get_data_parallel_world_size()

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel replicas."""
        return parallel_state.get_data_parallel_rank()

    def dp_sum(self, x: torch.Tensor) -> torch.Tensor:
        """`x` summed over the data-parallel ranks (a new tensor)."""
        out = x.detach().to(self.device, copy=True)
        dist.all_reduce(out, group=parallel_state.get_data_parallel_group())
        return out.to(x.device)

    def dp_max(self, x: torch.Tensor) -> torch.Tensor:
        """Element-wise maximum of `x` over the data-parallel ranks (a new tensor)."""
        out = x.detach().to(self.device, copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=parallel_state.get_data_parallel_group())
        return out.to(x.device)

    @property
    def device(self) -> torch.device:
        """Where the weights live (and where collectives of the actor's backend reduce)."""
        return self._device

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def sharded_state_dict(
        self, with_optimizer: bool = True, is_loading: bool = False
    ) -> dict[str, Any]:
        """Model (and optimizer, scheduler) state keyed by global, layout-free tensor names."""
        self._require_onloaded("checkpointing")
        state: dict[str, Any] = {
            f"model{i}": chunk.module.sharded_state_dict() for i, chunk in enumerate(self.model)
        }
        if with_optimizer:
            # Optimizer state keyed per model parameter, so it re-shards like the model does:
            # the distributed optimizer's "fully_reshardable" format (the plain optimizer
            # ignores it), and no "chained_<i>." key prefix, since with EP > 1 expert and dense
            # parameters get separate optimizers and the index would tie keys to the layout.
            meta = {
                "distrib_optim_sharding_type": "fully_reshardable",
                "chained_optim_avoid_prefix": True,
            }
            state["optimizer"] = self.optimizer.sharded_state_dict(
                state, is_loading=is_loading, metadata=meta
            )
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def load_hf(self, path: str | os.PathLike, arch: Arch, progress: bool = True) -> dict:
        """Load Hugging Face safetensors straight into this rank's shards."""
        padded = padded_vocab_size(self.model_cfg.vocab_size, self.parallel_cfg.tp)
        self.arch = arch
        return load_hf([c.module for c in self.model], arch, self.model_cfg, str(path), padded,
                       progress=progress)

    def save_hf(self, out_dir: str | os.PathLike, arch: Arch, **kwargs: Any) -> str:
        """Write the weights as a Hugging Face checkpoint (config.json + safetensors; `kwargs`:
        `export.save_hf`'s dtype, config, extra files and overwrite)."""
        self._require_onloaded("weights")
        return str(save_hf([c.module for c in self.model], arch, self.model_cfg, out_dir,
                           **kwargs))

    def hf_buckets(self, arch: Arch, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """This stage's weights as HF-named tensors in buckets (collective; weight sync)."""
        self._require_onloaded("weights")
        return iter_hf_buckets([c.module for c in self.model], arch, self.model_cfg, bucket_bytes)

    def _layout_info(self, with_optimizer: bool) -> dict:
        p = self.parallel_cfg
        return {
            "tp": p.tp, "pp": p.pp, "ep": p.ep, "cp": p.cp, "dp": p.dp,
            "virtual_pp": p.virtual_pp, "with_optimizer": with_optimizer,
            "distributed_optimizer": self.actor_cfg.use_distributed_optimizer,
            "model": dataclasses.asdict(self.model_cfg),
            "arch": self.arch.name if self.arch else None,
        }

    def save(self, root: str | os.PathLike, name: str, with_optimizer: bool = True,
             info: dict | None = None, latest: bool = True) -> str:
        """Write a checkpoint `<root>/<name>` atomically (`info`: extra entries for its
        megatron_rl.json; `latest`: point `<root>/latest` at it); returns its path."""
        state = self.sharded_state_dict(with_optimizer)
        info = self._layout_info(with_optimizer) | (info or {})
        return str(checkpoint.save_sharded(state, root, name, info, latest=latest))

    def _check_optimizer_compatible(self, path: str | os.PathLike) -> None:
        """Model weights re-shard across any layout; optimizer state only where Megatron can.

        Megatron-Core 0.16 keeps expert and dense parameters in separate optimizers when
        EP > 1 and one optimizer otherwise, and the distributed optimizer has its own format, so
        optimizer state cannot move across a change of EP size or optimizer kind.
        """
        if self.actor_cfg.use_distributed_optimizer and not compat.te_available():
            # Megatron-Core 0.16 with torch's Adam (no TE/Apex) saves the distributed
            # optimizer's state without the per-parameter `step` its loader then requires
            # (KeyError 'step' in DistributedOptimizer._set_main_param_and_optimizer_states).
            raise ValueError(
                f"{path}: reloading distributed-optimizer state needs Transformer Engine's Adam; "
                "without it load weights only (with_optimizer=False) or train with "
                "actor.use_distributed_optimizer=false"
            )
        saved, here = checkpoint.read_info(path), self._layout_info(True)
        if not saved:
            return
        if not saved.get("with_optimizer", True):
            raise ValueError(f"{path}: checkpoint holds no optimizer state; load it with "
                             "with_optimizer=False (weights only)")
        for key in ("distributed_optimizer",) + (("ep",) if self.model_cfg.num_experts else ()):
            if saved.get(key) != here[key]:
                raise ValueError(
                    f"{path}: optimizer state was saved with {key}={saved.get(key)} but this run "
                    f"has {key}={here[key]}; Megatron-Core cannot re-shard optimizer state "
                    "across that change. Load weights only (with_optimizer=False) or keep "
                    f"{key}={saved.get(key)}"
                )

    def load(self, path: str | os.PathLike, with_optimizer: bool = True) -> None:
        """Load a checkpoint saved under any parallel layout into this one (optimizer state:
        see `_check_optimizer_compatible`)."""
        if with_optimizer:
            self._check_optimizer_compatible(path)
        loaded = checkpoint.load_sharded(
            self.sharded_state_dict(with_optimizer, is_loading=True), path
        )
        for i, chunk in enumerate(self.model):
            chunk.module.load_state_dict(loaded[f"model{i}"], strict=True)
        if with_optimizer:
            self.optimizer.load_state_dict(loaded["optimizer"])
            self.scheduler.load_state_dict(loaded["scheduler"])
