"""Server-sent events as the OpenAI streaming API sends them (`data: {json}` events, then `data: [DONE]`):
read with httpx-sse, written with the product's own writer (mesh402.api.bodies.sse), so a test's upstream
stream is byte-for-byte what a node sends. Tests that check the wire text itself read raw lines instead."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
from httpx_sse import EventSource

from mesh402.api.bodies import sse

DONE = "[DONE]"


def json_events(response: httpx.Response) -> Iterator[Any]:
    """The JSON payload of each event of a streaming response, as it arrives; the closing [DONE] is left out."""
    for event in EventSource(response).iter_sse():
        if event.data != DONE:
            yield json.loads(event.data)


async def ajson_events(response: httpx.Response) -> AsyncIterator[Any]:
    """json_events for an httpx.AsyncClient stream."""
    async for event in EventSource(response).aiter_sse():
        if event.data != DONE:
            yield json.loads(event.data)


def body_events(raw: bytes) -> list[Any]:
    """Every event of a whole SSE body already in memory: the JSON payloads, and [DONE] as the string itself."""
    response = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=raw)
    return [event.data if event.data == DONE else json.loads(event.data) for event in EventSource(response).iter_sse()]


def sse_body(*objs: Any) -> list[bytes]:
    """A streamed body in the parts a node sends: one event per object, then [DONE]."""
    return [sse(obj) for obj in objs] + [f"data: {DONE}\n\n".encode()]
