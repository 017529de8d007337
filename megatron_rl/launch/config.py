"""Config section owned by launch: how `megatron-rl submit` runs a config on a Slurm cluster."""

import re
from dataclasses import field
from typing import Literal

from megatron_rl.configurable import require, require_non_negative, require_positive, section

# Slurm's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S.
_TIME = re.compile(r"^(\d+-\d+(:\d+){0,2}|\d+(:\d+){0,2})$")
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
_VAR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@section
class SlurmConfig:
    """The sbatch job: allocation, software environment, logs, preemption and engine placement.

    The trainer runs on the first `nodes - engine_nodes` nodes, one `torchrun` per node with
    `nproc_per_node` ranks; its TP/PP/EP/CP/DP must fit that world size (checked at submit).
    """

    job_name: str = "megatron-rl"
    """Slurm job name; also keys the run's directories (`<run_dir>/<job_name>/`), so a requeued
    or resubmitted job of the same name resumes from its checkpoints."""
    nodes: int = 1
    """Nodes of the job: trainer and engine nodes together."""
    gpus_per_node: int = 0
    """GPUs per node (--gpus-per-node); 0 = a CPU job."""
    nproc_per_node: int | None = None
    """Trainer ranks per node; None = gpus_per_node (1 on a CPU job)."""
    cpus_per_task: int | None = None
    """CPUs for each node's task (--cpus-per-task); None = Slurm's default."""
    mem: str | None = None
    """Memory per node (--mem), e.g. '0' (all of it) or '200G'; None = Slurm's default."""
    partition: str | None = None
    """Partition (--partition); None = the cluster's default."""
    account: str | None = None
    """Account to charge (--account); None = the user's default."""
    time: str | None = None
    """Time limit (--time), e.g. '04:00:00' or '2-00:00:00'; None = the partition's limit."""
    container_image: str | None = None
    """Container image for the tasks (pyxis/enroot `srun --container-image`); None = none."""
    container_mounts: list[str] = field(default_factory=list)
    """Container mounts, `SRC:DST` each (pyxis `--container-mounts`)."""
    venv: str | None = ".venv"
    """Virtual environment whose python runs the job (relative to workdir, or absolute);
    None = `python3` on PATH (e.g. the container's)."""
    workdir: str | None = None
    """Directory the job runs in (--chdir); None = the directory `submit` is run from."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run first in the batch script (e.g. `module load cuda/12.4`)."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables exported to every task (e.g. NCCL_IB_HCA)."""
    extra_sbatch: list[str] = field(default_factory=list)
    """Further sbatch options, one per #SBATCH line, e.g. ['--qos=high', '--exclusive']."""
    log_dir: str = "outputs/slurm/logs"
    """Where the job writes its output (`%x-%j.out`: job name and id) and its scripts."""
    run_dir: str = "outputs/slurm"
    """Root of the job's checkpoints, outputs and tensorboard (`<run_dir>/<job_name>/...`)."""
    signal_lead_s: int = 120
    """Seconds before the time limit at which Slurm sends SIGUSR1 (`--signal=USR1@N`): the
    trainer finishes its step, saves and the job requeues itself; 0 = no signal."""
    requeue: bool = True
    """Requeue on preemption or node failure (--requeue), and after a time-limit stop."""
    rdzv_port: int | None = None
    """torchrun rendezvous port on the head node; None = 20000 + job id % 20000 (jobs sharing
    a node do not clash)."""
    engine_nodes: int = 0
    """Nodes of their own for rollout engines (the last ones of the job); 0 = colocated."""
    engine_server: Literal["sglang", "megatron-rl"] = "sglang"
    """Server on engine nodes: SGLang's HTTP server (GPUs), or `megatron-rl serve` (CPU)."""
    engine_tp: int = 1
    """GPUs per SGLang engine (its --tp-size): gpus_per_node / engine_tp engines per node, or
    one engine over engine_tp / gpus_per_node nodes."""
    engine_ep: int = 1
    """Expert parallel size inside one SGLang engine (its --ep-size)."""
    engine_port: int = 30000
    """Port of the first engine on a node; further engines on the node take the next ports."""
    engine_model_path: str | None = None
    """Hugging Face model directory the engines load at start; None = checkpoint.load."""
    engine_args: list[str] = field(default_factory=list)
    """Extra arguments for the engine server, e.g. ['--mem-fraction-static', '0.8']."""

    @property
    def ranks_per_node(self) -> int:
        """Trainer ranks per node."""
        return self.nproc_per_node or self.gpus_per_node or 1

    @property
    def trainer_nodes(self) -> int:
        """Nodes running the trainer."""
        return self.nodes - self.engine_nodes

    @property
    def engines_per_node(self) -> int:
        """Engine servers per engine node (1 also when an engine spans nodes)."""
        if self.engine_server == "megatron-rl" or self.gpus_per_node == 0:
            return 1
        return max(1, self.gpus_per_node // self.engine_tp)

    def validate(self) -> None:
        """Counts and ports in range, names usable in paths, engines that fit their nodes."""
        require(bool(_NAME.match(self.job_name)), "job_name", f"{self.job_name!r} is not a "
                "plain name", "use letters, digits, '.', '_' and '-' (it names directories)")
        require_positive(self, "nodes", "engine_tp", "engine_ep")
        require_non_negative(self, "gpus_per_node", "signal_lead_s", "engine_nodes")
        for name in ("nproc_per_node", "cpus_per_task"):
            value = getattr(self, name)
            require(value is None or value >= 1, name, f"must be >= 1, got {value}",
                    "or null for the default")
        require(self.time is None or bool(_TIME.match(self.time)), "time",
                f"{self.time!r} is not a Slurm time", "e.g. '04:00:00', '90' or '2-00:00:00'")
        for name in ("rdzv_port", "engine_port"):
            port = getattr(self, name)
            require(port is None or 1024 <= port <= 65535, name, f"port {port} out of range",
                    "use 1024..65535")
        require(all(":" in m for m in self.container_mounts), "container_mounts",
                "each mount is SRC:DST", "e.g. ['/lustre:/lustre']")
        require(all(_VAR.match(k) for k in self.env), "env",
                "has a name that is not a shell variable", "use names like NCCL_DEBUG")
        require(self.engine_nodes < self.nodes, "engine_nodes",
                f"{self.engine_nodes} leaves no trainer node of {self.nodes}",
                f"use engine_nodes < nodes, or nodes > {self.engine_nodes}")
        if self.engine_nodes and self.engine_server == "sglang":
            require(self.gpus_per_node > 0, "engine_server", "SGLang needs GPUs",
                    "set slurm.gpus_per_node, or engine_server=megatron-rl on CPU")
            per, gpus = self.engine_tp, self.gpus_per_node
            require(gpus % per == 0 or per % gpus == 0, "engine_tp",
                    f"{per} neither divides nor is a multiple of gpus_per_node={gpus}",
                    "an engine takes part of a node or whole nodes")
            span = max(1, per // gpus)
            require(self.engine_nodes % span == 0, "engine_nodes",
                    f"{self.engine_nodes} is not a multiple of the {span} nodes one engine "
                    f"spans (engine_tp={per})", f"use a multiple of {span}")
        require(self.engine_tp % self.engine_ep == 0 or self.engine_server != "sglang",
                "engine_ep", f"{self.engine_ep} does not divide engine_tp={self.engine_tp}",
                "SGLang's expert parallel splits the engine's tensor-parallel GPUs")
