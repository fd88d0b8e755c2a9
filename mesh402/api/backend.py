"""A client for an operator's own OpenAI-compatible server (`serve --backend URL`).

Everything a backend answers is untrusted input, like a peer's: every call has a deadline (connect, first
byte, and between stream events), every body a size cap, and every JSON a shape check; a backend that
breaks a rule is an error of this client (`BackendError`, answered as a clean 503), never a crash or an
unbounded read. Streams are parsed event by event and handed on as JSON objects, so the edge re-frames
them (never relays raw bytes), and a stream asks for `stream_options.include_usage` so the node can count
and charge tokens from the backend's `usage`.

The node's side (probing, listing, answering through the edge) is mesh402.api.backends.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError


@dataclass(frozen=True)
class BackendLimits:
    probe_timeout_s: float = 5.0  # GET /models, the health probe
    first_byte_timeout_s: float = 120.0  # a completion's status line (prefill may be slow)
    idle_timeout_s: float = 60.0  # between body chunks / stream events
    max_list_bytes: int = 1 << 20
    max_models: int = 256
    max_answer_bytes: int = 8 << 20  # a whole non-streamed answer
    max_event_bytes: int = 1 << 20  # one SSE event of a stream
    max_error_bytes: int = 4096  # what an error answer may say


class BackendError(Exception):
    """The backend is unreachable or broke a rule; `code` names which (`backend_unavailable`, ...)."""

    def __init__(self, message: str, code: str = "backend_unavailable", status: int = 503) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


class BackendModel(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str = Field(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f]+$")
    context_length: int | None = Field(default=None, ge=1, le=1 << 24)


class _ModelList(BaseModel):
    model_config = ConfigDict(extra="ignore")
    data: list[Any]


class Usage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt_tokens: int = Field(ge=0, le=1 << 24)
    completion_tokens: int = Field(ge=0, le=1 << 24)


class _Answer(BaseModel):
    model_config = ConfigDict(extra="allow")
    choices: list[dict[str, Any]] = Field(max_length=128)
    usage: Usage | None = None


@dataclass
class Backend:
    url: str  # the base URL, ending before /models (e.g. http://127.0.0.1:8000/v1)
    api_key: str | None = None
    limits: BackendLimits = field(default_factory=BackendLimits)
    healthy: bool = False
    models: list[BackendModel] = field(default_factory=list)
    last_error: str | None = None
    checked_at: float = 0.0
    answers: int = 0  # completions answered through this backend
    usage_estimated: int = 0  # ... of which the node counted the tokens (the backend sent no usage)
    usage_count_s: float = 0.0  # time spent counting them

    def _headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _client(self, read_timeout: float) -> httpx.AsyncClient:
        # follow no redirects: a backend must not send the node (and its key) anywhere else
        return httpx.AsyncClient(base_url=self.url.rstrip("/"), headers=self._headers(), follow_redirects=False,
                                 timeout=httpx.Timeout(self.limits.probe_timeout_s, read=read_timeout))

    # ---------------------------------------------------------------- models and health
    async def list_models(self) -> list[BackendModel]:
        """GET {url}/models within the probe deadline; the entries that are well-formed (at most max_models)."""
        try:
            async with self._client(self.limits.probe_timeout_s) as c:
                body = await asyncio.wait_for(self._get(c, "/models"), self.limits.probe_timeout_s)
        except asyncio.TimeoutError:
            raise BackendError(f"{self.url}/models did not answer within {self.limits.probe_timeout_s:g} s") from None
        try:
            listed = _ModelList.model_validate_json(body)
        except ValidationError:
            raise BackendError(f"{self.url}/models is not an OpenAI model list", "backend_bad_answer") from None
        out: list[BackendModel] = []
        for item in listed.data[: self.limits.max_models]:
            try:
                out.append(BackendModel.model_validate(item))
            except ValidationError:
                continue  # one bad entry loses that model only
        return out

    async def _get(self, c: httpx.AsyncClient, path: str) -> bytes:
        try:
            async with c.stream("GET", path) as r:
                body = await self._read(r, self.limits.max_list_bytes)
        except httpx.HTTPError as e:
            raise BackendError(f"{self.url} is unreachable: {type(e).__name__}") from None
        if r.status_code != 200:
            raise BackendError(f"{self.url}{path} answered {r.status_code}", "backend_error")
        return body

    async def probe(self) -> bool:
        """Refresh health and the model list; never raises."""
        try:
            self.models = await self.list_models()
            self.healthy, self.last_error = True, None
        except BackendError as e:
            self.healthy, self.last_error = False, str(e)
        self.checked_at = time.time()
        return self.healthy

    # ---------------------------------------------------------------- completions
    async def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST {url}/chat/completions, not streamed: the validated answer."""
        async with self._client(self.limits.idle_timeout_s) as c:
            try:
                req = c.build_request("POST", "/chat/completions", json={**body, "stream": False})
                r = await asyncio.wait_for(c.send(req, stream=True), self.limits.first_byte_timeout_s)
            except (httpx.HTTPError, asyncio.TimeoutError) as e:
                raise BackendError(f"{self.url} did not answer: {type(e).__name__}") from None
            try:
                data = await self._read(r, self.limits.max_answer_bytes)
            finally:
                await r.aclose()
        if r.status_code != 200:
            raise BackendError(f"the backend answered {r.status_code}: {data[: self.limits.max_error_bytes]!r}",
                               "backend_error", 502 if r.status_code >= 500 else r.status_code)
        try:
            return _Answer.model_validate_json(data).model_dump(exclude_none=True)
        except ValidationError:
            raise BackendError("the backend's answer is not a chat completion", "backend_bad_answer") from None

    async def stream_chat(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """POST {url}/chat/completions with stream (and include_usage): each event's JSON object, until [DONE]."""
        payload = {**body, "stream": True, "stream_options": {**(body.get("stream_options") or {}), "include_usage": True}}
        async with self._client(self.limits.idle_timeout_s) as c:
            try:
                req = c.build_request("POST", "/chat/completions", json=payload)
                r = await asyncio.wait_for(c.send(req, stream=True), self.limits.first_byte_timeout_s)
            except (httpx.HTTPError, asyncio.TimeoutError) as e:
                raise BackendError(f"{self.url} did not answer: {type(e).__name__}") from None
            try:
                if r.status_code != 200:
                    err = await self._read(r, self.limits.max_error_bytes, truncate=True)
                    raise BackendError(f"the backend answered {r.status_code}: {err!r}", "backend_error",
                                       502 if r.status_code >= 500 else r.status_code)
                async for event in self._events(r):
                    yield event
            finally:
                await r.aclose()

    async def _events(self, r: httpx.Response) -> AsyncIterator[dict[str, Any]]:
        buf = b""
        chunks = r.aiter_raw()
        while True:
            try:
                chunk = await asyncio.wait_for(chunks.__anext__(), self.limits.idle_timeout_s)
            except StopAsyncIteration:
                raise BackendError("the backend's stream ended without [DONE]", "backend_stream_cut") from None
            except asyncio.TimeoutError:
                raise BackendError(f"the backend's stream stalled for {self.limits.idle_timeout_s:g} s",
                                   "backend_stream_cut") from None
            except httpx.HTTPError as e:
                raise BackendError(f"the backend's stream broke: {type(e).__name__}", "backend_stream_cut") from None
            buf += chunk
            while True:
                sep = min((i for i in (buf.find(b"\n\n"), buf.find(b"\r\n\r\n")) if i >= 0), default=-1)
                if sep < 0:
                    break
                raw, buf = buf[:sep], buf[sep:].lstrip(b"\r\n")
                data = b"".join(ln[5:].strip() for ln in raw.splitlines() if ln.startswith(b"data:"))
                if not data:
                    continue  # comments, keepalives, event names
                if data == b"[DONE]":
                    return
                try:
                    event = json.loads(data)
                except ValueError:
                    raise BackendError("the backend sent an event that is not JSON", "backend_bad_answer") from None
                if not isinstance(event, dict):
                    raise BackendError("the backend sent an event that is not a JSON object", "backend_bad_answer")
                if isinstance(event.get("usage"), dict):
                    try:
                        event["usage"] = Usage.model_validate(event["usage"]).model_dump() | {
                            "total_tokens": event["usage"].get("total_tokens")}
                    except ValidationError:
                        event.pop("usage")
                yield event
            if len(buf) > self.limits.max_event_bytes:
                raise BackendError("the backend sent an event over the size cap", "backend_bad_answer")

    async def _read(self, r: httpx.Response, cap: int, *, truncate: bool = False) -> bytes:
        out = bytearray()
        chunks = r.aiter_raw()
        while True:
            try:
                chunk = await asyncio.wait_for(chunks.__anext__(), self.limits.idle_timeout_s)
            except StopAsyncIteration:
                return bytes(out)
            except asyncio.TimeoutError:
                raise BackendError(f"the backend stalled for {self.limits.idle_timeout_s:g} s") from None
            out += chunk
            if len(out) > cap:
                if truncate:
                    return bytes(out[:cap])
                raise BackendError(f"the backend's answer is over {cap} bytes", "backend_bad_answer")
