"""`megatron-rl convert` as a user runs it (issue 19): a bf16 Qwen2 with tied embeddings and QKV
bias, saved with tokenizer files and a generation config, goes HF -> Megatron (TP=2 under
torchrun, through `--tp`) -> HF (TP=2 again: each tensor gathered) and comes back complete:
the same tensors bit for bit in bf16, every config.json key with its value, the tokenizer files
and generation config.
The destination is never deleted or replaced unasked, nothing is written beside it, and a
DeepSeek-V3 whose router does not renormalise (`norm_topk_prob=false`) is refused by name
before any work. A shrunk DeepSeek-V3 made with transformers' own config class, with an MTP
layer as the released checkpoints have, goes HF -> Megatron at TP=2/PP=2/EP=2 -> HF (from
TP=2/EP=2) bit for bit (the MTP layer skipped, and said so)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_convert import _tensors  # every tensor of an HF checkpoint dir

ROOT = Path(__file__).resolve().parents[1]
COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              rms_norm_eps=1e-6)
TOKENIZER = {"tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"}}',
             "tokenizer_config.json": '{"model_max_length": 64, "eos_token": "<e>"}',
             "special_tokens_map.json": '{"eos_token": "<e>"}'}


def _cli(*args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "megatron_rl", "convert", *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "megatron_rl", "convert", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def qwen2_bf16(tmp_path_factory) -> Path:
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Qwen2Config(**COMMON, rope_theta=1e6, tie_word_embeddings=True, bos_token_id=1,
                         eos_token_id=2)
    model = tf.Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    path = tmp_path_factory.mktemp("qwen2_bf16") / "hf"
    model.save_pretrained(path)
    tf.GenerationConfig(bos_token_id=1, eos_token_id=2, temperature=0.6, top_p=0.95,
                        do_sample=True).save_pretrained(path)
    for name, text in TOKENIZER.items():
        (path / name).write_text(text)
    return path


@pytest.fixture(scope="module")
def round_trip(qwen2_bf16, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("round_trip")
    mcore, back = work / "mcore", work / "back"
    to = _cli("hf-to-mcore", str(qwen2_bf16), str(mcore), "--tp", "2", nproc=2)
    assert to.returncode == 0, to.stderr[-3000:]
    fro = _cli("mcore-to-hf", str(mcore), str(back), "--tp", "2", nproc=2)
    assert fro.returncode == 0, fro.stderr[-3000:]
    return {"work": work, "mcore": mcore, "back": back, "stderr": to.stderr + fro.stderr}


def test_weights_come_back_bit_identical_in_bf16(qwen2_bf16, round_trip):
    orig, got = _tensors(qwen2_bf16), _tensors(round_trip["back"])
    assert orig.keys() == got.keys()
    for k, v in orig.items():
        assert v.dtype == torch.bfloat16 and got[k].dtype == torch.bfloat16, k
        assert torch.equal(got[k], v), k
    info = json.loads((round_trip["mcore"] / "megatron_rl.json").read_text())
    assert info["dtype"] == "bfloat16"  # recorded in the Megatron checkpoint
    assert info["hf_config"] == json.loads((qwen2_bf16 / "config.json").read_text())


def test_config_tokenizer_and_generation_config_come_back(qwen2_bf16, round_trip):
    src = json.loads((qwen2_bf16 / "config.json").read_text())
    back = json.loads((round_trip["back"] / "config.json").read_text())
    assert {k: back.get(k, "<missing>") for k in src} == src  # every key, every value
    for name in [*TOKENIZER, "generation_config.json"]:
        assert (round_trip["back"] / name).read_bytes() == (qwen2_bf16 / name).read_bytes(), name


def test_nothing_is_written_beside_the_destination(round_trip):
    # hf-to-mcore used to leave a `latest` file in the destination's parent
    assert sorted(p.name for p in round_trip["work"].iterdir()) == ["back", "mcore"]
    assert "\r" not in round_trip["stderr"]  # progress is one line per update in a log file


def test_an_existing_destination_is_kept_unless_overwrite(qwen2_bf16, round_trip, tmp_path):
    dst = tmp_path / "mine"
    dst.mkdir()
    (dst / "notes.txt").write_text("keep me")
    run = _cli("mcore-to-hf", str(round_trip["mcore"]), str(dst))
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "--overwrite" in lines[0] and str(dst) in lines[0], run.stderr
    assert sorted(p.name for p in dst.iterdir()) == ["notes.txt"]
    assert (dst / "notes.txt").read_text() == "keep me"
    run = _cli("mcore-to-hf", str(round_trip["mcore"]), str(dst), "--overwrite",
               "--dtype", "float32")
    assert run.returncode == 0, run.stderr[-3000:]
    assert not (dst / "notes.txt").exists()
    got = _tensors(dst)
    assert all(t.dtype == torch.float32 for t in got.values())
    orig = _tensors(qwen2_bf16)
    assert all(torch.equal(got[k].to(torch.bfloat16), v) for k, v in orig.items())
    config = json.loads((dst / "config.json").read_text())  # under the key(s) the source used
    assert config.get("dtype", config.get("torch_dtype")) == "float32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no partial left over


def _deepseek_v3(path: Path, **kw) -> Path:
    """A shrunk DeepSeek-V3 (MLA with q/kv LoRA, 8 experts in 4 groups, a shared expert, the
    first layer dense) saved at `path`."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.DeepseekV3Config(**{
        "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4, "moe_intermediate_size": 16,
        "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4,
        "v_head_dim": 8, "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 4,
        "n_group": 4, "topk_group": 2, "first_k_dense_replace": 1, "norm_topk_prob": True,
        "max_position_embeddings": 64, "routed_scaling_factor": 2.5} | kw)
    tf.DeepseekV3ForCausalLM(cfg).save_pretrained(path)
    return path


def test_deepseek_v3_round_trips_at_tp2_pp2_ep2_skipping_mtp(tmp_path):
    from safetensors.torch import save_file

    path = _deepseek_v3(tmp_path / "ds", num_nextn_predict_layers=1)
    # the released checkpoints hold the MTP layer after the last one: model.layers.<N>.*
    orig = _tensors(path)
    mtp = {k.replace("model.layers.1.", "model.layers.2."): v.clone()
           for k, v in orig.items() if k.startswith("model.layers.1.")}
    save_file(mtp, str(path / "model-mtp.safetensors"), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in orig}
             | {k: "model-mtp.safetensors" for k in mtp}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    mcore, back = tmp_path / "mcore", tmp_path / "back"
    run = _cli("hf-to-mcore", str(path), str(mcore), "--tp", "2", "--pp", "2", "--ep", "2",
               "--set", "parallel.etp=1", nproc=4)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "skipped" in run.stderr and "MTP" in run.stderr
    run = _cli("mcore-to-hf", str(mcore), str(back), "--tp", "2", "--ep", "2",
               "--set", "parallel.etp=1", nproc=2)
    assert run.returncode == 0, run.stderr[-3000:]
    got = _tensors(back)
    assert got.keys() == orig.keys()  # all but the MTP layer
    assert all(torch.equal(got[k], v) for k, v in orig.items())
    src = json.loads((path / "config.json").read_text())
    assert {k: json.loads((back / "config.json").read_text()).get(k) for k in src} == src


def test_deepseek_v3_without_renormalised_top_k_is_refused_before_any_work(tmp_path):
    path = _deepseek_v3(tmp_path / "ds", norm_topk_prob=False)
    run = _cli("hf-to-mcore", str(path), str(tmp_path / "out"))
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "norm_topk_prob" in lines[0], run.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kv_heads", [1, 4])
def test_config_that_disagrees_with_the_weights_is_refused_before_reading(qwen2_bf16, tmp_path,
                                                                         kv_heads):
    """config.json's num_key_value_heads below the weights' would let the first rows of k and v
    fit the parameter (a silently wrong model); above them, reads would run into the next
    tensor. Both are refused, naming the tensor and both shapes, and nothing is written."""
    import shutil

    src = tmp_path / "hf"
    shutil.copytree(qwen2_bf16, src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(config | {"num_key_value_heads": kv_heads}))
    run = _cli("hf-to-mcore", str(src), str(tmp_path / "out"))
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    hd = COMMON["hidden_size"] // COMMON["num_attention_heads"]
    assert lines[-1].count("k_proj.weight is (16, 32), the model needs "
                           f"({kv_heads * hd}, 32)") == 1, run.stderr[-2000:]
    assert f"num_key_value_heads={kv_heads}" in lines[-1]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change", [{"hidden_size": 64},
                                    {"architectures": ["LlamaForCausalLM"],
                                     "model_type": "llama"}])
def test_an_hf_source_of_another_model_is_refused(qwen2_bf16, round_trip, tmp_path, change):
    """--hf-source gives the export its config keys and tokenizer: another model's would be
    mixed into this one's files."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(qwen2_bf16, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | change))
    run = _cli("mcore-to-hf", str(round_trip["mcore"]), str(tmp_path / "out"),
               "--hf-source", str(other))
    assert run.returncode == 1
    line = run.stderr.strip().splitlines()[-1]
    assert "--hf-source" in line and "not the model this checkpoint was trained from" in line
    assert ("hidden_size=64 there, 32 here" in line if "hidden_size" in change
            else "a llama model, the checkpoint holds qwen2" in line), line
    assert not (tmp_path / "out").exists()
