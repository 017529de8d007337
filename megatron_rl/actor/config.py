"""Config sections owned by the actor: model shape, parallel layout, optimizer, checkpoints.

Only field-level checks live here; checks that combine sections (e.g. heads divisible by tp)
run in `megatron_rl.config.load_config`. Translation to Megatron-Core's `TransformerConfig`
happens in exactly one place in the actor, not here.
"""

import dataclasses
import math
from typing import Literal

from megatron_rl.configurable import (
    divisors,
    one_of,
    require,
    require_non_negative,
    require_positive,
    section,
)


@section
class ModelConfig:
    """Transformer (optionally MoE) architecture, named as in Megatron-Core."""

    hf_architecture: str | None = None
    """Hugging Face architecture the weights map to (megatron_rl.convert name, e.g. qwen3_moe):
    needed for HF export and weight sync to rollout engines; set by conversion from HF."""
    vocab_size: int = 512
    """Tokenizer vocabulary size (Megatron pads it for TP internally)."""
    hidden_size: int = 64
    """Model width."""
    num_layers: int = 2
    """Number of transformer layers."""
    num_attention_heads: int = 4
    """Query heads per layer."""
    num_query_groups: int | None = None
    """Key/value heads for GQA; None = num_attention_heads (plain multi-head attention)."""
    kv_channels: int | None = None
    """Head dimension; None = hidden_size / num_attention_heads."""
    ffn_hidden_size: int = 256
    """Intermediate size of the dense MLP (dense layers of an MoE model too)."""
    max_position_embeddings: int = 512
    """Longest sequence the rotary embedding is sized for."""
    rotary_base: float = 10000.0
    """RoPE base (theta)."""
    norm_epsilon: float = 1e-6
    """RMSNorm epsilon."""
    add_qkv_bias: bool = False
    """Bias on the QKV projection (Qwen2 style)."""
    qk_layernorm: bool = False
    """RMSNorm on queries and keys per head (Qwen3 style)."""
    tie_embeddings: bool = False
    """Share the input embedding with the output layer."""
    init_method_std: float = 0.02
    """Std of the normal init for freshly initialised weights."""
    num_experts: int = 0
    """Routed experts per MoE layer; 0 = dense model."""
    moe_ffn_hidden_size: int | None = None
    """Intermediate size of one routed expert; None = ffn_hidden_size."""
    moe_router_topk: int = 2
    """Experts each token is routed to."""
    moe_shared_expert_intermediate_size: int | None = None
    """Total intermediate size of the shared expert(s); None = no shared expert."""
    moe_router_score_function: Literal["softmax", "sigmoid"] = "softmax"
    """Router score function (DeepSeek-V3 uses sigmoid)."""
    moe_router_load_balancing_type: Literal["aux_loss", "seq_aux_loss", "none"] = "aux_loss"
    """Load-balancing loss kind."""
    moe_aux_loss_coeff: float = 0.0
    """Weight of the load-balancing loss; 0 = off."""
    moe_router_enable_expert_bias: bool = False
    """Aux-loss-free balancing with a per-expert bias (DeepSeek-V3); needs sigmoid scores."""
    moe_router_bias_update_rate: float = 1e-3
    """Step size of the expert-bias update."""
    moe_router_num_groups: int | None = None
    """Expert groups for group-limited routing (DeepSeek-V3 node-limited); None = off."""
    moe_router_group_topk: int | None = None
    """Groups each token may use under group-limited routing."""
    moe_router_topk_scaling_factor: float | None = None
    """Scale applied to the top-k routing weights; None = 1."""
    moe_router_pre_softmax: bool = False
    """Softmax before top-k (required by Megatron for top-1 softmax routing)."""
    moe_layer_freq: int | list[int] = 1
    """Which layers are MoE: int k = every k-th layer; list = one 0/1 per layer (as Megatron)."""
    moe_token_dispatcher_type: Literal["alltoall", "allgather"] = "alltoall"
    """How tokens reach their experts across the expert-parallel group."""
    multi_latent_attention: bool = False
    """DeepSeek-V2/V3 multi-latent attention (MLA) instead of grouped-query attention."""
    q_lora_rank: int | None = None
    """MLA: rank of the query down-projection; None = a full query projection."""
    kv_lora_rank: int = 512
    """MLA: rank of the compressed key/value."""
    qk_head_dim: int = 128
    """MLA: per-head query/key size without RoPE (HF qk_nope_head_dim)."""
    qk_pos_emb_head_dim: int = 64
    """MLA: per-head query/key size that carries RoPE (HF qk_rope_head_dim)."""
    v_head_dim: int = 128
    """MLA: per-head value size."""
    rope_scaling: Literal["none", "yarn"] = "none"
    """RoPE scaling (YaRN as in DeepSeek-V3; MLA only)."""
    rope_scaling_factor: float = 1.0
    """YaRN: context extension factor."""
    rope_original_max_position_embeddings: int = 4096
    """YaRN: context length of pre-training before extension."""
    yarn_beta_fast: float = 32.0
    """YaRN: high-frequency boundary."""
    yarn_beta_slow: float = 1.0
    """YaRN: low-frequency boundary."""
    yarn_mscale: float = 1.0
    """YaRN: attention temperature coefficient of the rotary embedding."""
    yarn_mscale_all_dim: float = 0.0
    """YaRN: coefficient applied to the softmax scale of all dimensions."""

    def validate(self) -> None:
        """Field-level checks; the messages name the field and the fix."""
        require_positive(self, "vocab_size", "hidden_size", "num_layers", "num_attention_heads",
                         "num_query_groups", "kv_channels", "ffn_hidden_size",
                         "max_position_embeddings", "rotary_base", "norm_epsilon",
                         "init_method_std")
        groups = self.num_query_groups or self.num_attention_heads
        require(self.num_attention_heads % groups == 0, "num_query_groups",
                f"num_attention_heads={self.num_attention_heads} is not divisible by {groups}",
                f"choose one of {one_of(divisors(self.num_attention_heads))}")
        if self.kv_channels is None:
            require(self.hidden_size % self.num_attention_heads == 0, "num_attention_heads",
                    f"hidden_size={self.hidden_size} is not divisible by "
                    f"{self.num_attention_heads} heads",
                    f"choose one of {one_of(divisors(self.hidden_size))} or set kv_channels")
        self._validate_layer_freq()
        if self.multi_latent_attention:
            require_positive(self, "q_lora_rank", "kv_lora_rank", "qk_head_dim",
                             "qk_pos_emb_head_dim", "v_head_dim")
        require(self.rope_scaling == "none" or self.multi_latent_attention, "rope_scaling",
                "YaRN scaling is mapped for multi-latent attention only",
                "set rope_scaling=none or multi_latent_attention=true")
        # No silent settings: fields only one attention/RoPE kind reads keep their defaults.
        if not self.multi_latent_attention:
            _require_default(self, _MLA_FIELDS, "multi_latent_attention=true")
        if self.rope_scaling == "none":
            _require_default(self, _YARN_FIELDS, "rope_scaling=yarn")
        require_non_negative(self, "num_experts")
        if self.num_experts > 0:
            self._validate_moe()

    def _validate_layer_freq(self) -> None:
        freq = self.moe_layer_freq
        if isinstance(freq, int):
            require(freq >= 1, "moe_layer_freq", f"must be >= 1, got {freq}",
                    "use 1 for all layers MoE, k for every k-th layer, or a 0/1 list")
            return
        require(len(freq) == self.num_layers, "moe_layer_freq",
                f"has {len(freq)} entries but num_layers={self.num_layers}",
                "give one 0/1 entry per layer")
        require(all(v in (0, 1) for v in freq), "moe_layer_freq",
                f"entries must be 0 or 1, got {freq}", "use 1 for an MoE layer, 0 for dense")

    def _validate_moe(self) -> None:
        require_positive(self, "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
                         "moe_router_topk_scaling_factor")
        require_non_negative(self, "moe_aux_loss_coeff")
        require(1 <= self.moe_router_topk <= self.num_experts, "moe_router_topk",
                f"must be in 1..num_experts={self.num_experts}, got {self.moe_router_topk}",
                "route each token to at least one and at most all experts")
        require(self.moe_router_topk > 1 or self.moe_router_score_function != "softmax"
                or self.moe_router_pre_softmax, "moe_router_pre_softmax",
                "top-1 softmax routing needs softmax before top-k (Megatron rule)",
                "set moe_router_pre_softmax=true")
        if self.moe_router_enable_expert_bias:
            # Megatron-Core 0.16 TransformerConfig rejects expert bias with softmax scores.
            require(self.moe_router_score_function == "sigmoid", "moe_router_enable_expert_bias",
                    "expert bias needs sigmoid router scores (Megatron rule)",
                    "set moe_router_score_function=sigmoid")
            require_positive(self, "moe_router_bias_update_rate")
        groups, group_topk = self.moe_router_num_groups, self.moe_router_group_topk
        require((groups is None) == (group_topk is None), "moe_router_group_topk",
                "group-limited routing needs both moe_router_num_groups and "
                "moe_router_group_topk", "set both or neither")
        if groups is not None and group_topk is not None:
            require(groups >= 1 and self.num_experts % groups == 0, "moe_router_num_groups",
                    f"num_experts={self.num_experts} is not divisible by {groups} groups",
                    f"choose one of {one_of(divisors(self.num_experts))}")
            require(1 <= group_topk <= groups, "moe_router_group_topk",
                    f"must be in 1..moe_router_num_groups={groups}, got {group_topk}",
                    "pick fewer groups per token")


_MLA_FIELDS = ("q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim")
_YARN_FIELDS = ("rope_scaling_factor", "rope_original_max_position_embeddings", "yarn_beta_fast",
                "yarn_beta_slow", "yarn_mscale", "yarn_mscale_all_dim")


def _require_default(cfg: ModelConfig, names: tuple[str, ...], needs: str) -> None:
    """Refuse a non-default value in fields that are read only with `needs` set."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    for name in names:
        value = getattr(cfg, name)
        require(value == defaults[name], name,
                f"is {value!r} but is read only with {needs}",
                f"set model.{needs} or leave {name} at its default {defaults[name]!r}")


@section
class ParallelConfig:
    """Megatron-Core parallel layout and process-group settings."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    ep: int = 1
    """Expert-parallel size (MoE only)."""
    etp: int | None = None
    """Expert tensor-parallel size; None = tp (as Megatron)."""
    cp: int = 1
    """Context-parallel size."""
    dp: int | None = None
    """Data-parallel size; None = world_size / (tp*pp*cp), filled in at load time."""
    sequence_parallel: bool | None = None
    """Megatron sequence parallelism (needs tp > 1); None = on exactly where Megatron requires
    it (an MoE model with tp > 1), filled in at load time."""
    virtual_pp: int | None = None
    """Virtual pipeline stages per rank (interleaved schedule); None = off."""
    pp_last_stage_layers: int | None = None
    """Layers on the last pipeline stage when num_layers does not split evenly (Megatron's
    num_layers_in_last_pipeline_stage; DeepSeek-V3's 61 = 3*16 + 13); None = an even split."""
    timeout_s: float = 120.0
    """Timeout of every collective and process group, in seconds: a stalled or dead rank ends
    the job within it."""
    rank0_work_timeout_s: float = 3600.0
    """How long the other ranks wait for rank 0's host work (generation, rewards, evaluation:
    minutes, not a collective's seconds) before giving up; rank 0 itself still finds a stalled
    rank within `timeout_s`."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend; auto = nccl with CUDA, gloo without."""

    def validate(self) -> None:
        """Sizes are >= 1; sequence parallelism needs tensor parallelism."""
        for name in ("tp", "pp", "ep", "etp", "cp", "dp", "virtual_pp", "pp_last_stage_layers"):
            value = getattr(self, name)
            require(value is None or value >= 1, name, f"must be >= 1, got {value}",
                    "use 1 to disable this kind of parallelism")
        require_positive(self, "timeout_s", "rank0_work_timeout_s")
        require(self.pp_last_stage_layers is None or (self.pp > 1 and self.virtual_pp is None),
                "pp_last_stage_layers", "an uneven last stage needs pp > 1 and no virtual_pp",
                "set parallel.pp > 1 and parallel.virtual_pp=null, or pp_last_stage_layers=null")
        require(not self.sequence_parallel or self.tp > 1, "sequence_parallel",
                "sequence parallelism needs tensor parallelism (tp > 1)",
                "set parallel.tp > 1 or parallel.sequence_parallel=false")

    @property
    def expert_tp(self) -> int:
        """Expert tensor-parallel size with the Megatron default (etp None = tp) applied."""
        return self.tp if self.etp is None else self.etp


@section
class ActorConfig:
    """Policy optimisation: optimizer, schedule, precision and micro-batching."""

    optimizer: Literal["adam", "sgd"] = "adam"
    """Optimizer (adam is AdamW: decoupled weight decay)."""
    lr: float = 1e-6
    """Peak learning rate."""
    min_lr: float = 0.0
    """Final learning rate of the decay schedule."""
    lr_warmup_steps: int = 0
    """Linear warm-up steps from 0 to lr."""
    lr_decay_style: Literal["constant", "linear", "cosine"] = "constant"
    """Decay after warm-up, from lr to min_lr over the run."""
    weight_decay: float = 0.0
    """Decoupled weight decay."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.999
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Global gradient-norm clip; 0 = off."""
    params_dtype: Literal["float32", "bfloat16"] = "float32"
    """Dtype of the model parameters (optimizer state stays fp32)."""
    use_distributed_optimizer: bool = False
    """Shard optimizer state over data-parallel ranks (Megatron distributed optimizer)."""
    micro_batch_size: int = 1
    """Samples per forward/backward micro-batch (unless `max_tokens_per_micro_batch` is set)."""
    seq_length: int = 256
    """Maximum prompt + response tokens per sample."""
    max_tokens_per_micro_batch: int | None = None
    """Token budget of a micro-batch, rows x its longest row (slime's max_tokens_per_gpu,
    verl's dynamic batch size): as many rows as fit, longest first, instead of
    `micro_batch_size`; a step's rows are dealt to the DP ranks balanced by tokens. A row longer
    than the budget gets a micro-batch of its own. None: `micro_batch_size` rows. Not with
    pipeline parallelism (its schedule needs one shape)."""
    pad_to_seq_length: bool = False
    """Keep every row at `seq_length` tokens (the fixed shape: for comparisons and fixed-shape
    kernels). Off: each micro-batch is cut to its longest row, so padding costs nothing."""
    share_prompts: bool = False
    """Feed each prompt group's prompt once per micro-batch: one packed row holds the prompt
    and then the group's responses, each seeing the prompt and itself only (an attention mask,
    RoPE positions continuing from the prompt). Same loss and gradients as one row per sample
    (the MoE load-balancing loss then counts a prompt's tokens once); with G samples per prompt
    it feeds P + G*R tokens instead of G*(P + R). Attention runs in torch SDPA with a mask (also
    under Transformer Engine, whose fused attention takes no such mask), RoPE unfused; not with
    multi-latent attention. docs/design.md "Shared prompts"."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recomputation granularity."""
    optimizer_cpu_offload: bool = False
    """Keep the optimizer state (fp32 master weights, Adam moments) on the host and step it there
    (Megatron's HybridDeviceOptimizer); needs use_distributed_optimizer."""
    kernels: Literal["auto", "triton", "torch"] = "auto"
    """Backend of the fused log-prob and policy-loss kernels: auto = Triton on CUDA tensors (or
    under TRITON_INTERPRET=1), torch otherwise; triton = fail if Triton cannot run; torch = the
    torch implementations (the policy loss of `megatron_rl.algorithms`, the reference)."""
    # Megatron-Core fusions: None = on where this process can run them (CUDA, plus Transformer
    # Engine or Apex as each needs), off under the CPU compatibility layer; true where the device
    # cannot is a config error at model build; false is honoured. Decided by
    # `actor.compat.fusion_settings`.
    grouped_gemm: bool | None = None
    """MoE: a rank's experts in one grouped GEMM (Megatron's moe_grouped_gemm, TE's grouped
    linear); None = on with CUDA and Transformer Engine."""
    permute_fusion: bool | None = None
    """MoE: fused token permutation in the dispatcher (Megatron's moe_permute_fusion, TE >= 2.1);
    None = on with CUDA and Transformer Engine."""
    rope_fusion: bool | None = None
    """Fused RoPE kernel (Megatron's apply_rope_fusion: TE's kernel; with MLA a Triton kernel
    Megatron calls experimental, YaRN only); None = on with CUDA and Transformer Engine, off
    with MLA unless set true."""
    bias_dropout_fusion: bool | None = None
    """Fused bias-dropout-add after attention and MLP (Megatron's, torch.compile'd); None = on
    with CUDA."""
    masked_softmax_fusion: bool | None = None
    """Megatron's fused scale-mask-softmax (read by its local attention; TE's attention and torch
    SDPA fuse the softmax themselves); None = on with CUDA and Transformer Engine."""
    gradient_accumulation_fusion: bool | None = None
    """Weight gradients accumulated into the fp32 main grads inside the GEMM (Megatron's
    gradient_accumulation_fusion); needs Apex's fused_weight_gradient_mlp_cuda, which Megatron's
    output layer uses even with TE; None = on with CUDA and that extension."""

    def validate(self) -> None:
        """Ranges of optimizer and batching settings."""
        require_non_negative(self, "lr", "min_lr", "lr_warmup_steps", "weight_decay", "clip_grad")
        require(self.min_lr <= self.lr, "min_lr", f"{self.min_lr} exceeds lr={self.lr}",
                "use min_lr <= lr")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            require(0.0 <= value < 1.0, name, f"must be in [0, 1), got {value}", "e.g. 0.9")
        require_positive(self, "adam_eps", "micro_batch_size", "max_tokens_per_micro_batch")
        require(self.seq_length >= 2, "seq_length", f"must be >= 2, got {self.seq_length}",
                "room for at least one prompt and one response token")
        require(not self.optimizer_cpu_offload or self.use_distributed_optimizer,
                "optimizer_cpu_offload", "Megatron offloads only the distributed optimizer",
                "set actor.use_distributed_optimizer=true or optimizer_cpu_offload=false")


@section
class CheckpointConfig:
    """Where and how often the actor saves; what it starts from."""

    dir: str = "outputs/checkpoints"
    """Directory of the run's checkpoints."""
    save_interval: int = 0
    """Save every N steps; 0 = only at the end."""
    resume: bool = False
    """Resume from the latest checkpoint in dir, if one exists."""
    keep_last: int = 2
    """Checkpoints to keep (older ones are deleted); 0 = keep all."""
    load: str | None = None
    """Initial weights: a Megatron checkpoint dir or a HF model dir; None = random init."""

    def validate(self) -> None:
        """Non-negative counts and a non-empty directory."""
        require(bool(self.dir.strip()), "dir", "is empty", "give a directory path")
        require_non_negative(self, "save_interval", "keep_last")
        require(self.load is None or bool(self.load.strip()), "load", "is empty",
                "give a checkpoint or HF model directory, or null")


# Vocabulary is padded to a multiple of this, independent of TP, so that a checkpoint saved at
# one TP size loads at another (the padded rows are masked to -inf when computing log-probs).
VOCAB_PAD_MULTIPLE = 128


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """Vocabulary rounded up to `VOCAB_PAD_MULTIPLE` (and to a multiple of tp), as the model
    builder and the memory planner both see it."""
    multiple = math.lcm(VOCAB_PAD_MULTIPLE, tp)
    return -(-vocab_size // multiple) * multiple
