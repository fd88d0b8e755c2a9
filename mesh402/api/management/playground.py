"""The console's playground: chat with any model of the mesh through this node's own OpenAI API.

The page never sees the API key: it posts to the console (behind the console token and the Host/Origin
checks), and the console forwards to the node's API on loopback with `Authorization: Bearer <key>` when
the node has one. The answer streams back as it comes, with the API's `x-mesh402-route` header (which
model and node `model: auto` chose, and why) and its status (a node that sells inference answers 402).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

MAX_BODY_BYTES = 256 * 1024
MAX_MESSAGES = 64
PASSED_HEADERS = ("x-mesh402-route", "x-request-id", "retry-after", "content-type")
TIMEOUT = httpx.Timeout(connect=5.0, read=300.0, write=30.0, pool=5.0)


@dataclass
class Playground:
    api_url: str  # the node's API root on loopback, e.g. http://127.0.0.1:9337
    api_key: str | None = None

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def _chat_body(raw: bytes) -> dict[str, Any] | str:
    """The page's chat request, checked and made a stream with usage; a string says what is wrong."""
    try:
        body = json.loads(raw)
    except ValueError:
        return "body must be JSON"
    if not isinstance(body, dict) or not isinstance(body.get("model"), str) or not body["model"]:
        return 'body must be {"model": "...", "messages": [...]}'
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs or len(msgs) > MAX_MESSAGES:
        return f"messages must be a list of 1 to {MAX_MESSAGES} messages"
    out: dict[str, Any] = {"model": body["model"][:128], "messages": msgs, "stream": True,
                           "stream_options": {"include_usage": True}}
    for k in ("max_tokens", "temperature", "seed"):
        if isinstance(body.get(k), (int, float)) and not isinstance(body.get(k), bool):
            out[k] = body[k]
    return out


def install(app: FastAPI, pg: Playground) -> None:
    @app.get("/api/playground/models")
    async def models() -> Response:
        try:
            async with httpx.AsyncClient(timeout=TIMEOUT) as client:
                r = await client.get(f"{pg.api_url}/v1/models", headers=pg.headers())
        except httpx.HTTPError as e:
            return JSONResponse({"error": f"the node's API did not answer: {type(e).__name__}"}, status_code=502)
        return Response(r.content, status_code=r.status_code, media_type="application/json")

    @app.post("/api/playground/chat")
    async def chat(request: Request) -> Response:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            return JSONResponse({"error": f"body over {MAX_BODY_BYTES} bytes"}, status_code=413)
        body = _chat_body(raw)
        if isinstance(body, str):
            return JSONResponse({"error": body}, status_code=400)
        client = httpx.AsyncClient(timeout=TIMEOUT)
        try:
            upstream = await client.send(client.build_request(
                "POST", f"{pg.api_url}/v1/chat/completions", json=body, headers=pg.headers()), stream=True)
        except httpx.HTTPError as e:
            await client.aclose()
            return JSONResponse({"error": f"the node's API did not answer: {type(e).__name__}"}, status_code=502)

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in upstream.aiter_raw():
                    yield chunk
            except httpx.HTTPError:  # the answer broke off: the page shows what arrived
                pass
            finally:
                await upstream.aclose()
                await client.aclose()

        headers = {k: v for k, v in upstream.headers.items() if k.lower() in PASSED_HEADERS}
        headers["cache-control"] = "no-store"
        return StreamingResponse(relay(), status_code=upstream.status_code, headers=headers)
