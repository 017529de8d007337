"""The sbatch job of `megatron-rl submit`: render a script from a run config and submit it.

    megatron-rl submit configs/qwen3_30b_a3b_h100.yaml --set slurm.nodes=2 [--dry-run]
    megatron-rl submit --convert HF_DIR MCORE_DIR configs/deepseek_v3_h100.yaml [--dry-run]

The script is self-contained: the resolved config (with the run's paths keyed by job name) is
embedded in it and written next to the log at every start, so a requeued job runs exactly what
was submitted. Each trainer node runs one `torchrun` (c10d rendezvous on the head node's
address from `scontrol show hostnames`, rendezvous id = job id) with `--resume`: a first start
finds no checkpoint and starts fresh, a restart continues from the newest complete one.

Signals, verified on Slurm 22.05 with torch 2.13's torchrun (tests/test_slurm_real.py):
- Slurm delivers a step signal (`--signal=USR1@N` without `B:`, `scancel --signal`) to every
  process of the step. The trainer's helpers ignore it (reward workers, the spawned
  `multiprocessing.Manager` Megatron's checkpoint writer talks through: `rewards.pool.
  become_helper`), but torchrun does not: it dies of SIGUSR1 (or, told to handle it, SIGKILLs
  the ranks after its shutdown timeout). So the job asks for `--signal=B:USR1@N`: only
  the batch shell gets it, and its `forward_stop` trap sends SIGUSR1 to the trainer ranks alone
  (the children of each node's torchrun, whose PID the node wrapper records), through
  `srun --overlap`. `run_state.StopSignals` finishes the step, saves and exits 0; torchrun (which
  ignores SIGUSR1) sees its ranks exit 0; the script finds `latest` short of `train.steps` and
  requeues the job. To stop a job the same way by hand: `scancel --batch --signal=USR1 JOBID`.
- `scontrol requeue`, preemption and the time limit send SIGTERM to every process of the job:
  torchrun forwards it to the ranks, which finish the step and save (their helpers ignore it)
  within torchrun's `--shutdown-timeout`; Slurm requeues the job and it resumes from that
  checkpoint (or the newest complete one).
"""

from __future__ import annotations

import dataclasses
import shlex
import shutil
import subprocess
from pathlib import Path

import yaml

from megatron_rl.config import RunConfig, load_config, read_yaml
from megatron_rl.configurable import ConfigError, apply_overrides, from_dict, to_dict
from megatron_rl.launch.config import SlurmConfig

CONFIG_EOF = "MEGATRON_RL_CONFIG"


@dataclasses.dataclass(frozen=True)
class Job:
    """A rendered job: its script and where `submit` writes it."""

    name: str
    script: str
    script_path: Path


def _slurm_section(path: str | None, overrides: list[str]) -> SlurmConfig:
    """The slurm section alone (it decides the world size the full config is checked at)."""
    data = apply_overrides(RunConfig, read_yaml(path) if path else {}, overrides)
    slurm = from_dict(SlurmConfig, data.get("slurm") or {}, "slurm")
    try:
        slurm.validate()
    except ConfigError as err:
        raise ConfigError(f"config error: slurm.{err.key}: {err.problem}; {err.fix}") from None
    return slurm


def run_paths(slurm: SlurmConfig, workdir: Path) -> dict[str, str]:
    """The overrides that key the run's outputs by job name (absolute, as the job sees them)."""
    root = _abs(slurm.run_dir, workdir) / slurm.job_name
    return {"checkpoint.dir": str(root / "checkpoints"), "train.output_dir": str(root / "run"),
            "logging.log_dir": str(root / "tensorboard")}


def load_job_config(path: str | None, overrides: list[str], workdir: Path,
                    all_nodes: bool = False) -> RunConfig:
    """The run config as the job will run it: paths keyed by job name, parallel layout checked
    against (nodes - engine_nodes) * ranks_per_node ranks (every node's ranks with
    `all_nodes`, as a conversion job uses them). Raises ConfigError."""
    slurm = _slurm_section(path, overrides)
    paths = [f"{k}={v}" for k, v in run_paths(slurm, workdir).items()]
    world = (slurm.nodes if all_nodes else slurm.trainer_nodes) * slurm.ranks_per_node
    return load_config(path, [*overrides, *paths, "checkpoint.resume=true"], world_size=world)


def _abs(path: str, workdir: Path) -> Path:
    p = Path(path)
    return p if p.is_absolute() else workdir / p


def _q(text: str) -> str:
    return shlex.quote(str(text))


def _oneline(text: str) -> str:
    return " ".join(text.split())


def _header(slurm: SlurmConfig, name: str, workdir: Path, signal: bool) -> list[str]:
    """The #SBATCH lines."""
    opts = [f"--job-name={name}", f"--nodes={slurm.nodes}", "--ntasks-per-node=1"]
    if slurm.gpus_per_node:
        opts.append(f"--gpus-per-node={slurm.gpus_per_node}")
    for key, value in (("cpus-per-task", slurm.cpus_per_task), ("mem", slurm.mem),
                       ("partition", slurm.partition), ("account", slurm.account),
                       ("time", slurm.time)):
        if value is not None:
            opts.append(f"--{key}={value}")
    log_dir = _abs(slurm.log_dir, workdir)
    opts += [f"--chdir={workdir}", f"--output={log_dir}/%x-%j.out", "--open-mode=append"]
    opts.append("--requeue" if slurm.requeue else "--no-requeue")
    if signal and slurm.signal_lead_s:
        opts.append(f"--signal=B:USR1@{slurm.signal_lead_s}")
    opts += slurm.extra_sbatch
    return [f"#SBATCH {o}" for o in opts]


def _prologue(slurm: SlurmConfig, workdir: Path) -> list[str]:
    """Strict mode, environment, setup lines, the node list and the head node's address."""
    lines = ["set -euo pipefail", ""]
    lines += [f"export {k}={_q(v)}" for k, v in slurm.env.items()]
    lines += slurm.setup
    py = f"{slurm.venv.rstrip('/')}/bin/python" if slurm.venv else "python3"
    lines += [
        f"export python={_q(py)}",
        'echo "[submit] job $SLURM_JOB_ID ($SLURM_JOB_NAME) start ${SLURM_RESTART_COUNT:-0}'
        ' on $SLURM_JOB_NODELIST at $(date -u +%FT%TZ)"',
        'mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
        'head_node=${hosts[0]}',
        'head_addr=$(scontrol show node "$head_node" | sed -n "s/.*NodeAddr=\\([^ ]*\\).*/\\1/p")',
        'head_addr=${head_addr:-$head_node}',
        f"rdzv_port={slurm.rdzv_port or '$((20000 + SLURM_JOB_ID % 20000))'}",
        f"export torchrun_pids={_abs(slurm.log_dir, workdir)}/.${{SLURM_JOB_ID}}.torchrun",
    ]
    return lines


def _srun(slurm: SlurmConfig, nodes: int, nodelist: str, workdir: Path,
          overlap: bool = False) -> str:
    """An `srun` of one task per node on `nodelist` (a shell expression), in the container;
    `overlap`: beside a running step (to signal it)."""
    args = [f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1",
            f'--nodelist="{nodelist}"', "--overlap" if overlap else "--kill-on-bad-exit=1"]
    if slurm.container_image:
        args.append(f"--container-image={_q(slurm.container_image)}")
        if slurm.container_mounts:
            args.append(f"--container-mounts={_q(','.join(slurm.container_mounts))}")
        args.append(f"--container-workdir={_q(str(workdir))}")
    return "srun " + " ".join(args)


def _torchrun(slurm: SlurmConfig, nodes: int) -> list[str]:
    """torchrun for one node: SIGUSR1 ignored (it is for the ranks), its PID noted for
    `forward_stop` (the wrapper bash execs torchrun, so `$$` becomes torchrun's PID)."""
    return [
        "bash -c 'trap \"\" USR1; echo $$ >\"$torchrun_pids.$(hostname)\"; exec \"$@\"' "
        "torchrun-node",
        '"$python" -m torch.distributed.run',
        f"--nnodes={nodes} --nproc-per-node={slurm.ranks_per_node}",
        '--rdzv-backend=c10d --rdzv-endpoint="$head_addr:$rdzv_port" --rdzv-id="$SLURM_JOB_ID"',
        f"--shutdown-timeout={max(slurm.signal_lead_s, 30)}",
    ]


# `megatron-rl serve --config` loads the job's config as one process: the trainer's layout off.
_SERVE_LAYOUT = ("parallel.tp=1", "parallel.pp=1", "parallel.cp=1", "parallel.ep=1",
                 "parallel.etp=null", "parallel.dp=null", "parallel.virtual_pp=null",
                 "parallel.pp_last_stage_layers=null", "parallel.sequence_parallel=null")


def _engines_per_node(slurm: SlurmConfig) -> int:
    """Engine servers per node: SGLang's `gpus_per_node / engine_tp` (1 when an engine spans
    nodes); `megatron-rl serve` (CPU) one per `engine_tp` of the node's trainer ranks."""
    if slurm.engine_server == "megatron-rl" or slurm.gpus_per_node == 0:
        return max(1, slurm.ranks_per_node // slurm.engine_tp)
    return slurm.engines_per_node


def _engine_commands(cfg: RunConfig, slurm: SlurmConfig, colocated: bool
                     ) -> tuple[list[str], int]:
    """Server commands for the engines of one group of nodes (run via `bash -c`, with `$0` the
    group's first host and `$SLURM_PROCID` the node's rank in the group), and the group size.
    An engine wider than a node spans `engine_tp / gpus_per_node` nodes (SGLang --nnodes).
    `colocated`: beside the trainer on its GPUs, so SGLang can release its memory."""
    extra = " ".join(_q(a) for a in slurm.engine_args)
    if slurm.engine_server == "megatron-rl" or not slurm.gpus_per_node:
        sets = " ".join(f"--set {s}" for s in _SERVE_LAYOUT)
        return [f'"$python" -m megatron_rl serve --config "$config" {sets} --host 0.0.0.0 '
                f"--port {slurm.engine_port + i} {extra}".rstrip()
                for i in range(_engines_per_node(slurm))], 1
    model = slurm.engine_model_path or cfg.checkpoint.load
    if not model:
        raise ConfigError("config error: slurm.engine_model_path: SGLang engines need a Hugging "
                          "Face model to start from; set it or checkpoint.load")
    base = (f'"$python" -m sglang.launch_server --model-path {_q(model)} --tp-size '
            f"{slurm.engine_tp} --ep-size {slurm.engine_ep} --host 0.0.0.0")
    if colocated:
        base += " --enable-memory-saver"
    if slurm.engine_tp > slurm.gpus_per_node:
        group = slurm.engine_tp // slurm.gpus_per_node
        return [f'{base} --port {slurm.engine_port} --nnodes {group} --node-rank "$SLURM_PROCID"'
                f' --dist-init-addr "$0:{slurm.engine_port + 1000}" {extra}'.rstrip()], group
    cmds = []
    for i in range(_engines_per_node(slurm)):
        gpus = ",".join(str(g) for g in range(i * slurm.engine_tp, (i + 1) * slurm.engine_tp))
        cmds.append(f"CUDA_VISIBLE_DEVICES={gpus} {base} --port {slurm.engine_port + i} "
                    f"{extra}".rstrip())
    return cmds, 1


def _starts_engines(cfg: RunConfig) -> bool:
    """The job starts engine servers: on nodes of their own, or colocated on the trainer nodes
    for `rollout.engine=sglang` without given `rollout.engine_urls`."""
    slurm: SlurmConfig = cfg.slurm
    return bool(slurm.engine_nodes) or (cfg.rollout.engine == "sglang"
                                         and not cfg.rollout.engine_urls)


def _engines(cfg: RunConfig, slurm: SlurmConfig, workdir: Path) -> list[str]:
    """Engine servers on the last `engine_nodes` nodes, or with none of those on the trainer
    nodes (colocated: a step beside the trainer's, `--overlap`); their URLs, and a wait until
    healthy."""
    colocated = not slurm.engine_nodes
    cmds, group = _engine_commands(cfg, slurm, colocated)
    nodes = slurm.trainer_nodes if colocated else slurm.engine_nodes
    if nodes % group:
        raise ConfigError(f"config error: slurm.engine_tp: an engine of {slurm.engine_tp} GPUs "
                          f"spans {group} nodes, which does not divide the {nodes} nodes that "
                          "run engines", f"use a multiple of {group} nodes")
    # SIGUSR1 is for the trainer; each group's first host serves its engines' ports.
    node_cmd = 'trap "" USR1; ' + " & ".join(cmds) + " & wait"
    ports = " ".join(f'"http://${{grp[0]}}:{slurm.engine_port + i}"' for i in range(len(cmds)))
    srun = _srun(slurm, group, '$(IFS=,; echo "${grp[*]}")', workdir, overlap=colocated)
    hosts = "train_hosts" if colocated else "engine_hosts"
    return [
        f'engine_hosts=("${{hosts[@]: -{slurm.engine_nodes}}}")' if not colocated else
        "# colocated: the engines run on the trainer nodes, in a step beside the trainer's",
        f'train_hosts=("${{hosts[@]:0:{slurm.trainer_nodes}}}")',
        "engine_pids=() engine_urls=()",
        f"for ((e = 0; e < {nodes}; e += {group})); do",
        f'  grp=("${{{hosts}[@]:e:{group}}}")',
        f'  {srun} bash -c {_q(node_cmd)} "${{grp[0]}}" &',
        "  engine_pids+=($!)",
        f"  engine_urls+=({ports})",
        "done",
        'for url in "${engine_urls[@]}"; do  # engines load their weights: wait up to 30 min',
        "  for ((i = 0; i < 360; i++)); do",
        '    curl -sf "$url/health" >/dev/null && break',
        '    kill -0 "${engine_pids[@]}" || { echo "[submit] an engine exited" >&2; exit 1; }',
        "    sleep 5",
        "  done",
        '  curl -sf "$url/health" >/dev/null || { echo "[submit] $url not healthy" >&2; exit 1; }',
        "done",
        'urls_yaml="[$(IFS=,; echo "${engine_urls[*]}")]"',
        'echo "[submit] engines healthy: $urls_yaml"',
    ]


def render(cfg: RunConfig, source: str, workdir: Path) -> str:
    """The sbatch script of the training job for a config loaded by `load_job_config`."""
    slurm: SlurmConfig = cfg.slurm
    config_file = f"{_abs(slurm.log_dir, workdir)}/${{SLURM_JOB_NAME}}-${{SLURM_JOB_ID}}.yaml"
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)
    lines = ["#!/bin/bash", f"# Rendered by `megatron-rl submit` from {_oneline(source)}.",
             *_header(slurm, slurm.job_name, workdir, signal=True), ""]
    lines += _prologue(slurm, workdir)
    lines += [f"export config={config_file}", f"cat >\"$config\" <<'{CONFIG_EOF}'",
              text.rstrip("\n"), CONFIG_EOF, ""]
    train_sets = ""
    engines = _starts_engines(cfg)
    if engines:
        lines += _engines(cfg, slurm, workdir)
        # engines on nodes of their own never share the trainer's devices; colocated ones do
        # unless the config says otherwise (rollout.colocate=false: only their host)
        colocate = not slurm.engine_nodes and cfg.rollout.colocate is not False
        train_sets = (' --set rollout.engine=sglang --set "rollout.engine_urls=$urls_yaml"'
                      f" --set rollout.colocate={str(colocate).lower()}")
        nodelist = '$(IFS=,; echo "${train_hosts[*]}")'
    else:
        nodelist = '$SLURM_JOB_NODELIST'
    cmd = [_srun(slurm, slurm.trainer_nodes, nodelist, workdir),
           *_torchrun(slurm, slurm.trainer_nodes),
           f'-m megatron_rl train "$config" --resume{train_sets}']
    signal_ranks = (f"{_srun(slurm, slurm.trainer_nodes, nodelist, workdir, overlap=True)} "
                    """bash -c 'pkill -USR1 -P "$(cat "$torchrun_pids.$(hostname)")"' || true""")
    ckpt, steps = cfg.checkpoint.dir, cfg.train.steps
    lines += [
        "# SIGUSR1 (--signal=B:USR1@N, the time limit is near) reaches this shell only: pass it",
        "# to the trainer ranks alone (torchrun's children), which finish the step, save and",
        "# exit 0. Helper processes (checkpoint writers, reward workers) never see it.",
        "forward_stop() {",
        '  echo "[submit] SIGUSR1: asking the trainer ranks to checkpoint and stop"',
        f"  {signal_ranks}",
        "}",
        "trap forward_stop USR1",
        " \\\n  ".join(cmd) + " &",
        "train_pid=$!",
        'rc=0; wait "$train_pid" || rc=$?',
        'while kill -0 "$train_pid" 2>/dev/null; do rc=0; wait "$train_pid" || rc=$?; done',
        'if ((rc != 0)); then echo "[submit] trainer failed (exit $rc)" >&2; exit "$rc"; fi',
        "",
        "# Stopped early by SIGUSR1 (it saved a checkpoint): requeue to continue.",
        f"last=$(sed -n 's/^step_//p' {_q(ckpt + '/latest')} 2>/dev/null || true)",
        f"if (( ${{last:-0}} < {steps} )); then",
        f'  echo "[submit] stopped at step ${{last:-0}} of {steps}"',
        '  scontrol requeue "$SLURM_JOB_ID"' if slurm.requeue else
        '  echo "[submit] resubmit the same config to continue (it resumes)"; exit 1',
        "  exit 0",
        "fi",
        f'echo "[submit] finished {steps} steps"',
    ]
    if engines:
        lines.append('kill "${engine_pids[@]}" 2>/dev/null || true')
    return "\n".join(lines) + "\n"


def render_convert(slurm: SlurmConfig, parallel_sets: list[str], src: str, dst: str,
                   source: str, workdir: Path) -> str:
    """The sbatch script of a multi-node HF -> Megatron conversion (`megatron-rl convert`)."""
    name = f"{slurm.job_name}-convert"
    lines = ["#!/bin/bash",
             f"# Rendered by `megatron-rl submit --convert` from {_oneline(source)}.",
             *_header(slurm, name, workdir, signal=False), ""]
    lines += _prologue(slurm, workdir)
    sets = " ".join(f"--set {_q(s)}" for s in parallel_sets)
    cmd = [_srun(slurm, slurm.nodes, "$SLURM_JOB_NODELIST", workdir),
           *_torchrun(slurm, slurm.nodes),
           f"-m megatron_rl convert hf-to-mcore {_q(src)} {_q(dst)} {sets}".rstrip()]
    lines += [" \\\n  ".join(cmd)]
    return "\n".join(lines) + "\n"


def convert_layout(cfg: RunConfig) -> list[str]:
    """The parallel overrides `megatron-rl convert` needs for the config's layout."""
    par = cfg.parallel
    return [f"parallel.tp={par.tp}", f"parallel.pp={par.pp}", f"parallel.ep={par.ep}",
            f"parallel.etp={par.expert_tp}", f"parallel.cp={par.cp}"]


def sbatch(script: str, path: Path) -> str:
    """Write `script` to `path` and submit it; return the job id. Raises RuntimeError naming
    the command and its stderr when sbatch is missing or fails."""
    exe = shutil.which("sbatch")
    if exe is None:
        raise RuntimeError("`sbatch` not found on PATH: run on a Slurm login node "
                           "(or use --dry-run to print the script)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    cmd = [exe, "--parsable", str(path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): "
                           f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]


def job_workdir(path: str | None, overrides: list[str], cwd: Path) -> Path:
    """The directory the job runs in: `slurm.workdir` (relative to `cwd`), else `cwd`."""
    workdir = _slurm_section(path, overrides).workdir
    return _abs(workdir, cwd).resolve() if workdir else cwd


def build(path: str, overrides: list[str], workdir: Path,
          convert: tuple[str, str] | None = None, source: str | None = None) -> Job:
    """Render the job for the config at `path` with `overrides`: training, or with `convert`
    (SRC, DST) a conversion on the config's nodes and layout; `source` names where the config
    came from in the script (default: `path` and the overrides). Raises ConfigError."""
    source = source or " ".join([path, *(f"--set {o}" for o in overrides)])
    if convert:
        src, dst = (str(_abs(p, workdir)) for p in convert)
        cfg = load_job_config(path, overrides, workdir, all_nodes=True)
        slurm = dataclasses.replace(cfg.slurm, engine_nodes=0)
        script = render_convert(slurm, convert_layout(cfg), src, dst, source, workdir)
        name = f"{slurm.job_name}-convert"
    else:
        cfg = load_job_config(path, overrides, workdir)
        script, name = render(cfg, source, workdir), cfg.slurm.job_name
    log_dir = _abs(cfg.slurm.log_dir, workdir)
    return Job(name, script, log_dir / f"{name}.sbatch")
