"""The demo tokenizer: a small sentencepiece BPE trained on the task's text, used through HF.

The tiny model learns from scratch, so it gets a vocabulary of `ModelConfig.vocab_size` (512)
pieces fitted to its task instead of a 150k-token one. Choices, and why:
- BPE with byte fallback: any text encodes (unseen characters become <0xNN> byte pieces).
- identity normalisation, no dummy prefix, whitespace kept: decode(encode(s)) == s exactly.
- split_digits: numbers are read digit by digit, as arithmetic tasks need.
- <think> </think> <answer> </answer> are user-defined symbols: always one token each.
- ids: <unk>=0, <s>=1, </s>=2, <pad>=3; the HF tokenizer adds no BOS/EOS by itself.
The result is saved as a Hugging Face tokenizer directory (`tokenizer.json`, loadable offline
with `AutoTokenizer.from_pretrained(dir)`) under a cache dir named by a hash of its inputs.
"""

import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from megatron_rl.data.records import DataError, PromptRecord
from megatron_rl.data.templates import apply_template

SPECIAL_SYMBOLS = ("<think>", "</think>", "<answer>", "</answer>")
"""Tags of the R1-Zero format, each a single token."""

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
"""A plain chat template so `chat_template: tokenizer` also works with the demo tokenizer."""

_SPM_OPTIONS: dict[str, Any] = {
    "model_type": "bpe",
    "byte_fallback": True,
    "user_defined_symbols": list(SPECIAL_SYMBOLS),
    "unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3,
    "normalization_rule_name": "identity",
    "remove_extra_whitespaces": False,
    "add_dummy_prefix": False,
    "allow_whitespace_only_pieces": True,
    "split_digits": True,
    "character_coverage": 1.0,
    "hard_vocab_limit": False,  # small corpora may support fewer pieces than asked for
    "max_sentence_length": 16384,
}
_FORMAT_VERSION = 1  # bump when the options or the HF wrapping change: invalidates caches


def tokenizer_texts(records: Sequence[PromptRecord], template: str = "r1_zero",
                    formatted: int = 64) -> list[str]:
    """Training text: every prompt and label, plus `formatted` prompts in the chat template
    followed by an answer in the R1-Zero tags, so the template's words get pieces too."""
    texts: list[str] = []
    for r in records:
        texts.append(r.prompt if isinstance(r.prompt, str) else
                     "\n".join(m["content"] for m in r.prompt))
        texts.append(str(r.label))
    for r in records[:formatted]:
        texts.append(apply_template(template if template != "tokenizer" else "none", r.prompt)
                     + f" <think> </think> <answer> {r.label} </answer>")
    return texts


def cache_key(texts: Sequence[str], vocab_size: int) -> str:
    """Hash of everything the trained tokenizer depends on."""
    h = hashlib.sha256(json.dumps([_FORMAT_VERSION, vocab_size, _SPM_OPTIONS]).encode())
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()[:16]


def train_tokenizer(texts: Iterable[str], vocab_size: int, cache_dir: str | Path) -> Path:
    """Train (or reuse from cache) the sentencepiece model; return its HF tokenizer dir."""
    texts = [t for t in texts if t]
    if not texts:
        raise DataError("tokenizer: no text to train on")
    out = Path(cache_dir) / f"spm-bpe{vocab_size}-{cache_key(texts, vocab_size)}"
    if (out / "tokenizer.json").is_file():
        return out
    import sentencepiece as spm  # only to train one; a cached tokenizer does not need it

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model,
                                       vocab_size=vocab_size, num_threads=2, minloglevel=2,
                                       **_SPM_OPTIONS)
    except RuntimeError as e:
        raise DataError(f"tokenizer: sentencepiece cannot train {vocab_size} pieces ({e}); "
                        "model.vocab_size must cover 256 byte pieces, 8 special tokens and the "
                        "text's characters, e.g. 512") from e
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".spm-", dir=out.parent))
    try:
        (tmp / "tokenizer.model").write_bytes(model.getvalue())
        _wrap_hf(tmp).save_pretrained(tmp)
        os.replace(tmp, out)  # atomic: readers see a complete dir or none
    except OSError:
        if not (out / "tokenizer.json").is_file():  # not a lost race with another process
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _wrap_hf(model_dir: Path) -> Any:
    """A Hugging Face (tokenizers-backed) Llama tokenizer equal to the sentencepiece model."""
    from transformers import LlamaTokenizer  # heavy: kept out of `import megatron_rl.data`

    tok = LlamaTokenizer.from_pretrained(
        str(model_dir), legacy=False, add_prefix_space=False, add_bos_token=False,
        add_eos_token=False, pad_token="<pad>", padding_side="left")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def load_tokenizer(path: str | Path) -> Any:
    """A Hugging Face tokenizer from a local dir (ours or any model's), offline."""
    from transformers import AutoTokenizer  # heavy, as in _wrap_hf

    if not Path(path).is_dir():
        raise DataError(f"{path}: tokenizer dir not found (set data.tokenizer to a local dir)")
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
