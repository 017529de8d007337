"""Run Megatron-Core on CPU: the one place that knows CUDA may be absent.

Megatron-Core assumes CUDA in a handful of places (device arguments, RNG trackers, streams,
Transformer Engine names, a grad-type assert in clipping). `activate()` patches exactly those,
and only when `torch.cuda.is_available()` is False, so every other module of ours is ordinary
Megatron-Core code that runs unchanged on GPUs. docs/design.md section 2 lists what was verified.
`backend_summary()` says in one line what runs (CUDA or this layer, collectives, Transformer
Engine, kernels); the model build prints it once per process, in place of Megatron-Core's Apex /
TE fallback warnings, which `megatron_rl.actor` filters. `fusion_settings` decides Megatron's
fusions, grouped GEMM and layer implementation from what `probe_device` finds: on where CUDA and
the kernels' provider (Transformer Engine, Apex) are present, off under this layer.

The patches:
- a `TorchFunctionMode` mapping `device="cuda"`, `"cuda:N"` and integer devices to CPU, and
  `Tensor.cuda()` / `.to("cuda")` to no-ops;
- `torch.cuda` device, stream, event and synchronize calls made inert, and its RNG calls
  mapped to the CPU generator (Megatron's model-parallel RNG tracker forks that state);
- `moe_utils.te_general_gemm = None` (a name Megatron only defines when TE imports);
- `maybe_move_tensor_to_cpu(..., as_numpy=True)` returning numpy for CPU tensors, since the
  all-to-all dispatcher needs host split sizes;
- `HAVE_TE = False` in every Megatron module that a `MagicMock` fooled into True;
- `clip_grad_by_total_norm_fp32` without its `torch.cuda.FloatTensor` assert;
- CPU parameters reading as `torch.cuda.*Tensor` inside the constructors of Megatron's
  mixed-precision and distributed optimizers, which sort parameters by those type names
  (gloo in torch >= 2.6 has the reduce-scatter and all-gather the distributed optimizer needs).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import importlib.util
import logging
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from megatron_rl.actor.config import ActorConfig, ModelConfig
from megatron_rl.configurable import config_error
from megatron_rl.kernels.dispatch import triton_can_run

_ACTIVE = False
_MODE: TorchFunctionMode | None = None
_REPORTED = False


def te_available() -> bool:
    """True when Transformer Engine really imports (not Megatron's MagicMock stand-in)."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception:  # noqa: BLE001 - any failure means TE is unusable here
        return False
    return True


def needed() -> bool:
    """The compat layer is needed exactly when CUDA is absent."""
    return not torch.cuda.is_available()


@dataclasses.dataclass(frozen=True)
class Device:
    """What this process can run, as far as Megatron's fusions care (`probe_device` fills it;
    tests build it as a CUDA run would). Every kernel flag counts only together with `cuda`."""

    cuda: bool
    """CUDA is present: the CPU compatibility layer is not needed."""
    te: bool = False
    """Transformer Engine really imports: its layer spec builds the layers."""
    te_grouped_gemm: bool = False
    """TE's grouped linear, Megatron's `TEColumnParallelGroupedLinear` (TEGroupedMLP)."""
    te_permute: bool = False
    """TE's fused MoE permutation kernels as Megatron's `moe_utils` imports them (TE >= 2.1)."""
    te_rope: bool = False
    """TE's fused RoPE as Megatron's `rope_utils` imports it (TE >= 1.4)."""
    mla_rope: bool = False
    """Megatron's Triton MLA YaRN RoPE kernels (`fused_apply_mla_rope_for_q`)."""
    apex_grad_accum: bool = False
    """Apex's `fused_weight_gradient_mlp_cuda` extension."""

    def describe(self) -> str:
        """A few words for error messages."""
        if not self.cuda:
            return "this process runs on the CPU compatibility layer (no CUDA)"
        return ("this process has CUDA, " + ("Transformer Engine" if self.te else
                "no Transformer Engine") + (", Apex" if self.apex_grad_accum else ", no Apex"))


_PERMUTE_KERNELS = ("fused_permute", "fused_permute_with_probs", "fused_sort_chunks_by_index",
                    "fused_sort_chunks_by_index_with_probs", "fused_unpermute")
"""The `moe_utils` names that Megatron's `TransformerConfig` requires for moe_permute_fusion."""


def probe_device() -> Device:
    """What this process can run, read from Megatron-Core's own imports (the same names its
    `TransformerConfig` and layers check); imports nothing TE-related without CUDA and TE."""
    if needed():
        return Device(cuda=False)
    from megatron.core.transformer import multi_latent_attention

    mla_rope = getattr(multi_latent_attention, "fused_apply_mla_rope_for_q", None) is not None
    apex = importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None
    if not te_available():
        return Device(cuda=True, mla_rope=mla_rope, apex_grad_accum=apex)
    from megatron.core.extensions import transformer_engine as mte
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.transformer.moe import moe_utils

    return Device(
        cuda=True,
        te=True,
        te_grouped_gemm=getattr(mte, "TEColumnParallelGroupedLinear", None) is not None,
        te_permute=all(getattr(moe_utils, n, None) is not None for n in _PERMUTE_KERNELS),
        te_rope=getattr(rope_utils, "fused_apply_rotary_pos_emb", None) is not None,
        mla_rope=mla_rope,
        apex_grad_accum=apex,
    )


def fusion_settings(actor: ActorConfig, model: ModelConfig, device: Device) -> dict[str, Any]:
    """Megatron `TransformerConfig` kwargs that follow the device: the layer implementation (TE
    with CUDA and a real TE import, else local; `spec.decoder_block_spec` reads it) and each
    fusion. A fusion field None is on exactly where `device` supports it (MLA's experimental
    RoPE fusion: only when set); false is honoured; true where unsupported is a ConfigError
    naming the field. MoE-only settings are left out for a dense model."""
    cuda, te = device.cuda, device.cuda and device.te
    if model.multi_latent_attention:
        # Megatron: MLA's RoPE fusion is a Triton kernel for YaRN only, and "experimental".
        rope_ok = cuda and device.mla_rope and model.rope_scaling == "yarn"
        rope = (rope_ok, False, "CUDA, Triton and model.rope_scaling=yarn (MLA)")
    elif actor.share_prompts:  # per-token RoPE positions: the unfused path takes [s, b, 1, d]
        rope = (False, False, "actor.share_prompts=false (shared prompts need the unfused "
                "RoPE)")
    else:
        rope_ok = te and device.te_rope
        rope = (rope_ok, rope_ok, "CUDA and Transformer Engine >= 1.4 (fused RoPE)")
    grouped, permute = te and device.te_grouped_gemm, te and device.te_permute
    grad_accum = cuda and device.apex_grad_accum
    # our field -> Megatron's field, (supported, value when None, what it needs)
    table = {
        "grouped_gemm": ("moe_grouped_gemm",
                         (grouped, grouped, "CUDA and Transformer Engine's grouped linear")),
        "permute_fusion": ("moe_permute_fusion",
                           (permute, permute, "CUDA and Transformer Engine >= 2.1")),
        "rope_fusion": ("apply_rope_fusion", rope),
        "bias_dropout_fusion": ("bias_dropout_fusion", (cuda, cuda, "CUDA")),
        "masked_softmax_fusion": ("masked_softmax_fusion",
                                  (te, te, "CUDA and Transformer Engine")),
        "gradient_accumulation_fusion": (
            "gradient_accumulation_fusion",
            (grad_accum, grad_accum, "CUDA and Apex's fused_weight_gradient_mlp_cuda (Megatron's "
             "output layer is a local linear even with Transformer Engine)")),
    }
    settings: dict[str, Any] = {"transformer_impl": "transformer_engine" if te else "local"}
    for name, (megatron_name, (supported, auto, needs)) in table.items():
        wanted = getattr(actor, name)
        if wanted and not supported:
            raise config_error(f"actor.{name}", f"is true but needs {needs}; {device.describe()}",
                               f"set actor.{name}=null (on where supported) or false")
        if model.num_experts or not megatron_name.startswith("moe_"):
            settings[megatron_name] = auto if wanted is None else wanted
    return settings


def _te_version() -> str | None:
    """Transformer Engine's version when it really imports, else None."""
    if not te_available():
        return None
    try:
        return importlib.metadata.version("transformer-engine")
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown)"


def _triton_kernels(kernels: str) -> bool:
    """Whether the fused kernels run in Triton under `ActorConfig.kernels` (as
    `megatron_rl.kernels.dispatch.use_triton` decides for CUDA tensors, or CPU tensors under the
    Triton interpreter)."""
    return kernels != "torch" and triton_can_run(on_cuda=not needed())


def backend_summary(kernels: str = "auto") -> str:
    """What runs the model in this process, in one line: CUDA or the CPU compatibility layer,
    the collectives, Transformer Engine, and the kernel backend for `ActorConfig.kernels`."""
    backend = dist.get_backend() if dist.is_initialized() else None
    te = _te_version()
    kernel = "Triton kernels" if _triton_kernels(kernels) else "torch kernels"
    if needed():
        suffix = ("Transformer Engine not installed" if te is None
                  else f"Transformer Engine {te} installed, unused on CPU")
        return (f"megatron-rl: CPU compatibility layer ({backend or 'no'} collectives, "
                f"{kernel}); {suffix}")
    layers = (f"Transformer Engine {te}" if te is not None
              else "local layers (no Transformer Engine)")
    return (f"megatron-rl: CUDA ({torch.cuda.get_device_name()}, {backend or 'no'} collectives), "
            f"{layers}, {kernel}")


def report_backend(kernels: str = "auto") -> None:
    """Print `backend_summary` once per process, on global rank 0 only (stderr)."""
    global _REPORTED
    if _REPORTED:
        return
    _REPORTED = True
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(backend_summary(kernels), file=sys.stderr, flush=True)


def _is_cuda_device(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return isinstance(dev, int) and not isinstance(dev, bool)


class _CpuDeviceMode(TorchFunctionMode):
    """Rewrites CUDA device arguments of any torch call to CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        name = getattr(func, "__name__", "")
        if name == "cuda":  # Tensor.cuda()
            return args[0]
        if name == "to" and args:
            args = tuple("cpu" if (i > 0 and _is_cuda_device(a)) else a for i, a in enumerate(args))
        return func(*args, **kwargs)


class _InertStream:
    """Stand-in for `torch.cuda.Stream`/`Event`: every method does nothing and returns another
    inert object (so `stream.record_event().synchronize()` chains work)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: _InertStream()

    def __enter__(self) -> _InertStream:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: "cpu"
    cuda.device_count = lambda: 0
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda *a, **k: None
    cuda.Stream = _InertStream
    cuda.Event = _InertStream
    cuda.current_stream = lambda *a, **k: _InertStream()
    cuda.default_stream = lambda *a, **k: _InertStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # torch.manual_seed itself calls cuda.manual_seed_all: seed the CPU generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state


def _patch_megatron() -> None:
    from megatron.core.optimizer import clip_grads
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    # The tracker warns when the CPU RNG moves inside a "GPU" fork; on CPU they are the same
    # generator by design, so the warning is noise.
    logging.getLogger(mrandom.__name__).setLevel(logging.ERROR)
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    moe_utils.te_general_gemm = None

    def maybe_move_tensor_to_cpu(tensor: Any, as_numpy: bool = False, record_stream: bool = False):
        if torch.is_tensor(tensor):
            tensor = tensor.detach().to("cpu")
            return tensor.numpy() if as_numpy else tensor
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu

    def clip_grad_by_total_norm_fp32(
        parameters: Any, max_norm: float, total_norm: float, use_decoupled_grad: bool = False
    ) -> None:
        """Megatron's clip by total norm without its CUDA-only grad type assert."""
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        attr = "decoupled_grad" if use_decoupled_grad else "grad"
        grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0:
            for g in grads:
                g.detach().mul_(clip_coeff)

    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    for mod_name in ("megatron.core.optimizer.optimizer", "megatron.core.optimizer"):
        mod = sys.modules.get(mod_name)
        if mod is not None and hasattr(mod, "clip_grad_by_total_norm_fp32"):
            mod.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


@contextlib.contextmanager
def _cuda_type_names():
    """Within the block, `tensor.type()` of a CPU tensor reads `torch.cuda.<X>Tensor`.

    Megatron's optimizers sort parameters by `param.type()` against CUDA type names only
    (`'torch.cuda.FloatTensor'`, ...), so CPU parameters are rejected. Only those constructors
    run inside this block; everything else sees the true type names.
    """
    orig = torch.Tensor.type

    def type_(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kw: Any):
        if dtype is None and not kw and not self.is_cuda:
            name = orig(self)
            return name.replace("torch.", "torch.cuda.", 1) if "cuda" not in name else name
        return orig(self, dtype, non_blocking, **kw)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = orig


def _patch_optimizer_type_checks() -> None:
    from megatron.core.optimizer import distrib_optimizer, optimizer

    classes = (optimizer.Float16OptimizerWithFloat16Params, distrib_optimizer.DistributedOptimizer)
    for cls in classes:
        init = cls.__init__

        def wrapped(self, *args: Any, __init=init, **kwargs: Any) -> None:
            with _cuda_type_names():
                __init(self, *args, **kwargs)

        cls.__init__ = wrapped


def _unfool_have_te() -> None:
    """Set HAVE_TE False where Megatron's MagicMock stand-in for TE made it read True."""
    # Import the modules the GPT/MoE/MLA paths use so their flags exist before we fix them.
    for name in (
        "megatron.core.models.gpt.gpt_model",
        "megatron.core.models.gpt.gpt_layer_specs",
        "megatron.core.transformer.multi_latent_attention",
        "megatron.core.transformer.moe.moe_layer",
        "megatron.core.transformer.moe.experts",
        "megatron.core.transformer.moe.shared_experts",
    ):
        importlib.import_module(name)
    for name, mod in list(sys.modules.items()):
        if name.startswith("megatron.core") and getattr(mod, "HAVE_TE", None) is True:
            mod.HAVE_TE = False


def activate() -> bool:
    """Switch the CPU compat layer on if CUDA is absent; idempotent. Returns whether it is on."""
    global _ACTIVE, _MODE
    if _ACTIVE:
        return True
    if not needed():
        return False
    _patch_torch_cuda()
    _patch_megatron()
    _patch_optimizer_type_checks()
    if not te_available():
        _unfool_have_te()
    _MODE = _CpuDeviceMode()
    _MODE.__enter__()
    _ACTIVE = True
    return True


def is_active() -> bool:
    """Whether `activate()` patched this process."""
    return _ACTIVE
