"""Weight sync: the actor's weights, as HF-named tensors in bounded buckets, into every engine.

Which rank sends: `actor.hf_buckets` is collective and hands every rank of a pipeline stage the
full (TP-gathered, EP-collected) HF tensors of that stage, so any one of those ranks can feed an
engine. By convention the engines live on global rank 0 (the stage-0 writer: TP, DP, CP, EP
rank 0); the other ranks pass `engines=[]` and only take part in the gathers. For remote
engines the same rank broadcasts each bucket over the update group (`broadcast_bucket`).
Pipeline parallelism > 1 would leave rank 0 with stage 0's layers only: refused for now.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from megatron_rl.rollout.engine import EngineError, RolloutEngine


@dataclass(frozen=True)
class SyncReport:
    """What one weight sync moved and how long it took (on this rank)."""

    seconds: float
    bytes: int
    """Bytes of HF tensors applied to each engine (0 on ranks without engines)."""
    tensors: int
    buckets: int
    max_bucket_bytes: int
    """Largest bucket seen (exceeds bucket_bytes only for a single larger tensor)."""

    @property
    def gb_per_s(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e9


def sync_weights(actor: Any, engines: Sequence[RolloutEngine], bucket_bytes: int = 64 * 2**20,
                 arch: Any = None) -> SyncReport:
    """Stream the actor's weights into `engines` (collective over the actor's ranks)."""
    arch = arch or actor.arch
    if arch is None:
        raise ValueError("weight sync needs model.hf_architecture (the HF names to export)")
    if engines and actor.parallel_cfg.pp > 1:
        raise ValueError("in-process weight sync with parallel.pp > 1 is not supported: the "
                         "engine's rank sees only its pipeline stage; use pp=1")
    start = time.perf_counter()
    nbytes = ntensors = nbuckets = biggest = 0
    for bucket in actor.hf_buckets(arch, bucket_bytes):
        size = sum(t.numel() * t.element_size() for _, t in bucket)
        biggest = max(biggest, size)
        nbuckets += 1
        if not engines:
            continue
        for engine in engines:
            engine.update_weights_from_tensor(bucket, flush_cache=False)
        nbytes += size
        ntensors += len(bucket)
    for engine in engines:
        engine.flush_cache()
    return SyncReport(time.perf_counter() - start, nbytes, ntensors, nbuckets, biggest)


def open_update_group(master_address: str, master_port: int, rank: int, world_size: int,
                      group_name: str = "weight_update_group", timeout_s: float = 60.0
                      ) -> tuple[Any, Any]:
    """A gloo process group of its own (own TCP store), apart from any default group.

    Rank 0 (the trainer) hosts the store. Returns (process group, store); keep both alive.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        store = torch.distributed.TCPStore(master_address, master_port, world_size,
                                           is_master=rank == 0, timeout=timeout)
        prefixed = torch.distributed.PrefixStore(group_name, store)
        pg = torch.distributed.ProcessGroupGloo(prefixed, rank, world_size, timeout)
    except (RuntimeError, TimeoutError) as e:
        raise EngineError(f"weight update group {group_name!r} at {master_address}:"
                          f"{master_port} did not form within {timeout_s:.0f} s: {e}") from e
    return pg, store


def bucket_meta(bucket: Sequence[tuple[str, torch.Tensor]]) -> dict[str, list]:
    """The `update_weights_from_distributed` arguments of a bucket (SGLang's field names)."""
    return {"names": [n for n, _ in bucket],
            "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
            "shapes": [list(t.shape) for _, t in bucket]}


def broadcast_bucket(pg: Any, bucket: Sequence[tuple[str, torch.Tensor]],
                     timeout_s: float = 60.0) -> None:
    """Send a bucket from rank 0 of the update group, tensor by tensor, in bucket order."""
    for name, tensor in bucket:
        broadcast_tensor(pg, tensor.contiguous(), name, timeout_s)


def broadcast_tensor(pg: Any, tensor: torch.Tensor, name: str, timeout_s: float) -> None:
    """One broadcast from rank 0 of `pg` (sender or receiver), failing after `timeout_s`."""
    try:
        ok = pg.broadcast(tensor, 0).wait(datetime.timedelta(seconds=timeout_s))
    except RuntimeError as e:  # gloo reports a timeout or a vanished peer this way
        raise EngineError(f"weight broadcast of {name} failed or timed out "
                          f"({timeout_s:.0f} s): {e}") from e
    if ok is False:
        raise EngineError(f"weight broadcast of {name} timed out after {timeout_s:.0f} s")
