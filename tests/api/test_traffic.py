"""The edge's traffic counters (api/traffic.py) and the ASGI meter that feeds them (api/meter.py): rates over
the window, bounded tables, no prompt text unless turned on, and what the meter reads from real
streamed and whole answers (an in-process ASGI app that answers like the edge)."""

from __future__ import annotations

import asyncio
import json

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from mesh402.api import traffic as tr
from mesh402.api.meter import MAX_EVENT_BYTES, TrafficMeter
from mesh402.api.traffic import Served, Traffic
from mesh402.clock import FakeClock


def served(model: str = "m", node: str = "self", tokens: int = 10, status: int = 200, ttft: float | None = 50.0,
           prompt: str | None = None) -> Served:
    return Served("r", 0.0, "/v1/chat/completions", model, model, node, "client", True, status,
                  prompt_tokens=5, completion_tokens=tokens, ttft_ms=ttft, prompt=prompt)


def test_rates_cover_the_last_minute_and_ttft_percentiles() -> None:
    clock = FakeClock()
    t = Traffic(clock)
    for i in range(30):
        t.record(served(tokens=20, ttft=float(10 + i)))
        clock.advance(1.0)
    v = t.view()
    (m,) = v["models"]
    assert m["requests"] == 30 and m["tokens"] == 600
    assert m["rps"] == round(30 / tr.WINDOW_S, 3) and m["tok_s"] == round(600 / tr.WINDOW_S, 2)
    assert 20 <= m["ttft_p50_ms"] <= 30 and m["ttft_p95_ms"] >= 36
    clock.advance(tr.WINDOW_S + 1)  # a quiet minute: rates fall to zero, totals stay
    (m,) = t.view()["models"]
    assert m["rps"] == 0 and m["tok_s"] == 0 and m["requests"] == 30


def test_tables_are_bounded() -> None:
    t = Traffic(FakeClock())
    for i in range(tr.MAX_KEYS + 50):
        t.record(served(model=f"model-{i}", node=f"{i:016x}"))
    v = t.view()
    assert len(v["rows"]) == tr.MAX_KEYS + 1  # the rest summed under (other)
    assert any(r["model"] == tr.OTHER and r["requests"] == 50 for r in v["rows"])
    assert len(v["recent"]) == tr.RECENT
    keys = [t.begin(f"x{i}") for i in range(tr.MAX_MODELS + 10)]
    assert len(t.inflight) == tr.MAX_MODELS + 1 and t.inflight[tr.OTHER] == 10
    for k in keys:
        t.end(k)
    assert not t.inflight


def test_prompt_text_is_kept_only_while_turned_on() -> None:
    t = Traffic(FakeClock())
    t.record(served(prompt="secret question"))
    assert t.view()["recent"][0]["prompt"] is None
    t.show_prompts = True
    t.record(served(prompt="x" * 1000))
    assert t.view()["recent"][0]["prompt"] == "x" * tr.PROMPT_CHARS


def _edge_like() -> Starlette:
    """Answers like the OpenAI edge: a stream with a route header and a usage chunk, or a whole answer."""
    async def chat(request: Request):
        body = await request.json()
        if body.get("model") == "missing":
            return JSONResponse({"error": {"message": "model not found"}}, status_code=404)
        if not body.get("stream"):
            return JSONResponse({"model": "m1", "choices": [{"message": {"content": "hi"}}],
                                 "usage": {"prompt_tokens": 7, "completion_tokens": 3}})

        async def events():
            yield b'data: {"model":"m1","choices":[{"delta":{"role":"assistant","content":""}}]}\n\n'
            await asyncio.sleep(0.02)
            for piece in ("Hel", "lo"):
                yield f"data: {json.dumps({'model': 'm1', 'choices': [{'delta': {'content': piece}}]})}\n\n".encode()
            if body.get("huge"):
                yield b"data: " + b"x" * (MAX_EVENT_BYTES + 10)  # never terminated: parsing stops, counting goes on
            else:
                yield b'data: {"model":"m1","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2}}\n\n'
            yield b"data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"x-mesh402-route": "model=m1; node=abcdef0123456789; via=mesh"})
    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


async def _post(traffic: Traffic, body: dict) -> httpx.Response:
    app = TrafficMeter(_edge_like(), traffic)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        return await c.post("/v1/chat/completions", json=body)


def test_meter_reads_streams_whole_answers_and_errors() -> None:
    t = Traffic()
    msgs = [{"role": "user", "content": "my private prompt"}]
    r = asyncio.run(_post(t, {"model": "auto", "stream": True, "messages": msgs}))
    assert r.status_code == 200 and '"Hel"' in r.text and '"lo"' in r.text  # passed through unchanged
    s = t.view()["recent"][0]
    assert (s["requested"], s["model"], s["node"], s["stream"]) == ("auto", "m1", "abcdef0123456789", True)
    assert (s["prompt_tokens"], s["completion_tokens"], s["prompt"]) == (7, 2, None)
    assert s["ttft_ms"] is not None and s["ttft_ms"] >= 15 and s["total_ms"] >= s["ttft_ms"]

    asyncio.run(_post(t, {"model": "m1", "messages": msgs}))
    s = t.view()["recent"][0]
    assert (s["model"], s["node"], s["completion_tokens"], s["ttft_ms"], s["stream"]) == ("m1", "self", 3, None, False)

    asyncio.run(_post(t, {"model": "missing", "messages": msgs}))
    s = t.view()["recent"][0]
    assert s["status"] == 404 and s["model"] == "" and s["requested"] == "missing"
    assert {row["model"] for row in t.view()["rows"]} == {"m1", tr.OTHER}  # no row named after the unknown model
    assert not t.inflight

    t.show_prompts = True
    asyncio.run(_post(t, {"model": "m1", "stream": True, "huge": True, "messages": msgs}))
    s = t.view()["recent"][0]
    assert s["prompt"] == "my private prompt" and s["status"] == 200 and s["completion_tokens"] == 2
