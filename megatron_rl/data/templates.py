"""Chat templates: a prompt (text or messages) -> the exact string the engine tokenizes.

One registry keyed by `DataConfig.chat_template`:
- "r1_zero": the DeepSeek-R1-Zero training template (DeepSeek-AI, "DeepSeek-R1: Incentivizing
  Reasoning Capability in LLMs via Reinforcement Learning", 2025, Table 1), for base models
  trained from scratch by RL; the response continues after "Assistant:".
- "tokenizer": the tokenizer's own chat template with the generation prompt (instruct models).
- "none": the raw text; messages' contents joined by a blank line.
"""

from collections.abc import Callable
from typing import Any

from megatron_rl.data.records import DataError, Message, Prompt

R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process "
    "here </think> <answer> answer here </answer>. User: {prompt}. Assistant:"
)
"""Table 1 of the DeepSeek-R1 paper, verbatim; `{prompt}` is replaced by the question."""

TemplateFn = Callable[[Prompt, Any], str]
"""(prompt, tokenizer or None) -> formatted prompt text."""


def _as_messages(prompt: Prompt) -> list[Message]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def r1_zero(prompt: Prompt, tokenizer: Any = None) -> str:
    """R1-Zero template around the question.

    Messages: the user turns' contents joined by a blank line (the template supplies its own
    system text, so system turns are dropped). A trailing period of the question is not doubled.
    """
    if isinstance(prompt, str):
        question = prompt
    else:
        question = "\n\n".join(m["content"] for m in prompt if m["role"] == "user")
        if not question:
            raise DataError("r1_zero template: the prompt has no user message")
    question = question.strip().removesuffix(".")
    return R1_ZERO_TEMPLATE.format(prompt=question)


def tokenizer_template(prompt: Prompt, tokenizer: Any = None) -> str:
    """The tokenizer's own chat template, ending with the assistant's generation prompt."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError("chat_template 'tokenizer' needs a tokenizer with a chat template; "
                        "use data.chat_template=r1_zero or none, or a chat tokenizer")
    return tokenizer.apply_chat_template(_as_messages(prompt), add_generation_prompt=True,
                                         tokenize=False)


def no_template(prompt: Prompt, tokenizer: Any = None) -> str:
    """The prompt as is; messages' contents joined by a blank line."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(m["content"] for m in prompt)


TEMPLATES: dict[str, TemplateFn] = {
    "r1_zero": r1_zero,
    "tokenizer": tokenizer_template,
    "none": no_template,
}


def apply_template(name: str, prompt: Prompt, tokenizer: Any = None) -> str:
    """Format `prompt` with the template registered as `name` (`DataConfig.chat_template`)."""
    if name not in TEMPLATES:
        raise DataError(f"unknown chat template {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name](prompt, tokenizer)
