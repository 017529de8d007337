"""Process groups: torch.distributed from torchrun's environment (or a single process), then
Megatron-Core's model-parallel groups. Every group gets the configured timeout, so a dead rank
fails a collective instead of hanging it.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_rl.actor import compat
from megatron_rl.actor.config import ParallelConfig


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the layout."""

    rank: int
    world_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    ep_rank: int
    dp_size: int
    backend: str


def free_port() -> int:
    """A TCP port on localhost that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _backend(parallel: ParallelConfig) -> str:
    if parallel.backend != "auto":
        return parallel.backend
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(parallel: ParallelConfig, seed: int = 1234) -> RankInfo:
    """Initialise torch.distributed and Megatron's groups for `parallel`.

    Reads RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT as torchrun sets them; without them it runs
    as a single process on a free local port. Activates the CPU compat layer when CUDA is absent.
    """
    compat.activate()
    # Megatron-Core: imported where groups are made, so that `actor.parallel` (free_port, the
    # test spawner) stays light
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    backend = _backend(parallel)
    timeout = datetime.timedelta(seconds=parallel.timeout_s)
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            if world > 1:
                raise RuntimeError("WORLD_SIZE > 1 but MASTER_PORT is unset: launch with torchrun")
            os.environ["MASTER_PORT"] = str(free_port())
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.virtual_pp,
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp,
        distributed_timeout_minutes=parallel.timeout_s / 60.0,
        # On CPU the default groups already are gloo; duplicates would only cost time.
        create_gloo_process_groups=backend != "gloo",
    )
    model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)
    return rank_info(backend)


def rank_info(backend: str | None = None) -> RankInfo:
    """This rank's coordinates in the current Megatron layout."""
    from megatron.core import parallel_state as ps  # Megatron-Core: as in init_distributed

    return RankInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        backend=backend or dist.get_backend(),
    )


def destroy_distributed() -> None:
    """Tear down Megatron's groups and the default process group."""
    from megatron.core import parallel_state  # Megatron-Core: as in init_distributed

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
