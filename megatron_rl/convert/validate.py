"""Checks a conversion runs before any work: the source and the destination, in well under a
second and without importing Megatron-Core (nothing here does), so a wrong path, a truncated
file or an unsupported config key is named in one line instead of a traceback after the model
was built. `megatron-rl convert` calls these first; `checkpoints.hf_to_mcore/mcore_to_hf` again.

Safetensors files are checked by their header only (8-byte little-endian length, JSON, every
tensor's dtype, shape and byte range, and the file's size against the last range), never by
reading tensor data: a terabyte checkpoint checks as fast as a tiny one.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

from megatron_rl.convert.maps import Arch
from megatron_rl.convert.registry import ARCHS, read_hf_config

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
INFO = "megatron_rl.json"
"""`megatron_rl.actor.checkpoint.INFO` (that module imports Megatron-Core)."""
LATEST = "latest"
"""`megatron_rl.actor.checkpoint.LATEST`."""

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def read_header(file: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the file's tensor data, its header's tensor entries), checked against the
    file's size (ValueError naming the file)."""
    size = file.stat().st_size
    if size < 8:
        raise ValueError(f"{file}: truncated ({size} bytes; not a safetensors file)")
    with file.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if 8 + n > size:
            raise ValueError(f"{file}: truncated (has {size} bytes, its header alone needs "
                             f"{8 + n})")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{file}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{file}: corrupt safetensors header (not a JSON object)")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (lo, hi) = entry["dtype"], entry["shape"], entry["data_offsets"]
            nbytes = math.prod(shape) * _DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{file}: corrupt safetensors header entry for {name!r}") from None
        if hi - lo != nbytes or lo < 0:
            raise ValueError(f"{file}: corrupt safetensors header: {name!r} is {dtype} "
                             f"{shape} ({nbytes} bytes) but spans bytes {lo}..{hi}")
        end = max(end, hi)
    if size < 8 + n + end:
        raise ValueError(f"{file}: truncated (has {size} bytes, its header needs "
                         f"{8 + n + end})")
    return 8 + n, header


def _check_weights(path: Path) -> None:
    if (path / INDEX).is_file():
        try:
            weight_map = json.loads((path / INDEX).read_text())["weight_map"]
            files = {str(f) for f in weight_map.values()}
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{path / INDEX}: not a safetensors index (no weight_map)") from None
        missing = sorted(f for f in files if not (path / f).is_file())
        if missing:
            raise ValueError(f"{path / INDEX}: names {missing[0]!r}, which does not exist"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        headers = {f: read_header(path / f)[1] for f in sorted(files)}
        for name, f in weight_map.items():
            if name not in headers[f]:
                raise ValueError(f"{path / INDEX}: maps {name!r} to {f}, which does not hold it")
    elif (path / SINGLE).is_file():
        read_header(path / SINGLE)
    else:
        raise ValueError(f"{path}: neither {INDEX} nor {SINGLE} found")


def check_hf_source(path: str | os.PathLike) -> tuple[Arch, dict]:
    """The architecture and config.json of the HF checkpoint at `path`, after checking the
    directory, config.json (valid JSON, a supported architecture, every key its map needs and
    no unsupported value), and every safetensors file's header. ValueError / FileNotFoundError
    with one line naming the path, file or key."""
    from megatron_rl.convert import hf_model_config  # megatron-free: ModelConfig and the maps

    src = Path(path)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such checkpoint directory")
    hf = read_hf_config(src)
    try:
        arch, _ = hf_model_config(src)
    except KeyError as err:
        raise ValueError(f"{src / 'config.json'}: missing key {err.args[0]!r} (needed to "
                         f"convert {hf.get('model_type') or 'this model'})") from None
    except TypeError as err:
        raise ValueError(f"{src / 'config.json'}: {err}") from None
    _check_weights(src)
    return arch, hf


def check_mcore_source(path: str | os.PathLike) -> dict:
    """The megatron_rl.json of the Megatron checkpoint at `path` (a checkpoint directory, or a
    run's checkpoint root whose `latest` names one), checked to record the model and a known
    architecture: only checkpoints written by megatron-rl can go back to HF."""
    src = Path(path)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: no such checkpoint directory")
    if (src / LATEST).is_file():
        src = src / (src / LATEST).read_text().strip()
    if not (src / "metadata.json").is_file():
        raise ValueError(f"{src}: not a Megatron dist checkpoint (no metadata.json) and no "
                         f"{LATEST!r} file")
    try:
        info = json.loads((src / INFO).read_text())
    except FileNotFoundError:
        info = {}
    except json.JSONDecodeError:
        raise ValueError(f"{src / INFO}: not valid JSON") from None
    if not info.get("model") or not info.get("arch"):
        raise ValueError(f"{src}: no model config/architecture recorded ({INFO}); only "
                         "checkpoints written by megatron-rl (a run, or hf-to-mcore) can go "
                         "back to HF")
    if info["arch"] not in ARCHS:
        raise ValueError(f"{src / INFO}: architecture {info['arch']!r} is not one of "
                         f"{sorted(ARCHS)}")
    return info


def check_destination(path: str | os.PathLike, overwrite: bool = False) -> None:
    """A destination that holds anything is refused unless `overwrite`; its parent must be a
    writable directory. Conversion never deletes or replaces a user's files unasked."""
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out}: the destination exists and is not empty; pass "
                              "--overwrite to replace it, or choose a new directory (nothing "
                              "was written)")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise FileNotFoundError(f"{out}: its parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{out}: its parent directory {parent} is not writable")
