"""Language-consistency reward (DeepSeek-R1): share of the response's letters in the target
script, to discourage mixing languages in the chain of thought."""

import re
import unicodedata
from typing import Any, Literal

from megatron_rl.rewards.extract import strip_think
from megatron_rl.rewards.registry import register

SCRIPTS = {
    "latin": ("LATIN",),
    "cjk": ("CJK", "HIRAGANA", "KATAKANA", "HANGUL"),
    "cyrillic": ("CYRILLIC",),
    "greek": ("GREEK",),
    "arabic": ("ARABIC",),
}
"""Target scripts: Unicode character-name prefixes of their letters."""

_TAG = re.compile(r"</?(?:think|answer)>")


def script_share(text: str, script: str) -> float:
    """Fraction of the letters (Unicode category L*) of `text` that belong to `script`."""
    if script not in SCRIPTS:
        raise ValueError(f"language: unknown script {script!r}; choose from {', '.join(SCRIPTS)}")
    prefixes = SCRIPTS[script]
    text = _TAG.sub(" ", text)  # template tags (<think>, <answer>) are not the model's language
    letters = [c for c in text if unicodedata.category(c).startswith("L")]
    if not letters:
        return 0.0
    hits = sum(unicodedata.name(c, "").startswith(prefixes) for c in letters)
    return hits / len(letters)


@register("language")
def language_reward(prompt: str, response: str, label: Any, metadata: dict, *,
                    script: str = "latin", part: Literal["all", "think"] = "all") -> float:
    """Share of letters in `script`; part="think" scores only the reasoning (as R1 does).

    A response with no letters scores 0.
    """
    if part == "think":
        after = strip_think(response)
        response = response[: len(response) - len(after)] if after is not None else response
    elif part != "all":
        raise ValueError(f"language: part must be 'all' or 'think', got {part!r}")
    return script_share(response, script)
