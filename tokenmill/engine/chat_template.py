"""Chat templates: Jinja rendered in an immutable sandbox, as Hugging Face renders them."""

from __future__ import annotations

from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tokenmill.errors import TokenizerError


def _raise_exception(message: str) -> None:
    raise TokenizerError(f"chat template: {message}")


def render_chat_template(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool,
                         **special_tokens: str) -> str:
    """Renders ``messages`` (each with "role" and "content"); TokenizerError on a bad template or messages."""
    if not isinstance(messages, list) or not messages:
        raise TokenizerError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise TokenizerError(f"messages[{i}] must be a dict with 'role' and 'content', got {message!r}")
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    try:
        return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                **special_tokens)
    except TemplateError as e:
        raise TokenizerError(f"chat template failed to render: {e}") from None
