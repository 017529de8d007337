"""Plain length reward for GDPO (DAPO's overlong shaping lives in algorithms/overlong.py)."""

from typing import Any, Literal

from megatron_rl.rewards.registry import register


@register("length")
def length_reward(prompt: str, response: str, label: Any, metadata: dict, *,
                  max_len: int = 1024, target: int | None = None,
                  unit: Literal["chars", "words", "tokens"] = "chars") -> float:
    """Shorter is better, or closer to a target length is better; in [0, 1].

    target=None: 1 - len/max_len, clipped to [0, 1]. target=T: 1 - |len - T| / T, clipped.
    unit="tokens" reads `metadata["response_length"]` (set by the rollout), since rewards do not
    hold a tokenizer; "chars" and "words" measure the text.
    """
    if unit == "tokens":
        if "response_length" not in metadata:
            raise ValueError("length: unit='tokens' needs metadata['response_length']")
        n = int(metadata["response_length"])
    elif unit in ("chars", "words"):
        n = len(response) if unit == "chars" else len(response.split())
    else:
        raise ValueError(f"length: unit must be chars, words or tokens, got {unit!r}")
    if target is not None:
        if target <= 0:
            raise ValueError(f"length: target must be > 0, got {target}")
        return max(0.0, 1.0 - abs(n - target) / target)
    if max_len <= 0:
        raise ValueError(f"length: max_len must be > 0, got {max_len}")
    return min(1.0, max(0.0, 1.0 - n / max_len))
