"""The SGLang HTTP client (`SGLangEngine`) end to end against `megatron-rl serve`, started as a
real subprocess on a free localhost port, serving a tiny Qwen3-MoE saved to disk (so this process
can recompute the served log-probs from the same weights)."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from megatron_rl.config import load_config
from megatron_rl.launch.spawn import ServeProcess
from megatron_rl.rollout.engine import EngineError, RolloutEngine
from megatron_rl.rollout.server import RequestError, sampling_from_json
from megatron_rl.rollout.sglang_engine import (
    GPU_HINT,
    SGLangEngine,
    SGLangInProcessEngine,
    decode_portable,
    encode_portable,
    encode_routed_experts,
    parse_output,
)
from megatron_rl.rollout.types import SamplingParams

CONFIG = "configs/tiny_moe_cpu.yaml"
PROMPTS = [[5, 17, 42, 7], [9, 3]]
GREEDY = SamplingParams(top_k=1, max_new_tokens=6)


# ---- fixtures: two tiny HF checkpoints and a server process ----------------------------------


def _save_model(path: Path, seed: int) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_rl.convert import arch_of

    model_cfg = load_config(CONFIG).model
    torch.manual_seed(seed)
    config = AutoConfig.for_model(**arch_of(model_cfg).hf_config(model_cfg))
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return _save_model(root / "a", 0), _save_model(root / "b", 1)


def _start_server(model_path: Path) -> tuple[subprocess.Popen, str]:
    server = ServeProcess(["--model-path", str(model_path), "--port", "0"])
    url = server.url(timeout_s=120)
    assert url.startswith("http://127.0.0.1:"), url
    return server.proc, url


@pytest.fixture(scope="module")
def server(checkpoints: tuple[Path, Path]) -> Iterator[str]:
    proc, url = _start_server(checkpoints[0])
    yield url
    proc.send_signal(signal.SIGTERM)  # graceful shutdown path
    assert proc.wait(timeout=30) == 0


@pytest.fixture()
def client(server: str) -> SGLangEngine:
    return SGLangEngine(server, timeout_s=60, max_retries=1, backoff_s=0.1)


def _teacher_forced(model_path: Path, prompt: list[int], out: list[int]) -> list[float]:
    """log p(out[t] | prompt, out[:t]) at temperature 1, recomputed in this process."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    ids = torch.tensor([prompt + out])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    pos = torch.arange(len(prompt) - 1, len(prompt) + len(out) - 1)
    return logp[pos, torch.tensor(out)].tolist()


# ---- end to end ---------------------------------------------------------------------------


def test_client_is_a_rollout_engine(client: SGLangEngine) -> None:
    assert isinstance(client, RolloutEngine)
    assert client.health()
    info = client.model_info()
    assert info["is_generation"] is True and info["model_path"].endswith("/a")


def test_generate_logprobs_match_teacher_forcing(client: SGLangEngine,
                                                 checkpoints: tuple[Path, Path]) -> None:
    params = SamplingParams(temperature=1.0, max_new_tokens=8, seed=3)
    (out,), = client.generate(input_ids=[PROMPTS[0]], sampling_params=params)
    assert out.prompt_ids == PROMPTS[0]
    assert len(out.output_ids) == len(out.output_logprobs) == 8
    assert out.finish_reason == "length"
    expected = _teacher_forced(checkpoints[0], PROMPTS[0], out.output_ids)
    assert out.output_logprobs == pytest.approx(expected, abs=1e-4)


def test_batch_and_n(client: SGLangEngine) -> None:
    params = SamplingParams(max_new_tokens=5, n=3, seed=0)
    groups = client.generate(input_ids=PROMPTS, sampling_params=params)
    assert [len(g) for g in groups] == [3, 3]
    for prompt, group in zip(PROMPTS, groups, strict=True):
        assert all(o.prompt_ids == prompt and len(o.output_ids) == 5 for o in group)
        assert all(math.isfinite(lp) and lp < 0 for o in group for lp in o.output_logprobs)
    assert len({tuple(o.output_ids) for g in groups for o in g}) > 1  # samples differ


def test_stop_token(client: SGLangEngine) -> None:
    (greedy,), = client.generate(input_ids=[PROMPTS[0]], sampling_params=GREEDY)
    stop_at = greedy.output_ids[2]
    first = greedy.output_ids.index(stop_at)
    params = SamplingParams(top_k=1, max_new_tokens=6, stop_token_ids=[stop_at])
    (out,), = client.generate(input_ids=[PROMPTS[0]], sampling_params=params)
    assert out.finish_reason == "stop"
    assert out.output_ids == greedy.output_ids[:first + 1]  # the stop token is kept


def test_routed_experts_roundtrip(client: SGLangEngine) -> None:
    (out,), = client.generate(input_ids=[PROMPTS[1]], sampling_params=GREEDY,
                              return_routed_experts=True)
    experts = out.routed_experts
    assert experts is not None and experts.dtype == torch.int32
    assert experts.shape[1:] == (2, 2)  # 2 MoE layers, top-2 (tiny_moe_cpu.yaml)
    assert 0 <= int(experts.min()) and int(experts.max()) < 8


def test_weight_updates_change_outputs(client: SGLangEngine,
                                       checkpoints: tuple[Path, Path]) -> None:
    from safetensors.torch import load_file

    def greedy() -> list[list[int]]:
        return [g[0].output_ids for g in client.generate(input_ids=PROMPTS,
                                                         sampling_params=GREEDY)]

    before = greedy()
    client.update_weights_from_disk(str(checkpoints[1]), weight_version="b")
    after_disk = greedy()
    assert after_disk != before
    assert client.model_info()["weight_version"] == "b"
    (out,), = client.generate(input_ids=[PROMPTS[0]], sampling_params=GREEDY)
    expected = _teacher_forced(checkpoints[1], PROMPTS[0], out.output_ids)
    assert out.output_logprobs == pytest.approx(expected, abs=1e-4)  # really model b

    named = list(load_file(checkpoints[0] / "model.safetensors").items())
    client.update_weights_from_tensor(named)  # back to model a, portable encoding
    assert greedy() == before
    client.flush_cache()


def test_release_and_resume(client: SGLangEngine) -> None:
    client.release_memory_occupation(["weights", "kv_cache"])
    with pytest.raises(EngineError, match="release_memory_occupation"):
        client.generate(input_ids=[PROMPTS[1]], sampling_params=GREEDY)
    client.resume_memory_occupation()
    assert len(client.generate(input_ids=[PROMPTS[1]], sampling_params=GREEDY)) == 1


def test_bad_request_is_not_retried(client: SGLangEngine) -> None:
    body = {"input_ids": PROMPTS[0], "sampling_params": {"frequency_penalty": 0.5}}
    with pytest.raises(EngineError, match="frequency_penalty") as exc:
        client.request("/generate", body)
    assert client.address in str(exc.value)


def test_sglang_tensor_encoding_is_refused_by_our_server(client: SGLangEngine) -> None:
    with pytest.raises(EngineError, match="megatron_rl.torch_save"):
        client._call("/update_weights_from_tensor",
                     {"serialized_named_tensors": ["AAAA"], "load_format": None})


def test_killed_server_gives_engine_error_naming_the_url(checkpoints: tuple[Path, Path]) -> None:
    proc, url = _start_server(checkpoints[0])
    client = SGLangEngine(url, timeout_s=30, max_retries=2, backoff_s=0.1)
    errors: list[BaseException] = []

    def rollout() -> None:
        try:
            client.generate(input_ids=PROMPTS * 16, sampling_params=SamplingParams(
                max_new_tokens=400, n=4))
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=rollout)
    thread.start()
    time.sleep(1.5)  # the request is in flight
    assert thread.is_alive(), "the rollout finished before the kill: make it longer"
    proc.kill()
    proc.wait(timeout=10)
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], EngineError)
    assert url in str(errors[0]) and "/generate" in str(errors[0])


# ---- units --------------------------------------------------------------------------------


def test_unreachable_server_retries_then_names_url_and_route() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = SGLangEngine(f"127.0.0.1:{port}", timeout_s=2, max_retries=2, backoff_s=0.01)
    with pytest.raises(EngineError) as exc:
        client.flush_cache()
    msg = str(exc.value)
    assert f"http://127.0.0.1:{port}" in msg and "/flush_cache" in msg and "3 attempt" in msg
    assert client.health() is False


def test_portable_encoding_roundtrip() -> None:
    named = [("a.weight", torch.randn(3, 4)), ("b.bias", torch.arange(5, dtype=torch.bfloat16))]
    back = decode_portable(encode_portable(named))
    assert [n for n, _ in back] == ["a.weight", "b.bias"]
    for (_, x), (_, y) in zip(named, back, strict=True):
        assert x.dtype == y.dtype and torch.equal(x, y)


def test_parse_sglang_response() -> None:
    """A response shaped as SGLang writes it (no output_ids; base64 routed experts)."""
    experts = torch.tensor([[[1, 3]], [[0, 2]], [[3, 1]]], dtype=torch.int32)  # [3, 1, 2]
    item = {"text": "hi", "meta_info": {
        "finish_reason": {"type": "stop", "matched": 7}, "prompt_tokens": 2,
        "completion_tokens": 2, "output_token_logprobs": [[-0.5, 11, None], [-1.25, 7, None]],
        "routed_experts": encode_routed_experts(experts)}}
    out = parse_output(item, [1, 2], layout=(1, 2))
    assert out.output_ids == [11, 7] and out.output_logprobs == [-0.5, -1.25]
    assert out.finish_reason == "stop" and out.text == "hi" and out.prompt_ids == [1, 2]
    assert torch.equal(out.routed_experts, experts)
    with pytest.raises(EngineError, match="routed_experts_layout"):
        parse_output(item, [1, 2], layout=None)


def test_sampling_params_json() -> None:
    sp = sampling_from_json({"temperature": 0, "max_new_tokens": 3, "stop": "\n",
                             "sampling_seed": 4})
    assert (sp.temperature, sp.top_k, sp.stop, sp.seed) == (1.0, 1, ["\n"], 4)
    assert sampling_from_json(SamplingParams(top_p=0.5, n=2).to_sglang()) == SamplingParams(
        top_p=0.5, n=2)
    with pytest.raises(RequestError, match="min_p"):
        sampling_from_json({"min_p": 0.1})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_in_process_sglang_without_gpu_says_so() -> None:
    with pytest.raises(EngineError, match="SGLang needs a CUDA GPU") as exc:
        SGLangInProcessEngine(model_path="Qwen/Qwen3-0.6B")
    assert GPU_HINT in str(exc.value)


def test_serve_needs_a_model(capsys: pytest.CaptureFixture[str]) -> None:
    from megatron_rl import cli

    assert cli.main(["serve"]) == 2
    assert "exactly one of --model-path and --config" in capsys.readouterr().err


# ---- the trainer with a served engine --------------------------------------------------------

def _remote_trainer_worker(url: str, out: str) -> list[dict]:
    from megatron_rl.trainer import Trainer

    cfg = load_config(CONFIG, [
        "rollout.engine=sglang", f"rollout.engine_urls=['{url}']",
        "rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=4",
        "rollout.max_new_tokens=12", "actor.seq_length=128", "actor.micro_batch_size=2",
        "data.train_size=200", "data.eval_size=20", "rewards.num_workers=0",
        "algorithm.dynamic_sampling=false", f"data.tokenizer_cache={out}/tok",
        f"train.output_dir={out}/run", "logging.tensorboard=false", "logging.plot=false",
        f"checkpoint.dir={out}/ckpt",
    ], world_size=1)
    return Trainer(cfg).run(steps=2)


def test_trainer_generates_with_a_served_engine(checkpoints: tuple[Path, Path],
                                                tmp_path: Path) -> None:
    """`rollout.engine=sglang` with `engine_urls`: the trainer samples from the server and
    syncs its weights there after every update (the engine's sampling log-probs then equal the
    actor's), as a job with engines on their own nodes runs."""
    from megatron_rl.launch.spawn import run_ranks

    proc, url = _start_server(checkpoints[0])  # its own: the updates overwrite its weights
    try:
        (history,) = run_ranks(_remote_trainer_worker, 1, url, str(tmp_path), timeout_s=600)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert len(history) == 2
    for m in history:
        assert m["weight_sync/bytes"] > 0 and m["actor/skipped"] == 0.0
        assert m["mismatch/logp_abs_diff_mean"] < 1e-3  # sampled with the actor's weights


def test_trainer_names_an_engine_that_does_not_answer(tmp_path: Path) -> None:
    """A dead engine URL fails `train` at start-up with one line naming it, not at step 1."""
    out = subprocess.run(
        [sys.executable, "-m", "megatron_rl", "train", CONFIG, "--set", "rollout.engine=sglang",
         "--set", "rollout.engine_urls=['http://127.0.0.1:9']", "--set", "rollout.max_retries=0",
         "--set", "data.train_size=50", "--set", f"data.tokenizer_cache={tmp_path}/tok",
         "--set", f"train.output_dir={tmp_path}/run", "--set", f"checkpoint.dir={tmp_path}/ck",
         "--set", "eval.size=0"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("megatron-rl train:") and "http://127.0.0.1:9" in last, last
