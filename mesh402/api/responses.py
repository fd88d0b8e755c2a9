"""`POST /v1/responses`, stateless: the request becomes a chat request (instructions, input text or items,
function tools and their outputs, `text.format`), runs through the chat path (prompt, grammar, choices,
payment) and is answered as a Response object, or streamed as Responses events (`response.created` ...
`response.output_text.delta` ... `response.completed`, each SSE event named by its type).

Nothing is stored: `previous_response_id`, conversations and background responses are refused by name
(api/fields.py); a client sends the whole conversation as input items."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.background import BackgroundTask

from mesh402.api import fields
from mesh402.api.bodies import validation_message
from mesh402.api.chat import ChatPlan, chat_logprobs, plan_chat
from mesh402.api.completion import Outcome, Plan, Prepared, admit, collect, run_stream
from mesh402.api.context import EdgeContext
from mesh402.api.errors import bad_request
from mesh402.api.forwarding import arrive
from mesh402.api.schemas import MAX_TOOLS, ChatCompletionRequest
from mesh402.api.selection import Selection, local_route
from mesh402.serving.generation import Delta
from mesh402.serving.registry import ModelEntry

LOGPROBS_INCLUDE = "message.output_text.logprobs"


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    max_tool_calls: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    stream: bool | None = False
    stream_options: dict[str, bool] | None = None
    reasoning: dict[str, Any] | None = None
    truncation: Literal["disabled", "auto"] | None = None
    include: list[str] | None = None
    user: str | None = Field(default=None, max_length=512)
    safety_identifier: str | None = Field(default=None, max_length=512)
    prompt_cache_key: str | None = Field(default=None, max_length=1024)
    session_id: str | None = Field(default=None, max_length=512)
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    store: bool | None = None
    service_tier: str | None = None
    # refused by api/fields.py when sent with a value; typed here so a null passes
    previous_response_id: None = None
    conversation: None = None
    background: bool | None = None
    background_options: None = None
    context_management: None = None
    prompt: None = None
    image: None = None
    moderation: None = None
    access_programs: None = None


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where}: content must be text or a list of text parts", param="input")
    out = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
            out.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            out.append(part["refusal"])
        else:
            raise bad_request(f"{where}: unsupported content part {kind!r}: this model reads text only", param="input")
    return "".join(out)


def messages_of(req: ResponsesRequest) -> list[dict[str, Any]]:
    """Instructions and input items as chat messages (function calls and their outputs included)."""
    msgs: list[dict[str, Any]] = []
    if req.instructions:
        msgs.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        return [*msgs, {"role": "user", "content": req.input}]
    for i, item in enumerate(req.input):
        kind = item.get("type", "message")
        where = f"input[{i}]"
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise bad_request(f"{where}: role must be user, assistant, system or developer", param="input")
            msgs.append({"role": role, "content": _text(item.get("content"), where)})
        elif kind == "function_call":
            call = {"id": str(item.get("call_id") or item.get("id") or f"call_{i}"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "{}")}}
            if msgs and msgs[-1]["role"] == "assistant" and msgs[-1].get("tool_calls") and not msgs[-1]["content"]:
                msgs[-1]["tool_calls"].append(call)  # parallel calls of one answer
            else:
                msgs.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out = item.get("output")
            msgs.append({"role": "tool", "tool_call_id": str(item.get("call_id", "")),
                         "content": out if isinstance(out, str) else _text(out, where)})
        else:
            raise bad_request(f"{where}: item type {kind!r} is not supported (message, function_call and "
                              "function_call_output are)", param="input")
    return msgs


def to_chat(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request a Responses request asks for; 400 naming what cannot be honoured."""
    if req.truncation == "auto":
        raise bad_request("truncation auto is not supported: an input over the context window is a 400",
                          param="truncation")
    include = req.include or []
    unknown = [x for x in include if x != LOGPROBS_INCLUDE]
    if unknown:
        raise bad_request(f"include {unknown[0]!r} is not supported (only {LOGPROBS_INCLUDE!r})", param="include")
    tools = []
    for i, t in enumerate(req.tools or []):
        if not isinstance(t, dict) or t.get("type") != "function":
            kind = t.get("type") if isinstance(t, dict) else None
            raise bad_request(f"tools[{i}]: only function tools are supported, got {kind!r}", param="tools")
        tools.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters", "strict")
                                                       if t.get(k) is not None}})
    choice: Any = req.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") == "function":
            choice = {"type": "function", "function": {"name": choice.get("name")}}
        elif choice.get("type") == "allowed_tools":
            allowed: dict[str, Any] = {"mode": choice.get("mode", "auto"), "tools": [
                {"type": "function", "function": {"name": t.get("name")}} for t in choice.get("tools") or []
                if isinstance(t, dict)]}
            choice = {"type": "allowed_tools", "allowed_tools": allowed}
        else:
            raise bad_request(f"tool_choice {choice.get('type')!r} is not supported", param="tool_choice")
    if req.max_tool_calls == 0:
        choice = "none"
    text = req.text or {}
    fmt = text.get("format")
    rf: dict[str, Any] | None = None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        rf = {"type": "json_schema", "json_schema": {k: fmt[k] for k in ("name", "schema", "strict", "description")
                                                      if k in fmt}}
    elif isinstance(fmt, dict):
        rf = {"type": fmt.get("type")}
    effort = (req.reasoning or {}).get("effort")
    data: dict[str, Any] = {
        "model": req.model, "messages": messages_of(req), "tools": tools or None, "tool_choice": choice,
        "parallel_tool_calls": False if req.max_tool_calls == 1 else req.parallel_tool_calls,
        "response_format": rf, "max_completion_tokens": req.max_output_tokens, "temperature": req.temperature,
        "top_p": req.top_p, "stream": req.stream, "verbosity": text.get("verbosity"), "reasoning_effort": effort,
        "logprobs": True if (LOGPROBS_INCLUDE in include or req.top_logprobs is not None) else None,
        "top_logprobs": req.top_logprobs, "user": req.user, "safety_identifier": req.safety_identifier,
        "prompt_cache_key": req.prompt_cache_key, "session_id": req.session_id,
    }
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in data.items() if v is not None})
    except ValidationError as e:
        raise bad_request(validation_message(e)) from None


def install(app: FastAPI, ctx: EdgeContext) -> None:
    @app.post("/v1/responses")
    async def responses(request: Request) -> Any:
        got = await arrive(ctx, request, ResponsesRequest, fields.RESPONSES, "responses", to_chat)
        if isinstance(got, Response):
            return got
        assert isinstance(got.routed, ChatCompletionRequest)
        return await answer(ctx, got.sel, request, got.body, got.routed, got.entry)


# ---- the answer ----------------------------------------------------------------------------------
def _usage(prompt: int, output: int, cached: int = 0) -> dict[str, Any]:
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached}, "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": prompt + output}


@dataclass
class Shape:
    """What every Response object of one request repeats."""

    id: str
    created: int
    model: str
    req: ResponsesRequest

    def response(self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None,
                 reason: str | None = None) -> dict[str, Any]:
        r = self.req
        fmt = (r.text or {}).get("format") or {"type": "text"}
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "model": self.model, "output": output, "usage": usage, "error": None,
                "incomplete_details": {"reason": reason} if reason else None,
                "instructions": r.instructions, "max_output_tokens": r.max_output_tokens,
                "parallel_tool_calls": r.parallel_tool_calls is not False, "previous_response_id": None,
                "temperature": r.temperature, "top_p": r.top_p, "tools": r.tools or [],
                "tool_choice": r.tool_choice or "auto", "text": {"format": fmt}, "truncation": "disabled",
                "metadata": r.metadata or {}, "store": False, "service_tier": "default", "user": r.user,
                "reasoning": {"effort": (r.reasoning or {}).get("effort"), "summary": None}}


def _ids(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def output_items(o: Outcome, plan: ChatPlan, tokenizer: Any, logprobs: bool, max_calls: int | None) -> list[dict[str, Any]]:
    """A finished choice as Responses output items: a message (when there is text), then function calls."""
    from mesh402.engine.tools import parse_tool_calls  # lazy: loads gguf, numpy, torch only when needed

    text, calls = o.text, []
    if plan.tool_format is not None:
        parsed = parse_tool_calls(o.text, plan.tool_format)
        text, calls = parsed.content or "", parsed.tool_calls[:max_calls] if max_calls else parsed.tool_calls
    items: list[dict[str, Any]] = []
    status = "completed" if o.finish != "length" else "incomplete"
    if text or not calls:
        part = {"type": "output_text", "text": text, "annotations": [],
                "logprobs": chat_logprobs(tokenizer, o.logprobs) if logprobs else []}
        items.append({"id": _ids("msg"), "type": "message", "status": status, "role": "assistant", "content": [part]})
    for c in calls:
        items.append({"id": _ids("fc"), "type": "function_call", "status": status, "call_id": c.id, "name": c.name,
                      "arguments": c.arguments})
    return items


async def answer(ctx: EdgeContext, sel: Selection, request: Request, req: ResponsesRequest,
                 chat: ChatCompletionRequest, entry: ModelEntry) -> Response:
    local = entry.local
    assert local is not None
    plan = plan_chat(chat, local.engine)
    charge, p = await admit(ctx, request, chat, entry, Plan(plan.prompt_ids, plan.constraints, 1))
    if not isinstance(p, Prepared):
        return p
    shape = Shape(_ids("resp"), int(time.time()), entry.model_id, req)
    headers = {"x-request-id": p.gen.request_id, **(charge.headers if charge else {}), **local_route(ctx, sel, entry)}
    logprobs = bool(chat.logprobs)
    if req.stream:
        events = EventStream(shape, plan, local.tokenizer, logprobs, len(p.prompt_ids), req.max_tool_calls)
        body = ctx.payments.sse(charge, run_stream(ctx, p), events.chunk, False, len(p.prompt_ids))
        return StreamingResponse(body, media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"},
                                 background=BackgroundTask(p.release))
    outs, fin = await collect(ctx, p, charge)
    o = outs[0]
    reason = "max_output_tokens" if o.finish == "length" else None
    whole = shape.response("incomplete" if reason else "completed",
                          output_items(o, plan, local.tokenizer, logprobs, req.max_tool_calls),
                          _usage(fin.prompt_tokens, fin.completion_tokens, fin.cached_tokens), reason)
    return await ctx.payments.respond(charge, fin, whole, headers)


@dataclass
class _Item:
    """An output item being streamed."""

    index: int
    id: str
    kind: str  # message | function_call
    text: str = ""
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    call_id: str = ""
    name: str = ""


class EventStream:
    """Generation events as Responses streaming events (one `chunk` call may give several)."""

    def __init__(self, shape: Shape, plan: ChatPlan, tokenizer: Any, logprobs: bool, prompt_tokens: int,
                 max_calls: int | None) -> None:
        from mesh402.engine.tools import ToolCallStream  # lazy: loads gguf, numpy, torch only when needed

        self.shape, self.plan, self.tokenizer, self.logprobs = shape, plan, tokenizer, logprobs
        self.parser = ToolCallStream(plan.tool_format) if plan.tool_format is not None else None
        self.prompt_tokens, self.max_calls = prompt_tokens, max_calls
        self.seq = 0
        self.output: list[dict[str, Any]] = []
        self.item: _Item | None = None
        self.calls: dict[int, _Item] = {}
        self.tokens = 0
        self.ended = False

    def _ev(self, kind: str, **body: Any) -> dict[str, Any]:
        self.seq += 1
        return {"type": kind, "sequence_number": self.seq - 1, **body}

    def chunk(self, ev: Delta | None, finish: str | None, first: bool) -> list[dict[str, Any]] | dict[str, Any] | None:
        if first:
            r = self.shape.response("in_progress", [], None)
            return [self._ev("response.created", response=r), self._ev("response.in_progress", response=r)]
        if ev is None and finish is None:  # the frame of an x402 record: a Responses-shaped envelope
            return {"type": "response.x402", "sequence_number": self.seq}
        if ev is None:
            return self._end(finish or "length") if not self.ended else None
        self.tokens += ev.tokens
        if ev.finish is not None:
            return self._end(ev.finish)
        content, deltas = self.parser.feed(ev.text) if self.parser is not None else (ev.text, [])
        lps = chat_logprobs(self.tokenizer, ev.logprobs) if self.logprobs else []
        out = self._content(content, lps) if content or lps else []
        for d in deltas:
            out += self._call(d)
        return out or None

    def _content(self, text: str, lps: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        if self.item is None or self.item.kind != "message":
            out += self._close()
            self.item = _Item(len(self.output), _ids("msg"), "message")
            self.output.append({})
            out.append(self._ev("response.output_item.added", output_index=self.item.index, item={
                "id": self.item.id, "type": "message", "status": "in_progress", "role": "assistant", "content": []}))
            out.append(self._ev("response.content_part.added", item_id=self.item.id, output_index=self.item.index,
                                content_index=0, part={"type": "output_text", "text": "", "annotations": [],
                                                       "logprobs": []}))
        self.item.text += text
        self.item.logprobs += lps
        out.append(self._ev("response.output_text.delta", item_id=self.item.id, output_index=self.item.index,
                            content_index=0, delta=text, logprobs=lps))
        return out

    def _call(self, d: Any) -> list[dict[str, Any]]:
        out = []
        if d.id is not None:  # a new call starts
            if self.max_calls and len(self.calls) >= self.max_calls:
                return []
            out += self._close()
            self.item = _Item(len(self.output), _ids("fc"), "function_call", call_id=d.id, name=d.name or "")
            self.output.append({})
            self.calls[d.index] = self.item
            out.append(self._ev("response.output_item.added", output_index=self.item.index, item={
                "id": self.item.id, "type": "function_call", "status": "in_progress", "call_id": d.id,
                "name": self.item.name, "arguments": ""}))
        item = self.calls.get(d.index)
        if item is not None and d.arguments:
            item.text += d.arguments
            out.append(self._ev("response.function_call_arguments.delta", item_id=item.id, output_index=item.index,
                                delta=d.arguments))
        return out

    def _close(self, status: str = "completed") -> list[dict[str, Any]]:
        it, self.item = self.item, None
        if it is None:
            return []
        if it.kind == "message":
            part = {"type": "output_text", "text": it.text, "annotations": [], "logprobs": it.logprobs}
            done = {"id": it.id, "type": "message", "status": status, "role": "assistant", "content": [part]}
            evs = [self._ev("response.output_text.done", item_id=it.id, output_index=it.index, content_index=0,
                            text=it.text, logprobs=it.logprobs),
                   self._ev("response.content_part.done", item_id=it.id, output_index=it.index, content_index=0,
                            part=part)]
        else:
            done = {"id": it.id, "type": "function_call", "status": status, "call_id": it.call_id, "name": it.name,
                    "arguments": it.text}
            evs = [self._ev("response.function_call_arguments.done", item_id=it.id, output_index=it.index,
                            name=it.name, arguments=it.text)]
        self.output[it.index] = done
        return [*evs, self._ev("response.output_item.done", output_index=it.index, item=done)]

    def _end(self, reason: str) -> list[dict[str, Any]]:
        self.ended = True
        out: list[dict[str, Any]] = []
        if self.parser is not None:
            content, deltas = self.parser.finish()
            if content:
                out += self._content(content, [])
            for d in deltas:
                out += self._call(d)
        if not self.output:  # an empty answer is still one (empty) message
            out += self._content("", [])
        status = "incomplete" if reason == "length" else "completed"
        out += self._close(status)
        r = self.shape.response(status, self.output, _usage(self.prompt_tokens, self.tokens),
                                "max_output_tokens" if status == "incomplete" else None)
        out.append(self._ev("response.incomplete" if status == "incomplete" else "response.completed", response=r))
        return out
