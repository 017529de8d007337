"""The embedded rollout engine: a `transformers` causal LM sampling batches with a KV cache.

One forward over the left-padded prompts, then one token per step for every row; the log-prob
of each sampled token is log_softmax(logits / temperature) *before* top-k/top-p truncation,
which is what the actor recomputes (`actor.logprobs(..., temperature)`). With
`return_routed_experts=True`, forward hooks on the MoE gates record the experts each token was
sent to, exactly as the model used them (the gate's returned top-k indices).

On CPU there is no device memory to hand back: `release_memory_occupation` drops nothing but
marks what was released, as SGLang's tags say ("weights", "kv_cache"; None = both), and the
engine keeps SGLang's rules: no generation while either is released, no weight update while the
weights are. So the colocated sequence (docs/design.md section 6) is checked on CPU too.

Shape legend: B = rows (prompts x n), P = padded prompt length, V = vocabulary, K = top-k,
L = MoE layers.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from megatron_rl.convert import arch_of
from megatron_rl.rollout.engine import EngineError
from megatron_rl.rollout.hf_weights import HFWeightApplier, iter_checkpoint
from megatron_rl.rollout.types import GenerateOutput, SamplingParams
from megatron_rl.rollout.weight_sync import (
    broadcast_tensors,
    close_update_group,
    open_update_group,
)


def _truncate(logits_BV: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Logits with everything outside the top-k and the top-p nucleus set to -inf."""
    if top_k != -1 and top_k < logits_BV.shape[-1]:
        kth = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits_BV.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits_BV = torch.full_like(logits_BV, float("-inf")).scatter(-1, order, sorted_logits)
    return logits_BV


def draw(probs_BV: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """One token per row [B] from the (unnormalised) probabilities [B, V]: a uniform draw per
    row through the inverse CDF. The first entry whose cdf exceeds the draw (searchsorted's
    right side), so a zero-probability token, a flat step of the cdf, is never drawn."""
    cdf = probs_BV.cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=gen, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True)[:, 0].clamp_(max=cdf.shape[-1] - 1)


MEMORY_TAGS = ("weights", "kv_cache")
"""SGLang's memory tags (`release_memory_occupation(tags=...)`)."""


class _GateRecorder:
    """Forward hooks on the MoE gates: the top-k expert ids of each forward, per layer."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.gates = [m for name, m in model.named_modules()
                      if name.endswith("mlp.gate") and "Router" in type(m).__name__]
        self.calls: list[list[torch.Tensor]] = []
        self._handles: list[Any] = []

    def __enter__(self) -> _GateRecorder:
        for layer, gate in enumerate(self.gates):
            self._handles.append(gate.register_forward_hook(self._hook(layer)))
        return self

    def _hook(self, layer: int):
        def hook(_module, _inputs, output) -> None:
            # transformers 5 routers return (router_logits, top-k weights, top-k indices).
            indices = output[2]
            if layer == 0:
                self.calls.append([])
            self.calls[-1].append(indices.detach().clone())
        return hook

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def pop(self, rows: int) -> torch.Tensor:
        """Experts of the last forward as [B, S, L, K]."""
        per_layer = self.calls.pop()
        return torch.stack([x.view(rows, -1, x.shape[-1]) for x in per_layer], dim=2)


@dataclass
class _Rows:
    """Decode state of one chunk of rows."""

    prompts: list[list[int]]
    out: list[list[int]]
    logprobs: list[list[float]]
    finish: list[str | None]
    experts: list[list[torch.Tensor]]
    """Per row, the [S, L, K] expert blocks of the tokens it fed through the model."""


class TransformersEngine:
    """A `RolloutEngine` around an in-memory Hugging Face causal LM (CPU or one GPU)."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None, address: str = "embedded",
                 max_batch_tokens: int = 16384, timeout_s: float = 600.0) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.address = address
        self.max_batch_tokens = max_batch_tokens
        """Rows x (prompt + max_new_tokens) of one decode batch; more rows run in chunks."""
        self.timeout_s = timeout_s
        """Wall-clock limit of one call (generate, weight update group)."""
        self._weights = HFWeightApplier(self.model)
        self._released: set[str] = set()  # SGLang's memory tags released and not resumed
        self._groups: dict[str, tuple[Any, Any]] = {}
        # transformers 5.x names the KV cache argument `cache` (`past_key_values` is deprecated
        # and warns on every call); older releases only know `past_key_values`.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        cfg = model.config
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = cfg.eos_token_id if eos is None else eos
        if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
            eos = tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.pad_id = (getattr(tokenizer, "pad_token_id", None) if tokenizer else None) or 0

    @classmethod
    def from_model_config(cls, model_cfg: Any, arch: Any = None, dtype: torch.dtype =
                          torch.float32, **kwargs: Any) -> TransformersEngine:
        """An engine on a fresh HF model of our `ModelConfig` (weights come by weight sync)."""
        # transformers: heavy; an engine handed a built model never needs the import
        from transformers import AutoConfig, AutoModelForCausalLM

        arch = arch or arch_of(model_cfg)
        config = AutoConfig.for_model(**arch.hf_config(model_cfg))
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return cls(model, **kwargs)

    # ---- generation -------------------------------------------------------------------------

    def generate(
        self,
        input_ids: Sequence[Sequence[int]] | None = None,
        sampling_params: SamplingParams | None = None,
        prompt: Sequence[str] | None = None,
        return_routed_experts: bool = False,
    ) -> list[list[GenerateOutput]]:
        """For each prompt, `sampling_params.n` samples (rows of a prompt are adjacent)."""
        sp = sampling_params or SamplingParams()
        prompts = self._prompt_ids(input_ids, prompt)
        if self._released:
            raise EngineError(f"engine {self.address}: generate after release_memory_occupation"
                              f" ({sorted(self._released)}); call resume_memory_occupation "
                              "first")
        if sp.stop and self.tokenizer is None:
            raise EngineError(f"engine {self.address}: stop strings need a tokenizer")
        rows = [list(p) for p in prompts for _ in range(sp.n)]
        gen = torch.Generator().manual_seed(sp.seed) if sp.seed is not None else None
        deadline = time.monotonic() + self.timeout_s
        longest = max(len(r) for r in rows) + sp.max_new_tokens
        per_chunk = max(1, self.max_batch_tokens // longest)
        outputs: list[GenerateOutput] = []
        for start in range(0, len(rows), per_chunk):
            outputs += self._generate_chunk(rows[start : start + per_chunk], sp, gen, deadline,
                                            return_routed_experts)
        return [outputs[i * sp.n : (i + 1) * sp.n] for i in range(len(prompts))]

    def _prompt_ids(self, input_ids, prompt) -> list[list[int]]:
        if (input_ids is None) == (prompt is None):
            raise EngineError(f"engine {self.address}: give exactly one of input_ids or prompt")
        if input_ids is None:
            if self.tokenizer is None:
                raise EngineError(f"engine {self.address}: text prompts need a tokenizer")
            input_ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompt]
        ids = [list(map(int, p)) for p in input_ids]
        if not ids or any(len(p) == 0 for p in ids):
            raise EngineError(f"engine {self.address}: empty prompt list or empty prompt")
        return ids

    @torch.no_grad()
    def _generate_chunk(self, prompts: list[list[int]], sp: SamplingParams,
                        gen: torch.Generator | None, deadline: float,
                        capture: bool) -> list[GenerateOutput]:
        from transformers import DynamicCache  # transformers: as in from_model_config

        B, P = len(prompts), max(len(p) for p in prompts)
        ids_BP = torch.full((B, P), self.pad_id, dtype=torch.long)
        mask_BP = torch.zeros((B, P), dtype=torch.long)
        for r, p in enumerate(prompts):  # left padding: every row's next token is at column P
            ids_BP[r, P - len(p):] = torch.tensor(p)
            mask_BP[r, P - len(p):] = 1
        pos_BP = (mask_BP.cumsum(-1) - 1).clamp(min=0)
        st = _Rows(prompts, [[] for _ in range(B)], [[] for _ in range(B)], [None] * B,
                   [[] for _ in range(B)])
        cache = DynamicCache(config=self.model.config)
        stop_ids = self.eos_ids | set(sp.stop_token_ids)
        recorder = _GateRecorder(self.model) if capture else None
        with recorder or _Null():
            logits = self._forward(ids_BP, mask_BP, pos_BP, cache)
            if recorder:
                ex = recorder.pop(B)
                for r, p in enumerate(prompts):
                    st.experts[r].append(ex[r, P - len(p):])
            live = list(range(B))  # the chunk's row of each batch row
            for step in range(sp.max_new_tokens):
                if time.monotonic() > deadline:
                    raise EngineError(f"engine {self.address}: generate exceeded its "
                                      f"{self.timeout_s:.0f} s timeout")
                sampled = [st.finish[i] is None for i in live]  # rows drawing a token now
                tokens = self._sample_step(logits, sp, gen, st, stop_ids, step, live)
                running = any(st.finish[i] is None for i in live)
                if not running and not capture:
                    break
                # Rows that are done leave the batch (and the KV cache) once a quarter of it
                # is done: a few long answers no longer pay for every finished row. A row
                # finishing now still feeds its last token when capturing, so its experts
                # cover prompt + output.
                keep = [r for r, i in enumerate(live)
                        if st.finish[i] is None or (capture and sampled[r])]
                if len(keep) <= 3 * len(live) // 4:
                    index = torch.tensor(keep)
                    cache.batch_select_indices(index)
                    mask_BP, pos_BP, tokens = mask_BP[index], pos_BP[index], tokens[index]
                    live = [live[r] for r in keep]
                    sampled = [sampled[r] for r in keep]
                # Feed the new tokens (finished rows still here feed padding nobody reads).
                rows = len(live)
                mask_BP = torch.cat([mask_BP, torch.ones(rows, 1, dtype=torch.long)], 1)
                pos_BP = pos_BP[:, -1:] + 1
                logits = self._forward(tokens[:, None], mask_BP, pos_BP, cache)
                if recorder:
                    ex = recorder.pop(rows)
                    for r, i in enumerate(live):
                        if sampled[r]:
                            st.experts[i].append(ex[r])
                if not running:
                    break
        return [self._output(st, r, capture) for r in range(B)]

    def _forward(self, ids, mask, pos, cache) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos,
                         use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})
        return out.logits[:, -1].float()

    def _sample_step(self, logits_BV: torch.Tensor, sp: SamplingParams,
                     gen: torch.Generator | None, st: _Rows, stop_ids: set[int],
                     step: int, live: list[int]) -> torch.Tensor:
        """Sample one token for every unfinished row (batch row r is chunk row `live[r]`);
        record it, its log-prob, and stops.

        One uniform draw per row through the inverse CDF (exact sampling from the truncated
        distribution, and ~10x cheaper than `torch.multinomial`'s exponential draw per
        vocabulary entry); the log-probs are gathered in one call, not read row by row."""
        scaled = logits_BV / sp.temperature
        logp_BV = scaled.log_softmax(-1)
        truncated = (sp.top_k != -1 and sp.top_k < logits_BV.shape[-1]) or sp.top_p < 1.0
        probs = _truncate(scaled, sp.top_k, sp.top_p).softmax(-1) if truncated else logp_BV.exp()
        tokens = draw(probs, gen)
        token_logp = logp_BV.gather(1, tokens[:, None])[:, 0].tolist()
        for r, (i, tok) in enumerate(zip(live, tokens.tolist(), strict=True)):
            if st.finish[i] is not None:
                tokens[r] = self.pad_id
                continue
            st.out[i].append(tok)
            st.logprobs[i].append(token_logp[r])
            if tok in stop_ids or self._hit_stop_string(st.out[i], sp.stop):
                st.finish[i] = "stop"
            elif step + 1 == sp.max_new_tokens:
                st.finish[i] = "length"
        return tokens

    def _hit_stop_string(self, out: list[int], stop: list[str]) -> bool:
        if not stop:
            return False
        longest = max(len(s) for s in stop)
        tail = self.tokenizer.decode(out[-(longest + 8):], skip_special_tokens=False)
        return any(s in tail for s in stop)

    def _output(self, st: _Rows, r: int, capture: bool) -> GenerateOutput:
        experts = torch.cat(st.experts[r]) if capture and st.experts[r] else None
        # like SGLang's /generate (skip_special_tokens defaults to true): "... <|im_end|>" must
        # score like "...", or a chat model's every answer is read with the end token attached
        text = (self.tokenizer.decode(st.out[r], skip_special_tokens=True)
                if self.tokenizer is not None else "")
        return GenerateOutput(output_ids=st.out[r], output_logprobs=st.logprobs[r],
                              finish_reason=st.finish[r] or "length", text=text,
                              routed_experts=experts, prompt_ids=st.prompts[r])

    # ---- weights ----------------------------------------------------------------------------

    def update_weights_from_tensor(self, named_tensors: Sequence[tuple[str, torch.Tensor]],
                                   load_format: str | None = None,
                                   flush_cache: bool = True) -> None:
        """Copy HF-named tensors into the model in place (fused MoE experts handled)."""
        if "weights" in self._released:
            raise EngineError(f"engine {self.address}: weight update while the weights are "
                              "released; call resume_memory_occupation(['weights']) first")
        self._apply(named_tensors)

    def _apply(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        try:
            self._weights.apply(named_tensors)
        except (KeyError, ValueError) as e:
            raise EngineError(f"engine {self.address}: {e}") from e

    def update_weights_from_disk(self, model_path: str, load_format: str | None = None) -> None:
        """Reload every weight from an HF safetensors checkpoint directory."""
        self.update_weights_from_tensor(iter_checkpoint(model_path))

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                  world_size: int, group_name: str = "weight_update_group",
                                  backend: str = "gloo") -> None:
        """Join the trainer's broadcast group as rank `rank_offset` (the trainer is rank 0).

        The group is its own gloo process group on its own TCP store, independent of any
        default process group in this process (SGLang does the same with NCCL).
        """
        if backend not in ("gloo", "nccl"):
            raise EngineError(f"engine {self.address}: unknown backend {backend!r}")
        self.destroy_weights_update_group(group_name)  # a trainer re-forming it after a failure
        self._groups[group_name] = open_update_group(
            master_address, master_port, rank_offset, world_size, group_name, self.timeout_s)

    def update_weights_from_distributed(self, names: Sequence[str], dtypes: Sequence[str],
                                        shapes: Sequence[Sequence[int]],
                                        group_name: str = "weight_update_group",
                                        flush_cache: bool = True) -> None:
        """Receive one bucket by broadcast from rank 0 of the update group, then apply it."""
        if group_name not in self._groups:
            raise EngineError(f"engine {self.address}: no weight update group {group_name!r}; "
                              "call init_weights_update_group first")
        pg, _store = self._groups[group_name]
        tensors = [torch.empty(tuple(s), dtype=getattr(torch, d.removeprefix("torch.")))
                   for d, s in zip(dtypes, shapes, strict=True)]
        if "weights" in self._released:
            raise EngineError(f"engine {self.address}: weight update while the weights are "
                              "released; call resume_memory_occupation(['weights']) first")
        try:  # each tensor is applied as it arrives, while the next ones are in flight
            broadcast_tensors(pg, list(zip(names, tensors, strict=True)), self.timeout_s,
                              on_each=lambda n, t: self._apply([(n, t)]))
        except EngineError as e:
            raise EngineError(f"engine {self.address}: {e}") from e

    def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> None:
        """Leave the update group (SGLang's /destroy_weights_update_group)."""
        old = self._groups.pop(group_name, None)
        if old is not None:
            close_update_group(old[0])

    # ---- memory and housekeeping ------------------------------------------------------------

    def release_memory_occupation(self, tags: Sequence[str] | None = None) -> None:
        """Mark `tags` released (None: weights and KV cache); on CPU the weights stay."""
        self._released |= set(MEMORY_TAGS if tags is None else tags)

    def resume_memory_occupation(self, tags: Sequence[str] | None = None) -> None:
        """Take `tags` back (None: all)."""
        self._released -= set(MEMORY_TAGS if tags is None else tags)

    def flush_cache(self) -> None:
        """No-op: the KV cache lives for one generate call, so no prefix survives an update."""

    def health(self) -> bool:
        return True


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
