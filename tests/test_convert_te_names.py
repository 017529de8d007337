"""Checkpoint conversion of an actor built from Megatron-Core's Transformer Engine layer spec with
grouped-GEMM experts (what a CUDA + TE run builds), without Transformer Engine:

(a) `te_names.canonical` against the parameter names such layers have, written down from the
    Megatron-Core 0.16.1 sources (cited per list), and those names cover exactly an
    architecture's rules;
(b) end to end on CPU: the portable actor's tensors, held by a module tree under the TE names
    (with TE's TP layout: MLA down projections duplicated on every TP rank, expert linears marked
    `partition_dim=0`), export exactly the portable actor's HF tensors and load exactly what the
    portable actor loads, at 1 rank, TP=2 (sequence parallel) and EP=2.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import pytest
import torch
from rank_batches import ok, run_batch

from megatron_rl.convert.te_names import canonical, ignored

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# (a) Names, from megatron/core (0.16.1):
# - models/gpt/gpt_layer_specs.py `get_gpt_layer_with_transformer_engine_spec`, non-MLA branch:
#   no input_layernorm (TransformerLayerSubmodules default IdentityOp),
#   linear_qkv = TELayerNormColumnParallelLinear (te.pytorch.LayerNormLinear: `weight`,
#   `layer_norm_weight`, plus `layer_norm_bias` for LayerNorm), q/k_layernorm = TENorm (`weight`),
#   pre_mlp_layernorm = TENorm only `if num_experts` else IdentityOp;
# - `get_mlp_module_spec_for_backend`: dense MLP linear_fc1 =
#   TELayerNormColumnParallelLinear since TESpecProvider.fuse_layernorm_and_linear() is True;
# - models/gpt/moe_module_specs.py + extensions/transformer_engine_spec_provider.py
#   `grouped_mlp_modules`: experts = TEGroupedMLP (transformer/moe/experts.py) with
#   TEColumnParallelGroupedLinear / TERowParallelGroupedLinear (te.pytorch.GroupedLinear:
#   `weight{i}`, `bias{i}`, one per local expert), shared experts = SharedExpertMLP with
#   TEColumnParallelLinear / TERowParallelLinear (`weight`);
# - MLA branch: input_layernorm = TENorm, linear_q_down_proj / linear_kv_down_proj = TELinear
#   (duplicated, transformer/multi_latent_attention.py), linear_q_up_proj / linear_kv_up_proj =
#   TELayerNormColumnParallelLinear when qk_layernorm, q_layernorm / kv_layernorm = IdentityOp;
# - router (transformer/moe/router.py TopKRouter): `weight`, buffer `expert_bias`;
# - TE modules' state dicts add `_extra_state` (TEGroupedLinear: `_extra_state{i}` in dist-ckpt).
# ---------------------------------------------------------------------------------------------

GQA_DENSE = {  # Qwen3 layer 0: dense attention with QK norm, dense MLP
    "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight":
        "decoder.layers.0.input_layernorm.weight",
    "decoder.layers.0.self_attention.linear_qkv.weight":
        "decoder.layers.0.self_attention.linear_qkv.weight",
    "decoder.layers.0.self_attention.q_layernorm.weight":
        "decoder.layers.0.self_attention.q_layernorm.weight",
    "decoder.layers.0.self_attention.k_layernorm.weight":
        "decoder.layers.0.self_attention.k_layernorm.weight",
    "decoder.layers.0.self_attention.linear_proj.weight":
        "decoder.layers.0.self_attention.linear_proj.weight",
    "decoder.layers.0.mlp.linear_fc1.layer_norm_weight":
        "decoder.layers.0.pre_mlp_layernorm.weight",
    "decoder.layers.0.mlp.linear_fc1.weight": "decoder.layers.0.mlp.linear_fc1.weight",
    "decoder.layers.0.mlp.linear_fc2.weight": "decoder.layers.0.mlp.linear_fc2.weight",
}
GQA_MOE = {  # Qwen3-MoE layer 1: MoE layer, TEGroupedMLP with 2 local experts
    "decoder.layers.1.self_attention.linear_qkv.layer_norm_weight":
        "decoder.layers.1.input_layernorm.weight",
    "decoder.layers.1.self_attention.linear_qkv.weight":
        "decoder.layers.1.self_attention.linear_qkv.weight",
    "decoder.layers.1.self_attention.q_layernorm.weight":
        "decoder.layers.1.self_attention.q_layernorm.weight",
    "decoder.layers.1.self_attention.k_layernorm.weight":
        "decoder.layers.1.self_attention.k_layernorm.weight",
    "decoder.layers.1.self_attention.linear_proj.weight":
        "decoder.layers.1.self_attention.linear_proj.weight",
    "decoder.layers.1.pre_mlp_layernorm.weight": "decoder.layers.1.pre_mlp_layernorm.weight",
    "decoder.layers.1.mlp.router.weight": "decoder.layers.1.mlp.router.weight",
    "decoder.layers.1.mlp.experts.linear_fc1.weight0":
        "decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight",
    "decoder.layers.1.mlp.experts.linear_fc1.weight1":
        "decoder.layers.1.mlp.experts.local_experts.1.linear_fc1.weight",
    "decoder.layers.1.mlp.experts.linear_fc2.weight0":
        "decoder.layers.1.mlp.experts.local_experts.0.linear_fc2.weight",
    "decoder.layers.1.mlp.experts.linear_fc2.weight1":
        "decoder.layers.1.mlp.experts.local_experts.1.linear_fc2.weight",
}
MLA_DENSE = {  # DeepSeek-V3 layer 0 (first_k_dense_replace): MLA with q LoRA, dense MLP
    "decoder.layers.0.input_layernorm.weight": "decoder.layers.0.input_layernorm.weight",
    "decoder.layers.0.self_attention.linear_q_down_proj.weight":
        "decoder.layers.0.self_attention.linear_q_down_proj.weight",
    "decoder.layers.0.self_attention.linear_q_up_proj.layer_norm_weight":
        "decoder.layers.0.self_attention.q_layernorm.weight",
    "decoder.layers.0.self_attention.linear_q_up_proj.weight":
        "decoder.layers.0.self_attention.linear_q_up_proj.weight",
    "decoder.layers.0.self_attention.linear_kv_down_proj.weight":
        "decoder.layers.0.self_attention.linear_kv_down_proj.weight",
    "decoder.layers.0.self_attention.linear_kv_up_proj.layer_norm_weight":
        "decoder.layers.0.self_attention.kv_layernorm.weight",
    "decoder.layers.0.self_attention.linear_kv_up_proj.weight":
        "decoder.layers.0.self_attention.linear_kv_up_proj.weight",
    "decoder.layers.0.self_attention.linear_proj.weight":
        "decoder.layers.0.self_attention.linear_proj.weight",
    "decoder.layers.0.mlp.linear_fc1.layer_norm_weight":
        "decoder.layers.0.pre_mlp_layernorm.weight",
    "decoder.layers.0.mlp.linear_fc1.weight": "decoder.layers.0.mlp.linear_fc1.weight",
    "decoder.layers.0.mlp.linear_fc2.weight": "decoder.layers.0.mlp.linear_fc2.weight",
}
MLA_MOE = {  # DeepSeek-V3 layer 1: MLA, MoE with shared expert and router expert bias
    **{k.replace("layers.0.", "layers.1."): v.replace("layers.0.", "layers.1.")
       for k, v in MLA_DENSE.items() if ".mlp." not in k},
    "decoder.layers.1.pre_mlp_layernorm.weight": "decoder.layers.1.pre_mlp_layernorm.weight",
    "decoder.layers.1.mlp.router.weight": "decoder.layers.1.mlp.router.weight",
    "decoder.layers.1.mlp.router.expert_bias": "decoder.layers.1.mlp.router.expert_bias",
    "decoder.layers.1.mlp.experts.linear_fc1.weight0":
        "decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight",
    "decoder.layers.1.mlp.experts.linear_fc2.weight0":
        "decoder.layers.1.mlp.experts.local_experts.0.linear_fc2.weight",
    "decoder.layers.1.mlp.shared_experts.linear_fc1.weight":
        "decoder.layers.1.mlp.shared_experts.linear_fc1.weight",
    "decoder.layers.1.mlp.shared_experts.linear_fc2.weight":
        "decoder.layers.1.mlp.shared_experts.linear_fc2.weight",
}
MODEL = {  # GPTModel: embedding (VocabParallelEmbedding), TENorm final norm, output layer
    "embedding.word_embeddings.weight": "embedding.word_embeddings.weight",
    "decoder.final_layernorm.weight": "decoder.final_layernorm.weight",
    "output_layer.weight": "output_layer.weight",
}
LAYERNORM_AND_BIAS = {  # normalization="LayerNorm" adds layer_norm_bias; Qwen2's QKV bias
    "decoder.layers.3.self_attention.linear_qkv.layer_norm_bias":
        "decoder.layers.3.input_layernorm.bias",
    "decoder.layers.3.mlp.linear_fc1.layer_norm_bias": "decoder.layers.3.pre_mlp_layernorm.bias",
    "decoder.layers.3.self_attention.linear_qkv.bias":
        "decoder.layers.3.self_attention.linear_qkv.bias",
    "decoder.layers.3.mlp.experts.linear_fc1.bias12":
        "decoder.layers.3.mlp.experts.local_experts.12.linear_fc1.bias",
    "decoder.layers.3.mlp.experts.linear_fc2.weight15":
        "decoder.layers.3.mlp.experts.local_experts.15.linear_fc2.weight",
    # the portable spec's names come back unchanged
    "decoder.layers.3.mlp.experts.local_experts.2.linear_fc1.weight":
        "decoder.layers.3.mlp.experts.local_experts.2.linear_fc1.weight",
    "decoder.layers.3.mlp.shared_experts.gate_weight":
        "decoder.layers.3.mlp.shared_experts.gate_weight",
}
EXTRA_STATE = [
    "decoder.layers.0.self_attention.linear_qkv._extra_state",
    "decoder.layers.0.self_attention.core_attention._extra_state",
    "decoder.layers.0.self_attention.linear_proj._extra_state",
    "decoder.layers.0.mlp.linear_fc1._extra_state",
    "decoder.layers.1.mlp.experts.linear_fc1._extra_state",
    "decoder.layers.1.mlp.experts.linear_fc2._extra_state3",
    "decoder.layers.1.mlp.shared_experts.linear_fc2._extra_state",
]


@pytest.mark.parametrize("table", [GQA_DENSE, GQA_MOE, MLA_DENSE, MLA_MOE, MODEL,
                                   LAYERNORM_AND_BIAS],
                         ids=["gqa-dense", "gqa-moe", "mla-dense", "mla-moe", "model", "ln-bias"])
def test_canonical_names(table):
    assert {te: canonical(te) for te in table} == table
    assert not any(ignored(te) for te in table)


def test_extra_state_ignored():
    assert all(ignored(n) for n in EXTRA_STATE)
    assert not ignored("decoder.layers.0.mlp.extra_state_weight")


def _qwen3_moe_cfg():
    from megatron_rl.actor.config import ModelConfig
    from megatron_rl.config import read_yaml

    model = read_yaml(ROOT / "configs/tiny_moe_cpu.yaml")["model"]
    return ModelConfig(**model | {"moe_layer_freq": [0, 1]})  # layer 0 dense, layer 1 MoE


def _deepseek_cfg():
    from megatron_rl.actor.config import ModelConfig
    from megatron_rl.convert.registry import ARCHS

    hf = dict(vocab_size=160, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
              rms_norm_eps=1e-6, rope_theta=10000.0, moe_intermediate_size=16, q_lora_rank=16,
              kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
              n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=1,
              topk_group=1, first_k_dense_replace=1)
    return ModelConfig(**ARCHS["deepseek_v3"].model_config(hf) | {"hf_architecture": "deepseek_v3"})


@pytest.mark.parametrize(("cfg", "tables"), [
    (_qwen3_moe_cfg, [GQA_DENSE, GQA_MOE, MODEL]), (_deepseek_cfg, [MLA_DENSE, MLA_MOE, MODEL])],
    ids=["qwen3_moe", "deepseek_v3"])
def test_te_names_cover_the_rules_exactly(cfg, tables):
    """A whole TE model's parameters (layer 0 dense, layer 1 MoE) map onto every rule, once."""
    from megatron_rl.convert import arch_of
    from megatron_rl.convert.maps import template_of

    model_cfg = cfg()
    rules = arch_of(model_cfg).rules(model_cfg)
    names = [te for table in tables for te in table]
    templates = [template_of(canonical(n))[0] for n in names]
    assert len({template_of(canonical(n)) for n in names}) == len(names)  # none twice
    assert set(templates) == set(rules)


# ---------------------------------------------------------------------------------------------
# (b) End to end on CPU.
# ---------------------------------------------------------------------------------------------

_GROUPED = re.compile(r"^(.*mlp\.experts\.)local_experts\.(\d+)\.(linear_fc[12])\.(weight|bias)$")


def te_name(name: str, dense_layers: set[int], mla: bool) -> str:
    """The inverse of `canonical` for this test: a portable name as the TE spec names it."""
    m = re.match(r"^decoder\.layers\.(\d+)\.(.*)$", name)
    if m:
        layer, rest = int(m.group(1)), m.group(2)
        p = f"decoder.layers.{layer}."
        if rest == "input_layernorm.weight" and not mla:
            return p + "self_attention.linear_qkv.layer_norm_weight"
        if rest == "pre_mlp_layernorm.weight" and layer in dense_layers:
            return p + "mlp.linear_fc1.layer_norm_weight"
        if mla and rest == "self_attention.q_layernorm.weight":
            return p + "self_attention.linear_q_up_proj.layer_norm_weight"
        if mla and rest == "self_attention.kv_layernorm.weight":
            return p + "self_attention.linear_kv_up_proj.layer_norm_weight"
    g = _GROUPED.match(name)
    if g:
        return f"{g.group(1)}{g.group(3)}.{g.group(4)}{g.group(2)}"
    return name


class _TEModule(torch.nn.Module):
    """Stands in for a TE module: its state dict has an `_extra_state` entry."""

    def get_extra_state(self):
        return torch.zeros(1)

    def set_extra_state(self, state) -> None:
        pass


def te_view(chunk: torch.nn.Module, model_cfg) -> tuple[torch.nn.Module, dict[str, str]]:
    """A module tree under the TE spec's names holding copies of `chunk`'s tensors as TE holds
    them; returns it and {TE name: portable name}."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    names = dict(chunk.named_parameters())
    dense = {int(m.group(1)) for n in names
             if (m := re.match(r"^decoder\.layers\.(\d+)\.mlp\.linear_fc1\.weight$", n))}
    mla = bool(model_cfg.multi_latent_attention)
    explicit_expert_comm = (ps.get_expert_model_parallel_world_size() > 1
                            or ps.get_expert_tensor_parallel_world_size() > 1)
    root = torch.nn.Module()
    layers = torch.nn.ModuleList()
    for layer in chunk.decoder.layers:
        new = _TEModule()
        new.layer_number = layer.layer_number
        layers.append(new)
    root.add_module("decoder", _TEModule())
    root.decoder.add_module("layers", layers)

    def module_at(path: list[str]) -> torch.nn.Module:
        m = root
        for part in path:
            if not hasattr(m, part):
                m.add_module(part, _TEModule())
            m = m[int(part)] if isinstance(m, torch.nn.ModuleList) else getattr(m, part)
        return m

    mapping: dict[str, str] = {}
    for name, param in list(chunk.named_parameters()) + list(chunk.named_buffers()):
        new_name = te_name(name, dense, mla)
        *path, leaf = new_name.split(".")
        owner = module_at(path)
        tensor = param.detach().clone()
        attrs = dict(vars(param)) if isinstance(param, torch.nn.Parameter) else {}
        if mla and re.search(r"linear_(q|kv)_down_proj\.weight$", name):
            # TELinear(parallel_mode="duplicated"): the whole tensor on every TP rank, marked
            # tensor_model_parallel with partition_dim 0 by TE all the same.
            group = ps.get_tensor_model_parallel_group()
            parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, tensor.contiguous(), group=group)
            tensor = torch.cat(parts)
            attrs |= {"tensor_model_parallel": True, "partition_dim": 0}
            owner.parallel_mode = None
        elif _GROUPED.match(name) and explicit_expert_comm:
            attrs |= {"tensor_model_parallel": True, "partition_dim": 0}  # TE, parallel_mode None
            owner.parallel_mode = None
        if isinstance(param, torch.nn.Parameter):
            new = torch.nn.Parameter(tensor, requires_grad=param.requires_grad)
            for k, v in attrs.items():
                setattr(new, k, v)
            owner.register_parameter(leaf, new)
        else:
            owner.register_buffer(leaf, tensor)
        mapping[new_name] = name
    for layer, new in zip(chunk.decoder.layers, layers, strict=True):
        if hasattr(layer.mlp, "experts"):  # TEGroupedMLP has no local_experts list
            new.mlp.experts.num_local_experts = len(layer.mlp.experts.local_experts)
    return root, mapping


def _perturb(chunk: torch.nn.Module) -> None:
    """Deterministic weights; equal on the ranks that hold the same tensor."""
    from megatron.core import parallel_state as ps

    for name, p in list(chunk.named_parameters()) + list(chunk.named_buffers()):
        if not p.is_floating_point():
            continue
        seed = zlib.crc32(name.encode())
        if getattr(p, "tensor_model_parallel", False):
            seed += 1000 * ps.get_tensor_model_parallel_rank()
        if "local_experts" in name:
            seed += 7 * ps.get_expert_model_parallel_rank()
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))


def te_worker(kind: str, parallel: dict, tmp: str) -> dict:
    import torch.distributed as dist
    from safetensors.torch import save_file

    from megatron_rl.actor.actor import Actor
    from megatron_rl.actor.config import ActorConfig, ParallelConfig
    from megatron_rl.actor.model import padded_vocab_size
    from megatron_rl.actor.parallel import init_distributed
    from megatron_rl.convert import arch_of
    from megatron_rl.convert.export import iter_hf_tensors
    from megatron_rl.convert.load import load_hf

    model_cfg = {"qwen3_moe": _qwen3_moe_cfg, "deepseek_v3": _deepseek_cfg}[kind]()
    arch = arch_of(model_cfg)
    par = ParallelConfig(timeout_s=60, dp=None, **parallel)
    init_distributed(par, seed=1)
    actor = Actor(model_cfg, par, ActorConfig(seq_length=16, micro_batch_size=1))
    chunk = actor.model[0].module
    _perturb(chunk)
    view, mapping = te_view(chunk, model_cfg)
    out: dict = {"te_names": sorted(n for n, _ in view.named_parameters())}
    out["state_dict"] = sorted(view.state_dict())
    # Export: the same HF tensors under the same names.
    want = list(iter_hf_tensors([chunk], arch, model_cfg))
    got = list(iter_hf_tensors([view], arch, model_cfg))
    out["want_names"], out["got_names"] = [n for n, _ in want], [n for n, _ in got]
    want_d, got_d = dict(want), dict(got)
    out["export_differs"] = sorted(n for n in want_d
                                   if n not in got_d or not torch.equal(want_d[n], got_d[n]))
    # Load: the portable actor's export as a checkpoint, into both; the same tensors result.
    path = Path(tmp)
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
        save_file({n: t.contiguous() for n, t in want}, str(path / "model.safetensors"))
    dist.barrier()
    with torch.no_grad():
        for p in list(view.parameters()) + list(view.buffers()):
            p.zero_()
        for p in list(chunk.parameters()) + list(chunk.buffers()):
            if p.is_floating_point():
                p.zero_()
    padded = padded_vocab_size(model_cfg.vocab_size, par.tp)
    load_hf([chunk], arch, model_cfg, str(path), padded, progress=False)
    load_hf([view], arch, model_cfg, str(path), padded, progress=False)
    portable = dict(chunk.named_parameters()) | dict(chunk.named_buffers())
    te = dict(view.named_parameters()) | dict(view.named_buffers())
    differs = []
    for te_n, name in mapping.items():
        expected = portable[name].detach()
        if te[te_n].shape != expected.shape:  # a duplicated TE linear: compare this rank's rows
            from megatron.core import parallel_state as ps

            rank = ps.get_tensor_model_parallel_rank()
            full = te[te_n].detach()
            n = expected.shape[0]
            full = full[rank * n : (rank + 1) * n]
            out.setdefault("duplicated", []).append(te_n)
        else:
            full = te[te_n].detach()
        if not torch.equal(full, expected):
            differs.append(te_n)
    out["load_differs"] = differs
    out["mapping"] = mapping
    return out


CASES = [("qwen3_moe", 1, {}), ("qwen3_moe", 2, {"ep": 2}),
         ("qwen3_moe", 2, {"tp": 2, "etp": 2, "sequence_parallel": True}),
         ("deepseek_v3", 1, {}), ("deepseek_v3", 2, {"tp": 2, "sequence_parallel": True})]


@pytest.fixture(scope="module")
def te_runs(tmp_path_factory) -> dict:
    """Every case's `te_worker`, the cases of one world size in turn in one spawn:
    {case index: [result of each rank]}."""
    out = {}
    for world in sorted({w for _, w, _ in CASES}):
        idx = [i for i, case in enumerate(CASES) if case[1] == world]
        calls = [(te_worker, (CASES[i][0], CASES[i][2], str(tmp_path_factory.mktemp("hf"))))
                 for i in idx]
        out.update(zip(idx, run_batch(world, calls, timeout_s=600), strict=True))
    return out


@pytest.mark.parametrize(("kind", "world", "parallel"), CASES,
                         ids=["qwen3_moe-single", "qwen3_moe-ep2", "qwen3_moe-tp2-etp2-sp",
                              "deepseek_v3-single", "deepseek_v3-tp2-sp"])
def test_te_names_export_and_load_like_portable(kind, world, parallel, te_runs):
    results = [ok(res) for res in te_runs[CASES.index((kind, world, parallel))]]
    for res in results:
        names = res["te_names"]
        # Not vacuous: the tree has the TE spec's names, not the portable ones.
        assert not any("local_experts" in n or "input_layernorm" in n and kind == "qwen3_moe"
                       for n in names)
        assert any(re.search(r"mlp\.experts\.linear_fc2\.weight\d+$", n) for n in names)
        assert any(n.endswith("mlp.linear_fc1.layer_norm_weight") for n in names)
        assert any(n.endswith("_extra_state") for n in res["state_dict"])
        # Export: exactly the portable names and tensors, each once.
        assert sorted(res["got_names"]) == sorted(res["want_names"])
        assert len(set(res["got_names"])) == len(res["got_names"])
        assert res["export_differs"] == []
        # Load: every TE-named tensor equals the portable parameter it stands for.
        assert res["load_differs"] == []
        assert {canonical(te) for te in res["mapping"]} == set(res["mapping"].values())
        if kind == "deepseek_v3" and parallel.get("tp"):
            assert len(res["duplicated"]) == 4  # q/kv down projections of both layers
