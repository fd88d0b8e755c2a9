"""The ASGI meter in front of the OpenAI edge: it feeds `Traffic` from what crosses the wire, for every
completion request (direct clients and requests tunnelled here by other nodes alike).

It reads, without changing anything: the request body's `model`, `stream` and (only while prompts are
shown) the last user message; the response's status, `x-mesh402-route` header (which node served) and
body: for a stream, the time to the first content chunk, the chunks and the final `usage`; for a
whole answer, its `usage`. What it buffers is capped (`MAX_PARSE_BYTES`); past the cap it stops
parsing and still counts the request.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mesh402.api.traffic import SELF, Served, Traffic
from mesh402.api.tunnel import PEER_SCOPE_KEY
from mesh402.routing.classify import content_text

METERED = ("/v1/chat/completions", "/v1/completions")
MAX_PARSE_BYTES = 4 * 1024 * 1024  # a request body or a whole JSON answer parsed at most
MAX_EVENT_BYTES = 256 * 1024  # one SSE event
NAME_CHARS = 64  # a model name as the client wrote it, cut short
_ROUTE_NODE = re.compile(r"(?:^|;)\s*node=([0-9a-f]{1,64})")


class _Reading:
    """One metered exchange: what was learned so far."""

    def __init__(self, traffic: Traffic, scope: Scope) -> None:
        self.traffic = traffic
        self.t0 = time.monotonic()
        self.served = Served(request_id=uuid.uuid4().hex, ts=traffic.clock.time(), path=scope["path"],
                             requested="", model="", node=SELF, entry=str(scope.get(PEER_SCOPE_KEY) or "client")[:16],
                             stream=False, status=0)
        self.body = bytearray()
        self.sse = False
        self.out = bytearray()
        self.overflow = False
        self.chunks = 0

    def request_body(self) -> None:
        try:
            data = json.loads(bytes(self.body)) if not self.overflow else None
        except ValueError:
            data = None
        self.body = bytearray()
        self.overflow = False
        if not isinstance(data, dict):
            return
        s = self.served
        s.requested = str(data.get("model", ""))[:NAME_CHARS]
        s.stream = data.get("stream") is True
        if self.traffic.show_prompts:
            msgs = data.get("messages")
            if isinstance(msgs, list):
                users = [m for m in msgs if isinstance(m, dict) and m.get("role") == "user"]
                s.prompt = content_text(users[-1].get("content")) if users else None
            elif isinstance(data.get("prompt"), str):
                s.prompt = data["prompt"]

    def response_start(self, message: Message) -> None:
        s = self.served
        s.status = int(message["status"])
        for k, v in message.get("headers", []):
            name = k.decode("latin-1").lower()
            if name == "content-type":
                self.sse = v.startswith(b"text/event-stream")
            elif name == "x-mesh402-route":
                m = _ROUTE_NODE.search(v.decode("latin-1"))
                if m is not None:
                    s.node = m.group(1)
            elif name == "x-request-id":
                s.request_id = v.decode("latin-1")[:64]

    def response_body(self, chunk: bytes) -> None:
        if self.overflow:
            return
        self.out += chunk
        if not self.sse:
            if len(self.out) > MAX_PARSE_BYTES:
                self.overflow, self.out = True, bytearray()
            return
        while True:
            end = self.out.find(b"\n\n")
            if end < 0:
                if len(self.out) > MAX_EVENT_BYTES:
                    self.overflow, self.out = True, bytearray()
                return
            event, self.out = bytes(self.out[:end]), self.out[end + 2:]
            self._event(event)

    def _event(self, raw: bytes) -> None:
        data = b"".join(line[5:].strip() for line in raw.split(b"\n") if line.startswith(b"data:"))
        if not data or data == b"[DONE]":
            return
        try:
            obj = json.loads(data)
        except ValueError:
            return
        if not isinstance(obj, dict):
            return
        self._answer(obj)
        choices = obj.get("choices")
        first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
        delta = first.get("delta")
        piece = delta.get("content") if isinstance(delta, dict) else first.get("text")
        if isinstance(piece, str) and piece:
            self.chunks += 1
            if self.served.ttft_ms is None:
                self.served.ttft_ms = round((time.monotonic() - self.t0) * 1000, 1)

    def _answer(self, obj: dict[str, Any]) -> None:
        s = self.served
        if not s.model and isinstance(obj.get("model"), str):
            s.model = obj["model"][:NAME_CHARS]
        usage = obj.get("usage")
        if isinstance(usage, dict):
            for name in ("prompt_tokens", "completion_tokens"):
                v = usage.get(name)
                if isinstance(v, int) and 0 <= v < 2**31:
                    setattr(s, name, v)

    def finish(self) -> Served:
        s = self.served
        if not self.sse and not self.overflow and self.out and s.status < 400:
            try:
                obj = json.loads(bytes(self.out))
            except ValueError:
                obj = None
            if isinstance(obj, dict):
                self._answer(obj)
        if self.sse and s.completion_tokens is None and s.status < 400:
            s.completion_tokens = self.chunks  # no usage chunk asked for: one chunk per decoded piece
        if s.status >= 400:
            s.model = ""  # an error names no model that served (and an unknown name makes no row)
        s.total_ms = round((time.monotonic() - self.t0) * 1000, 1)
        return s


class TrafficMeter:
    """ASGI middleware: meters the completion endpoints into `traffic`, passes everything through."""

    def __init__(self, app: ASGIApp, traffic: Traffic) -> None:
        self.app = app
        self.traffic = traffic

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in METERED:
            await self.app(scope, receive, send)
            return
        reading = _Reading(self.traffic, scope)
        key = ""

        async def metered_receive() -> Message:
            nonlocal key
            message = await receive()
            if message["type"] == "http.request" and not key:
                if len(reading.body) + len(message.get("body", b"")) > MAX_PARSE_BYTES:
                    reading.overflow = True
                else:
                    reading.body += message.get("body", b"")
                if not message.get("more_body", False):
                    reading.request_body()
                    key = self.traffic.begin(reading.served.requested)
            return message

        async def metered_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                reading.response_start(message)
            elif message["type"] == "http.response.body":
                reading.response_body(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, metered_receive, metered_send)
        finally:
            if key:
                self.traffic.end(key)
            if reading.served.status:
                self.traffic.record(reading.finish())
