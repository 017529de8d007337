"""`megatron-rl submit --dry-run`: sbatch scripts rendered from shipped configs pass `bash -n`
and carry the lines a Slurm run depends on; the embedded config reads back equal; errors are
one clear line. (tests/test_slurm_real.py runs a script on a real Slurm.)"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from megatron_rl import cli
from megatron_rl.config import load_config
from megatron_rl.launch.slurm import CONFIG_EOF, load_job_config

ROOT = Path(__file__).resolve().parents[1]
GPU_LAYOUT = ["slurm.nodes=4", "slurm.gpus_per_node=8", "parallel.tp=2", "parallel.pp=2",
              "parallel.ep=8", "slurm.partition=batch", "slurm.account=rl", "slurm.time=04:00:00",
              "slurm.container_image=nvcr.io/nvidia/pytorch:25.01-py3",
              "slurm.container_mounts=[/lustre:/lustre]", "slurm.env={NCCL_DEBUG: WARN}"]
ENGINES = ["slurm.nodes=4", "slurm.gpus_per_node=8", "slurm.engine_nodes=2", "parallel.ep=8",
           "checkpoint.load=/models/hf"]
CASES = {  # name: (config, overrides, trainer nodes, ranks per node)
    "tiny_cpu": ("configs/tiny_moe_cpu.yaml", [], 1, 1),
    "demo_cpu": ("configs/demo_cpu.yaml", [], 1, 1),
    "tiny_cpu_2x2": ("configs/tiny_moe_cpu.yaml", ["slurm.nodes=2", "slurm.nproc_per_node=2",
                                                   "parallel.ep=2"], 2, 2),
    "gpu_4x8": ("configs/tiny_moe_cpu.yaml", GPU_LAYOUT, 4, 8),
    "engines_per_node": ("configs/tiny_moe_cpu.yaml", [*ENGINES, "slurm.engine_tp=2"], 2, 8),
    "engines_multi_node": ("configs/tiny_moe_cpu.yaml", [*ENGINES, "slurm.engine_tp=16"], 2, 8),
    # colocated engines (engine_nodes 0, rollout.engine sglang): started on the trainer nodes
    "colocated_cpu": ("configs/tiny_moe_cpu.yaml", ["rollout.engine=sglang",
                                                    "slurm.nproc_per_node=2",
                                                    "slurm.engine_tp=1"], 1, 2),
    "colocated_gpu": ("configs/tiny_moe_cpu.yaml", [*GPU_LAYOUT, "rollout.engine=sglang",
                                                    "slurm.engine_tp=4",
                                                    "checkpoint.load=/models/hf"], 4, 8),
    "cpu_engine_nodes": ("configs/tiny_moe_cpu.yaml", ["slurm.nodes=2", "slurm.engine_nodes=1",
                                                       "slurm.engine_server=megatron-rl"], 1, 1),
    "qwen3_30b_a3b_h100": ("configs/qwen3_30b_a3b_h100.yaml", [], None, 8),
    "deepseek_v3_h100": ("configs/deepseek_v3_h100.yaml", [], None, 8),
}


def submit(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["submit", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _sets(overrides: list[str]) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


@pytest.mark.parametrize("case", list(CASES))
def test_rendered_script(case: str, capsys: pytest.CaptureFixture[str], tmp_path: Path,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    config, overrides, train_nodes, per_node = CASES[case]
    if not (ROOT / config).is_file():
        pytest.skip(f"{config} is not written yet")
    monkeypatch.chdir(ROOT)
    code, script, err = submit(capsys, config, *_sets(overrides), "--dry-run")
    assert code == 0, err
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    check = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr

    cfg = load_job_config(config, overrides, ROOT)
    slurm = cfg.slurm
    train_nodes = train_nodes or slurm.nodes - slurm.engine_nodes
    header = [ln for ln in script.splitlines() if ln.startswith("#SBATCH")]
    assert f"#SBATCH --nodes={slurm.nodes}" in header and "#SBATCH --requeue" in header
    assert "#SBATCH --ntasks-per-node=1" in header
    assert f"#SBATCH --signal=B:USR1@{slurm.signal_lead_s}" in header
    assert (f"#SBATCH --gpus-per-node={slurm.gpus_per_node}" in header) == (slurm.gpus_per_node > 0)
    assert f"#SBATCH --output={ROOT}/{slurm.log_dir}/%x-%j.out" in header
    for key in ("partition", "account", "time"):
        value = getattr(slurm, key)
        assert (f"#SBATCH --{key}={value}" in header) == (value is not None)
    assert script.startswith("#!/bin/bash\n") and "set -euo pipefail" in script
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST"' in script
    assert f"--nnodes={train_nodes} --nproc-per-node={per_node}" in script
    assert '--rdzv-backend=c10d --rdzv-endpoint="$head_addr:$rdzv_port"' in script
    assert '--rdzv-id="$SLURM_JOB_ID"' in script
    assert re.search(r'-m megatron_rl train "\$config" --resume', script)
    assert "trap forward_stop USR1" in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert f"{ROOT}/outputs/slurm/{slurm.job_name}/checkpoints/latest" in script
    assert ("--container-image=" in script) == (slurm.container_image is not None)
    colocated = not slurm.engine_nodes and cfg.rollout.engine == "sglang"
    if slurm.engine_nodes or colocated:
        assert "rollout.engine_urls=$urls_yaml" in script and "/health" in script
        assert f"--set rollout.colocate={str(colocated).lower()}" in script
        # colocated engines run in a step beside the trainer's (srun --overlap)
        assert ('echo "${grp[*]}")" --overlap' in script) == colocated
        nodes = train_nodes if colocated else slurm.engine_nodes
        if slurm.gpus_per_node and slurm.engine_server == "sglang":
            span = max(1, slurm.engine_tp // slurm.gpus_per_node)
            assert script.count("sglang.launch_server") == (
                1 if span > 1 else slurm.gpus_per_node // slurm.engine_tp)
            assert ("--nnodes " + str(span) in script) == (span > 1)
            assert ("--enable-memory-saver" in script) == colocated  # releases memory
            assert f"for ((e = 0; e < {nodes}; e += {span})); do" in script
        else:  # CPU: `megatron-rl serve` of the job's config, one per engine_tp trainer ranks
            per_node = max(1, slurm.ranks_per_node // slurm.engine_tp)
            assert script.count('-m megatron_rl serve --config "$config"') == per_node
            assert "--set parallel.tp=1 --set parallel.pp=1" in script
    else:
        assert "rollout.engine_urls=" not in script and "/health" not in script

    # The embedded config is the resolved one, paths keyed by job name; it reads back equal.
    embedded = script.split(f"<<'{CONFIG_EOF}'\n", 1)[1].split(f"\n{CONFIG_EOF}\n", 1)[0]
    (tmp_path / "job.yaml").write_text(embedded)
    world = train_nodes * per_node
    assert load_config(tmp_path / "job.yaml", world_size=world) == cfg
    assert cfg.checkpoint.resume and cfg.parallel.dp is not None
    assert cfg.checkpoint.dir == f"{ROOT}/outputs/slurm/{slurm.job_name}/checkpoints"


def test_layout_that_does_not_fit_the_nodes_is_one_clear_line(
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = submit(capsys, "configs/tiny_moe_cpu.yaml", "--set", "slurm.nodes=1",
                            "--set", "slurm.gpus_per_node=8", "--set", "parallel.tp=16",
                            "--dry-run")
    assert code == 1 and out == ""
    assert err.startswith("megatron-rl submit: config error: parallel") and err.count("\n") == 1


@pytest.mark.parametrize("override, key", [("slurm.nodes=0", "slurm.nodes"),
                                           ("slurm.time=soon", "slurm.time"),
                                           ("slurm.engine_nodes=1", "slurm.engine_nodes"),
                                           ("slurm.job_name=a/b", "slurm.job_name")])
def test_bad_slurm_field_is_named(override: str, key: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = submit(capsys, "configs/tiny_moe_cpu.yaml", "--set", override, "--dry-run")
    assert code == 1 and f"config error: {key}:" in err, err


def test_convert_job(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    code, script, err = submit(capsys, "configs/tiny_moe_cpu.yaml", *_sets(GPU_LAYOUT),
                               "--convert", "/hf/model", "out/mcore", "--dry-run")
    assert code == 0, err
    (tmp_path / "c.sbatch").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "c.sbatch")]).returncode == 0
    assert "#SBATCH --job-name=megatron-rl-convert" in script
    assert "--signal" not in script and "--nnodes=4 --nproc-per-node=8" in script
    assert (f"-m megatron_rl convert hf-to-mcore /hf/model {ROOT}/out/mcore --set parallel.tp=2 "
            "--set parallel.pp=2 --set parallel.ep=8 --set parallel.etp=2 --set parallel.cp=1"
            in script)


def _fake_sbatch(bin_dir: Path, body: str) -> None:
    bin_dir.mkdir()
    exe = bin_dir / "sbatch"
    exe.write_text(f"#!/bin/bash\n{body}\n")
    exe.chmod(0o755)


def test_submit_runs_sbatch_and_prints_the_job_id(capsys: pytest.CaptureFixture[str],
                                                  tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_sbatch(tmp_path / "bin", 'cp "$2" "$(dirname "$2")/submitted"; echo "4242;cluster"')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    monkeypatch.chdir(tmp_path)
    code, out, err = submit(capsys, str(ROOT / "configs/tiny_moe_cpu.yaml"))
    assert code == 0, err
    assert out == "4242\n"
    logs = tmp_path / "outputs/slurm/logs"
    assert (logs / "megatron-rl.sbatch").read_text() == (logs / "submitted").read_text()
    assert "megatron-rl-4242.out" in err


def test_sbatch_missing_or_failing_is_a_clear_error(capsys: pytest.CaptureFixture[str],
                                                    tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    code, _, err = submit(capsys, str(ROOT / "configs/tiny_moe_cpu.yaml"))
    assert code == 1 and "`sbatch` not found on PATH" in err
    _fake_sbatch(tmp_path / "bin", 'echo "sbatch: error: invalid partition specified" >&2; exit 1')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:/usr/bin:/bin")
    code, _, err = submit(capsys, str(ROOT / "configs/tiny_moe_cpu.yaml"))
    assert code == 1 and "sbatch --parsable" in err and "invalid partition specified" in err
