"""Tool calls at the template level: call formats, prompts, grammars, and parsing into OpenAI `tool_calls`.

Formats (what a model writes when it calls a function):
- hermes   (Qwen 2.5/3, Hermes): ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, repeated for
           parallel calls;
- llama3   (Llama 3.1-3.3 JSON tool calling): the whole answer is ``{"name": ..., "parameters": {...}}``;
- mistral  ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` (``[TOOL_CALLS]`` is a control token);
- generic  for templates that know no tools (e.g. SmolLM2): ``<tool_call>[{"name": ..., "arguments": {...}}]</tool_call>``,
           taught by `GENERIC_PROMPT` in a system message (the shape SmolLM2 was tuned on).

Templates that render `tools` themselves get them (`ChatTemplate.render_segments(tools=...)`); others get
the generic prompt. `tool_grammar` returns a Lark grammar (llguidance dialect) for
`GrammarCompiler.tool_calls`: with `required` or a named function the answer *is* one or more calls whose
arguments fit each function's JSON schema; with `auto` the answer is free text, or text followed by calls:
once the start marker appears, the call is constrained from there on. `ToolCallStream` turns the generated
text into OpenAI's streamed deltas; `parse_tool_calls` is the same parser run over the finished text, so
the streamed and the final `arguments` strings are identical.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .chat_template import ChatTemplate, ChatTemplateError, Segment
from .grammar import JSON_WHITESPACE

if TYPE_CHECKING:  # pragma: no cover
    from .tokenizer import Tokenizer


@dataclass(frozen=True)
class ToolFormat:
    name: str
    start: str  # opens the call region ("" for llama3: the answer starts with the JSON object)
    end: str  # closes one call block ("" if none)
    args_key: str  # "arguments" or "parameters"
    list_body: bool  # the block holds a JSON list of calls
    template_renders_tools: bool  # the chat template renders `tools` itself

    @property
    def call_depth(self) -> int:
        """JSON nesting depth of a call object inside the call region."""
        return 2 if self.list_body else 1


HERMES = ToolFormat("hermes", "<tool_call>", "</tool_call>", "arguments", False, True)
LLAMA3 = ToolFormat("llama3", "", "", "parameters", False, True)
MISTRAL = ToolFormat("mistral", "[TOOL_CALLS]", "", "arguments", True, True)
GENERIC = ToolFormat("generic", "<tool_call>", "</tool_call>", "arguments", True, False)
FORMATS = {f.name: f for f in (HERMES, LLAMA3, MISTRAL, GENERIC)}

GENERIC_PROMPT = """You can call functions. The functions you may call are described in JSON Schema:
<tools>{tools}</tools>
To call functions, answer with nothing but a list of calls in this exact format:
<tool_call>[{{"name": "function_name", "arguments": {{"argument": "value"}}}}]</tool_call>
Results come back in messages from the tool. If no function fits, answer in plain text."""

_PROBE_TOOL = [{"type": "function", "function": {"name": "probe_fn", "description": "probe",
                                                  "parameters": {"type": "object", "properties": {}}}}]


def detect_format(template: ChatTemplate | None) -> ToolFormat:
    """The call format a chat template expects, and whether it renders tools itself.

    A template renders tools when a probe tool changes its output; the format is read from the markers
    the template source mentions. Anything else gets the generic prompt and format."""
    if template is None:
        return GENERIC
    msgs = [{"role": "user", "content": "hi"}]
    try:
        renders = template.render(msgs, tools=_PROBE_TOOL) != template.render(msgs)
    except ChatTemplateError:
        renders = False
    if not renders:
        return GENERIC
    src = template.source
    if "[TOOL_CALLS]" in src:
        return MISTRAL
    if "<tool_call>" in src:
        return HERMES
    if "<|python_tag|>" in src or "ipython" in src or '"parameters"' in src:
        return LLAMA3
    return HERMES  # a tool-aware template without known markers: the most common convention


# ---- prompt ------------------------------------------------------------------------------------
def render_with_tools(template: ChatTemplate, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                      fmt: ToolFormat, *, add_generation_prompt: bool = True, **extra: Any) -> list[Segment]:
    """Segments of the prompt (`Tokenizer.encode_chat`), with tools rendered the template's way, or the
    generic prompt merged into the system message; assistant tool calls and tool results included."""
    chat = template_messages(messages, fmt)
    if not tools:
        return template.render_segments(chat, add_generation_prompt=add_generation_prompt, **extra)
    if fmt.template_renders_tools:
        return template.render_segments(chat, tools=tools, add_generation_prompt=add_generation_prompt, **extra)
    prompt = GENERIC_PROMPT.format(tools=json.dumps([_function(t) for t in tools], ensure_ascii=False))
    if chat and chat[0].get("role") == "system" and isinstance(chat[0].get("content"), str):
        chat = [{**chat[0], "content": chat[0]["content"] + "\n\n" + prompt}, *chat[1:]]
    else:
        chat = [{"role": "system", "content": prompt}, *chat]
    return template.render_segments(chat, add_generation_prompt=add_generation_prompt, **extra)


def template_messages(messages: list[dict[str, Any]], fmt: ToolFormat) -> list[dict[str, Any]]:
    """OpenAI messages as chat templates expect them.

    Tool-aware templates get assistant `tool_calls` with `arguments` parsed to objects (Qwen, Llama and
    Mistral templates apply `tojson` to them) and `tool` messages as they are. For the generic format the
    calls become the assistant's text in that format and tool results become `tool` turns."""
    out: list[dict[str, Any]] = []
    for m in messages:
        m = dict(m)
        if m.get("role") == "function":  # legacy OpenAI role: a tool result without a call id
            m["role"] = "tool"
        calls = m.get("tool_calls") or []
        if m.get("role") == "assistant" and calls:
            parsed = [{"type": "function", "id": c.get("id"),
                       "function": {"name": c["function"]["name"], "arguments": _args_obj(c["function"].get("arguments"))}}
                      for c in calls]
            if fmt.template_renders_tools:
                m["tool_calls"] = parsed
            else:
                body = json.dumps([{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                                   for c in parsed], ensure_ascii=False)
                m.pop("tool_calls")
                m["content"] = (m.get("content") or "") + f"{fmt.start}{body}{fmt.end}"
        out.append(m)
    return out


def _args_obj(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments  # not JSON: the template gets the text
    return arguments if arguments is not None else {}


def _function(tool: dict[str, Any]) -> dict[str, Any]:
    return tool.get("function", tool) if isinstance(tool, dict) else {}


# ---- grammar -----------------------------------------------------------------------------------
def tool_grammar(fmt: ToolFormat, tools: Sequence[dict[str, Any]], tool_choice: Any = "auto", *,
                 parallel: bool = True, tokenizer: Tokenizer | None = None,
                 text_schema: dict[str, Any] | None = None, strict_text: bool = True) -> str | None:
    """Lark source (llguidance) constraining the answer to the tool-call format, or None (`none`).

    `tool_choice`: "auto" | "required" | "none" | {"type": "function", "function": {"name": ...}}.
    `tokenizer` lets a start marker that is a special token (Mistral's [TOOL_CALLS]) be matched as that token.
    `text_schema` (with "auto"): an answer that is not a call must be JSON fitting this schema (a request
    with both tools and a JSON `response_format`) instead of free text.
    """
    if tool_choice == "none" or not tools:
        return None
    funcs = [_function(t) for t in tools]
    mode = "required"
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        funcs = [f for f in funcs if f.get("name") == name]
        if not funcs:
            raise ValueError(f"tool_choice names function {name!r}, which is not in tools")
        parallel = False
    elif tool_choice == "auto":
        mode = "auto"
    elif tool_choice != "required":
        raise ValueError(f"tool_choice must be 'auto', 'required', 'none' or a named function, got {tool_choice!r}")
    call = "%json " + json.dumps(_call_schema(fmt, funcs), ensure_ascii=False)
    if fmt.list_body:
        body = f'"[" WS {call} (WS "," WS {call})* WS "]"' if parallel else f'"[" WS {call} WS "]"'
    else:
        body = call
    start = _marker(fmt.start, tokenizer)
    end = f' WS "{fmt.end}"' if fmt.end else ""
    repeat = parallel and not fmt.list_body and bool(fmt.start)  # hermes: one block per call
    more = "(SEP block)* " if repeat else ""
    # WS: inside a call; SEP: around and between call blocks; one space or newline at most, so that the
    # model spends no tokens on blank lines and reaches EOS after the last call.
    lines = [
        "%llguidance {}",
        f"block: {start + ' WS ' if start else ''}{body}{end}",
        r"WS: /[ \n]{0,1}/",
        r"SEP: /[ \n]{0,1}/",
    ]
    if mode == "required":
        lines.insert(1, f"start: SEP block {more}SEP")
    elif text_schema is not None:  # a JSON answer, or calls
        lines.insert(1, f"start: answer | SEP block {more}SEP")
        opts = {"whitespace_pattern": JSON_WHITESPACE, "lenient": not strict_text}
        lines.append("answer: %json " + json.dumps({**text_schema, "x-guidance": opts}, ensure_ascii=False))
    elif not fmt.start:  # llama3: a call is the whole answer, so text must not open like one
        lines.insert(1, "start: TEXT | SEP block SEP")
        lines.append(r"TEXT: /[ \t\r\n]{0,8}[^{ \t\r\n](.|\n)*/")
    elif start.startswith("<["):  # special-token marker: plain text can never contain it
        lines.insert(1, f"start: TEXT | TEXT? {start} WS {body}{end} {more}SEP")
        lines.append(r"TEXT: /(.|\n)+/")
    else:  # text until the marker (lazy: the first occurrence starts the call), then calls
        lines.insert(1, f"start: TEXT | trigger WS {body}{end} {more}SEP")
        lines.append(f"trigger[lazy]: ANY {start}")
        lines.append(r"TEXT: /(.|\n)+/")
        lines.append(r"ANY: /(.|\n)*/")
    return "\n".join(lines) + "\n"


def _call_schema(fmt: ToolFormat, funcs: list[dict[str, Any]]) -> dict[str, Any]:
    options = []
    for f in funcs:
        params = f.get("parameters") or {"type": "object", "properties": {}}
        options.append({"type": "object", "properties": {"name": {"const": f["name"]}, fmt.args_key: params},
                        "required": ["name", fmt.args_key], "additionalProperties": False})
    strict = all(f.get("strict") is not False for f in funcs)
    schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    # Unsupported keywords: refused when strict (arguments must be guaranteed), ignored otherwise.
    return {**schema, "x-guidance": {"whitespace_pattern": JSON_WHITESPACE, "lenient": not strict}}


def _marker(text: str, tokenizer: Tokenizer | None) -> str:
    if not text:
        return ""
    if tokenizer is not None:
        tid = tokenizer.token_to_id(text)
        if tid is not None and tokenizer.is_special(tid):
            return f"<[{tid}]>"
    return json.dumps(text)


# ---- parsing -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ToolCallDelta:
    """One streamed piece: a call's start (id and name set) or more of its arguments."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None

    def to_openai(self) -> dict[str, Any]:
        if self.id is not None:
            return {"index": self.index, "id": self.id, "type": "function",
                    "function": {"name": self.name, "arguments": self.arguments}}
        return {"index": self.index, "function": {"arguments": self.arguments}}


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class _Call:
    index: int
    name: str | None = None
    args: str = ""
    sent: int = 0  # chars of args already streamed
    quoted: bool = False  # arguments written as a JSON string
    done: bool = False


@dataclass
class ParsedOutput:
    content: str | None
    tool_calls: list[ToolCall] = field(default_factory=list)
    complete: bool = True  # False: a call was cut off (e.g. by max_tokens)


def new_call_id(index: int) -> str:
    return "call_" + secrets.token_hex(12)


class ToolCallStream:
    """Incremental parser: feed generated text, get content text and OpenAI tool-call deltas."""

    def __init__(self, fmt: ToolFormat, make_id: Callable[[int], str] = new_call_id) -> None:
        self.fmt = fmt
        self._make_id = make_id
        self._pending = ""  # text not yet classified (a possible partial start marker)
        self._in_calls = False
        self._region = ""  # raw text of the call region (for the fallback to content)
        self._content_sent = 0
        self.content = ""
        self.calls: list[_Call] = []
        self._ids: list[str] = []
        # JSON scanner state inside the call region
        self._stack: list[str] = []
        self._in_str = False
        self._esc = False
        self._str = ""  # the string being scanned (raw, without quotes)
        self._key: str | None = None
        self._expect_key = False
        self._value: str | None = None  # "name" | "args" while inside such a member value
        self._call: _Call | None = None
        self._started = False  # llama3: saw the first non-space character

    # ---- public API ----
    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """(new content text, new tool-call deltas) for this piece of generated text."""
        content = ""
        if not self._in_calls:
            self._pending += text
            content, rest = self._split_content()
            if rest is None:
                return content, []
            text = rest
        before = [(c.name, len(c.args)) for c in self.calls]
        for ch in text:
            self._region += ch
            self._scan(ch)
        return content, self._deltas(before)

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """Flush at the end of generation: held-back text, unstreamed (quoted) arguments."""
        content = ""
        if not self._in_calls:
            content, self._pending = self._pending, ""
            self.content += content
        elif not any(c.name for c in self.calls):  # a marker but no parsable call: it was text after all
            content, self.calls = self.fmt.start + self._region, []
            self.content += content
            self._in_calls = False
        before = [(c.name, len(c.args)) for c in self.calls]
        return content, self._deltas(before, final=True)

    def result(self) -> ParsedOutput:
        """The finished answer (call after `finish`)."""
        calls = [ToolCall(self._ids[c.index], c.name, _final_args(c)) for c in self.calls if c.name is not None]
        complete = all(c.done for c in self.calls) and not self._stack
        content = self.content.strip() or None if calls else (self.content or None)
        return ParsedOutput(content, calls, complete)

    # ---- internals ----
    def _split_content(self) -> tuple[str, str | None]:
        """(content to emit now, text after the start marker or None if no call region yet)."""
        fmt, p = self.fmt, self._pending
        if not fmt.start:  # llama3: a call only if the answer opens with "{"
            stripped = p.lstrip()
            if not stripped:
                return "", None
            if stripped[0] != "{" or self._started:
                self._started = True
                self._pending = ""
                self.content += p
                return p, None
            self._started = self._in_calls = True
            self._pending = ""
            return "", p
        at = p.find(fmt.start)
        if at >= 0:
            self._in_calls = True
            self._pending = ""
            self.content += p[:at]
            return p[:at], p[at + len(fmt.start):]
        keep = _partial_suffix(p, fmt.start)
        emit, self._pending = p[: len(p) - keep], p[len(p) - keep:]
        self.content += emit
        return emit, None

    def _scan(self, ch: str) -> None:
        depth = len(self._stack)
        if self._in_str:
            self._member_char(ch)
            if self._esc:
                self._esc = False
            elif ch == "\\":
                self._esc = True
            elif ch == '"':
                self._in_str = False
                self._end_string()
                return
            self._str += ch
            return
        if ch == '"':
            self._in_str, self._str = True, ""
            self._member_char(ch)
            return
        if ch in "{[":
            self._member_char(ch)
            self._stack.append(ch)
            if ch == "{" and len(self._stack) == self.fmt.call_depth:
                self._call = _Call(len(self.calls))
                self.calls.append(self._call)
                self._ids.append(self._make_id(self._call.index))
                self._expect_key = True
            return
        if ch in "}]":
            if depth == 0:
                return
            if depth == self.fmt.call_depth + 1 and self._value == "args":
                self._member_char(ch)
                self._stack.pop()
                self._value = None  # an object/array argument value just closed
                return
            if ch == "}" and depth == self.fmt.call_depth and self._call is not None:
                self._value = None
                self._call.done = True
                self._call = None
            else:
                self._member_char(ch)
            self._stack.pop()
            return
        if depth == self.fmt.call_depth and self._call is not None:
            if ch == ",":
                self._value, self._expect_key = None, True
                return
            if ch == ":":
                self._expect_key = False
                self._value = {"name": "name", "arguments": "args", "parameters": "args"}.get(self._key or "")
                if self._value == "args" and self._call.args:  # duplicate key: keep the last
                    self._call.args = ""
                return
        self._member_char(ch)

    def _member_char(self, ch: str) -> None:
        """Raw characters of the arguments value are collected as the model writes them."""
        if self._value == "args" and self._call is not None and len(self._stack) >= self.fmt.call_depth:
            if not self._call.args and ch.isspace():
                return
            if not self._call.args and ch == '"':
                self._call.quoted = True
            self._call.args += ch

    def _end_string(self) -> None:
        depth = len(self._stack)
        if depth != self.fmt.call_depth or self._call is None:
            return
        if self._expect_key:
            self._key = _json_string(self._str)
        elif self._value == "name":
            self._call.name = _json_string(self._str)
            self._value = None
        elif self._value == "args" and self._call.quoted:
            self._value = None

    def _deltas(self, before: list[tuple[str | None, int]], final: bool = False) -> list[ToolCallDelta]:
        out: list[ToolCallDelta] = []
        for c in self.calls:
            if c.name is None:
                continue
            was_named = c.index < len(before) and before[c.index][0] is not None
            if c.quoted:  # a JSON-string argument streams once, decoded, when complete
                chunk = _final_args(c) if (c.done or final) and c.sent == 0 else ""
                c.sent = len(c.args) if chunk else c.sent
            else:
                chunk = c.args[c.sent:]
                c.sent = len(c.args)
            if not was_named:
                out.append(ToolCallDelta(c.index, "", self._ids[c.index], c.name))
            if chunk:
                out.append(ToolCallDelta(c.index, chunk))
        return out


def parse_tool_calls(text: str, fmt: ToolFormat, make_id: Callable[[int], str] = new_call_id) -> ParsedOutput:
    """The finished answer as content and OpenAI tool calls (the streaming parser over the whole text)."""
    stream = ToolCallStream(fmt, make_id)
    stream.feed(text)
    stream.finish()
    return stream.result()


def _final_args(c: _Call) -> str:
    if c.quoted:
        try:
            value = json.loads(c.args)
            return value if isinstance(value, str) else c.args
        except ValueError:
            return c.args
    return c.args.rstrip()


def _json_string(raw: str) -> str:
    try:
        return json.loads(f'"{raw}"')
    except ValueError:
        return raw


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
