"""Chat templates: the checkpoint's Jinja template rendered in a sandbox, HF-style.

The environment is `ImmutableSandboxedEnvironment` (no attribute writes, no unsafe calls, ranges
capped) with what Hugging Face templates expect: `raise_exception`, `strftime_now`, a `tojson`
filter, loop controls, and the tokenizer's special tokens as variables. A model without a template
gets a ChatML-style fallback (and a log line at startup). A template sent in a request is refused
unless the operator set `ember.trust_request_chat_template`. Every rendering failure, including
a template's own `raise_exception`, is a 400 naming `messages` (or `chat_template`).

Tools: a template that reads `tools` gets them (and the messages' `tool_calls` / `tool` results) as
HF templates expect; for any other template the tools become ember's built-in system instruction,
past `tool_calls` become `<tool_call>` blocks and `tool` results `<tool_response>` user turns
(ember/structured/tools.py), so a conversation with tools renders on every model."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ember.errors import InvalidRequestError
from ember.server.errors import NotSupportedError
from ember.server.protocol import ChatMessage
from ember.structured.tools import add_tools_to_messages, inline_tool_messages, template_supports_tools

logger = logging.getLogger("ember.server")

FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplateError(InvalidRequestError):
    """A template that fails to compile or render (its own raise_exception included)."""


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _make_env() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _make_env()


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    try:
        return _ENV.from_string(source)
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"The chat template does not compile: {exc}.", param="chat_template") from exc


def messages_to_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Plain dicts as HF templates expect them: list content joined to a string, "developer" shown as
    "system", tool-call arguments parsed from JSON text into objects."""
    out = []
    for i, msg in enumerate(messages):
        content = msg.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise NotSupportedError(
                        f"Content parts of type '{part.type}' are not supported; only 'text' parts are (ember serves text: "
                        "a vision-language checkpoint such as Gemma 3 serves its language model, without the vision "
                        "tower).", param=f"messages.{i}.content.{j}.type"
                    )
                texts.append(part.text)
            content = "\n".join(texts)
        if content is None and not msg.tool_calls:
            content = ""
        item: dict[str, Any] = {"role": "system" if msg.role == "developer" else msg.role, "content": content}
        if msg.name is not None:
            item["name"] = msg.name
        if msg.tool_call_id is not None:
            item["tool_call_id"] = msg.tool_call_id
        if msg.tool_calls:
            item["tool_calls"] = [_tool_call_dict(tc) for tc in msg.tool_calls]
        out.append(item)
    return out


def _tool_call_dict(tc) -> dict[str, Any]:
    d = tc.model_dump(exclude_none=True)
    try:
        d["function"]["arguments"] = json.loads(tc.function.arguments)
    except (ValueError, TypeError):
        pass  # templates get the raw text then
    return d


class ChatRenderer:
    """Turns a request's messages into the prompt text of the served model."""

    def __init__(self, tokenizer, chat_template: str | None, trust_request_template: bool = False):
        self.tokenizer = tokenizer
        self.has_model_template = bool(chat_template)
        self.template_source = chat_template or FALLBACK_CHAT_TEMPLATE
        self.trust_request_template = trust_request_template
        if not self.has_model_template:
            logger.warning("the model has no chat template; chat requests use ember's built-in ChatML-style fallback")
        compile_template(self.template_source)  # fail at startup, not on the first request
        self.special_tokens = {
            name: getattr(tokenizer, name, None) or "" for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        }

    def source_for(self, request_template: str | None) -> str:
        """The template a request renders with: the model's, or (when trusted) the request's own."""
        if request_template is None:
            return self.template_source
        if not self.trust_request_template:
            raise InvalidRequestError(
                "A chat_template in the request is not allowed on this server (ember.trust_request_chat_template is off).",
                param="chat_template",
            )
        return request_template

    def render(
        self,
        messages: list[ChatMessage],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict] | None = None,
        request_template: str | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        source = self.source_for(request_template)
        template = compile_template(source)
        dicts = messages_to_dicts(messages)
        if not _supports_tools(source):
            # the built-in format: tools as a system instruction, past calls and results inline; a
            # template that handles tool messages itself (but not `tools`) keeps them when no tools are sent
            if tools or "tool" not in source:
                try:
                    dicts = inline_tool_messages(dicts)
                except ValueError as exc:  # tool_calls arguments that are not JSON
                    raise InvalidRequestError(f"A tool call's arguments in messages are not valid JSON: {exc}.", param="messages") from exc
            if tools:
                dicts = add_tools_to_messages(dicts, tools)
            tools = None
        context = dict(template_kwargs or {})
        context.update(self.special_tokens)
        context.update(messages=dicts, add_generation_prompt=add_generation_prompt, tools=tools)
        try:
            return template.render(**context)
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(f"The chat template refused these messages: {exc}", param="messages") from exc
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, OverflowError, RecursionError) as exc:
            raise ChatTemplateError(f"The chat template failed on these messages: {type(exc).__name__}: {exc}", param="messages") from exc


@lru_cache(maxsize=16)
def _supports_tools(source: str) -> bool:
    return template_supports_tools(source)
