"""The embedded default's base model: a short pre-training of the tiny MoE on worked solutions.

RL needs a base model that sometimes samples correct answers. The demo has no hub to download
one from, so it makes one: the tokenizer and task of the run's config, a corpus of R1-Zero
formatted worked solutions whose steps slip now and then (`megatron_rl.data.worked`), and a few
hundred AdamW steps of next-token prediction on the responses. The result is a Hugging Face model
directory (weights, config, tokenizer) that `checkpoint.load` reads at any parallel layout, cached
under `pretrain.cache_dir` by a hash of everything it depends on, so a second run starts at RL.

Pre-training is single-process (the model is tiny); under torchrun rank 0 builds the cache and the
other ranks wait for it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from megatron_rl.configurable import to_dict
from megatron_rl.convert import arch_of
from megatron_rl.data import apply_template, build_dataset, build_tokenizer
from megatron_rl.data.worked import solution
from megatron_rl.metrics.logger import format_duration
from megatron_rl.pretrain.config import PretrainConfig

if TYPE_CHECKING:  # torch is imported where it is used: the run config imports pretrain.config
    import torch

__all__ = ["PretrainConfig", "base_model_dir", "ensure_base_model", "pretrain"]

_FORMAT_VERSION = 2  # bump when the corpus or the training loop changes: invalidates caches
_WAIT_S = 3600.0  # how long other ranks wait for rank 0's pre-training


def base_model_dir(cfg: Any, tokenizer_dir: str) -> Path:
    """The cache directory of the base model `cfg` (a RunConfig) describes."""
    pre = {**to_dict(cfg.pretrain), "cache_dir": ""}  # where it is cached is not part of the key
    data = {k: getattr(cfg.data, k) for k in ("source", "task", "task_kwargs", "train_size",
                                               "seed", "chat_template")}
    key = json.dumps([_FORMAT_VERSION, to_dict(cfg.model), pre, data,
                      Path(tokenizer_dir).name], sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(cfg.pretrain.cache_dir) / f"{cfg.data.task}-{digest}"


def ensure_base_model(cfg: Any, log: Any = print) -> Path:
    """The base model's HF directory for run config `cfg`, pre-training it first if not cached."""
    train = build_dataset(cfg.data, "train")
    tokenizer = build_tokenizer(cfg.data, cfg.model.vocab_size, train)
    out = base_model_dir(cfg, tokenizer.name_or_path)
    if (out / "config.json").is_file():
        log(f"base model: cached at {out}")
        return out
    if int(os.environ.get("RANK", "0")) != 0:
        return _wait_for(out)
    pre = cfg.pretrain
    log(f"base model: pre-training {pre.steps} steps on worked {cfg.data.task} answers (step "
        f"accuracy {pre.step_accuracy}), the last {min(pre.mixed_steps, pre.steps)} with "
        f"{1 - pre.work_fraction:.0%} guesses mixed in; cached at {out}")
    model, history = pretrain(cfg.model, cfg.pretrain, train.records, tokenizer,
                              cfg.data.chat_template, log=log)
    _save(model, tokenizer, history, cfg, out)
    return out


def pretrain(model_cfg: Any, pre: PretrainConfig, records: Sequence[Any], tokenizer: Any,
             template: str, log: Any = print) -> tuple[torch.nn.Module, list[float]]:
    """A fresh HF model of `model_cfg` trained `pre.steps` steps on worked solutions of
    `records` (guesses mixed in for the last `pre.mixed_steps`); returns it and the loss per
    step."""
    # torch and transformers: heavy, and loading a config (which imports this package) does
    # not need them
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(pre.seed)
    rng = random.Random(pre.seed)
    config = AutoConfig.for_model(**arch_of(model_cfg).hf_config(model_cfg))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=pre.lr, betas=(0.9, 0.98), weight_decay=0.0)
    prompts: dict[int, list[int]] = {}

    def example(i: int, work: float) -> tuple[list[int], list[int]]:
        rec = records[i]
        if i not in prompts:
            prompts[i] = tokenizer.encode(apply_template(template, rec.prompt, tokenizer))
        text = solution(rec, rng, work, pre.step_accuracy)
        return prompts[i], tokenizer.encode(text) + [tokenizer.eos_token_id]

    history: list[float] = []
    start = time.perf_counter()
    for step in range(pre.steps):
        work = pre.work_fraction if step >= pre.steps - pre.mixed_steps else 1.0
        ids, labels, mask = _batch([example(rng.randrange(len(records)), work)
                                    for _ in range(pre.batch_size)], tokenizer.pad_token_id)
        for group in opt.param_groups:
            group["lr"] = _lr(step, pre)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == pre.steps:
            elapsed = time.perf_counter() - start
            eta = elapsed / (step + 1) * (pre.steps - step - 1)
            recent = history[-50:]
            log(f"pretrain step {step + 1}/{pre.steps}  loss {sum(recent) / len(recent):.3f}"
                f"  elapsed {format_duration(elapsed)}  ETA {format_duration(eta)}")
    return model.eval(), history


def _lr(step: int, pre: PretrainConfig) -> float:
    """Linear warmup, cosine decay to 0."""
    warm = min(1.0, (step + 1) / max(pre.warmup_steps, 1))
    return pre.lr * warm * 0.5 * (1 + math.cos(math.pi * step / max(pre.steps, 1)))


def _batch(examples: list[tuple[list[int], list[int]]], pad_id: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, labels (-100 on prompt and padding: only responses are learned) and
    attention mask."""
    import torch  # as in pretrain()

    n = max(len(p) + len(r) for p, r in examples)
    ids = torch.full((len(examples), n), pad_id)
    labels = torch.full((len(examples), n), -100)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, (p, r) in enumerate(examples):
        ids[i, : len(p) + len(r)] = torch.tensor(p + r)
        labels[i, len(p): len(p) + len(r)] = torch.tensor(r)
        mask[i, : len(p) + len(r)] = 1
    return ids, labels, mask


def _save(model: torch.nn.Module, tokenizer: Any, history: list[float], cfg: Any,
          out: Path) -> None:
    """Write the HF model dir atomically (a complete dir or none)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "pretrain.json").write_text(json.dumps(
            {"pretrain": to_dict(cfg.pretrain), "task": cfg.data.task, "loss": history},
            indent=1))
        os.replace(tmp, out)
    except OSError:
        if not (out / "config.json").is_file():  # not a lost race with another process
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_for(out: Path) -> Path:
    """Other ranks: wait until rank 0 has written the base model."""
    print(f"base model: waiting for rank 0 to write {out}", file=sys.stderr)
    deadline = time.monotonic() + _WAIT_S
    while not (out / "config.json").is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"base model: {out} did not appear within {_WAIT_S:.0f} s; "
                               "check rank 0's log")
        time.sleep(1.0)
    return out
