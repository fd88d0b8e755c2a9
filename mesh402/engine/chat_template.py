"""Chat templates: render a model's Jinja template the way transformers' apply_chat_template does.

Templates come from model files, i.e. untrusted input, so they run in Jinja's immutable sandbox
and every failure surfaces as `ChatTemplateError` (the API maps it to HTTP 400).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping
from datetime import datetime
from typing import Any, NamedTuple

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] is iterable %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplateError(ValueError):
    """The template could not be compiled or rendered (bad template or bad messages)."""


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): render the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore names, so templates cannot poke at internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same calling trick as jinja2's Namespace
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes; chat templates expect plain JSON (as in transformers).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _plain(value: Any) -> Any:
    """Copy caller data into plain JSON types so the template only sees str/int/float/list/dict."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if getattr(value, "shape", None) == () and callable(getattr(value, "item", None)):  # numpy scalar
        return _plain(value.item())
    if callable(getattr(value, "model_dump", None)):  # pydantic messages
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace)
    return env


_ENV = _environment()


class ChatTemplate:
    """A compiled chat template. `render()` is thread-safe."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _ENV.from_string(source)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template does not compile: {exc}") from exc

    @classmethod
    def default(cls, bos_token: str = "", eos_token: str = "<|im_end|>") -> ChatTemplate:
        """ChatML, for models that ship no template."""
        return cls(CHATML, bos_token, eos_token)

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        return self._render(_chat(messages), _plain(tools), add_generation_prompt, extra)

    def render_segments(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> list[Segment]:
        """The same text as `render`, cut into what the template wrote (`template=True`: its turn
        markers may be special tokens) and what came from the caller's fields (message contents, names,
        tool arguments and results, tool definitions: never special tokens). See `_segments`."""
        chat, plain_tools = _chat(messages), _plain(tools)
        text = self._render(chat, plain_tools, add_generation_prompt, extra)
        fields: list[str] = []
        nonce = secrets.token_hex(6)

        def mark(value: str) -> str:
            fields.append(value)
            return f"{_SENTINEL_OPEN}{nonce}{len(fields) - 1:x}{_SENTINEL_CLOSE}"

        marked = self._render(_replace_strings(chat, mark), _replace_strings(plain_tools, mark),
                              add_generation_prompt, extra)
        return _segments(text, marked, fields, nonce)

    def _render(self, chat: list[dict[str, Any]], tools: Any, add_generation_prompt: bool,
                extra: dict[str, Any]) -> str:
        context: dict[str, Any] = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "documents": None,
            **{k: _plain(v) for k, v in extra.items()},
        }
        try:
            return self._template.render(
                context, messages=chat, tools=tools, add_generation_prompt=add_generation_prompt
            )
        except jinja2.exceptions.SecurityError as exc:
            raise ChatTemplateError(f"chat template attempted a forbidden operation: {exc}") from exc
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template error: {exc}") from exc
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError,
                OverflowError, RecursionError) as exc:
            raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc


class Segment(NamedTuple):
    text: str
    template: bool  # True: written by the template (special tokens parsed); False: caller data (literal)


def _chat(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
        raise ChatTemplateError("messages must be a list of objects")
    # None-valued keys are dropped (OpenAI clients send content=None, tool_calls=None), as
    # transformers does: templates handle a missing key but often render "None".
    return [{k: _plain(v) for k, v in m.items() if v is not None} for m in messages]


# Sentinels stand in for caller strings in a second render; ASCII letters only, so tojson, escaping
# and string filters leave them intact, with a per-render nonce so caller text cannot forge one.
_SENTINEL_OPEN, _SENTINEL_CLOSE = "QmSeNtOpEn", "QmSeNtClOsE"
# Values templates branch on (`message.role == 'user'`, `part.type == 'text'`) stay as they are.
_STRUCTURAL_KEYS = frozenset({"role", "type"})


def _replace_strings(value: Any, mark: Any, key: str | None = None) -> Any:
    """Copy of `value` with every non-empty string leaf (except structural ones) replaced by mark(s).
    Empty strings stay: templates test truthiness (`if message.content`)."""
    if isinstance(value, str):
        return mark(value) if value and key not in _STRUCTURAL_KEYS else value
    if isinstance(value, dict):
        return {k: _replace_strings(v, mark, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_replace_strings(v, mark, key) for v in value]
    return value


def _segments(text: str, marked: str, fields: list[str], nonce: str) -> list[Segment]:
    """Align the real render `text` with the sentinel render `marked`.

    The template pieces between sentinels must appear verbatim in `text`; each field shows up as the
    caller's string or a piece of it (templates trim, strip, or split off reasoning). A template that
    renders fields some other way cannot be split: the whole text is then one template segment, which
    tokenizes as before (special tokens parsed everywhere).
    """
    pattern = re.compile(re.escape(_SENTINEL_OPEN + nonce) + "([0-9a-f]+)" + re.escape(_SENTINEL_CLOSE))
    pieces = pattern.split(marked)  # template, field index, template, field index, ..., template
    out: list[Segment] = []
    pos = 0
    for i in range(0, len(pieces), 2):
        tmpl = pieces[i]
        if not text.startswith(tmpl, pos):
            return [Segment(text, True)]
        if tmpl:
            out.append(Segment(tmpl, True))
        pos += len(tmpl)
        if i + 1 == len(pieces):
            break
        field = fields[int(pieces[i + 1], 16)]
        end = _field_end(text, pos, field, pieces[i + 2])
        if end is None:
            return [Segment(text, True)]
        if end > pos:
            out.append(Segment(text[pos:end], False))
        pos = end
    return out if pos == len(text) else [Segment(text, True)]


def _field_end(text: str, pos: int, field: str, following: str) -> int | None:
    """End of the rendered field starting at `pos`: the caller's string, else the longest substring of it
    that the next template piece follows."""
    if text.startswith(field + following, pos):
        return pos + len(field)
    for end in range(min(len(text), pos + len(field)), pos - 1, -1):
        if text.startswith(following, end) and text[pos:end] in field:
            return end
    return None
