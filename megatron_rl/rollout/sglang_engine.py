"""SGLang behind the `RolloutEngine` protocol: an HTTP client of an SGLang server (or of
`megatron-rl serve`, which speaks the same routes) and a wrapper of the in-process `sglang.Engine`.

Routes and fields are SGLang's own, read from its source (sgl-project/sglang,
`python/sglang/srt/managers/io_struct.py` at commit 001067fffe33427bee0ed2f007fb7551a1d76b44 and
`python/sglang/srt/entrypoints/http_server.py` at 0025436eab0556737d615b36a4dd3e1e26e82f3d, the
0.5.x line; docs/design.md section 6 lists the same fields for 0.5.23):

- `/generate` (GenerateReqInput): `text` | `input_ids` (one or a batch), `sampling_params`,
  `return_logprob`, `logprob_start_len` (-1: output tokens only), `top_logprobs_num`,
  `return_routed_experts`. Response per output: `text`, `output_ids`, `meta_info` with
  `output_token_logprobs` ([logprob, token_id, text | None] per generated token),
  `finish_reason` ({"type": "stop" | "length" | "abort", ...}), `prompt_tokens`,
  `completion_tokens`, and `routed_experts` (base64 of a little-endian int32 C-order array
  [positions, layers, top_k]; SGLang covers prompt + completion - 1 positions; `megatron-rl
  serve` adds `routed_experts_shape`, SGLang does not: pass `routed_experts_layout=(layers,
  top_k)` to decode SGLang's). A batch, or n > 1,
  returns a flat list, prompt-major (prompt i, sample j at i * n + j).
- `/update_weights_from_disk` {model_path, load_format, flush_cache, abort_all_requests,
  weight_version} -> {success, message, num_paused_requests}.
- `/update_weights_from_tensor` {serialized_named_tensors (one base64 string per TP rank),
  load_format, flush_cache, abort_all_requests, weight_version} -> {success, message}.
- `/init_weights_update_group` {master_address, master_port, rank_offset, world_size,
  group_name="weight_update_group", backend="nccl"}; `/update_weights_from_distributed` {names,
  dtypes, shapes, group_name, flush_cache}; `/destroy_weights_update_group` {group_name}.
- `/release_memory_occupation`, `/resume_memory_occupation` {tags}; `/flush_cache`; `/health`
  (200, empty body); `/model_info` (older servers: `/get_model_info`; the client tries both).

Tensor encoding of `/update_weights_from_tensor` (`tensor_encoding`):
- "sglang": SGLang's own, `MultiprocessingSerializer.serialize(named_tensors, output_str=True)`
  (a ForkingPickler pickle: CUDA tensors travel as same-host CUDA IPC handles, so the server must
  run on the same host and GPU driver; the tensors must stay alive until the call returns). Needs
  `sglang` importable. Wire-compatible with real SGLang; NOT understood by `megatron-rl serve`.
- "portable": base64 of `torch.save` bytes of the list of (name, CPU tensor), sent with
  `load_format="megatron_rl.torch_save"`. Works across hosts; understood by `megatron-rl serve`
  only. Real SGLang treats an unknown `load_format` as a custom loader import and fails with an
  error, never silently.
- "auto" (default): "sglang" when `sglang` is importable, else "portable".
"""

from __future__ import annotations

import base64
import http.client
import importlib.util
import io
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch

from megatron_rl.rollout.engine import EngineError
from megatron_rl.rollout.types import FinishType, GenerateOutput, SamplingParams

logger = logging.getLogger(__name__)

PORTABLE_LOAD_FORMAT = "megatron_rl.torch_save"
"""`load_format` marking the portable tensor encoding (see the module docstring)."""
TensorEncoding = Literal["auto", "sglang", "portable"]
GPU_HINT = "SGLang needs a CUDA GPU: pip install -e .[gpu] on a GPU machine"


# ---------------------------------------------------------------------------------------------
# Wire encodings shared by the client and `megatron-rl serve`.


def encode_portable(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> str:
    """base64 of `torch.save` bytes of [(name, CPU tensor)]."""
    buf = io.BytesIO()
    torch.save([(name, t.detach().cpu()) for name, t in named_tensors], buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_portable(payload: str) -> list[tuple[str, torch.Tensor]]:
    """Inverse of `encode_portable` (weights_only: no code runs while loading)."""
    data = torch.load(io.BytesIO(base64.b64decode(payload)), weights_only=True)
    return [(str(name), tensor) for name, tensor in data]


def encode_sglang(named_tensors: Sequence[tuple[str, torch.Tensor]]) -> str:
    """SGLang's own encoding (same-host ForkingPickler, base64); needs `sglang` importable."""
    try:
        from sglang.srt.utils import MultiprocessingSerializer
    except ImportError as e:
        raise EngineError(f"tensor_encoding='sglang' needs the sglang package ({e}); "
                          "use tensor_encoding='portable' for megatron-rl serve") from e
    return MultiprocessingSerializer.serialize(list(named_tensors), output_str=True)


def encode_routed_experts(experts: torch.Tensor) -> str:
    """SGLang's `meta_info["routed_experts"]`: base64 of little-endian int32, C order."""
    arr = experts.detach().to(torch.int32).contiguous().cpu().numpy().astype("<i4")
    return base64.b64encode(arr.tobytes()).decode("ascii")


def decode_routed_experts(payload: str | list, layout: tuple[int, int]) -> torch.Tensor:
    """[positions, layers, top_k] int32 from base64 (SGLang) or a nested list."""
    if isinstance(payload, list):
        return torch.tensor(payload, dtype=torch.int32).reshape(-1, *layout)
    flat = np.frombuffer(base64.b64decode(payload), dtype="<i4")
    return torch.from_numpy(flat.copy()).reshape(-1, *layout)


def parse_output(item: dict[str, Any], prompt_ids: Sequence[int] | None,
                 layout: tuple[int, int] | None) -> GenerateOutput:
    """One element of SGLang's /generate response as a `GenerateOutput`."""
    meta = item.get("meta_info") or {}
    token_lps = meta.get("output_token_logprobs") or []
    ids = item.get("output_ids")
    if ids is None:  # older servers: ids only inside the logprob triples
        ids = [int(entry[1]) for entry in token_lps]
    finish = meta.get("finish_reason") or {}
    kind = finish.get("type") if isinstance(finish, dict) else finish
    finish_reason: FinishType = kind if kind in ("stop", "length", "abort") else "abort"
    experts = None
    if meta.get("routed_experts") is not None:
        if "routed_experts_shape" in meta:
            layout = tuple(meta["routed_experts_shape"][1:])
        if layout is None:
            raise EngineError("the server returned routed_experts but their layout (MoE layers, "
                              "top-k) is unknown: pass routed_experts_layout=(layers, top_k)")
        experts = decode_routed_experts(meta["routed_experts"], layout)
    return GenerateOutput(
        output_ids=[int(t) for t in ids],
        output_logprobs=[float(entry[0]) for entry in token_lps],
        finish_reason=finish_reason, text=item.get("text") or "",
        routed_experts=experts, prompt_ids=list(prompt_ids or []))


def _generate_request(input_ids: Sequence[Sequence[int]] | None, prompt: Sequence[str] | None,
                      sampling_params: SamplingParams | None, return_routed_experts: bool
                      ) -> tuple[SamplingParams, dict[str, Any], int]:
    """(sampling params, /generate body, number of prompts) shared by the HTTP and in-process
    engines."""
    params = sampling_params or SamplingParams()
    body = generate_payload(input_ids, prompt, params, return_routed_experts)
    return params, body, len(body.get("input_ids") or body.get("text") or [])


def generate_payload(input_ids: Sequence[Sequence[int]] | None, prompt: Sequence[str] | None,
                     params: SamplingParams, return_routed_experts: bool) -> dict[str, Any]:
    """The /generate request body (GenerateReqInput) of a batch, with output log-probs."""
    if (input_ids is None) == (prompt is None):
        raise ValueError("generate: give exactly one of input_ids and prompt")
    body: dict[str, Any] = {"sampling_params": params.to_sglang(), "return_logprob": True,
                            "logprob_start_len": -1, "top_logprobs_num": 0}
    if input_ids is not None:
        body["input_ids"] = [[int(t) for t in ids] for ids in input_ids]
    else:
        body["text"] = list(prompt or [])
    if return_routed_experts:
        body["return_routed_experts"] = True
    return body


def group_outputs(items: Any, n_prompts: int, n: int, prompt_ids: Sequence[Sequence[int]] | None,
                  layout: tuple[int, int] | None) -> list[list[GenerateOutput]]:
    """Prompt-major flat response -> [prompt][sample]."""
    items = items if isinstance(items, list) else [items]
    if len(items) != n_prompts * n:
        raise EngineError(f"expected {n_prompts} x {n} outputs, got {len(items)}")
    return [[parse_output(items[i * n + j], prompt_ids[i] if prompt_ids else None, layout)
             for j in range(n)] for i in range(n_prompts)]


# ---------------------------------------------------------------------------------------------
# HTTP client.


class SGLangEngine:
    """`RolloutEngine` over HTTP: an SGLang server or `megatron-rl serve` at `url`.

    Every request has `timeout_s`; connection errors, timeouts and 5xx are retried `max_retries`
    times with exponential backoff (`backoff_s`, doubled per retry); 4xx and `success: false` are
    not retried. The final failure raises `EngineError` naming the URL and the route.
    """

    def __init__(self, url: str, *, timeout_s: float = 60.0, max_retries: int = 3,
                 backoff_s: float = 0.5, tp_size: int = 1,
                 tensor_encoding: TensorEncoding = "auto",
                 routed_experts_layout: tuple[int, int] | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            url = "http://" + url
        self.address = url.rstrip("/")
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.tp_size = tp_size
        if tensor_encoding == "auto":
            tensor_encoding = "sglang" if importlib.util.find_spec("sglang") else "portable"
        self.tensor_encoding = tensor_encoding
        self.routed_experts_layout = routed_experts_layout
        self._server_info: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, cfg: Any, url: str, **kwargs: Any) -> SGLangEngine:
        """From `RolloutConfig` (timeout and retries)."""
        return cls(url, timeout_s=cfg.request_timeout_s, max_retries=cfg.max_retries, **kwargs)

    def __repr__(self) -> str:
        return f"SGLangEngine({self.address!r})"

    # -- transport ------------------------------------------------------------------------------

    def request(self, route: str, body: dict[str, Any] | None = None, method: str = "POST",
                timeout_s: float | None = None, retries: int | None = None) -> Any:
        """Send one request (JSON in, JSON or text out), retrying transient failures."""
        url = self.address + route
        data = None if body is None else json.dumps(body).encode()
        retries = self.max_retries if retries is None else retries
        last = ""
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            req = urllib.request.Request(url, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as resp:
                    return _decode_body(resp.read())
            except urllib.error.HTTPError as e:
                detail = _error_detail(e)
                if e.code < 500:
                    raise EngineError(f"{url}: HTTP {e.code}: {detail}") from e
                last = f"HTTP {e.code}: {detail}"
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                # OSError: refused/reset/timeout; HTTPException: the server died mid-response
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            logger.warning("%s failed (attempt %d/%d): %s", url, attempt + 1, retries + 1, last)
        raise EngineError(f"engine at {self.address} failed on {route} after {retries + 1} "
                          f"attempt(s) (timeout {timeout_s or self.timeout_s} s): {last}")

    def _call(self, route: str, body: dict[str, Any] | None = None,
              retries: int | None = None) -> Any:
        """POST and check SGLang's {success, message} answer."""
        out = self.request(route, body, retries=retries)
        if isinstance(out, dict) and out.get("success") is False:
            raise EngineError(f"{self.address}{route}: {out.get('message', 'failed')}")
        return out

    # -- RolloutEngine --------------------------------------------------------------------------

    def generate(self, input_ids: Sequence[Sequence[int]] | None = None,
                 sampling_params: SamplingParams | None = None,
                 prompt: Sequence[str] | None = None,
                 return_routed_experts: bool = False) -> list[list[GenerateOutput]]:
        """For each prompt, `sampling_params.n` outputs with per-token log-probs."""
        params, body, n_prompts = _generate_request(input_ids, prompt, sampling_params,
                                                    return_routed_experts)
        if n_prompts == 0:
            return []
        items = self.request("/generate", body)
        return group_outputs(items, n_prompts, params.n, body.get("input_ids"),
                             self.routed_experts_layout)

    def update_weights_from_tensor(self, named_tensors: Sequence[tuple[str, torch.Tensor]],
                                   load_format: str | None = None, flush_cache: bool = True,
                                   weight_version: str | None = None) -> None:
        """Send the named weights (one serialized copy per TP rank, as SGLang expects)."""
        if self.tensor_encoding == "sglang":
            payload = encode_sglang(named_tensors)
        else:
            if load_format not in (None, PORTABLE_LOAD_FORMAT):
                raise EngineError(f"load_format={load_format!r} needs tensor_encoding='sglang'")
            payload, load_format = encode_portable(named_tensors), PORTABLE_LOAD_FORMAT
        self._call("/update_weights_from_tensor", {
            "serialized_named_tensors": [payload] * self.tp_size, "load_format": load_format,
            "flush_cache": flush_cache, "abort_all_requests": False,
            "weight_version": weight_version})

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                  world_size: int, group_name: str = "weight_update_group",
                                  backend: str = "nccl") -> None:
        """Ask the server to join the trainer's broadcast group (never retried: the group forms
        once, with the trainer waiting on the other side)."""
        self._call("/init_weights_update_group", {
            "master_address": master_address, "master_port": master_port,
            "rank_offset": rank_offset, "world_size": world_size, "group_name": group_name,
            "backend": backend}, retries=0)

    def update_weights_from_distributed(self, names: Sequence[str], dtypes: Sequence[str],
                                        shapes: Sequence[Sequence[int]],
                                        group_name: str = "weight_update_group",
                                        flush_cache: bool = True) -> None:
        """Tell the server to receive these weights by broadcast (the trainer sends them; never
        retried: a repeated request would wait for a broadcast that is not sent again)."""
        self._call("/update_weights_from_distributed", {
            "names": list(names), "dtypes": [str(d).removeprefix("torch.") for d in dtypes],
            "shapes": [list(s) for s in shapes], "group_name": group_name,
            "flush_cache": flush_cache}, retries=0)

    def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> None:
        """Leave the broadcast group."""
        self._call("/destroy_weights_update_group", {"group_name": group_name})

    def update_weights_from_disk(self, model_path: str, load_format: str | None = None,
                                 flush_cache: bool = True,
                                 weight_version: str | None = None) -> None:
        """Reload all weights from an HF checkpoint directory the server can read."""
        self._call("/update_weights_from_disk", {
            "model_path": str(model_path), "load_format": load_format,
            "flush_cache": flush_cache, "abort_all_requests": False,
            "weight_version": weight_version})

    def release_memory_occupation(self, tags: Sequence[str] | None = None) -> None:
        """Free weights and/or KV cache (tags: "weights", "kv_cache"; None = all)."""
        self._call("/release_memory_occupation", {"tags": None if tags is None else list(tags)})

    def resume_memory_occupation(self, tags: Sequence[str] | None = None) -> None:
        """Take the released memory back."""
        self._call("/resume_memory_occupation", {"tags": None if tags is None else list(tags)})

    def flush_cache(self) -> None:
        """Drop cached prefixes (SGLang answers 400 while requests are running)."""
        self.request("/flush_cache", {})

    def health(self) -> bool:
        """True when GET /health answers 200 (one try, never raises)."""
        try:
            self.request("/health", method="GET", retries=0)
            return True
        except EngineError:
            return False

    def server_info(self) -> dict[str, Any]:
        """GET /get_server_info (SGLang: its server args, e.g. `tp_size`, the ranks one engine
        brings to a weight update group)."""
        if self._server_info is None:
            self._server_info = self.request("/get_server_info", method="GET")
        return self._server_info

    def model_info(self) -> dict[str, Any]:
        """GET /model_info (falls back to the older /get_model_info)."""
        try:
            return self.request("/model_info", method="GET")
        except EngineError as e:
            if "HTTP 404" not in str(e):
                raise
            return self.request("/get_model_info", method="GET")


def _decode_body(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw.decode(errors="replace")


def _error_detail(e: urllib.error.HTTPError) -> str:
    try:
        body = _decode_body(e.read())
    except OSError:
        return str(e.reason)
    if isinstance(body, dict):
        err = body.get("error")
        return str(body.get("message") or (err.get("message") if isinstance(err, dict) else err)
                   or body)
    return str(body or e.reason).strip()


# ---------------------------------------------------------------------------------------------
# In-process sglang.Engine.


class SGLangInProcessEngine:
    """`RolloutEngine` over an in-process `sglang.Engine(**server_args)` (GPU only).

    Output parsing is the HTTP client's: `Engine.generate` returns the same dicts as /generate.
    """

    def __init__(self, routed_experts_layout: tuple[int, int] | None = None,
                 engine_factory: Callable[..., Any] | None = None, **server_args: Any) -> None:
        self.address = f"sglang.Engine({server_args.get('model_path', '?')})"
        self.routed_experts_layout = routed_experts_layout
        self._engine = (engine_factory or _import_sglang_engine())(**server_args)

    def generate(self, input_ids: Sequence[Sequence[int]] | None = None,
                 sampling_params: SamplingParams | None = None,
                 prompt: Sequence[str] | None = None,
                 return_routed_experts: bool = False) -> list[list[GenerateOutput]]:
        """Same request and parsing as `SGLangEngine.generate`."""
        params, body, n_prompts = _generate_request(input_ids, prompt, sampling_params,
                                                    return_routed_experts)
        if n_prompts == 0:
            return []
        key = "input_ids" if "input_ids" in body else "prompt"
        items = self._engine.generate(**{key: body.pop("input_ids", None) or body.pop("text")},
                                      **body)
        return group_outputs(items, n_prompts, params.n, input_ids, self.routed_experts_layout)

    def update_weights_from_tensor(self, named_tensors: Sequence[tuple[str, torch.Tensor]],
                                   load_format: str | None = None,
                                   flush_cache: bool = True) -> None:
        self._engine.update_weights_from_tensor(list(named_tensors), load_format=load_format,
                                                flush_cache=flush_cache)

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int,
                                  world_size: int, group_name: str = "weight_update_group",
                                  backend: str = "nccl") -> None:
        self._engine.init_weights_update_group(master_address, master_port, rank_offset,
                                               world_size, group_name, backend)

    def update_weights_from_distributed(self, names: Sequence[str], dtypes: Sequence[str],
                                        shapes: Sequence[Sequence[int]],
                                        group_name: str = "weight_update_group",
                                        flush_cache: bool = True) -> None:
        self._engine.update_weights_from_distributed(list(names), list(dtypes),
                                                     [list(s) for s in shapes], group_name,
                                                     flush_cache=flush_cache)

    def update_weights_from_disk(self, model_path: str, load_format: str | None = None) -> None:
        self._engine.update_weights_from_disk(model_path, load_format=load_format)

    def release_memory_occupation(self, tags: Sequence[str] | None = None) -> None:
        self._engine.release_memory_occupation(tags=None if tags is None else list(tags))

    def resume_memory_occupation(self, tags: Sequence[str] | None = None) -> None:
        self._engine.resume_memory_occupation(tags=None if tags is None else list(tags))

    def flush_cache(self) -> None:
        self._engine.flush_cache()

    def health(self) -> bool:
        return self._engine is not None

    def shutdown(self) -> None:
        """Stop SGLang's scheduler processes."""
        self._engine.shutdown()


def _import_sglang_engine() -> Callable[..., Any]:
    """`sglang.Engine`, or one clear error on a machine without CUDA or sglang."""
    if not torch.cuda.is_available():
        raise EngineError(f"{GPU_HINT} (torch.cuda.is_available() is False here)")
    try:
        import sglang
    except ImportError as e:
        raise EngineError(f"{GPU_HINT} (import sglang failed: {e})") from e
    return sglang.Engine
