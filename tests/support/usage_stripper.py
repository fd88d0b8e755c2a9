"""Test-only OpenAI-compatible server that sends no `usage`, as some backends do: it forwards chat
completions to a real `mesh402 serve` node and strips `usage` from plain answers and from streams (the usage
chunk that `stream_options.include_usage` asks for is dropped, the option not passed on). Its model is the
upstream's under another id (`--alias`), so one front node can front the upstream directly and through this.

Run it as its own process: `python -m tests.support.usage_stripper --port N --upstream http://.../v1 --alias ID`
(`start_usage_stripper` does, and waits until it answers)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from harness.procs import NodeProcess, free_port


def app(upstream: str, alias: str) -> FastAPI:
    api = FastAPI()
    client = httpx.AsyncClient(base_url=upstream.rstrip("/"), timeout=120)
    real: dict[str, str] = {}  # the alias -> the upstream's model id

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = (await client.get("/models")).json()["data"][:1]
        real[alias] = data[0]["id"]
        return {"object": "list", "data": [{**data[0], "id": alias}]}

    @api.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await request.json()
        if alias not in real:
            await models()
        body["model"] = real[alias]
        body.pop("stream_options", None)  # it never asks for usage
        if not body.get("stream"):
            r = await client.post("/chat/completions", json=body)
            out = r.json()
            out.pop("usage", None)
            return JSONResponse({**out, "model": alias}, status_code=r.status_code)

        async def events() -> AsyncIterator[bytes]:
            async with client.stream("POST", "/chat/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        yield b"data: [DONE]\n\n"
                        return
                    ev = json.loads(line[6:])
                    ev.pop("usage", None)
                    if ev.get("choices"):  # usage-only chunks are dropped
                        yield f"data: {json.dumps({**ev, 'model': alias})}\n\n".encode()

        return StreamingResponse(events(), media_type="text/event-stream")

    return api


def start_usage_stripper(home: Path, upstream: str, alias: str) -> tuple[NodeProcess, str]:
    """The server as a process on loopback (its log in `home`); returns it and its base URL (…/v1)."""
    port = free_port()
    proc = NodeProcess([sys.executable, "-m", "tests.support.usage_stripper", "--port", str(port),
                        "--upstream", upstream, "--alias", alias], home)
    base = f"http://127.0.0.1:{port}/v1"
    proc.wait_http(f"{base}/models", timeout=60)
    return proc, base


if __name__ == "__main__":
    import uvicorn

    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True)
    p.add_argument("--alias", required=True)
    a = p.parse_args()
    uvicorn.run(app(a.upstream, a.alias), host="127.0.0.1", port=a.port, log_level="warning")
