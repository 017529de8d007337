"""Megatron-Core -> Hugging Face: a generator of `(hf_name, tensor)` in bounded buckets, and a
writer of `config.json` + sharded `model-*.safetensors` with an index.

Ranks gather only what they must: a parameter's TP shards within its TP group, one local expert
at a time across the EP group. Each pipeline stage yields its own layers, so no rank holds more
than its stage. Weight sync to rollout engines uses the same generator.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_rl.atomic import delete_aside
from megatron_rl.convert import te_names
from megatron_rl.convert.load import Target, qkv_dims, targets
from megatron_rl.convert.maps import TIED_OUTPUT, Arch
from megatron_rl.convert.reader import INDEX
from megatron_rl.convert.writer import StreamingSafetensors


def _gather_tp(t: Target) -> torch.Tensor:
    """The full (TP-unsharded) Megatron tensor of a local parameter. Whether and how it is split
    is the rule's (rows, columns for `row`), as `load_hf` reads it, not the parameter's
    `tensor_model_parallel`/`partition_dim`: Megatron sets those only when it initialises the
    weights (a converter's bare model does not), and TE marks expert linears with explicit
    communication `partition_dim=0` whatever their mode (`te_names`)."""
    p = t.param.detach()
    if t.rule.kind == "replicated" or t.tp_duplicated:
        return p
    group = (ps.get_expert_tensor_parallel_group() if t.is_expert
             else ps.get_tensor_model_parallel_group())
    size = dist.get_world_size(group)
    if size == 1:
        return p
    parts = [torch.empty_like(p) for _ in range(size)]
    dist.all_gather(parts, p.contiguous(), group=group)
    dim = 1 if t.rule.kind == "row" else 0
    if t.rule.kind == "glu":  # each rank holds [gate_r; up_r]
        halves = [x.chunk(2, dim=0) for x in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(parts, dim=dim)


def _split(t: Target, full: torch.Tensor, model_cfg) -> list[torch.Tensor]:
    """Megatron tensor -> the HF tensors of its rule, in rule order."""
    kind = t.rule.kind
    if kind == "glu":
        return list(full.chunk(2, dim=0))
    if kind == "vocab":
        return [full[: model_cfg.vocab_size]]
    if kind == "qkv":
        heads, groups, hd = qkv_dims(model_cfg)
        hpg = heads // groups
        per_group = full.reshape(groups, (hpg + 2) * hd, *full.shape[1:])
        q, k, v = per_group.split([hpg * hd, hd, hd], dim=1)
        return [x.reshape(-1, *full.shape[1:]).contiguous() for x in (q, k, v)]
    return [full]


def _expert_sources(t: Target, full: torch.Tensor, num_local: int
                    ) -> list[tuple[int | None, torch.Tensor]]:
    """(global expert index, tensor) of this local expert slot on every EP rank."""
    if not t.is_expert:
        return [(None, full)]
    group = ps.get_expert_model_parallel_group()
    size = dist.get_world_size(group)
    if size == 1:
        return [(t.expert, full)]
    parts = [torch.empty_like(full) for _ in range(size)]
    dist.all_gather(parts, full.contiguous(), group=group)
    slot = t.expert - ps.get_expert_model_parallel_rank() * num_local
    return [(r * num_local + slot, parts[r]) for r in range(size)]


def iter_hf_tensors(chunks: list[torch.nn.Module], arch: Arch, model_cfg
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Every HF tensor of this rank's pipeline stage, on every rank of the stage (collective)."""
    num_local = _count_local_experts(chunks)
    for t in targets(chunks, arch, model_cfg):
        if model_cfg.tie_embeddings and t.name.endswith(TIED_OUTPUT):
            continue  # the last stage's copy of the tied embedding; the first stage exports it
        full = _gather_tp(t)
        for expert, tensor in _expert_sources(t, full, num_local):
            names = t.rule.hf_names(t.layer, expert)
            yield from zip(names, _split(t, tensor, model_cfg), strict=True)


def _count_local_experts(chunks: list[torch.nn.Module]) -> int:
    for chunk in chunks:
        num = te_names.num_local_experts(chunk)
        if num is not None:
            return num
    return 1


def iter_hf_buckets(chunks: list[torch.nn.Module], arch: Arch, model_cfg,
                    bucket_bytes: int = 64 * 2**20) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """`iter_hf_tensors` grouped into lists of at most `bucket_bytes` (one tensor may exceed)."""
    return bucketed(iter_hf_tensors(chunks, arch, model_cfg), bucket_bytes)


def bucketed(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
             ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive lists of at most `bucket_bytes`; a larger tensor travels alone."""
    bucket, size = [], 0
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def is_stage_writer() -> bool:
    """One writer per pipeline stage: TP, DP and CP rank 0 (EP is gathered already); it writes
    the stage's HF files and delivers its weight-sync buckets."""
    return (ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
            and ps.get_context_parallel_rank() == 0)


def _nonempty(path: Path) -> bool:
    return path.exists() and (not path.is_dir() or any(path.iterdir()))


def save_hf(chunks: list[torch.nn.Module], arch: Arch, model_cfg, out_dir: str | os.PathLike,
            shard_bytes: int = 2 * 2**30, *, dtype: torch.dtype | None = None,
            config: dict | None = None, extra_files: Iterable[Path] = (),
            overwrite: bool = False) -> Path:
    """Write config.json, model-XXXXX-of-YYYYY.safetensors and the index (collective).

    Everything is written into a hidden sibling (`.<name>.partial`) and renamed into place at
    the end. An existing non-empty `out_dir` is refused unless `overwrite`, and then replaced
    only once the new checkpoint is complete. `dtype`: the tensors' dtype on disk (default:
    the parameters'); `config`: the config.json to write (default: the architecture's, from the
    model config); `extra_files`: copied beside it (tokenizer files, generation_config.json)."""
    out = Path(out_dir)
    if _nonempty(out) and not overwrite:  # every rank sees the same filesystem: all raise
        raise FileExistsError(f"{out}: the destination exists and is not empty; pass "
                              "--overwrite to replace it, or choose a new directory "
                              "(nothing was written)")
    tmp = out.parent / f".{out.name}.partial"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # our own leftover of a crashed export
        tmp.mkdir(parents=True)
    dist.barrier()
    stage = ps.get_pipeline_model_parallel_rank()
    files: list[tuple[str, list[str]]] = []
    part: StreamingSafetensors | None = None
    writer = is_stage_writer()
    # one gathered tensor in flight: each is written as it comes (other ranks only take part
    # in the gathers), a file ends at `shard_bytes`
    for name, tensor in iter_hf_tensors(chunks, arch, model_cfg):
        if not writer:
            continue
        tensor = tensor if dtype is None else tensor.to(dtype)
        size = tensor.numel() * tensor.element_size()
        if part is not None and (part.nbytes + size > shard_bytes
                                 or not part.fits(name, tensor)):
            files.append((part.path.name, part.close()))
            part = None
        if part is None:
            part = StreamingSafetensors(
                tmp / f"part-{stage:05d}-{len(files):05d}.safetensors", {"format": "pt"})
        part.add(name, tensor)
    if part is not None:
        files.append((part.path.name, part.close()))
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, files)
    if rank == 0:
        for extra in extra_files:
            shutil.copy2(extra, tmp / Path(extra).name)
        _finish(tmp, out, sorted(f for part in gathered for f in part),
                config if config is not None else arch.hf_config(model_cfg))
    dist.barrier()
    return out


def _finish(tmp: Path, out: Path, files: list[tuple[str, list[str]]], config: dict) -> None:
    """Rename parts to HF's names, write the index and config, move into place atomically (an
    existing destination, allowed by the caller, is moved aside whole first)."""
    weight_map, total = {}, 0
    for i, (part, names) in enumerate(files):
        final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        os.replace(tmp / part, tmp / final)
        total += (tmp / final).stat().st_size
        weight_map.update({n: final for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX).write_text(json.dumps(index, indent=2))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if out.is_file():
        out.unlink()
    elif out.exists():
        delete_aside(out)
    os.replace(tmp, out)
