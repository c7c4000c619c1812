"""Chat templates: the model's own Jinja template, rendered the way transformers renders it.

The environment matches transformers' `apply_chat_template`: an immutable sandbox with
`trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, a `tojson` filter that does not
escape HTML or non-ASCII, and the globals `raise_exception` and `strftime_now`. The template sees
`messages`, `add_generation_prompt`, the special tokens (`bos_token`, `eos_token`, ...) and any
extra keyword arguments (`tools`, `documents`, `enable_thinking`, ...).

A model without a template (a base model such as gemma-3-270m) gets `PLAIN_TEMPLATE`, a documented
plain-text format:

    <system content>\n\n          (only when there is a system message)
    User: <content>\n
    Assistant: <content>\n
    Assistant:                    (when add_generation_prompt)
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ message['content'] }}\n"
    "{% elif message['role'] == 'assistant' %}Assistant: {{ message['content'] }}\n"
    "{% else %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class ChatTemplateError(ValueError):
    """A chat template failed to compile or render, or the messages are malformed."""


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template once (cached by its text)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e} (line {e.lineno})") from e


def _text_of(content: Any) -> str:
    """Plain text of a message's content: a string, or OpenAI-style parts [{'type': 'text', 'text': ...}]."""
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    raise ChatTemplateError(f"message content must be a string or a list of parts, got {type(content).__name__}")


def check_messages(messages: list[dict]) -> None:
    """Each message must be a dict with a string 'role'."""
    if not isinstance(messages, (list, tuple)):
        raise ChatTemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"message {i} must be a dict with a string 'role', got {message!r}")


def render_chat_template(
    template: str | None,
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    special_tokens: dict[str, str | None] | None = None,
    **kwargs: Any,
) -> str:
    """Render `messages` with `template` (or `PLAIN_TEMPLATE` when None) to the prompt text.

    `special_tokens` maps names such as 'bos_token' / 'eos_token' to their text; extra keyword
    arguments (tools=..., enable_thinking=...) are passed to the template as variables.
    """
    check_messages(messages)
    if template is None:
        template = PLAIN_TEMPLATE
        messages = [dict(m, content=_text_of(m.get("content"))) for m in messages]
    variables = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    variables.update(kwargs)
    try:
        return compile_template(template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **variables
        )
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template raised: {e}") from e
