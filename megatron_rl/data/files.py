"""Prompt files: jsonl and parquet rows with verl / slime field names -> `PromptRecord`s.

verl rows: {"prompt": [{"role", "content"}], "reward_model": {"ground_truth": ...},
"data_source": ..., "extra_info": {...}}; slime rows: {"prompt": ..., "label": ...,
"metadata": {...}}. Keys are dotted paths from `DataConfig` (`prompt_key`, `label_key`); when the
label key is absent a top-level `label` is used. A bad row raises `DataError` naming
`path:line` (jsonl, 1-based) or `path: row N` (parquet, 0-based), or is skipped and counted.
"""

import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_rl.data.records import DataError, PromptRecord, as_prompt, check_prompt, get_dotted

log = logging.getLogger(__name__)

LABEL_FALLBACK_KEY = "label"


@dataclass(frozen=True)
class RowKeys:
    """Where the fields of a row live (dotted paths)."""

    prompt_key: str = "prompt"
    label_key: str = "reward_model.ground_truth"


@dataclass
class LoadedRecords:
    """Records read from a file and how many malformed rows were skipped."""

    records: list[PromptRecord]
    skipped: int = 0


class _Malformed(Exception):
    """A row is not a valid prompt record; the message says what is wrong."""


def row_to_record(row: Any, keys: RowKeys, default_source: str, index: int) -> PromptRecord:
    """Convert one decoded row; raise `_Malformed` with what is wrong."""
    if not isinstance(row, Mapping):
        raise _Malformed(f"row is a {type(row).__name__}, not an object")
    prompt = get_dotted(row, keys.prompt_key, None)
    if prompt is None:
        raise _Malformed(f"no prompt at {keys.prompt_key!r}")
    problem = check_prompt(prompt)
    if problem:
        raise _Malformed(f"{problem} (at {keys.prompt_key!r})")
    label = get_dotted(row, keys.label_key, None)
    if label is None:
        label = row.get(LABEL_FALLBACK_KEY)
    if label is None:
        raise _Malformed(f"no label at {keys.label_key!r} nor {LABEL_FALLBACK_KEY!r}")
    source = row.get("data_source", default_source)
    if not isinstance(source, str):
        raise _Malformed(f"data_source is a {type(source).__name__}, not a string")
    metadata: dict[str, Any] = {}
    for name in ("extra_info", "metadata"):  # verl, slime
        extra = row.get(name)
        if extra is None:
            continue
        if not isinstance(extra, Mapping):
            raise _Malformed(f"{name} is a {type(extra).__name__}, not an object")
        metadata.update(extra)
    return PromptRecord(prompt=as_prompt(prompt), label=label, data_source=source,
                        metadata=metadata, index=index)


def _jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, decoded row or _Malformed) for each non-blank line of a jsonl file."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield where, _Malformed(f"not UTF-8 ({e.reason} at byte {e.start})")
                continue
            if not text.strip():
                continue
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as e:
                yield where, _Malformed(f"bad JSON: {e.msg} at column {e.colno}")


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, row dict) for each row of a parquet file, read in batches."""
    import pyarrow as pa  # heavy: only parquet files need it
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: cannot read as parquet: {e}") from e
    i = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield f"{path}: row {i}", row
            i += 1


def load_records(path: str | Path, fmt: str, keys: RowKeys, skip_malformed: bool = False,
                 limit: int | None = None) -> LoadedRecords:
    """Read up to `limit` valid records from a jsonl or parquet file.

    `fmt` is "jsonl" or "parquet". A missing file or a malformed row raises `DataError`
    (unless `skip_malformed`, which skips the row, counts it and logs the first few), and so
    does a file with no rows or none usable (`limit=0` reads nothing and is not refused).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: prompt file not found (set data.path / data.eval_path)")
    readers = {"jsonl": _jsonl_rows, "parquet": _parquet_rows}
    if fmt not in readers:
        raise DataError(f"{path}: unknown format {fmt!r}; use one of {sorted(readers)}")
    out = LoadedRecords(records=[])
    for where, row in readers[fmt](path):
        if limit is not None and len(out.records) >= limit:
            break
        try:
            if isinstance(row, _Malformed):
                raise row
            out.records.append(row_to_record(row, keys, path.stem, len(out.records)))
        except _Malformed as e:
            if not skip_malformed:
                raise DataError(f"{where}: {e}; fix the row or set data.skip_malformed=true"
                                ) from None
            out.skipped += 1
            if out.skipped <= 5:
                log.warning("skipping malformed row %s: %s", where, e)
    if not out.records and limit != 0:
        if out.skipped:
            raise DataError(f"{path}: no usable rows: all {out.skipped} rows are malformed "
                            "(skipped by data.skip_malformed=true)")
        blank = " (empty, or only blank lines)" if fmt == "jsonl" else ""
        raise DataError(f"{path}: the prompt file has no rows{blank}; set data.path / "
                        "data.eval_path to a file with prompts")
    if out.skipped:
        log.warning("%s: skipped %d malformed rows, kept %d", path, out.skipped, len(out.records))
    return out
