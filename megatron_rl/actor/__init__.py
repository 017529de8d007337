"""Megatron-Core side: parallel init, CPU compat, model builders, forward/backward, checkpoints.

Importing this package (which every module of ours that imports Megatron-Core does first:
`convert` imports `actor.config`) ignores Megatron-Core's import-time warnings that Apex or
Transformer Engine is not installed (`MEGATRON_FALLBACK_WARNINGS`, about a dozen lines per
command, none actionable: this project does not use Apex, and the portable layer specs need no
TE). Instead the model build prints one line saying what runs (`compat.backend_summary`). Only
these messages, only from Megatron-Core modules: every other warning still shows.
"""

import warnings

MEGATRON_FALLBACK_WARNINGS = (
    r"Transformer Engine and Apex are not installed\. Falling back to ",
    r"Apex is not installed\. Falling back to Torch Norm",
)
"""Message patterns (matched at the start) of the warnings above; see `compat.py` for what
stands in for TE on CPU."""


def ignore_megatron_fallback_warnings() -> None:
    """Ignore the warnings of `MEGATRON_FALLBACK_WARNINGS` when Megatron-Core modules raise them
    (run on import; idempotent)."""
    for pattern in MEGATRON_FALLBACK_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern, category=UserWarning,
                                module=r"megatron\.")


ignore_megatron_fallback_warnings()
