"""`megatron_rl.convert.validate`: what `megatron-rl convert` checks before any work (issue 19).
Each bad input gives one line naming the file or key, and nothing imports Megatron-Core (a
mistake is named in a second, not after the model was built). Through the CLI: a truncated
file and a missing key exit 1 with one line on stderr."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A tiny Qwen3-MoE saved in two shards with an index (so index rules are exercised)."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=8, moe_intermediate_size=16, num_experts=4,
                            num_experts_per_tok=2, norm_topk_prob=True,
                            max_position_embeddings=64)
    path = tmp_path_factory.mktemp("good") / "hf"
    tf.Qwen3MoeForCausalLM(cfg).save_pretrained(path, max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file()
    return path


def _copy(good: Path, tmp_path: Path) -> Path:
    out = tmp_path / "hf"
    shutil.copytree(good, out)
    return out


def _one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text
    return text


def test_a_good_checkpoint_passes(good):
    from megatron_rl.convert.validate import check_hf_source

    arch, hf = check_hf_source(good)
    assert arch.name == "qwen3_moe" and hf["hidden_size"] == 32


def test_config_problems_are_named(good, tmp_path):
    from megatron_rl.convert.validate import check_hf_source

    src = _copy(good, tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({k: v for k, v in cfg.items()
                                                 if k != "hidden_size"}))
    with pytest.raises(ValueError) as err:
        check_hf_source(src)
    assert "hidden_size" in _one_line(err) and "config.json" in str(err.value)
    (src / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        check_hf_source(src)
    (src / "config.json").write_text(json.dumps(cfg | {"architectures": ["GPT2LMHeadModel"],
                                                       "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="unsupported architecture"):
        check_hf_source(src)
    (src / "config.json").write_text(json.dumps(cfg | {"attention_bias": True}))
    with pytest.raises(ValueError, match="attention_bias"):
        check_hf_source(src)
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        check_hf_source(tmp_path / "nowhere")


def test_weight_file_problems_are_named(good, tmp_path):
    from megatron_rl.convert.validate import check_hf_source

    src = _copy(good, tmp_path)
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])  # a copy that stopped early
    with pytest.raises(ValueError) as err:
        check_hf_source(src)
    assert shard.name in _one_line(err) and "truncated" in str(err.value)
    shard.write_bytes(data[:4])
    with pytest.raises(ValueError, match=f"{shard.name}.*truncated"):
        check_hf_source(src)
    shard.write_bytes(len(b"garbage!").to_bytes(8, "little") + b"garbage!" + data[8:])
    with pytest.raises(ValueError, match=f"{shard.name}.*not JSON"):
        check_hf_source(src)
    shard.unlink()
    with pytest.raises(ValueError, match=f"names '{shard.name}', which does not exist"):
        check_hf_source(src)
    for f in src.glob("model*"):
        f.unlink()
    with pytest.raises(ValueError, match="neither"):
        check_hf_source(src)


def test_mcore_source_and_destination_rules(tmp_path):
    from megatron_rl.convert.validate import check_destination, check_mcore_source

    ck = tmp_path / "ck"
    ck.mkdir()
    with pytest.raises(ValueError, match="no metadata.json"):
        check_mcore_source(ck)
    (ck / "metadata.json").write_text("{}")
    with pytest.raises(ValueError, match="only checkpoints written by megatron-rl"):
        check_mcore_source(ck)
    (ck / "megatron_rl.json").write_text(json.dumps({"model": {"num_layers": 2},
                                                    "arch": "qwen3_moe"}))
    assert check_mcore_source(ck)["arch"] == "qwen3_moe"
    (tmp_path / "latest").write_text("ck\n")  # a run's checkpoint root
    assert check_mcore_source(tmp_path)["arch"] == "qwen3_moe"

    check_destination(tmp_path / "new")  # absent: fine
    (tmp_path / "empty").mkdir()
    check_destination(tmp_path / "empty")  # empty: fine
    with pytest.raises(FileExistsError, match="--overwrite") as err:
        check_destination(ck)
    _one_line(err)
    check_destination(ck, overwrite=True)
    with pytest.raises(FileNotFoundError, match="parent"):
        check_destination(tmp_path / "no" / "such" / "dir")


def test_checks_never_import_megatron(good, tmp_path):
    code = ("import sys\nfrom megatron_rl.convert.validate import check_hf_source, "
            "check_destination\n"
            f"check_hf_source({str(good)!r})\ncheck_destination({str(tmp_path / 'x')!r})\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'megatron'))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "[]"


def test_cli_names_a_truncated_file_in_one_line_before_megatron(good, tmp_path):
    src = _copy(good, tmp_path)
    shard = sorted(src.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-10])
    # -X importtime lists every module imported: megatron.core must not be among them
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "megatron_rl", "convert",
                          "hf-to-mcore", str(src), str(tmp_path / "out")], capture_output=True,
                         text=True, timeout=300, cwd=ROOT, env={**os.environ,
                                                                "OMP_NUM_THREADS": "1"})
    assert run.returncode == 1
    lines = [ln for ln in run.stderr.splitlines() if not ln.startswith("import time:")]
    assert len(lines) == 1 and shard.name in lines[0] and "truncated" in lines[0], lines
    assert not any("megatron.core" in ln for ln in run.stderr.splitlines())
    assert not (tmp_path / "out").exists()
