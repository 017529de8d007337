"""Weight sync: the actor's weights, as HF-named tensors in bounded buckets, into every engine
(docs/design.md section 6).

Who sends: `actor.hf_buckets` is collective within a pipeline stage and hands every rank of the
stage the full (TP-gathered, EP-collected) HF tensors of that stage's layers; the stage's writer
rank (TP, DP and CP rank 0) delivers them. Stages take turns (stage 0 first, a barrier between
them), so an engine never serves two stages' transfers at once and no two update groups can
wait on each other.

How (`rollout.weight_sync`):
- `tensor`: each writer sends each bucket in a request: to served engines over HTTP
  (`update_weights_from_tensor`); to the in-process engine on global rank 0 directly, the other
  stages' writers relaying their buckets to rank 0 point to point.
- `distributed` (served engines; slime's scheme): one update group per pipeline stage, made of
  the stage's writer (rank 0 of the group) and every engine rank (`rank_offset` 1, 1 + tp of
  engine 0, ...). For each bucket the writer posts the names, dtypes and shapes
  (`update_weights_from_distributed`, SGLang's fields) to every engine and broadcasts the
  tensors one by one; NCCL on GPUs, gloo on CPU, every wait bounded by
  `rollout.request_timeout_s`. A failed transfer drops the group (a new one forms at the next
  sync) and raises `EngineError` naming the engine.
- `disk`: the actor writes an HF checkpoint (collective) to a fresh directory under
  `rollout.weight_sync_dir`; every engine reloads it (`update_weights_from_disk`), and the
  previous one is removed.
In every mode the engines flush their prefix caches once, after the last stage.
"""

from __future__ import annotations

import datetime
import queue
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import torch
import torch.distributed as dist

from megatron_rl.rollout.engine import EngineError, RolloutEngine

T = TypeVar("T")


@dataclass(frozen=True)
class SyncReport:
    """What one weight sync moved and how long it took."""

    seconds: float
    bytes: int
    """Bytes of HF tensors delivered to the engines (all stages; each engine gets them all)."""
    tensors: int
    buckets: int
    max_bucket_bytes: int
    """Largest bucket seen (exceeds bucket_bytes only for a single larger tensor)."""

    @property
    def gb_per_s(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e9


def _nbytes(bucket: Sequence[tuple[str, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for _, t in bucket)


class _Counter:
    """Bytes, tensors and buckets one rank delivered; summed over ranks at the end."""

    def __init__(self) -> None:
        self.bytes = self.tensors = self.buckets = self.biggest = 0

    def add(self, bucket: Sequence[tuple[str, torch.Tensor]]) -> None:
        size = _nbytes(bucket)
        self.biggest = max(self.biggest, size)
        self.buckets += 1
        self.bytes += size
        self.tensors += len(bucket)

    def report(self, start: float, device: torch.device) -> SyncReport:
        totals = torch.tensor([self.bytes, self.tensors, self.buckets], dtype=torch.float64,
                              device=device)
        peak = torch.tensor([self.biggest], dtype=torch.float64, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(totals)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        b, t, n = (int(x) for x in totals.tolist())
        return SyncReport(time.perf_counter() - start, b, t, n, int(peak.item()))


def _stages() -> tuple[int, int]:
    """(this rank's pipeline stage, number of stages)."""
    from megatron.core import parallel_state as ps

    return ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()


def _writer_of(stage: int) -> int:
    """Global rank of stage `stage`'s writer (the first rank of the stage's group)."""
    from megatron.core import parallel_state as ps

    ranks = ps.get_pipeline_model_parallel_group()  # this rank's pipeline: one rank per stage
    return dist.get_global_rank(ranks, stage) if ranks is not None else 0


def sync_weights(actor: Any, engines: Sequence[RolloutEngine], bucket_bytes: int = 64 * 2**20,
                 arch: Any = None) -> SyncReport:
    """Send the actor's weights as tensors into `engines` (collective over the actor's ranks).

    `engines` are the engines of this rank: in-process ones live on global rank 0 (the other
    stages' writers relay their buckets there); served ones may be given on every writer.
    """
    return WeightSync(actor, "tensor", bucket_bytes, arch=arch, in_process=True).sync(
        list(engines))


class WeightSync:
    """One sync mode, with the state it keeps between syncs (update groups, disk versions)."""

    def __init__(self, actor: Any, mode: str = "tensor", bucket_bytes: int = 64 * 2**20,
                 *, in_process: bool, arch: Any = None, timeout_s: float = 60.0,
                 disk_dir: str | Path | None = None, backend: str | None = None) -> None:
        if mode not in ("tensor", "distributed", "disk"):
            raise ValueError(f"rollout.weight_sync: unknown mode {mode!r}")
        if mode == "distributed" and in_process:
            raise ValueError("rollout.weight_sync=distributed broadcasts to served engines; an "
                             "in-process engine takes tensors (weight_sync=tensor)")
        self.actor, self.mode, self.bucket_bytes = actor, mode, bucket_bytes
        self.in_process = in_process
        """The engines live in rank 0's process: other stages relay their buckets there."""
        self.arch = arch or actor.arch
        if self.arch is None:
            raise ValueError("weight sync needs model.hf_architecture (the HF names to export)")
        self.timeout_s = timeout_s
        self.disk_dir = Path(disk_dir) if disk_dir is not None else None
        self.backend = backend or ("nccl" if actor.device.type == "cuda" else "gloo")
        self._group: _UpdateGroup | None = None
        self._version = 0

    def sync(self, engines: Sequence[RolloutEngine]) -> SyncReport:
        """Deliver this rank's stage to `engines` (this rank's engine handles; collective)."""
        start, count = time.perf_counter(), _Counter()
        stage, stages = _stages()
        from megatron_rl.convert.export import is_stage_writer  # Megatron: trainer side only

        writer = is_stage_writer()
        if self.mode == "disk":
            self._disk(engines, count)
        else:
            for s in range(stages):  # stages take turns (module docstring)
                if s == stage:
                    self._send_stage(engines if writer else [], writer, count)
                elif self.mode == "tensor" and self.in_process and dist.get_rank() == 0:
                    self._receive_relay(engines, _writer_of(s))
                _barrier(stages)
        if dist.get_rank() == 0:
            for engine in engines:
                engine.flush_cache()
        return count.report(start, self.actor.device)

    # -- tensor and distributed ---------------------------------------------------------------

    def _send_stage(self, engines: Sequence[RolloutEngine], writer: bool, count: _Counter) -> None:
        """Every rank of the stage runs the gathers; the writer delivers each bucket."""
        relay = writer and self.mode == "tensor" and self.in_process and dist.get_rank() != 0
        if self.mode == "distributed" and writer and engines:
            group = self._update_group(engines)
        try:
            self._deliver(engines, writer, relay, count, group if self.mode == "distributed"
                          and writer and engines else None)
        except EngineError:
            if self._group is not None:  # broken: the next sync forms a new one
                self._group.close()
                self._group = None
            raise

    def _deliver(self, engines: Sequence[RolloutEngine], writer: bool, relay: bool,
                 count: _Counter, group: _UpdateGroup | None) -> None:
        # the next bucket is gathered and converted while this one travels
        buckets = self.actor.hf_buckets(self.arch, self.bucket_bytes)
        for bucket in one_ahead(buckets, self.actor.device):
            if relay:
                _send_object(bucket, dst=0)
                count.add(bucket)
            elif not writer or not engines:
                continue
            elif self.mode == "tensor":
                for engine in engines:
                    engine.update_weights_from_tensor(bucket, flush_cache=False)
                count.add(bucket)
            elif group is not None:
                group.send(bucket)
                count.add(bucket)
        if relay:
            _send_object(None, dst=0)

    def _receive_relay(self, engines: Sequence[RolloutEngine], src: int) -> None:
        """Rank 0: apply another stage's buckets, relayed by its writer (who counts them), to
        the in-process engines."""
        while (bucket := _recv_object(src)) is not None:
            for engine in engines:
                engine.update_weights_from_tensor(bucket, flush_cache=False)

    def _update_group(self, engines: Sequence[RolloutEngine]) -> _UpdateGroup:
        if self._group is None:
            stage, _ = _stages()
            self._group = _UpdateGroup(list(engines), f"megatron_rl_pp{stage}", self.timeout_s,
                                       self.backend, self.actor.device)
        return self._group

    # -- disk -----------------------------------------------------------------------------------

    def _disk(self, engines: Sequence[RolloutEngine], count: _Counter) -> None:
        if self.disk_dir is None:
            raise ValueError("weight_sync=disk needs a directory (rollout.weight_sync_dir)")
        self._version += 1
        path = self.disk_dir / f"v{self._version}"
        self.actor.save_hf(path, self.arch)  # collective; a fresh name, so nothing is replaced
        if dist.get_rank() == 0:
            size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
            for engine in engines:
                engine.update_weights_from_disk(str(path))
            count.bytes, count.buckets, count.biggest = size, 1, size
            old = self.disk_dir / f"v{self._version - 1}"
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)


def one_ahead(items: Iterator[T], device: torch.device | None = None) -> Iterator[T]:
    """`items`, the next one produced by a thread while the caller works on the current one
    (so at most two are held). The producer's error is raised here, in order. On a CUDA
    `device` the thread works on that device (a new thread starts on GPU 0)."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1)

    def produce() -> None:
        try:
            if device is not None and device.type == "cuda":
                torch.cuda.set_device(device)
            for item in items:
                q.put(("item", item))
            q.put(("done", None))
        except BaseException as e:  # noqa: BLE001 - raised in the consumer
            q.put(("error", e))

    threading.Thread(target=produce, daemon=True, name="weight-sync-prefetch").start()
    while True:
        kind, value = q.get()
        if kind == "done":
            return
        if kind == "error":
            raise value
        yield value


def _barrier(stages: int) -> None:
    if stages > 1:
        dist.barrier()


def _send_object(obj: Any, dst: int) -> None:
    dist.send_object_list([obj], dst=dst)


def _recv_object(src: int) -> Any:
    box: list[Any] = [None]
    dist.recv_object_list(box, src=src)
    return box[0]


class _UpdateGroup:
    """A writer's update group with its served engines: formed once, used for every bucket.

    Forming and every transfer need both sides at once: the HTTP calls that make an engine join
    (or receive) run in threads while this side does its part, then are joined."""

    def __init__(self, engines: list[Any], name: str, timeout_s: float, backend: str,
                 device: torch.device) -> None:
        self.engines, self.name, self.timeout_s, self.device = engines, name, timeout_s, device
        sizes = [_engine_ranks(e) for e in engines]
        world = 1 + sum(sizes)
        address = _local_address(engines[0].address)
        port = _free_port()
        offsets = [1 + sum(sizes[:i]) for i in range(len(engines))]
        calls = [lambda e=e, off=off: e.init_weights_update_group(
                     address, port, off, world, name, backend)
                 for e, off in zip(engines, offsets, strict=True)]
        self.pg = self.store = None
        def form() -> None:
            self.pg, self.store = open_update_group(address, port, 0, world, name, timeout_s,
                                                    backend, device)
        _together(engines, calls, form, f"forming update group {name!r}", timeout_s)

    def send(self, bucket: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Post the bucket's metadata to every engine and broadcast its tensors."""
        meta = bucket_meta(bucket)
        calls = [lambda e=e: e.update_weights_from_distributed(
                     meta["names"], meta["dtypes"], meta["shapes"], self.name, False)
                 for e in self.engines]
        _together(self.engines, calls,
                  lambda: broadcast_bucket(self.pg, bucket, self.timeout_s, self.device),
                  f"broadcast in update group {self.name!r}", self.timeout_s)

    def close(self) -> None:
        """Destroy this side of a broken group (the engines re-form theirs on the next
        `init_weights_update_group` of the same name)."""
        if self.pg is not None:
            close_update_group(self.pg)
        self.pg = self.store = None


def _together(engines: Sequence[Any], calls: Sequence[Callable[[], None]],
              local: Callable[[], None], what: str, timeout_s: float) -> None:
    """Run `calls` (one per engine) in threads while `local` runs here; raise one
    `EngineError` naming every engine that failed."""
    errors: list[BaseException | None] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            calls[i]()
        except BaseException as e:  # noqa: BLE001 - reported below, naming the engine
            errors[i] = e

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    for t in threads:
        t.start()
    local_error: BaseException | None = None
    try:
        local()
    except BaseException as e:  # noqa: BLE001
        local_error = e
    # A failed local side means the engines' calls cannot complete: a short grace, not 2x.
    deadline = time.monotonic() + (min(5.0, timeout_s) if local_error else timeout_s * 2)
    for i, t in enumerate(threads):
        t.join(max(0.0, deadline - time.monotonic()))
        if t.is_alive() and errors[i] is None:
            errors[i] = TimeoutError(f"no answer within {timeout_s * 2:.0f} s")
    failed = [f"{engines[i].address}: {e}" for i, e in enumerate(errors) if e is not None]
    if failed or local_error is not None:
        detail = "; ".join(failed) if failed else str(local_error)
        raise EngineError(f"weight sync ({what}) failed: {detail}") from (local_error or next(
            e for e in errors if e is not None))


def _engine_ranks(engine: Any) -> int:
    """Processes of one engine that join an update group (SGLang: its tp_size)."""
    info = getattr(engine, "server_info", None)
    if info is None:
        return 1
    return int(info().get("tp_size") or 1)


def _local_address(engine_url: str) -> str:
    """This host's address as the engine sees it: the interface that routes to the engine."""
    host = urlparse(engine_url if "://" in engine_url else f"http://{engine_url}").hostname
    host = host or "127.0.0.1"
    if host in ("localhost", "127.0.0.1", "::1"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))  # no packet is sent: this only picks the route
            return s.getsockname()[0]
        except OSError:
            return socket.gethostbyname(socket.gethostname())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def open_update_group(master_address: str, master_port: int, rank: int, world_size: int,
                      group_name: str = "weight_update_group", timeout_s: float = 60.0,
                      backend: str = "gloo", device: torch.device | None = None
                      ) -> tuple[Any, Any]:
    """A process group of its own, apart from any default group, formed exactly as SGLang's
    `init_custom_process_group` forms the engine's side (so the two meet on the same store
    keys): a TCP store hosted by rank 0 (the trainer's writer), prefixed by the group name, and
    torch's own group constructor; gloo, or NCCL (`device`: unused, the
    tensors say where). Returns (process group, store); keep both alive, `close_update_group`
    when done (a group name may then be formed again)."""
    from torch.distributed import distributed_c10d as c10d

    del device
    timeout = datetime.timedelta(seconds=timeout_s)
    try:
        # The store `rendezvous("tcp://...")` would make, made directly: under torchrun
        # rendezvous hands out the agent's store instead and nobody would host this one.
        store = dist.TCPStore(master_address, master_port, world_size, is_master=rank == 0,
                              timeout=timeout)
        store = dist.PrefixStore(group_name, store)
        pg, _ = c10d._new_process_group_helper(world_size, rank, [], c10d.Backend(backend), store,
                                               group_name=group_name, timeout=timeout)
        c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    except (RuntimeError, TimeoutError, ValueError) as e:
        raise EngineError(f"weight update group {group_name!r} at {master_address}:"
                          f"{master_port} did not form within {timeout_s:.0f} s: {e}") from e
    return pg, store


def close_update_group(pg: Any) -> None:
    """Destroy a group of `open_update_group` (never raises: it may be broken already)."""
    try:
        dist.destroy_process_group(pg)
    except (RuntimeError, ValueError, KeyError):
        pass


def bucket_meta(bucket: Sequence[tuple[str, torch.Tensor]]) -> dict[str, list]:
    """The `update_weights_from_distributed` arguments of a bucket (SGLang's field names)."""
    return {"names": [n for n, _ in bucket],
            "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
            "shapes": [list(t.shape) for _, t in bucket]}


def broadcast_bucket(pg: Any, bucket: Sequence[tuple[str, torch.Tensor]],
                     timeout_s: float = 60.0, device: torch.device | None = None) -> None:
    """Send a bucket from rank 0 of the update group: one broadcast per tensor, in bucket order,
    all started before any is waited for (as SGLang's receiving side does)."""
    tensors = [(name, t.contiguous() if device is None else t.contiguous().to(device))
               for name, t in bucket]
    broadcast_tensors(pg, tensors, timeout_s)


def broadcast_tensors(pg: Any, named: Sequence[tuple[str, torch.Tensor]], timeout_s: float,
                      on_each: Callable[[str, torch.Tensor], None] | None = None) -> None:
    """Broadcasts from rank 0 of `pg` (sender or receiver) of each tensor, in order: all
    started, then each waited for and handed to `on_each` (a receiver applies it while the rest
    arrive); any failing or exceeding `timeout_s` raises `EngineError`."""
    timeout = datetime.timedelta(seconds=timeout_s)
    name = "?"
    try:
        works = [(name, t, pg.broadcast(t, 0)) for name, t in named]
        for name, t, work in works:
            if work.wait(timeout) is False:
                raise EngineError(f"weight broadcast of {name} timed out after {timeout_s:.0f} s")
            if on_each is not None:
                on_each(name, t)
    except RuntimeError as e:  # gloo reports a timeout or a vanished peer this way
        raise EngineError(f"weight broadcast of {name} failed or timed out "
                          f"({timeout_s:.0f} s): {e}") from e


def broadcast_tensor(pg: Any, tensor: torch.Tensor, name: str, timeout_s: float) -> None:
    """One broadcast from rank 0 of `pg` (sender or receiver), failing after `timeout_s`."""
    broadcast_tensors(pg, [(name, tensor)], timeout_s)
