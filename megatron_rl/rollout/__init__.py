"""Generation engines (embedded transformers, SGLang), weight sync and the group sampler.

Names are imported on first use (PEP 562), so `import megatron_rl.rollout` stays light: no
transformers, no HTTP server, until an engine is asked for.
"""

from __future__ import annotations

from megatron_rl.lazy import lazy_exports

_EXPORTS = {
    "EngineError": "engine", "RolloutEngine": "engine",
    "GenerateOutput": "types", "Sample": "types", "SamplingParams": "types",
    "RolloutConfig": "config",
    "SGLangEngine": "sglang_engine", "SGLangInProcessEngine": "sglang_engine",
    "TransformersEngine": "transformers_engine",
    "GroupSampler": "sampler", "SamplerReport": "sampler",
    "serve": "server",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
