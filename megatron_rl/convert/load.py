"""Load a Hugging Face checkpoint straight into a sharded Megatron-Core model.

Each rank reads only the slices of the safetensors files that its own parameters hold (its TP
rows or columns, its pipeline stage's layers, its EP rank's experts), so no rank ever holds the
whole model. Missing tensors, extra tensors and shape mismatches fail with their names.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_rl.convert import te_names
from megatron_rl.convert.maps import Arch, Rule, template_of
from megatron_rl.convert.reader import CheckpointError, SafetensorsReader

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """Which part of a full tensor this rank holds along its TP split."""

    rank: int
    size: int

    def range(self, n: int, what: str) -> tuple[int, int]:
        if n % self.size:
            raise CheckpointError(f"{what}: size {n} is not divisible by the TP size {self.size}")
        step = n // self.size
        return self.rank * step, (self.rank + 1) * step


@dataclass(frozen=True)
class Target:
    """One local Megatron parameter and where it comes from."""

    name: str
    """Local parameter name in its model chunk."""
    param: torch.Tensor
    rule: Rule
    layer: int | None
    expert: int | None
    is_expert: bool
    tp_duplicated: bool = False
    """The whole tensor on every TP rank although the rule's kind splits it (TE's duplicated
    linears, `te_names.tp_duplicated`)."""


def _shard(t: Target) -> Shard:
    if t.tp_duplicated:
        return Shard(0, 1)
    if t.is_expert:
        return Shard(ps.get_expert_tensor_parallel_rank(),
                     ps.get_expert_tensor_parallel_world_size())
    return Shard(ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size())


def _global_indices(chunk: torch.nn.Module, name: str) -> tuple[str, int | None, int | None]:
    """Template name with the *global* layer and expert index of a local parameter (of the
    portable or the TE spec: `te_names.canonical` gives the portable name)."""
    template, layer, expert = template_of(te_names.canonical(name))
    if layer is not None:
        layer = chunk.decoder.layers[layer].layer_number - 1
    if expert is not None:
        num_local = _num_local_experts(chunk)
        expert = ps.get_expert_model_parallel_rank() * num_local + expert
    return template, layer, expert


def _num_local_experts(chunk: torch.nn.Module) -> int:
    num = te_names.num_local_experts(chunk)
    if num is None:
        raise CheckpointError("model has expert parameters but no experts module")
    return num


def targets(chunks: list[torch.nn.Module], arch: Arch, model_cfg) -> Iterator[Target]:
    """Every local parameter of the (unwrapped) model chunks with its rule. TE/grouped-GEMM
    names are read through `te_names.canonical`, so the same rules serve both layer specs."""
    rules = arch.rules(model_cfg)
    for chunk in chunks:
        # Buffers with a checkpoint counterpart (DeepSeek's router expert bias) load too.
        mapped_buffers = [(n, b) for n, b in chunk.named_buffers()
                          if template_of(te_names.canonical(n))[0] in rules]
        seen: dict[tuple[str, int | None, int | None], str] = {}
        for name, param in list(chunk.named_parameters()) + mapped_buffers:
            if te_names.ignored(name):
                continue
            template, layer, expert = _global_indices(chunk, name)
            if template not in rules:
                raise CheckpointError(f"{arch.name}: no mapping for Megatron parameter {name!r} "
                                      f"({template}); the model and architecture disagree")
            key = (template, layer, expert)
            if key in seen:  # e.g. a fused layer norm next to a separate one
                raise CheckpointError(f"{arch.name}: Megatron parameters {seen[key]!r} and "
                                      f"{name!r} are both {template} (layer {layer}, expert "
                                      f"{expert})")
            seen[key] = name
            is_expert = expert is not None
            duplicated = te_names.tp_duplicated(te_names.owner(chunk, name), is_expert)
            yield Target(name, param, rules[template], layer, expert, is_expert, duplicated)


def qkv_dims(model_cfg) -> tuple[int, int, int]:
    """(attention heads, query groups, head size) of a GQA model: how fused QKV rows are laid
    out (per query group, its q heads then one k and one v head)."""
    heads = model_cfg.num_attention_heads
    return (heads, model_cfg.num_query_groups or heads,
            model_cfg.kv_channels or model_cfg.hidden_size // heads)


def _read_local(reader: SafetensorsReader, t: Target, model_cfg, padded_vocab: int) -> torch.Tensor:
    """This rank's part of the Megatron tensor, read slice by slice from the checkpoint."""
    names = t.rule.hf_names(t.layer, t.expert)
    shard = _shard(t)
    kind = t.rule.kind
    if kind == "replicated":
        return reader.read(names[0])
    if kind == "column":
        return reader.read(names[0], rows=shard.range(reader.shape(names[0])[0], names[0]))
    if kind == "row":
        return reader.read(names[0], cols=shard.range(reader.shape(names[0])[1], names[0]))
    if kind == "glu":
        return torch.cat([reader.read(n, rows=shard.range(reader.shape(n)[0], n)) for n in names])
    if kind == "vocab":
        return _read_vocab(reader, names[0], shard, padded_vocab)
    return torch.cat([reader.read(n, rows=r) for n, r in _row_parts(reader, t, model_cfg, 0)])


def _row_parts(reader: SafetensorsReader, t: Target, model_cfg, padded_vocab: int
               ) -> list[tuple[str, tuple[int, int] | None]] | None:
    """The (HF tensor, rows) ranges that, stacked in order, are this rank's tensor: every kind
    but "row" (a column slice) is such a stack. None for "row"."""
    names, shard, kind = t.rule.hf_names(t.layer, t.expert), _shard(t), t.rule.kind
    if kind == "replicated":
        return [(names[0], None)]
    if kind in ("column", "glu"):
        return [(n, shard.range(reader.shape(n)[0], n)) for n in names]
    if kind == "vocab":
        vocab = reader.shape(names[0])[0]
        lo, hi = shard.range(padded_vocab, names[0])
        return [(names[0], (lo, min(hi, vocab)))] if lo < vocab else []
    if kind == "row":
        return None
    q, k, v = names  # fused QKV: per query group [its q heads, k, v]
    heads, groups, hd = qkv_dims(model_cfg)
    hpg = heads // groups
    g_lo, g_hi = shard.range(groups, f"{q} (query groups)")
    return [part for g in range(g_lo, g_hi) for part in (
        (q, (g * hpg * hd, (g + 1) * hpg * hd)), (k, (g * hd, (g + 1) * hd)),
        (v, (g * hd, (g + 1) * hd)))]


def _read_in_place(reader: SafetensorsReader, t: Target, model_cfg, padded_vocab: int) -> bool:
    """Read this rank's tensor straight into its parameter (no copy of it in between), where
    the checkpoint's dtype is the parameter's and the parts stack into it exactly; the rows of
    a padded vocabulary past the real one are zeroed. False: nothing was written."""
    parts = _row_parts(reader, t, model_cfg, padded_vocab)
    param = t.param
    if parts is None or param.dim() == 0:
        return False
    sizes = []
    for name, rows in parts:
        shape = reader.shape(name)
        n = (rows[1] - rows[0]) if rows else shape[0]
        if tuple(shape[1:]) != tuple(param.shape[1:]):
            return False
        sizes.append(n)
    if sum(sizes) > param.shape[0] or (t.rule.kind != "vocab" and sum(sizes) != param.shape[0]):
        return False
    offset = 0
    for (name, rows), n in zip(parts, sizes, strict=True):
        if not reader.read_into(name, rows, param[offset : offset + n]):
            return False  # a dtype other than the parameter's: the first part, nothing written
        offset += n
    param[offset:].zero_()  # vocabulary padding
    return True


def _read_vocab(reader: SafetensorsReader, name: str, shard: Shard, padded: int) -> torch.Tensor:
    vocab, width = reader.shape(name)
    lo, hi = shard.range(padded, name)
    out = torch.zeros(hi - lo, width, dtype=reader.read(name, rows=(0, 1)).dtype)
    if lo < vocab:
        out[: min(hi, vocab) - lo] = reader.read(name, rows=(lo, min(hi, vocab)))
    return out


def _check_extras(reader: SafetensorsReader, arch: Arch, num_layers: int) -> None:
    """Every checkpoint tensor must be used by some rank (or be known to be unused); layers
    past the model's last are skipped where the architecture says what they are (saying so on
    rank 0), an error otherwise."""
    used = [reader.used] if not dist.is_initialized() else [None] * dist.get_world_size()
    if dist.is_initialized():
        dist.all_gather_object(used, reader.used)
    seen = set().union(*used)
    extra = sorted(n for n in reader.names() - seen
                   if not any(re.match(p, n) for p in arch.ignored_hf))
    trailing = [n for n in extra if (m := _HF_LAYER.match(n)) and int(m.group(1)) >= num_layers]
    if trailing and arch.trailing_layers_skipped:
        layers = sorted({int(_HF_LAYER.match(n).group(1)) for n in trailing})
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"[convert] skipped {len(trailing)} tensors of {len(layers)} "
                  f"{arch.trailing_layers_skipped} (model.layers.{layers[0]}"
                  f"{'-' + str(layers[-1]) if len(layers) > 1 else ''}.*): not converted, so "
                  "not in the checkpoint written", file=sys.stderr, flush=True)
        extra = [n for n in extra if n not in set(trailing)]
    if extra:
        more = f" (and {len(extra) - 10} more)" if len(extra) > 10 else ""
        raise CheckpointError(f"{reader.path}: tensors with no Megatron counterpart: "
                              f"{extra[:10]}{more}; is the model config the checkpoint's?")


_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def _full_shapes(t: Target, model_cfg) -> dict[str, tuple[int, ...]]:
    """The whole HF tensor shape(s) this rank's parameter implies: its local shape times the
    TP split of its kind, and for fused QKV the heads, query groups and head size of the model
    config. Checked before anything is read: a row slice of a tensor of another shape can fit
    the parameter and load silently wrong (config.json's num_key_value_heads below the
    weights' takes the first rows of k and v)."""
    names, kind, shape = t.rule.hf_names(t.layer, t.expert), t.rule.kind, tuple(t.param.shape)
    size = _shard(t).size
    if kind == "column":
        return {names[0]: (shape[0] * size, *shape[1:])}
    if kind == "glu":
        return {n: (shape[0] // 2 * size, *shape[1:]) for n in names}
    if kind == "row":
        return {names[0]: (shape[0], shape[1] * size, *shape[2:])}
    if kind == "vocab":
        return {names[0]: (model_cfg.vocab_size, *shape[1:])}
    if kind == "qkv":
        heads, groups, hd = qkv_dims(model_cfg)
        q, k, v = names
        return {q: (heads * hd, *shape[1:]), k: (groups * hd, *shape[1:]),
                v: (groups * hd, *shape[1:])}
    return {names[0]: shape}


def _check_shapes(reader: SafetensorsReader, todo: list[Target], model_cfg, path: str) -> None:
    """Every checkpoint tensor this rank reads has the shape the model implies (one error
    naming the first few that do not, and the config keys that size attention)."""
    wrong = [f"{n} is {reader.shape(n)}, the model needs {want}"
             for t in todo for n, want in _full_shapes(t, model_cfg).items()
             if tuple(reader.shape(n)) != want]
    if wrong:
        more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
        heads, groups, hd = qkv_dims(model_cfg)
        raise CheckpointError(
            f"{path}: tensor shapes disagree with config.json: {'; '.join(wrong[:3])}{more} "
            f"(model: hidden_size={model_cfg.hidden_size}, num_attention_heads={heads}, "
            f"num_key_value_heads={groups}, head_dim={hd}, vocab_size={model_cfg.vocab_size})")


@torch.no_grad()
def load_hf(chunks: list[torch.nn.Module], arch: Arch, model_cfg, path: str,
            padded_vocab: int, progress: bool = True) -> dict[str, float]:
    """Copy an HF checkpoint into this rank's parameters; returns bytes read and seconds."""
    reader = SafetensorsReader(path)
    todo = list(targets(chunks, arch, model_cfg))
    missing = sorted({n for t in todo for n in t.rule.hf_names(t.layer, t.expert)}
                     - reader.names())
    if missing:
        more = f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""
        raise CheckpointError(f"{path}: missing tensors {missing[:10]}{more}")
    _check_shapes(reader, todo, model_cfg, path)
    start = time.perf_counter()
    for i, t in enumerate(todo):
        if not _read_in_place(reader, t, model_cfg, padded_vocab):
            local = _read_local(reader, t, model_cfg, padded_vocab)
            if tuple(local.shape) != tuple(t.param.shape):
                raise CheckpointError(
                    f"{t.name} <- {t.rule.hf_names(t.layer, t.expert)}: expected shape "
                    f"{tuple(t.param.shape)} on this rank, found {tuple(local.shape)}")
            t.param.copy_(local.to(t.param.dtype))
        if progress and (i + 1) % max(1, len(todo) // 10) == 0:
            _progress(i + 1, len(todo), reader.bytes_read, start)
    _check_extras(reader, arch, model_cfg.num_layers)
    return {"bytes_read": float(reader.bytes_read), "seconds": time.perf_counter() - start}


def _progress(done: int, total: int, nbytes: int, start: float) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        # one line per tenth: readable in a log file, where carriage returns garble
        seconds = time.perf_counter() - start
        rate = nbytes / 2**30 / seconds if seconds > 0 else 0.0
        eta = seconds * (total - done) / done if done else 0.0
        print(f"[convert] rank 0: {done}/{total} tensors ({100 * done // total}%), "
              f"{nbytes / 2**20:.1f} MiB read, {rate:.2f} GB/s, {seconds:.1f}s, ETA {eta:.0f}s",
              file=sys.stderr, flush=True)
