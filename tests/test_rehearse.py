"""`megatron-rl submit CONFIG --rehearse` without Slurm: the shrunk config keeps every
architectural feature of the flagship configs, its layout is valid on 4 ranks with the same kinds
of parallelism where they fit, and the rendered script starts the engines
(tests/test_slurm_real.py runs the rehearsals on a real Slurm)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from megatron_rl import cli
from megatron_rl.config import read_yaml
from megatron_rl.launch import rehearse
from megatron_rl.launch.rehearse import RANKS, rehearsal_config, rehearsal_data, warnings

ROOT = Path(__file__).resolve().parents[1]
DEEPSEEK = str(ROOT / "configs/deepseek_v3_h100.yaml")
QWEN3 = str(ROOT / "configs/qwen3_30b_a3b_h100.yaml")


def test_deepseek_keeps_its_architecture() -> None:
    orig = read_yaml(DEEPSEEK)["model"]
    cfg = rehearsal_config(DEEPSEEK)
    m = cfg.model
    assert m.hf_architecture == "deepseek_v3" and m.num_layers <= 4 and m.hidden_size <= 128
    assert m.vocab_size == 512 and m.num_experts == 8
    # MLA with both LoRA ranks, YaRN as released, QK layernorm
    assert m.multi_latent_attention and m.q_lora_rank and m.kv_lora_rank and m.qk_layernorm
    assert (m.rope_scaling, m.rope_scaling_factor) == ("yarn", orig["rope_scaling_factor"])
    # sigmoid routing, expert bias, group-limited top-k (top-k / group-top-k per group),
    # routed scaling, shared experts
    assert m.moe_router_score_function == "sigmoid" and m.moe_router_enable_expert_bias
    assert m.moe_router_num_groups > 1 and 1 <= m.moe_router_group_topk < m.moe_router_num_groups
    assert m.num_experts % m.moe_router_num_groups == 0
    assert m.moe_router_topk % m.moe_router_group_topk == 0
    assert m.moe_router_topk // m.moe_router_group_topk <= m.num_experts // m.moe_router_num_groups
    assert m.moe_router_topk_scaling_factor == orig["moe_router_topk_scaling_factor"]
    assert m.moe_shared_expert_intermediate_size and m.moe_router_load_balancing_type == (
        orig["moe_router_load_balancing_type"])
    # dense first layer(s), then MoE; the last pipeline stage shorter, as 61 = 3 x 16 + 13
    freq = m.moe_layer_freq
    assert isinstance(freq, list) and freq[0] == 0 and freq[-1] == 1
    par = cfg.parallel
    assert (par.tp, par.pp, par.cp, par.ep, par.etp, par.dp) == (2, 2, 1, 2, 1, 1)
    assert par.sequence_parallel and par.pp_last_stage_layers == 1 < m.num_layers - 1
    assert m.num_experts % par.ep == 0


def test_qwen3_keeps_its_architecture() -> None:
    cfg = rehearsal_config(QWEN3)
    m, par = cfg.model, cfg.parallel
    assert m.hf_architecture == "qwen3_moe" and m.qk_layernorm and not m.multi_latent_attention
    # GQA, and head_dim * heads != hidden_size as in Qwen3-30B-A3B (32 x 128 vs 2048)
    assert m.num_query_groups and m.num_attention_heads % m.num_query_groups == 0
    assert m.num_query_groups % par.tp == 0
    assert m.kv_channels * m.num_attention_heads != m.hidden_size
    assert m.moe_router_score_function == "softmax" and m.moe_layer_freq == 1
    assert (par.tp, par.pp, par.ep, par.etp, par.dp) == (2, 1, 4, 1, 2)
    assert par.sequence_parallel and m.num_experts % par.ep == 0


@pytest.mark.parametrize("config", [DEEPSEEK, QWEN3])
def test_run_settings(config: str) -> None:
    cfg = rehearsal_config(config)
    orig = read_yaml(config)
    assert cfg.slurm.job_name == f"{orig['slurm']['job_name']}-rehearsal"
    assert (cfg.slurm.nodes, cfg.slurm.gpus_per_node, cfg.slurm.nproc_per_node) == (1, 0, RANKS)
    assert cfg.slurm.engine_server == "megatron-rl" and cfg.slurm.engine_nodes == 0
    assert cfg.slurm.env["OMP_NUM_THREADS"] == "1"
    assert cfg.actor.params_dtype == "float32" and not cfg.actor.optimizer_cpu_offload
    assert not cfg.actor.use_distributed_optimizer  # its state reloads only with TE (CPU: none)
    assert cfg.checkpoint.load is None and cfg.checkpoint.save_interval >= 1
    assert cfg.data.source == "reasoning_gym" and cfg.data.tokenizer is None
    assert cfg.train.steps <= 8 and cfg.eval.size == 0
    assert cfg.rollout.engine == orig["rollout"]["engine"] and not cfg.rollout.engine_urls
    assert cfg.rollout.routing_replay == orig["rollout"].get("routing_replay", False)
    assert cfg.rollout.weight_sync == orig["rollout"].get("weight_sync", "tensor")
    own_nodes = orig["slurm"].get("engine_nodes", 0) > 0
    assert cfg.rollout.colocate is (False if own_nodes else orig["rollout"].get("colocate"))


def test_layout_scaling_rules() -> None:
    """Kinds of parallelism kept while 4 ranks allow: tp, then pp, then cp (which CPU ranks then
    refuse); dp from the rest; the widest ep the expert rule (etp * ep * pp | world) allows."""
    base = read_yaml(QWEN3)
    for par, want in [({"tp": 8, "pp": 4, "cp": 4, "ep": 32, "etp": 1}, (2, 2, 1, 2)),
                      # cp fits, but CPU ranks have no context-parallel attention
                      ({"tp": 1, "pp": 1, "cp": 2, "ep": 8, "etp": 1}, (1, 1, 1, 4)),
                      ({"tp": 2, "pp": 1, "cp": 1, "ep": 4}, (2, 1, 1, 2))]:
        data, notes = rehearsal_data({**base, "parallel": par})
        got = data["parallel"]
        assert (got["tp"], got["pp"], got["cp"], got["ep"]) == want, (par, got)
        assert notes[0].startswith("layout:")
    _, notes = rehearsal_data(read_yaml(DEEPSEEK))
    assert "tp=8->2, pp=4->2" in notes[0]


def test_overrides_apply_after_the_rehearsal() -> None:
    cfg = rehearsal_config(DEEPSEEK, ["parallel.pp=1", "parallel.pp_last_stage_layers=null",
                                      "parallel.ep=4", "train.steps=6"])
    assert (cfg.parallel.pp, cfg.parallel.ep, cfg.train.steps) == (1, 4, 6)


@pytest.mark.parametrize("config", [DEEPSEEK, QWEN3])
def test_dry_run_script(config: str, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    code = cli.main(["submit", config, "--rehearse", "--dry-run"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "megatron-rl submit --rehearse: layout:" in out.err
    assert "megatron-rl submit --rehearse: model:" in out.err
    script = out.out
    (tmp_path / "job.sbatch").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")]).returncode == 0
    assert "--rehearse" in script.splitlines()[1]
    assert "--nnodes=1 --nproc-per-node=4" in script
    assert script.count("-m megatron_rl serve --config") == 2 and "--overlap" in script
    assert '--set "rollout.engine_urls=$urls_yaml"' in script
    colocate = rehearsal_config(config).rollout.colocate is not False
    assert f"--set rollout.colocate={str(colocate).lower()}" in script
    assert "sglang.launch_server" not in script and "--gpus-per-node" not in script


def test_rehearse_and_convert_together_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["submit", QWEN3, "--rehearse", "--convert", "a", "b", "--dry-run"]) == 2
    assert "one of --rehearse and --convert" in capsys.readouterr().err


@pytest.mark.parametrize("config", [DEEPSEEK, QWEN3])
def test_the_rehearsal_is_one_the_trainer_accepts(config: str) -> None:
    """`launch/support.unsupported` of the rehearsal on CPU ranks (engine URLs as its script
    fills them) is empty; what the config as written would hit on its cluster is a warning."""
    lines = warnings(config, rehearsal_config(config), ROOT)
    assert not [ln for ln in lines if "the rehearsal would be refused" in ln], lines


def test_warns_about_the_config_as_written(tmp_path: Path) -> None:
    data = read_yaml(QWEN3)
    data["parallel"] |= {"cp": 2, "tp": 2}  # 8 GPUs = tp 2 x cp 2 x dp 2
    data["rollout"]["routing_replay"] = True
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    lines = warnings(str(path), rehearsal_config(str(path)), ROOT)
    assert any("as written would be refused on its cluster: parallel.cp=2" in ln
               for ln in lines), lines
    _, notes = rehearsal_data(data)
    assert any(n.startswith("dropped: parallel.cp=2 (on CPU: ") for n in notes), notes
    assert rehearsal_config(str(path)).parallel.cp == 1


def test_what_cpu_ranks_refuse_is_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rehearsal turns off what `launch/support.unsupported` says CPU ranks refuse, as it
    says it at the time: here activation recompute under routing replay."""
    refused = rehearse.Unsupported("rollout.routing_replay", "true", "replay under "
                                   "actor.recompute=full is not supported", "set recompute none")
    real = rehearse.unsupported
    monkeypatch.setattr(rehearse, "unsupported",
                        lambda cfg, **kw: [*real(cfg, **kw), refused]
                        if cfg.actor.recompute != "none" else real(cfg, **kw))
    data, notes = rehearse.rehearsal_data(read_yaml(QWEN3))
    assert data["actor"]["recompute"] == "none"
    assert any(n.startswith("replaced: actor.recompute=full -> none (replay under") for n in notes)
