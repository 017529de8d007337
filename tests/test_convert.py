"""HF <-> Megatron-Core conversion: tiny random HF models of each architecture are loaded into
Megatron-Core at 1 and 2 ranks (TP=2, EP=2, PP=2) and give the logits of `transformers`; saving
back gives bitwise-identical tensors and an equivalent config."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from rank_batches import Failed, ok, run_batch
from safetensors import safe_open

SEQ, BATCH = 12, 2
COMMON = dict(vocab_size=160, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
              rms_norm_eps=1e-6)


def _make(kind: str):
    import transformers as tf

    if kind == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON, rope_theta=10000.0,
                                                  tie_word_embeddings=True))
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**COMMON, rope_theta=1e6))
    if kind == "qwen3":
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(**COMMON, rope_theta=1e6))
    if kind == "qwen3_moe":
        return tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
            **COMMON, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
            norm_topk_prob=True, mlp_only_layers=[0], decoder_sparse_step=1))
    if kind == "deepseek_v3":  # MLA with q/kv LoRA, shared expert, group routing, 1 dense layer
        cfg = {k: v for k, v in COMMON.items() if k not in ("num_key_value_heads", "head_dim")}
        return tf.DeepseekV3ForCausalLM(tf.DeepseekV3Config(
            **cfg, num_key_value_heads=4, moe_intermediate_size=16, q_lora_rank=16,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=4, n_group=4,
            topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1))
    if kind == "deepseek_v3_yarn":  # the released DeepSeek-V3 extends its context with YaRN
        model = _make("deepseek_v3")
        cfg = model.config.to_dict() | {"rope_parameters": {
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
            "original_max_position_embeddings": 4, "beta_fast": 32.0, "beta_slow": 1.0,
            "mscale": 1.0, "mscale_all_dim": 1.0}}
        return tf.DeepseekV3ForCausalLM(tf.DeepseekV3Config(**cfg))
    raise ValueError(kind)


def _tokens() -> torch.Tensor:
    return torch.randint(0, COMMON["vocab_size"], (BATCH, SEQ + 1),
                         generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """{arch: (checkpoint dir, logits [b, s, V])}, made on first use."""
    cache: dict[str, tuple[Path, torch.Tensor]] = {}

    def get(kind: str):
        if kind not in cache:
            torch.manual_seed(0)
            model = _make(kind).eval()
            with torch.no_grad():  # random weights are small: give the norms some spread too
                for name, p in list(model.named_parameters()) + list(model.named_buffers()):
                    if "norm" in name:
                        p.uniform_(0.5, 1.5)
                    if "e_score_correction_bias" in name:  # make expert selection depend on it
                        p.normal_(0.0, 0.5)
            path = tmp_path_factory.mktemp(kind)
            model.save_pretrained(path)
            with torch.no_grad():
                logits = model(_tokens()[:, :-1]).logits.float()
            cache[kind] = (path, logits)
        return cache[kind]

    return get


def convert_worker(path: str, parallel: dict, out_dir: str | None) -> dict:
    """Load the HF checkpoint at `parallel`; logits (TP-gathered, no PP), log-probs; save back."""
    import os

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_rl.actor.actor import Actor
    from megatron_rl.actor.config import ActorConfig, ParallelConfig
    from megatron_rl.actor.parallel import init_distributed
    from megatron_rl.actor.step import MicroBatch
    from megatron_rl.convert import hf_model_config

    arch, model_cfg = hf_model_config(path)
    world = int(os.environ["WORLD_SIZE"])
    par = ParallelConfig(timeout_s=60, dp=None, **parallel)
    init_distributed(par, seed=1)
    actor = Actor(model_cfg, par, ActorConfig(seq_length=SEQ, micro_batch_size=1))
    actor.load_hf(path, arch, progress=False)
    tokens = _tokens()
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    rows = slice(dp_rank * BATCH // dp, (dp_rank + 1) * BATCH // dp)
    mbs = [MicroBatch(tokens[i : i + 1, :-1], tokens[i : i + 1, 1:], torch.ones(1, SEQ))
           for i in range(rows.start, rows.stop)]
    logprobs = torch.cat(actor.logprobs(mbs))
    logits = None
    if ps.get_pipeline_model_parallel_world_size() == 1:
        model = actor.model[0]
        with torch.no_grad():
            local = model(tokens[rows, :-1], mbs[0].positions().expand(len(mbs), SEQ), None)
        parts = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
        dist.all_gather(parts, local.contiguous(), group=ps.get_tensor_model_parallel_group())
        logits = torch.cat(parts, -1)[..., : model_cfg.vocab_size]
    if out_dir:
        actor.save_hf(out_dir, arch)
    assert world == dist.get_world_size()
    return {"rows": (rows.start, rows.stop), "logits": logits, "logprobs": logprobs}


def _hf_logprobs(logits: torch.Tensor) -> torch.Tensor:
    labels = _tokens()[:, 1:]
    return torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


CASES = [
    ("llama", 1, {}), ("qwen2", 1, {}), ("qwen3", 1, {}), ("qwen3_moe", 1, {}),
    ("qwen3", 2, {"tp": 2}), ("qwen2", 2, {"pp": 2}), ("llama", 2, {"pp": 2}),
    ("qwen3_moe", 2, {"ep": 2}), ("qwen3_moe", 2, {"tp": 2, "sequence_parallel": True}),
    ("qwen3_moe", 2, {"pp": 2}),
    ("deepseek_v3", 1, {}), ("deepseek_v3", 2, {"tp": 2, "sequence_parallel": True}),
    ("deepseek_v3", 2, {"ep": 2}), ("deepseek_v3", 2, {"pp": 2}), ("deepseek_v3_yarn", 1, {}),
]


@pytest.fixture(scope="module")
def converted(hf_models, tmp_path_factory):
    """Every case's `convert_worker`, the cases of one world size in turn in one spawn:
    {case index: ([result of each rank], directory saved back to)}."""
    out = {}
    for world in sorted({w for _, w, _ in CASES}):
        idx = [i for i, case in enumerate(CASES) if case[1] == world]
        backs = [tmp_path_factory.mktemp("back") / "back" for _ in idx]
        calls = [(convert_worker, (str(hf_models(CASES[i][0])[0]), CASES[i][2], str(back)))
                 for i, back in zip(idx, backs, strict=True)]
        results = run_batch(world, calls)
        out.update({i: (res, back) for i, res, back in zip(idx, results, backs, strict=True)})
    return out


@pytest.mark.parametrize(("kind", "world", "parallel"), CASES,
                         ids=[f"{k}-{w}r-{'-'.join(f'{a}{b}' for a, b in p.items()) or 'single'}"
                              for k, w, p in CASES])
def test_logits_match_transformers_and_round_trip(kind, world, parallel, hf_models, converted):
    path, hf_logits = hf_models(kind)
    results, out = converted[CASES.index((kind, world, parallel))]
    results = [ok(res) for res in results]
    want_lp = _hf_logprobs(hf_logits)
    for res in results:
        lo, hi = res["rows"]
        torch.testing.assert_close(res["logprobs"], want_lp[lo:hi], rtol=1e-4, atol=1e-4)
        if res["logits"] is not None:
            torch.testing.assert_close(res["logits"], hf_logits[lo:hi], rtol=1e-4, atol=1e-4)
    # Round trip: the same tensors, bit for bit, and an equivalent config.
    orig, back = _tensors(path), _tensors(out)
    assert orig.keys() == back.keys()
    for name, tensor in orig.items():
        assert torch.equal(back[name], tensor), name
    from megatron_rl.convert import hf_model_config

    assert hf_model_config(out)[1] == hf_model_config(path)[1]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(orig)


def test_errors_name_the_problem(hf_models, tmp_path):
    from megatron_rl.convert import hf_model_config
    from megatron_rl.convert.registry import arch_for

    with pytest.raises(ValueError, match="unsupported architecture.*supported.*Qwen3"):
        arch_for({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf_model_config(tmp_path)
    path, _ = hf_models("qwen3")
    # A checkpoint that lacks a tensor, one with an extra tensor, and one with a tensor of the
    # wrong shape fail naming them (the three loaded in turn in one spawn).
    tensors = _tensors(path)
    from safetensors.torch import save_file

    dropped = "model.layers.1.self_attn.k_proj.weight"
    cases = {  # error expected: the checkpoint's tensors
        f"missing tensors.*{dropped}": {k: v for k, v in tensors.items() if k != dropped},
        "no Megatron counterpart.*mystery": tensors | {"model.layers.0.mystery.weight":
                                                       torch.zeros(2)},
        r"shapes disagree.*o_proj\.weight is \(32, 31\), the model needs \(32, 32\)": {
            k: (v[:, :-1].contiguous() if k == "model.layers.0.self_attn.o_proj.weight" else v)
            for k, v in tensors.items()},
    }
    calls = []
    for i, bad in enumerate(cases.values()):
        broken = tmp_path / f"broken{i}"
        broken.mkdir()
        (broken / "config.json").write_text((path / "config.json").read_text())
        save_file(bad, str(broken / "model.safetensors"))
        calls.append((convert_worker, (str(broken), {}, None)))
    for message, (res,) in zip(cases, run_batch(1, calls), strict=True):
        assert isinstance(res, Failed) and re.search(message, res), (message, res)


def test_cli_round_trip_with_two_ranks_and_clear_errors(hf_models, tmp_path):
    """scripts/convert_hf.sh: HF -> Megatron at 1 rank, Megatron -> HF at EP=2 (torchrun)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    path, _ = hf_models("qwen3_moe")
    mcore, back = tmp_path / "mcore", tmp_path / "back"
    script = str(root / "scripts" / "convert_hf.sh")
    run = subprocess.run([script, str(path), str(mcore)], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    run = subprocess.run([script, str(mcore), str(back), "2", "--set", "parallel.ep=2"],
                         capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "DIRECTION": "mcore-to-hf"})
    assert run.returncode == 0, run.stderr[-2000:]
    orig, got = _tensors(path), _tensors(back)
    assert orig.keys() == got.keys() and all(torch.equal(got[k], v) for k, v in orig.items())
    # A layout the model cannot take fails in one line naming the key.
    run = subprocess.run([script, str(path), str(tmp_path / "x"), "--set", "parallel.ep=3"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "parallel" in run.stderr.strip().splitlines()[-1]


def test_hf_architecture_must_express_the_model():
    """The tiny default exports as Qwen3-MoE; a feature Qwen3-MoE lacks is named."""
    import dataclasses

    from megatron_rl.config import load_config
    from megatron_rl.convert import arch_of

    model = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "tiny_moe_cpu.yaml"),
                        world_size=1).model
    assert arch_of(model).name == "qwen3_moe"
    shared = dataclasses.replace(model, moe_shared_expert_intermediate_size=64)
    with pytest.raises(ValueError, match="cannot express.*moe_shared_expert_intermediate_size"):
        arch_of(shared)
    with pytest.raises(ValueError, match="hf_architecture.*not one of"):
        arch_of(dataclasses.replace(model, hf_architecture="gpt2"))


def test_loading_an_hf_checkpoint_checks_its_config_against_the_model_section(tmp_path):
    """Equal shapes are not enough: a differing rope_theta or epsilon is named before loading."""
    import dataclasses

    from megatron_rl.config import load_config
    from megatron_rl.convert import arch_of, check_hf_matches

    model = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "tiny_moe_cpu.yaml"),
                        world_size=1).model
    (tmp_path / "config.json").write_text(json.dumps(arch_of(model).hf_config(model)))
    assert check_hf_matches(model, tmp_path).name == "qwen3_moe"
    # training-only fields (the aux-loss weight) may differ
    assert check_hf_matches(dataclasses.replace(model, moe_aux_loss_coeff=0.5), tmp_path)
    other = dataclasses.replace(model, rotary_base=500000, norm_epsilon=1e-5)
    with pytest.raises(ValueError, match=r"checkpoint\.load=.*does not match.*model\.norm_epsilon="
                                         r"1e-05 but 1e-06 there, model\.rotary_base=500000"):
        check_hf_matches(other, tmp_path)
    # a value stored through float32 (SmolLM2's GGUF: rms_norm_eps 1e-5 as 9.999999747e-06)
    # is the same value; a real difference in the 6th digit is not
    hf = arch_of(model).hf_config(model)
    (tmp_path / "config.json").write_text(json.dumps(
        hf | {"rms_norm_eps": float(torch.tensor(model.norm_epsilon, dtype=torch.float32))}))
    assert check_hf_matches(model, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(
        hf | {"rms_norm_eps": model.norm_epsilon * 1.00001}))
    with pytest.raises(ValueError, match="norm_epsilon"):
        check_hf_matches(model, tmp_path)
