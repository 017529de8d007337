"""`megatron-rl plan CONFIG`: per-GPU memory and step time of a run, on paper, before submitting.

Everything here is arithmetic on the config; nothing imports torch or Megatron, so the planner runs
anywhere. Units: params and tokens are counts, memory is bytes (printed in GiB = 2**30 bytes),
FLOPs are counts, times are seconds.

Parameter counts follow Megatron-Core's GPTModel built by `megatron_rl.actor.model` (gated MLPs,
RMSNorm, no linear biases, vocabulary padded as `padded_vocab_size` does); tests/test_plan.py checks
them against `p.numel()` of the real model on the meta device.

Memory model (one GPU, the worst pipeline stage: the first, which holds pp micro-batches in flight
under 1F1B, and the stage with the most layers):
- weights: params_dtype bytes per parameter on the GPU (tp-sharded dense part, ep*etp-sharded
  experts, embedding on the first stage, output layer on the last);
- gradients: Megatron's fp32 main-grad buffer (`grad_reduce_in_fp32`), 4 bytes per parameter;
- optimizer: fp32 master copy (bf16 params only) + Adam m and v, sharded over the data-parallel
  group (experts: the expert-data-parallel group) by the distributed optimizer, or on the host
  with `actor.optimizer_cpu_offload`;
- activations: bytes each layer keeps for backward per token (flash attention: no s^2 term;
  sequence parallel splits them over tp, context parallel over cp; Korthikanti et al. 2022,
  "Reducing Activation Recomputation in Large Transformer Models"); full recompute keeps only
  each layer's input plus one layer's working set; plus fp32 logits of the last stage;
- rollout phase (colocated): the actor's weights, gradients and GPU optimizer stay resident while
  the engine takes its `--mem-fraction-static` of the GPU for weights and KV cache; during
  training the engine's memory is released (`release_memory_occupation`).

The engine layout comes from the config's `slurm` section, the one place `megatron-rl submit`
reads it from too: `engine_tp`, `engine_ep`, `engine_nodes` (0 = colocated with the actor) and,
from `engine_args`, SGLang's `--mem-fraction-static` and `--dp-size` (with
`--enable-dp-attention`). The actor's GPUs are `(nodes - engine_nodes) * gpus_per_node`.

Step time (upper bound: every sample at actor.seq_length tokens): FLOPs at an assumed MFU of the
GPUs' peak: 2*activated*tokens for generation (at the rollout MFU: decoding is bandwidth-bound),
2*activated*tokens per old/reference log-prob forward, 6*activated*tokens for the training step
(8* with full recompute); weight sync moves the bf16 model to every engine at the link bandwidth
(NVLink colocated, InfiniBand separate): every GPU of an engine receives the whole model as
gathered HF tensors, as slime's and our bucketed weight sync do. Attention FLOPs (the s^2 term)
are left out.

Verdict: FITS when both phases fit and every setting is one the trainer path runs on the target
(`launch/support.unsupported`, checked for GPUs when the config is a GPU job, slurm.gpus_per_node
> 0, else for a machine without CUDA); otherwise DOES NOT FIT (memory) or CANNOT START, one line
per setting the trainer would refuse, followed by the memory verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from megatron_rl.actor.config import ModelConfig, padded_vocab_size
from megatron_rl.configurable import ConfigError
from megatron_rl.launch.support import Unsupported, unsupported

if TYPE_CHECKING:  # the run config imports torch; the planner needs only its fields
    from megatron_rl.config import RunConfig

GIB = 2**30


@dataclass(frozen=True, kw_only=True)
class Hardware:
    """Assumptions about the GPUs and links (H100 SXM defaults); set by CLI flags."""

    gpu_mem_gib: float = 80.0
    """Memory of one GPU (H100 SXM: 80 GB HBM3, counted here as GiB)."""
    reserve_gib: float = 4.0
    """Per-GPU memory not usable by tensors: CUDA context, NCCL buffers, fragmentation."""
    peak_tflops: float = 989.0
    """Dense bf16 peak of one GPU (H100 SXM: 989 TFLOP/s)."""
    mfu: float = 0.3
    """Model FLOP utilisation of training and log-prob forwards."""
    rollout_mfu: float = 0.1
    """Model FLOP utilisation of generation (decode is memory-bandwidth-bound)."""
    nvlink_gbs: float = 450.0
    """Per-GPU NVLink bandwidth, one direction, GB/s (H100: 900 GB/s both directions)."""
    ib_gbs: float = 50.0
    """Per-GPU inter-node bandwidth, GB/s (one 400 Gb/s NIC per GPU)."""
    gpus_per_node: int = 8
    """GPUs per node, when slurm.gpus_per_node is 0 (a CPU job)."""
    mtp_layers: int = 0
    """Multi-token-prediction layers to count (DeepSeek-V3 ships 1; RL runs drop it)."""
    engine_mem_fraction: float | None = None
    """Memory fraction of an engine; None = `--mem-fraction-static` of slurm.engine_args, else
    0.7."""


@dataclass(frozen=True)
class LayerParams:
    """Parameters of one transformer layer, split by how they are sharded."""

    dense: int
    """Attention, norms, dense or shared-expert MLP, router: sharded over tp (norms replicated)."""
    experts: int
    """All routed experts: sharded over ep*etp."""
    active_experts: int
    """The top-k routed experts one token uses."""


@dataclass(frozen=True)
class ParamCount:
    """Parameters of the whole model."""

    embedding: int
    output: int
    """Output layer (0 when tied to the embedding)."""
    final_norm: int
    dense_layer: LayerParams
    moe_layer: LayerParams | None
    n_dense: int
    n_moe: int
    mtp: int
    """Multi-token-prediction layers (0 unless counted)."""
    mtp_active: int
    """Their parameters one token passes through."""

    @property
    def total(self) -> int:
        """All parameters."""
        moe = self.moe_layer.dense + self.moe_layer.experts if self.moe_layer else 0
        return (self.embedding + self.output + self.final_norm + self.mtp
                + self.n_dense * self.dense_layer.dense + self.n_moe * moe)

    @property
    def active(self) -> int:
        """Parameters one token passes through (all but the routed experts it does not use)."""
        moe = self.moe_layer.dense + self.moe_layer.active_experts if self.moe_layer else 0
        return (self.embedding + self.output + self.final_norm + self.mtp_active
                + self.n_dense * self.dense_layer.dense + self.n_moe * moe)


def attention_params(m: ModelConfig) -> int:
    """One attention block: GQA (fused QKV) or MLA (q/kv LoRA with their norms)."""
    h, heads = m.hidden_size, m.num_attention_heads
    norms = m.qk_layernorm
    if m.multi_latent_attention:
        qk = m.qk_head_dim + m.qk_pos_emb_head_dim
        if m.q_lora_rank is None:
            q = h * heads * qk
        else:
            q = h * m.q_lora_rank + m.q_lora_rank * heads * qk + norms * m.q_lora_rank
        kv = (h * (m.kv_lora_rank + m.qk_pos_emb_head_dim)
              + m.kv_lora_rank * heads * (m.qk_head_dim + m.v_head_dim) + norms * m.kv_lora_rank)
        return q + kv + heads * m.v_head_dim * h
    d = m.kv_channels or h // heads
    qkv_out = (heads + 2 * (m.num_query_groups or heads)) * d
    return h * qkv_out + m.add_qkv_bias * qkv_out + 2 * norms * d + heads * d * h


def layer_params(m: ModelConfig, moe: bool) -> LayerParams:
    """One transformer layer: two RMSNorms, attention, and a gated dense MLP or an MoE block."""
    h = m.hidden_size
    dense = 2 * h + attention_params(m)
    if not moe:
        return LayerParams(dense + 3 * h * m.ffn_hidden_size, 0, 0)
    expert = 3 * h * (m.moe_ffn_hidden_size or m.ffn_hidden_size)
    shared = 3 * h * (m.moe_shared_expert_intermediate_size or 0)
    router = m.num_experts * h  # the expert bias is a buffer, not a parameter
    return LayerParams(dense + shared + router, m.num_experts * expert,
                       m.moe_router_topk * expert)


def moe_pattern(m: ModelConfig) -> list[int]:
    """One 0 (dense) / 1 (MoE) per layer, as Megatron reads `moe_layer_freq`."""
    if m.num_experts == 0:
        return [0] * m.num_layers
    freq = m.moe_layer_freq
    if isinstance(freq, int):
        return [1 if i % freq == 0 else 0 for i in range(m.num_layers)]
    return list(freq)


def count_params(m: ModelConfig, mtp_layers: int = 0) -> ParamCount:
    """Parameters of the model at tp=1, total and activated."""
    pattern = moe_pattern(m)
    vocab = padded_vocab_size(m.vocab_size, 1)
    moe = layer_params(m, True) if m.num_experts else None
    # A Megatron MTP layer: two norms, the 2h->h projection, one (MoE) layer, a final norm;
    # embedding and output layer are shared with the main model.
    mtp_base = 3 * m.hidden_size + 2 * m.hidden_size**2
    last = moe or layer_params(m, False)
    return ParamCount(
        embedding=vocab * m.hidden_size,
        output=0 if m.tie_embeddings else vocab * m.hidden_size,
        final_norm=m.hidden_size,
        dense_layer=layer_params(m, False),
        moe_layer=moe,
        n_dense=pattern.count(0),
        n_moe=pattern.count(1),
        mtp=mtp_layers * (mtp_base + last.dense + last.experts),
        mtp_active=mtp_layers * (mtp_base + last.dense + last.active_experts),
    )


# --------------------------------------------------------------------------------------------
# Memory per GPU
# --------------------------------------------------------------------------------------------


def activation_bytes(m: ModelConfig, moe: bool) -> tuple[int, int]:
    """Bytes one layer keeps for backward per token, bf16, before any split, as
    (hidden-sized part: split by sequence parallel; head/ffn-sized part: split by tp)."""
    h, heads = m.hidden_size, m.num_attention_heads
    hidden = 4 * h  # input_layernorm input, QKV input
    if m.multi_latent_attention:
        qk = m.qk_head_dim + m.qk_pos_emb_head_dim
        low_rank = 4 * (m.q_lora_rank or 0) + 4 * m.kv_lora_rank + 2 * m.qk_pos_emb_head_dim
        split = 2 * heads * (2 * qk + 2 * m.v_head_dim)  # q, k, v, attention output
        hidden += low_rank  # the down-projections are not tp-split
    else:
        d = m.kv_channels or h // heads
        split = 2 * (heads + 2 * (m.num_query_groups or heads)) * d + 2 * heads * d
    hidden += 4 * h  # pre_mlp_layernorm input, MLP/router input
    if not moe:
        return hidden, split + 6 * m.ffn_hidden_size  # fc1 output (gate, up), SwiGLU output
    expert = m.moe_ffn_hidden_size or m.ffn_hidden_size
    hidden += m.moe_router_topk * 4 * h  # permuted tokens in, expert outputs back
    split += m.moe_router_topk * 6 * expert + 6 * (m.moe_shared_expert_intermediate_size or 0)
    return hidden, split


@dataclass(frozen=True)
class Layout:
    """The parallel layout and batching the memory model needs."""

    tp: int
    pp: int
    cp: int
    ep: int
    etp: int
    dp: int
    sp: bool
    stage_layers: list[int]
    """Layers of each pipeline stage."""
    micro_batch_tokens: int
    """Tokens of one micro-batch (micro_batch_size * seq_length)."""
    n_micro: int
    """Micro-batches per step on one data-parallel rank."""
    recompute: str

    @property
    def world(self) -> int:
        """Actor GPUs."""
        return self.tp * self.pp * self.cp * self.dp


@dataclass(frozen=True)
class StageMemory:
    """Bytes on one GPU of one pipeline stage."""

    stage: int
    params: float
    weights: float
    grads: float
    optimizer: float
    """On the GPU (0 when offloaded)."""
    optimizer_host: float
    """On the host, per GPU (when offloaded)."""
    activations: float
    logits: float

    @property
    def train(self) -> float:
        """Peak of the training phase."""
        return self.weights + self.grads + self.optimizer + self.activations + self.logits

    @property
    def resident(self) -> float:
        """What the actor keeps on the GPU while the engine generates."""
        return self.weights + self.grads + self.optimizer


def stage_memory(m: ModelConfig, counts: ParamCount, lay: Layout, stage: int,
                 params_bytes: int, adam: bool, offload: bool, distributed: bool) -> StageMemory:
    """Memory of one GPU of pipeline stage `stage` (see the module docstring for the model)."""
    pattern = moe_pattern(m)
    start = sum(lay.stage_layers[:stage])
    kinds = pattern[start:start + lay.stage_layers[stage]]
    vocab = padded_vocab_size(m.vocab_size, lay.tp)
    first, last = stage == 0, stage == lay.pp - 1
    dense = sum(counts.moe_layer.dense if k else counts.dense_layer.dense for k in kinds) / lay.tp
    if counts.moe_layer is not None:
        experts = kinds.count(1) * counts.moe_layer.experts / (lay.ep * lay.etp)
    else:
        experts = 0
    embed = vocab * m.hidden_size / lay.tp
    dense += embed * first + (embed * (not m.tie_embeddings or lay.pp > 1) + m.hidden_size) * last
    params = dense + experts
    # fp32 master (only for bf16 params) + Adam m, v (SGD: a momentum buffer).
    state = (4 if params_bytes == 2 else 0) + (8 if adam else 4)
    edp = lay.world // (lay.ep * lay.etp * lay.pp)
    shards = (lay.dp * lay.cp, edp) if distributed else (1, 1)
    opt = state * (dense / shards[0] + experts / shards[1])
    tokens = lay.micro_batch_tokens / lay.cp
    per_layer = [(hid / (lay.tp if lay.sp else 1) + split / lay.tp) * tokens
                 for hid, split in (activation_bytes(m, bool(k)) for k in kinds)]
    in_flight = min(lay.pp - stage, lay.n_micro)
    if lay.recompute == "full":  # each layer's input per micro-batch in flight + one layer
        inputs = 2 * m.hidden_size * tokens / (lay.tp if lay.sp else 1)
        act = in_flight * inputs * len(kinds) + max(per_layer)
    else:
        act = in_flight * sum(per_layer)
    logits = 6 * tokens * vocab / lay.tp * last  # bf16 logits + their fp32 copy
    return StageMemory(stage, params, params_bytes * params, 4 * params,
                       0.0 if offload else opt, opt if offload else 0.0, act, logits)


def kv_bytes_per_token(m: ModelConfig, attn_tp: int) -> int:
    """KV cache bytes of one token on one GPU of an engine whose attention is split attn_tp ways
    (bf16; MLA caches the compressed latent and the RoPE key, replicated across attn_tp)."""
    if m.multi_latent_attention:
        return m.num_layers * (m.kv_lora_rank + m.qk_pos_emb_head_dim) * 2
    d = m.kv_channels or m.hidden_size // m.num_attention_heads
    groups = m.num_query_groups or m.num_attention_heads
    return 2 * m.num_layers * -(-groups // attn_tp) * d * 2


# --------------------------------------------------------------------------------------------
# The plan of a run config
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """Per-GPU memory of both phases and the step-time estimate of one config."""

    counts: ParamCount
    layout: Layout
    hw: Hardware
    worst: StageMemory
    """The pipeline stage with the largest training-phase peak."""
    engine: EngineLayout
    engine_weights: float
    """Engine weight bytes per GPU (bf16, split over engine_tp)."""
    engine_pool: float
    """Bytes the engine takes per GPU: weights + KV cache."""
    kv_tokens: float
    """Tokens of full-length sequences the KV cache of one engine holds."""
    step_tokens: int
    """Tokens generated and trained on per step (upper bound: every sample at seq_length)."""
    seq_length: int
    times: dict[str, float]
    """Seconds per phase of one step."""
    sync_bytes: float
    unsupported: tuple[Unsupported, ...] = ()
    """Settings the trainer path would refuse on the target (`launch/support.py`)."""

    @property
    def capacity(self) -> float:
        """Usable bytes per GPU."""
        return (self.hw.gpu_mem_gib - self.hw.reserve_gib) * GIB

    @property
    def rollout_peak(self) -> float:
        """Peak of the generation phase on a GPU that runs an engine."""
        return self.engine_pool + (self.worst.resident if self.engine.colocated else 0.0)

    @property
    def spare(self) -> dict[str, float]:
        """Bytes left per phase (negative: over)."""
        return {"train": self.capacity - self.worst.train,
                "rollout": self.capacity - self.rollout_peak}

    @property
    def fits(self) -> bool:
        """Both phases fit, and the KV cache holds at least one full-length sequence (memory
        only: `can_start` says whether the trainer would run the config at all)."""
        return min(self.spare.values()) >= 0 and self.kv_tokens >= self.seq_length

    @property
    def can_start(self) -> bool:
        """No setting the trainer path would refuse."""
        return not self.unsupported


def _stage_layers(num_layers: int, pp: int, last: int | None) -> list[int]:
    if last is None:
        return [num_layers // pp] * pp
    return [(num_layers - last) // (pp - 1)] * (pp - 1) + [last]


@dataclass(frozen=True)
class EngineLayout:
    """Where and how the rollout engines run."""

    tp: int
    """GPUs per engine."""
    ep: int
    dp: int
    """DP-attention groups inside one engine (1 = off)."""
    mem_fraction: float
    gpus: int
    """GPUs running engines."""
    colocated: bool

    @property
    def count(self) -> int:
        """Engines."""
        return self.gpus // self.tp


def _engine_arg(args: list[str], name: str) -> str | None:
    """The value of `--name V` or `--name=V` in an argument list."""
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def engine_layout(cfg: RunConfig, actor_gpus: int, mem_fraction: float | None) -> EngineLayout:
    """The engines of `cfg.slurm` (one 1-GPU engine per actor GPU without GPUs in it)."""
    slurm = cfg.slurm
    args = list(slurm.engine_args)
    try:
        frac = mem_fraction or float(_engine_arg(args, "--mem-fraction-static") or 0.7)
        dp = int(_engine_arg(args, "--dp-size") or 1) if "--enable-dp-attention" in args else 1
    except ValueError:
        raise ConfigError("config error: slurm.engine_args: --mem-fraction-static or --dp-size "
                          "is not a number; write e.g. ['--mem-fraction-static', '0.7']") from None
    tp, ep = slurm.engine_tp, slurm.engine_ep
    separate = slurm.engine_nodes > 0 and slurm.gpus_per_node > 0
    gpus = slurm.engine_nodes * slurm.gpus_per_node if separate else actor_gpus
    for ok, key, problem, fix in (
            (gpus % tp == 0, "slurm.engine_tp", f"{tp} does not divide the {gpus} engine GPUs",
             f"use a divisor of {gpus}"),
            (tp % dp == 0, "slurm.engine_args", f"--dp-size {dp} does not divide engine_tp={tp}",
             "use a divisor of engine_tp"),
            (0 < frac < 1, "slurm.engine_args", f"--mem-fraction-static {frac} is not in (0, 1)",
             "e.g. 0.7")):
        if not ok:
            raise ConfigError(f"config error: {key}: {problem}; {fix}", key, problem, fix)
    return EngineLayout(tp, ep, dp, frac, gpus, not separate)


def make_plan(cfg: RunConfig, hw: Hardware) -> Plan:
    """Plan a resolved `RunConfig` on `hw`."""
    m, par, actor, ro = cfg.model, cfg.parallel, cfg.actor, cfg.rollout
    counts = count_params(m, hw.mtp_layers)
    samples = ro.prompts_per_step * ro.n_samples_per_prompt
    lay = Layout(par.tp, par.pp, par.cp, par.ep, par.expert_tp, par.dp, bool(par.sequence_parallel),
                 _stage_layers(m.num_layers, par.pp, par.pp_last_stage_layers),
                 actor.micro_batch_size * actor.seq_length,
                 max(1, -(-samples // (par.dp * actor.micro_batch_size))), actor.recompute)
    params_bytes = 2 if actor.params_dtype == "bfloat16" else 4
    stages = [stage_memory(m, counts, lay, s, params_bytes, actor.optimizer == "adam",
                           actor.optimizer_cpu_offload, actor.use_distributed_optimizer)
              for s in range(par.pp)]
    worst = max(stages, key=lambda s: s.train)
    eng = engine_layout(cfg, lay.world, hw.engine_mem_fraction)
    engine_weights = 2 * counts.total / eng.tp
    pool = eng.mem_fraction * hw.gpu_mem_gib * GIB
    attn_tp = eng.tp // eng.dp
    per_token = kv_bytes_per_token(m, attn_tp)  # on each of the attn_tp GPUs holding the token
    kv_tokens = max(0.0, pool - engine_weights) * eng.tp / (per_token * attn_tp)
    step_tokens = samples * actor.seq_length
    sync_bytes = 2.0 * counts.total
    flops = 2.0 * counts.active * step_tokens
    peak = hw.peak_tflops * 1e12
    forwards = 1 + (cfg.algorithm.kl_coef > 0)  # old log-probs (+ reference)
    train_factor = 4 if actor.recompute == "full" else 3  # fwd+bwd = 3 forwards; +1 recompute
    link = hw.nvlink_gbs if eng.colocated else hw.ib_gbs
    times = {
        "generate": flops * ro.over_sampling / (peak * hw.rollout_mfu * eng.gpus),
        "log-probs": forwards * flops / (peak * hw.mfu * lay.world),
        "train": train_factor * flops / (peak * hw.mfu * lay.world),
        "weight sync": sync_bytes / (link * 1e9),
    }
    refused = tuple(unsupported(cfg, cuda=cfg.slurm.gpus_per_node > 0))
    return Plan(counts, lay, hw, worst, eng, engine_weights, pool, kv_tokens,
                step_tokens, actor.seq_length, times, sync_bytes, refused)


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def _b(n: float) -> str:
    """A count with its unit: 671.03 B, 3.35 M, 12.0 k."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f}"


def _row(label: str, train: float | None, rollout: float | None, note: str = "") -> str:
    cells = ["-" if v is None else f"{v / GIB:.2f}" for v in (train, rollout)]
    return f"  {label:<34}{cells[0]:>9}{cells[1]:>9}  {note}".rstrip()


def _header(plan: Plan, cfg: RunConfig, path: str) -> list[str]:
    lay, hw, eng, c = plan.layout, plan.hw, plan.engine, plan.counts
    stages = ",".join(map(str, lay.stage_layers))
    mtp = f"incl. {hw.mtp_layers} MTP layer(s)" if hw.mtp_layers else "MTP not counted"
    nodes = max(1, -(-lay.world // hw.gpus_per_node))
    return [
        f"{'megatron-rl plan'} {path}",
        f"model    {_b(c.total)} params, {_b(c.active)} activated per token ({mtp})",
        f"actor    {lay.world} GPUs ({nodes} node(s) x {hw.gpus_per_node}): tp {lay.tp}"
        f"{' (sp)' if lay.sp else ''}, pp {lay.pp} [{stages} layers], cp {lay.cp}, ep {lay.ep}, "
        f"etp {lay.etp}, dp {lay.dp}; micro-batch {lay.micro_batch_tokens} tokens, "
        f"{lay.n_micro} per dp rank per step; recompute {lay.recompute}",
        f"engines  {eng.count} x {eng.tp} GPU(s) (tp {eng.tp}, ep {eng.ep}, dp-attention "
        f"{eng.dp}), {'colocated' if eng.colocated else 'on their own nodes'}, "
        f"{eng.mem_fraction:.2f} of each GPU ({cfg.rollout.engine} engine)",
        f"assume   {hw.gpu_mem_gib:g} GiB per GPU ({hw.reserve_gib:g} reserved), "
        f"{hw.peak_tflops:g} TFLOP/s bf16, MFU {hw.mfu:.2f} train / {hw.rollout_mfu:.2f} "
        f"generation, NVLink {hw.nvlink_gbs:g} GB/s, IB {hw.ib_gbs:g} GB/s per GPU",
    ]


def _memory_rows(plan: Plan, cfg: RunConfig) -> list[str]:
    w, hw = plan.worst, plan.hw
    dtype = "bf16" if cfg.actor.params_dtype == "bfloat16" else "fp32"
    res = (lambda v: v) if plan.engine.colocated else (lambda v: None)
    host = (f"host: {w.optimizer_host * hw.gpus_per_node / GIB:.1f} GiB per node"
            if cfg.actor.optimizer_cpu_offload else "")
    kv = plan.engine_pool - plan.engine_weights
    opt = ("master+" if dtype == "bf16" else "") + (
        "Adam" if cfg.actor.optimizer == "adam" else "momentum")
    shard = ", on host" if cfg.actor.optimizer_cpu_offload else (
        ", sharded" if cfg.actor.use_distributed_optimizer else "")
    train, roll = plan.worst.train, plan.rollout_peak
    return [
        f"{f'memory per GPU, GiB (stage {w.stage + 1}/{plan.layout.pp})':<36}{'train':>9}"
        f"{'rollout':>9}",
        _row(f"weights ({dtype})", w.weights, res(w.weights)),
        _row("gradients (fp32)", w.grads, res(w.grads)),
        _row(f"optimizer ({opt}{shard})", w.optimizer, res(w.optimizer), host),
        _row(f"activations (recompute {plan.layout.recompute})", w.activations, None),
        _row("logits (bf16 + fp32)", w.logits, None),
        _row("engine weights (bf16)", None, plan.engine_weights),
        _row("engine KV cache", None, kv, f"{_b(plan.kv_tokens)} tokens per engine"),
        _row("total", train, roll),
        _row(f"usable ({hw.gpu_mem_gib:g} - {hw.reserve_gib:g})", plan.capacity,
             plan.capacity),
        _row("spare", plan.spare["train"], plan.spare["rollout"]),
    ]


def _memory_verdict(plan: Plan) -> str:
    """Fits, or does not fit and by how many GiB (without the leading word)."""
    spare = plan.spare
    seqs = plan.kv_tokens * plan.engine.count / plan.step_tokens
    kv = (f"the KV caches hold {min(seqs, 1.0):.0%} of the step's sequences at full length"
          if plan.kv_tokens >= plan.seq_length else
          f"the KV cache cannot hold one {plan.seq_length}-token sequence: lower the engine's "
          f"weights per GPU (slurm.engine_tp) or raise --mem-fraction-static in "
          f"slurm.engine_args")
    if plan.fits:
        return (f"FITS: {spare['train'] / GIB:.2f} GiB spare in training, "
                f"{spare['rollout'] / GIB:.2f} GiB in generation; {kv}")
    over = [f"{phase} by {-v / GIB:.2f} GiB" for phase, v in spare.items() if v < 0]
    return f"DOES NOT FIT: over in {', '.join(over) or 'no phase'}; {kv}"


def verdict(plan: Plan) -> str:
    """`verdict  FITS: ...` or `verdict  DOES NOT FIT: ...` (memory); when a setting cannot
    start, one `verdict  CANNOT START: key=value: why; fix` line per setting, then the memory's
    verdict on a `memory` line (lower case: it is not the verdict)."""
    memory = _memory_verdict(plan)
    if plan.can_start:
        return f"verdict  {memory}"
    head, _, rest = memory.partition(":")
    lines = [f"verdict  CANNOT START: {item}" for item in plan.unsupported]
    return "\n".join([*lines, f"memory   {head.lower()}:{rest}"])


def render(plan: Plan, cfg: RunConfig, path: str) -> str:
    """The whole report as text."""
    c, t = plan.counts, plan.times
    lines = _header(plan, cfg, path)
    if cfg.rollout.engine != "sglang" or not cfg.slurm.gpus_per_node:
        lines.append("note     a CPU config (no slurm.gpus_per_node, or the embedded engine): the "
                     "figures show what it would take on the GPUs assumed"
                     + ("" if cfg.slurm.gpus_per_node else "; its settings are checked for a "
                        "machine without CUDA"))
    lines += [""] + _memory_rows(plan, cfg) + [verdict(plan), ""]
    samples = cfg.rollout.prompts_per_step * cfg.rollout.n_samples_per_prompt
    lines.append(f"step time, s (upper bound: {samples} samples x {plan.seq_length} tokens = "
                 f"{plan.step_tokens / 1e6:.2f}M tokens)")
    link = "NVLink" if plan.engine.colocated else "InfiniBand"
    notes = {
        "generate": f"2 x {_b(c.active)} x tokens x {cfg.rollout.over_sampling:g} on "
                    f"{plan.engine.gpus} GPUs at MFU {plan.hw.rollout_mfu:.2f}",
        "log-probs": f"{1 + (cfg.algorithm.kl_coef > 0)} forward(s) (old"
                     f"{', reference' if cfg.algorithm.kl_coef > 0 else ''}) at MFU "
                     f"{plan.hw.mfu:.2f}",
        "train": f"{'8' if plan.layout.recompute == 'full' else '6'} x {_b(c.active)} x tokens "
                 f"on {plan.layout.world} GPUs",
        "weight sync": f"{plan.sync_bytes / 1e9:.1f} GB bf16 to every engine GPU over {link}",
    }
    lines += [f"  {k:<12}{v:>10.3g}  {notes[k]}" for k, v in t.items()]
    lines.append(f"  {'total':<12}{sum(t.values()):>10.3g}  (phases run one after another)")
    return "\n".join(lines)
