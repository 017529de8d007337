"""Generation engines (embedded transformers, SGLang), weight sync and the group sampler.

Names are imported on first use (PEP 562), so `import megatron_rl.rollout` stays light: no
transformers, no HTTP server, until an engine is asked for.
"""

from __future__ import annotations

import importlib
from typing import Any

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


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'megatron_rl.rollout' has no attribute {name!r}")
    return getattr(importlib.import_module(f"megatron_rl.rollout.{_EXPORTS[name]}"), name)
