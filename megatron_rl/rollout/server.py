"""An in-process `RolloutEngine` behind SGLang's HTTP routes and fields (`megatron-rl serve`).

So that the SGLang HTTP client (`sglang_engine.SGLangEngine`) is tested end to end on CPU, and a
user can inspect rollouts with curl:

    megatron-rl serve --config configs/tiny_moe_cpu.yaml --port 30000
    curl -s localhost:30000/generate -d '{"text": "1+1=", "sampling_params": {"max_new_tokens": 8}}'

A stdlib `ThreadingHTTPServer`; requests to the one engine are serialised with a lock (health and
model_info answer without it, so a long generation never makes the server look dead). Weight
update groups (`/init_weights_update_group`, `/update_weights_from_distributed`) take a lock of
their own group instead: forming or filling one group never waits for another (the trainer has
one group per pipeline stage), and the trainer does not generate while it syncs. Field names
are SGLang's (see `sglang_engine`); differences: tensors for `/update_weights_from_tensor` must use
the portable encoding (`load_format="megatron_rl.torch_save"`), `temperature: 0` means greedy
(top_k=1, log-probs at temperature 1), and unsupported sampling fields are rejected with 400.
"""

from __future__ import annotations

import errno
import json
import logging
import signal
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from megatron_rl.rollout.engine import RolloutEngine
from megatron_rl.rollout.sglang_engine import (
    PORTABLE_LOAD_FORMAT,
    decode_portable,
    encode_routed_experts,
)
from megatron_rl.rollout.types import GenerateOutput, SamplingParams

logger = logging.getLogger(__name__)

_SAMPLING_FIELDS = {"temperature", "top_p", "top_k", "max_new_tokens", "stop", "stop_token_ids",
                    "n", "sampling_seed"}


class RequestError(ValueError):
    """A bad request: answered with 400 and this message."""


def sampling_from_json(raw: dict[str, Any] | None) -> SamplingParams:
    """SGLang's `sampling_params` object -> `SamplingParams` (unsupported fields: 400)."""
    raw = dict(raw or {})
    unknown = sorted(set(raw) - _SAMPLING_FIELDS)
    if unknown:
        raise RequestError(f"sampling_params fields not supported by megatron-rl serve: {unknown}"
                           f" (supported: {sorted(_SAMPLING_FIELDS)})")
    if raw.get("temperature") == 0:  # SGLang's greedy
        raw["temperature"], raw["top_k"] = 1.0, 1
    stop = raw.get("stop") or []
    kwargs = {k: raw[k] for k in ("temperature", "top_p", "top_k", "max_new_tokens", "n")
              if raw.get(k) is not None}
    try:
        return SamplingParams(**kwargs, stop=[stop] if isinstance(stop, str) else list(stop),
                              stop_token_ids=list(raw.get("stop_token_ids") or []),
                              seed=raw.get("sampling_seed"))
    except (TypeError, ValueError) as e:
        raise RequestError(f"sampling_params: {e}") from e


def output_json(out: GenerateOutput, return_logprob: bool, rid: str) -> dict[str, Any]:
    """One `GenerateOutput` as an element of SGLang's /generate response."""
    finish: dict[str, Any] = {"type": out.finish_reason}
    if out.finish_reason == "length":
        finish["length"] = len(out.output_ids)
    meta: dict[str, Any] = {"id": rid, "finish_reason": finish,
                            "prompt_tokens": len(out.prompt_ids),
                            "completion_tokens": len(out.output_ids), "cached_tokens": 0}
    if return_logprob:
        meta["output_token_logprobs"] = [[lp, tok, None] for lp, tok
                                         in zip(out.output_logprobs, out.output_ids, strict=True)]
    if out.routed_experts is not None:
        meta["routed_experts"] = encode_routed_experts(out.routed_experts)
        meta["routed_experts_shape"] = list(out.routed_experts.shape)  # ours, not SGLang's
    return {"text": out.text, "output_ids": out.output_ids, "meta_info": meta}


class EngineService:
    """The route handlers: JSON in, (status, JSON or text) out; one engine call at a time."""

    def __init__(self, engine: RolloutEngine, model_path: str | None = None,
                 tokenizer_path: str | None = None) -> None:
        self.engine = engine
        self.model_path = model_path
        self.tokenizer_path = tokenizer_path
        self.weight_version = "default"
        self.lock = threading.Lock()
        self._group_locks: dict[str, threading.Lock] = {}
        self._rid = 0
        self.routes: dict[str, Callable[[dict[str, Any]], Any]] = {
            "/generate": self.generate,
            "/update_weights_from_disk": self.update_weights_from_disk,
            "/update_weights_from_tensor": self.update_weights_from_tensor,
            "/destroy_weights_update_group": self.destroy_weights_update_group,
            "/release_memory_occupation": self.release_memory_occupation,
            "/resume_memory_occupation": self.resume_memory_occupation,
            "/flush_cache": self.flush_cache,
        }
        self.unlocked_routes: dict[str, Callable[[dict[str, Any]], Any]] = {
            "/health": lambda body: None, "/health_generate": self.health_generate,
            "/model_info": self.model_info, "/get_model_info": self.model_info,
            "/get_server_info": self.server_info,
        }
        self.group_routes: dict[str, Callable[[dict[str, Any]], Any]] = {
            "/init_weights_update_group": self.init_weights_update_group,
            "/update_weights_from_distributed": self.update_weights_from_distributed,
        }

    def handle(self, route: str, body: dict[str, Any]) -> tuple[int, Any]:
        """Dispatch one request; engine errors become SGLang-style {success: false} answers."""
        if route in self.unlocked_routes:
            return HTTPStatus.OK, self.unlocked_routes[route](body)
        if route in self.group_routes:
            name = str(body.get("group_name", "weight_update_group"))
            lock = self._group_locks.setdefault(name, threading.Lock())  # atomic (GIL)
            fn = self.group_routes[route]
        elif route in self.routes:
            lock, fn = self.lock, self.routes[route]
        else:
            return HTTPStatus.NOT_FOUND, {"error": {"message": f"no route {route}"}}
        try:
            with lock:
                return HTTPStatus.OK, fn(body)
        except RequestError as e:
            return HTTPStatus.BAD_REQUEST, {"error": {"message": str(e)}}
        except Exception as e:  # the engine's failure is the client's answer, not a crash
            logger.exception("%s failed", route)
            return HTTPStatus.BAD_REQUEST, {"success": False,
                                            "message": f"{type(e).__name__}: {e}"}

    def generate(self, body: dict[str, Any]) -> Any:
        """GenerateReqInput: single or batch `text` / `input_ids`; flat prompt-major answer."""
        text, ids = body.get("text"), body.get("input_ids")
        if (text is None) == (ids is None):
            raise RequestError("give exactly one of text and input_ids")
        single = isinstance(text, str) or (ids is not None and ids and isinstance(ids[0], int))
        if single:
            text, ids = ([text] if text is not None else None), ([ids] if ids is not None else None)
        params = sampling_from_json(body.get("sampling_params"))
        outs = self.engine.generate(input_ids=ids, sampling_params=params, prompt=text,
                                    return_routed_experts=bool(body.get("return_routed_experts")))
        flat = []
        for group in outs:
            for out in group:
                self._rid += 1
                flat.append(output_json(out, bool(body.get("return_logprob")), f"{self._rid:x}"))
        return flat[0] if single and params.n == 1 else flat

    def update_weights_from_disk(self, body: dict[str, Any]) -> dict[str, Any]:
        self.engine.update_weights_from_disk(body["model_path"],
                                             load_format=body.get("load_format"))
        self.model_path = body["model_path"]
        return self._ok("Succeeded to update model weights.", body, num_paused_requests=0)

    def update_weights_from_tensor(self, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("load_format") != PORTABLE_LOAD_FORMAT:
            raise RequestError(f"megatron-rl serve reads tensors sent with load_format="
                               f"{PORTABLE_LOAD_FORMAT!r} (SGLangEngine(tensor_encoding="
                               f"'portable')), got {body.get('load_format')!r}")
        payloads = body.get("serialized_named_tensors") or []
        if not payloads:
            raise RequestError("serialized_named_tensors is empty")
        self.engine.update_weights_from_tensor(decode_portable(payloads[0]),
                                               flush_cache=body.get("flush_cache", True))
        return self._ok("Succeeded to update model weights.", body)

    def init_weights_update_group(self, body: dict[str, Any]) -> dict[str, Any]:
        self.engine.init_weights_update_group(
            body["master_address"], int(body["master_port"]), int(body["rank_offset"]),
            int(body["world_size"]), body.get("group_name", "weight_update_group"),
            body.get("backend", "nccl"))
        return {"success": True, "message": "Succeeded to initialize custom process group."}

    def update_weights_from_distributed(self, body: dict[str, Any]) -> dict[str, Any]:
        self.engine.update_weights_from_distributed(
            body["names"], body["dtypes"], body["shapes"],
            body.get("group_name", "weight_update_group"), body.get("flush_cache", True))
        return self._ok("Succeeded to update parameter online.", body)

    def destroy_weights_update_group(self, body: dict[str, Any]) -> dict[str, Any]:
        destroy = getattr(self.engine, "destroy_weights_update_group", None)
        if destroy is not None:
            destroy(body.get("group_name", "weight_update_group"))
        return {"success": True, "message": "Succeeded to destroy custom process group."}

    def release_memory_occupation(self, body: dict[str, Any]) -> None:
        self.engine.release_memory_occupation(body.get("tags"))

    def resume_memory_occupation(self, body: dict[str, Any]) -> None:
        self.engine.resume_memory_occupation(body.get("tags"))

    def flush_cache(self, body: dict[str, Any]) -> str:
        self.engine.flush_cache()
        return "Cache flushed.\n"

    def health_generate(self, body: dict[str, Any]) -> None:
        if not self.engine.health():
            raise RuntimeError("engine unhealthy")

    def model_info(self, body: dict[str, Any]) -> dict[str, Any]:
        """SGLang's fields."""
        return {"model_path": self.model_path, "tokenizer_path": self.tokenizer_path,
                "is_generation": True, "weight_version": self.weight_version}

    def server_info(self, body: dict[str, Any]) -> dict[str, Any]:
        """The fields of SGLang's /get_server_info a trainer reads: one process, no TP."""
        return {"model_path": self.model_path, "tokenizer_path": self.tokenizer_path,
                "tp_size": 1, "dp_size": 1, "weight_version": self.weight_version}

    def _ok(self, message: str, body: dict[str, Any], **extra: Any) -> dict[str, Any]:
        if body.get("weight_version") is not None:
            self.weight_version = str(body["weight_version"])
            message += f" Weight version updated to {self.weight_version}."
        return {"success": True, "message": message, **extra}


def make_handler(service: EngineService) -> type[BaseHTTPRequestHandler]:
    """A request handler class bound to `service`."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._serve({})

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                body = json.loads(raw) if raw.strip() else {}
            except json.JSONDecodeError as e:
                self._send(HTTPStatus.BAD_REQUEST, {"error": {"message": f"bad JSON: {e}"}})
                return
            self._serve(body if isinstance(body, dict) else {})

        do_PUT = do_POST

        def _serve(self, body: dict[str, Any]) -> None:
            status, out = service.handle(self.path.split("?")[0], body)
            self._send(status, out)

        def _send(self, status: int, out: Any) -> None:
            if out is None:
                data, ctype = b"", "text/plain"
            elif isinstance(out, str):
                data, ctype = out.encode(), "text/plain"
            else:
                data, ctype = json.dumps(out).encode(), "application/json"
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt: str, *args: Any) -> None:
            logger.debug("%s " + fmt, self.address_string(), *args)

    return Handler


def listen(host: str = "127.0.0.1", port: int = 30000) -> ThreadingHTTPServer:
    """Bind `host:port` (0: any free port) for `serve(..., server=)`, so that a port in use
    fails before a model is loaded; an `OSError` naming the address when it cannot."""
    try:
        httpd = ThreadingHTTPServer((host, port), BaseHTTPRequestHandler)  # handler: serve()
    except OSError as e:
        why = ("the port is in use (choose another --port, or --port 0 for any free port)"
               if e.errno == errno.EADDRINUSE else e.strerror or str(e))
        raise OSError(f"cannot listen on {host}:{port}: {why}") from e
    httpd.daemon_threads = True
    return httpd


def serve(engine: RolloutEngine, host: str = "127.0.0.1", port: int = 30000,
          model_path: str | None = None, tokenizer_path: str | None = None,
          ready: Callable[[str], None] | None = None,
          server: ThreadingHTTPServer | None = None) -> None:
    """Serve `engine` until SIGTERM/SIGINT (port 0: any free port; `ready(url)` once bound) on
    `server` (from `listen`) or on a new one bound to `host:port`."""
    service = EngineService(engine, model_path, tokenizer_path)
    httpd = server if server is not None else listen(host, port)
    httpd.RequestHandlerClass = make_handler(service)
    host = httpd.server_address[0]
    url = f"http://{host}:{httpd.server_address[1]}"

    def stop(signum: int, frame: Any) -> None:
        logger.info("signal %d: shutting down %s", signum, url)
        threading.Thread(target=httpd.shutdown, daemon=True).start()  # not from serve_forever's

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
    (ready or (lambda u: print(f"megatron-rl serve: ready at {u}", flush=True)))(url)
    try:
        httpd.serve_forever(poll_interval=0.2)
    finally:
        httpd.server_close()
