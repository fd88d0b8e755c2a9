"""Chat completions: the prompt (chat template, tools, tokenize by segment), the grammar every draw is
masked by (`response_format`, `tools` with `tool_choice`), and the OpenAI chat choice (a message with
`tool_calls` or legacy `function_call`, `refusal: null`, logprobs), streamed or whole.

Tools are rendered by the model's own chat template when it renders them (Qwen 2.5/3, Llama 3.x, Mistral),
else by the generic prompt of `engine/tools.py`. With `tool_choice` required or a named function the
answer is constrained to calls whose arguments fit the schemas; with auto the model may answer in text,
and a call it starts is constrained from its start marker on (docs/structured-output.md)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from mesh402.api.completion import Outcome
from mesh402.api.errors import bad_request
from mesh402.api.schemas import ChatCompletionRequest, ChatMessage
from mesh402.serving.generation import Constraints, Delta

FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
VERBOSITY = {"low": "Answer as briefly as possible.", "high": "Answer thoroughly, in detail."}


@dataclass
class ChatPlan:
    prompt_ids: list[int]
    constraints: Constraints
    tool_format: Any = None  # engine.tools.ToolFormat when the answer may hold calls
    legacy: bool = False  # `functions` were asked: calls are answered as `function_call`


# ---- the request -------------------------------------------------------------------------------
def function_tools(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """`tools` (or legacy `functions`) as validated function tools; 400 naming what is wrong."""
    if req.tools and req.functions:
        raise bad_request("send tools or functions, not both", param="functions")
    raw: list[Any] = req.tools or [{"type": "function", "function": f} for f in (req.functions or [])]
    param = "tools" if req.tools else "functions"
    out: list[dict[str, Any]] = []
    for i, t in enumerate(raw):
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            kind = t.get("type") if isinstance(t, dict) else type(t).__name__
            raise bad_request(f"{param}[{i}]: only function tools are supported, got {kind!r}", param=param)
        f = t["function"]
        name, params = f.get("name"), f.get("parameters")
        if not isinstance(name, str) or not FUNCTION_NAME.match(name):
            raise bad_request(f"{param}[{i}]: a function name is 1-64 of a-z, A-Z, 0-9, _ . : -", param=param)
        if params is not None and not isinstance(params, dict):
            raise bad_request(f"{param}[{i}].parameters must be a JSON schema object", param=param)
        if f.get("description") is not None and not isinstance(f.get("description"), str):
            raise bad_request(f"{param}[{i}].description must be a string", param=param)
        out.append({"type": "function", "function": {k: v for k, v in f.items() if v is not None}})
    names = [t["function"]["name"] for t in out]
    if len(set(names)) != len(names):
        raise bad_request("function names must be unique", param=param)
    return out


def tool_choice(req: ChatCompletionRequest, tools: list[dict[str, Any]]) -> tuple[Any, list[dict[str, Any]]]:
    """(tool_choice as engine.tools takes it, the tools it may use). Legacy `function_call` maps onto it;
    `allowed_tools` narrows the tools."""
    choice: Any = req.tool_choice if req.tool_choice is not None else req.function_call
    param = "tool_choice" if req.tool_choice is not None else "function_call"
    if choice is None:
        return ("auto" if tools else "none"), tools
    if isinstance(choice, str):
        if choice not in ("auto", "none", "required"):
            raise bad_request(f"{param} must be auto, none, required or a function", param=param)
        if choice == "required" and param == "function_call":
            raise bad_request("function_call is none, auto or {\"name\": ...}", param=param)
        return choice, tools
    name = (choice.get("function") or {}).get("name") if "function" in choice else choice.get("name")
    if choice.get("type") == "allowed_tools":
        allowed = choice.get("allowed_tools") or {}
        mode = allowed.get("mode", "auto")
        keep = {(t.get("function") or {}).get("name") for t in allowed.get("tools") or [] if isinstance(t, dict)}
        if mode not in ("auto", "required") or not keep:
            raise bad_request("allowed_tools needs mode auto or required and the tools it allows", param=param)
        narrowed = [t for t in tools if t["function"]["name"] in keep]
        if len(narrowed) != len(keep):
            raise bad_request("allowed_tools names a function that is not in tools", param=param)
        return mode, narrowed
    if choice.get("type", "function") != "function" or not isinstance(name, str):
        raise bad_request(f"{param}: only function tools can be chosen", param=param)
    if name not in {t["function"]["name"] for t in tools}:
        raise bad_request(f"{param} names function {name!r}, which is not in {'tools' if req.tools else 'functions'}",
                          param=param)
    return {"type": "function", "function": {"name": name}}, tools


def message_dicts(req: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The conversation as chat templates take it (text content, tool calls with string arguments)."""
    out = []
    for i, m in enumerate(req.messages):
        try:
            d: dict[str, Any] = {"role": m.role, "content": m.text()}
        except ValueError as e:
            raise bad_request(f"messages[{i}]: {e}", param="messages") from None
        for k in ("name", "tool_call_id", "reasoning_content"):
            if getattr(m, k) is not None:
                d[k] = getattr(m, k)
        calls = _calls(m, i)
        if calls:
            d["tool_calls"] = calls
        out.append(d)
    if req.verbosity in VERBOSITY:
        line = VERBOSITY[req.verbosity]
        if out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{line}".strip()}
        else:
            out.insert(0, {"role": "system", "content": line})
    return out


def _calls(m: ChatMessage, i: int) -> list[dict[str, Any]]:
    raw = list(m.tool_calls or [])
    if m.function_call is not None:  # legacy assistant call
        raw.append({"id": f"call_{i}", "type": "function", "function": m.function_call})
    calls: list[dict[str, Any]] = []
    for c in raw:
        f = c.get("function") if isinstance(c, dict) else None
        if not isinstance(f, dict) or not isinstance(f.get("name"), str):
            raise bad_request(f"messages[{i}].tool_calls: each call needs function.name", param="messages")
        args = f.get("arguments", "{}")
        if not isinstance(args, str):
            raise bad_request(f"messages[{i}].tool_calls: function.arguments is a JSON string", param="messages")
        calls.append({"id": str(c.get("id") or f"call_{i}_{len(calls)}"), "type": "function",
                      "function": {"name": f["name"], "arguments": args}})
    return calls


@dataclass
class ChatPrompt:
    """A chat request rendered by a chat template: the prompt's segments (Tokenizer.encode_chat) and the
    tool calling it allows."""

    segments: list[Any]  # engine.chat_template.Segment
    fmt: Any  # engine.tools.ToolFormat
    usable: list[dict[str, Any]]
    choice: Any
    active: bool  # the answer may hold tool calls


def render_chat(req: ChatCompletionRequest, template: Any) -> ChatPrompt:
    """The prompt `template` (an engine.chat_template.ChatTemplate) makes of a chat request; 400 when it fails."""
    from mesh402.engine.chat_template import ChatTemplateError  # lazy: loads gguf, numpy, torch only when needed
    from mesh402.engine.tools import GENERIC, detect_format, render_with_tools  # lazy: as above

    if req.modalities and "audio" in req.modalities:
        raise bad_request("modalities: audio output is not supported: this node serves text models",
                          param="modalities")
    tools = function_tools(req)
    choice, usable = tool_choice(req, tools)
    messages = message_dicts(req)
    history_calls = any(m.get("tool_calls") or m["role"] in ("tool", "function") for m in messages)
    fmt = detect_format(template) if tools or history_calls else GENERIC
    active = bool(usable) and choice != "none"
    extra: dict[str, Any] = {}
    if req.reasoning_effort is not None:
        extra = {"reasoning_effort": req.reasoning_effort,
                 "enable_thinking": req.reasoning_effort not in ("none", "minimal")}
    try:
        segments = render_with_tools(template, messages, usable if active else None, fmt, **extra)
    except ChatTemplateError as e:
        raise bad_request(f"chat template failed: {e}", param="messages") from None
    return ChatPrompt(segments, fmt, usable, choice, active)


def plan_chat(req: ChatCompletionRequest, engine: Any) -> ChatPlan:
    """The prompt ids and the grammar for a chat request on `engine` (the serving node's model)."""
    from mesh402.engine.chat_template import ChatTemplate  # lazy: loads gguf, numpy, torch only when needed
    from mesh402.engine.grammar import GrammarError  # lazy: loads gguf, numpy, torch only when needed
    from mesh402.engine.tools import tool_grammar  # lazy: loads gguf, numpy, torch only when needed

    rendered = render_chat(req, engine.chat_template or ChatTemplate.default())
    segments, fmt, usable, choice, active = (rendered.segments, rendered.fmt, rendered.usable, rendered.choice,
                                             rendered.active)
    prompt_ids = engine.tokenizer.encode_chat(segments)
    compiler = engine.grammar_compiler()
    rf = req.response_format
    try:
        if active:
            schema = _json_schema(rf)
            src = tool_grammar(fmt, usable, choice, parallel=req.parallel_tool_calls is not False,
                               tokenizer=engine.tokenizer, text_schema=schema,
                               strict_text=_strict(rf))
            grammar = compiler.tool_calls(src) if src else None
        else:
            grammar = compiler.response_format(rf)
    except GrammarError as e:
        raise bad_request(f"the schema cannot be enforced: {e}", param="tools" if active else "response_format",
                          code="invalid_schema") from None
    except ValueError as e:
        raise bad_request(str(e), param="tool_choice") from None
    top = (req.top_logprobs or 0) if req.logprobs else None
    if req.top_logprobs and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")
    return ChatPlan(prompt_ids, Constraints(grammar, top), fmt if active else None, bool(req.functions))


def _strict(rf: dict[str, Any] | None) -> bool:
    spec = (rf or {}).get("json_schema")
    return bool(spec.get("strict")) if isinstance(spec, dict) else False


def _json_schema(rf: dict[str, Any] | None) -> dict[str, Any] | None:
    """The schema a JSON `response_format` asks for (None for text)."""
    kind = (rf or {}).get("type")
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        spec = (rf or {}).get("json_schema") or {}
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return schema if isinstance(schema, dict) else {"type": "object"}
    return None


# ---- the answer ----------------------------------------------------------------------------------
def logprob_entry(tokenizer: Any, token: int, logprob: float) -> dict[str, Any]:
    piece = tokenizer.token_bytes(token)
    return {"token": piece.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(piece)}


def chat_logprobs(tokenizer: Any, lps: list[Any]) -> list[dict[str, Any]]:
    """OpenAI `logprobs.content` entries for engine.sampling.TokenLogprob values."""
    return [{**logprob_entry(tokenizer, lp.token, lp.logprob),
             "top_logprobs": [logprob_entry(tokenizer, i, v) for i, v in lp.top]} for lp in lps]


@dataclass
class _Open:
    """A streamed choice: its tool-call parser and whether it has ended."""

    parser: Any = None  # engine.tools.ToolCallStream
    ended: bool = False


class ChatShaper:
    """Chat choices (see api/completion.Shaper): content, tool_calls (or legacy function_call),
    finish_reason `tool_calls` when the answer is calls, `refusal: null`, logprobs when asked."""

    def __init__(self, plan: ChatPlan, n: int, tokenizer: Any, logprobs: bool) -> None:
        from mesh402.engine.tools import ToolCallStream  # lazy: loads gguf, numpy, torch only when needed

        self.plan, self.n, self.tokenizer, self.logprobs = plan, n, tokenizer, logprobs
        fmt = plan.tool_format
        self.open = [_Open(ToolCallStream(fmt) if fmt is not None else None) for _ in range(n)]

    def _finish(self, reason: str, calls: bool) -> str:
        if reason == "stop" and calls:
            return "function_call" if self.plan.legacy else "tool_calls"
        return reason

    def _delta(self, content: str, deltas: list[Any], state: _Open) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if content:
            d["content"] = content
        if deltas and self.plan.legacy:
            for x in deltas:
                if x.index == 0:  # legacy: one call
                    fc = d.setdefault("function_call", {})
                    if x.name is not None:
                        fc["name"] = x.name
                    fc["arguments"] = fc.get("arguments", "") + x.arguments
        elif deltas:
            d["tool_calls"] = [x.to_openai() for x in deltas]
        return d

    def stream(self, ev: Delta | None, finish: str | None, first: bool) -> list[dict[str, Any]] | None:
        if first:
            return [{"index": i, "delta": {"role": "assistant", "content": "", "refusal": None}, "logprobs": None,
                     "finish_reason": None} for i in range(self.n)]
        if ev is None:  # the answer ends: choices still open (prepaid credit ran out) end with `finish`
            out = [self._end(i, finish or "length") for i, s in enumerate(self.open) if not s.ended]
            return out or None
        state = self.open[ev.index]
        if ev.finish is not None:
            return [self._end(ev.index, ev.finish)]
        content, deltas = (state.parser.feed(ev.text) if state.parser is not None else (ev.text, []))
        d = self._delta(content, deltas, state)
        lps = chat_logprobs(self.tokenizer, ev.logprobs) if self.logprobs else []
        if not d and not lps:
            return None
        return [{"index": ev.index, "delta": d, "logprobs": {"content": lps, "refusal": None} if self.logprobs else None,
                 "finish_reason": None}]

    def _end(self, i: int, reason: str) -> dict[str, Any]:
        state = self.open[i]
        state.ended = True
        d: dict[str, Any] = {}
        calls = False
        if state.parser is not None:
            content, deltas = state.parser.finish()
            d = self._delta(content, deltas, state)
            calls = bool(state.parser.result().tool_calls)
        return {"index": i, "delta": d, "logprobs": None, "finish_reason": self._finish(reason, calls)}

    def whole(self, outcomes: list[Outcome]) -> list[dict[str, Any]]:
        from mesh402.engine.tools import parse_tool_calls  # lazy: loads gguf, numpy, torch only when needed

        out = []
        for o in outcomes:
            msg: dict[str, Any] = {"role": "assistant", "content": o.text, "refusal": None, "annotations": []}
            calls = []
            if self.plan.tool_format is not None:
                parsed = parse_tool_calls(o.text, self.plan.tool_format)
                msg["content"], calls = parsed.content, [c.to_openai() for c in parsed.tool_calls]
            if calls and self.plan.legacy:
                msg["function_call"] = calls[0]["function"]
            elif calls:
                msg["tool_calls"] = calls
            lp = {"content": chat_logprobs(self.tokenizer, o.logprobs), "refusal": None} if self.logprobs else None
            out.append({"index": o.index, "message": msg, "logprobs": lp,
                        "finish_reason": self._finish(o.finish, bool(calls))})
        return out
