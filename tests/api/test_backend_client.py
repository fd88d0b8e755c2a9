"""The backend client (mesh402.api.backend) against a real mesh402 node standing alone (its API as the
backend: models, a chat answer, a stream with usage) and against a hostile backend on loopback (oversized,
malformed, stalled, cut-off and redirecting answers): each is a clean BackendError, never a crash or an
unbounded read, and a dead backend reads unhealthy within the probe deadline."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mesh402.api.backend import Backend, BackendError, BackendLimits
from harness.procs import free_port
from tests.support.api_node import ApiNode

MODEL = "smollm2-135m-instruct"
ASK = {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
       "max_tokens": 6, "temperature": 0}

pytestmark = pytest.mark.timeout(300)


def test_a_standalone_node_as_the_backend(api_node: ApiNode) -> None:
    b = Backend(f"{api_node.base}/v1", api_node.api_key)

    async def go() -> tuple[bool, dict, list[dict]]:
        healthy = await b.probe()
        answer = await b.chat(ASK)
        events = [e async for e in b.stream_chat(ASK)]
        return healthy, answer, events

    healthy, answer, events = asyncio.run(go())
    assert healthy and [m.id for m in b.models] == [MODEL] and b.models[0].context_length
    text = answer["choices"][0]["message"]["content"]
    assert text and answer["usage"]["completion_tokens"] > 0
    streamed = "".join((e["choices"][0].get("delta") or {}).get("content") or "" for e in events if e.get("choices"))
    assert streamed == text  # greedy: the same answer streamed
    assert events[-1]["usage"]["completion_tokens"] == answer["usage"]["completion_tokens"]
    wrong_key = Backend(f"{api_node.base}/v1", "not-the-key")
    assert not asyncio.run(wrong_key.probe()) and "401" in (wrong_key.last_error or "")


class Hostile(BaseHTTPRequestHandler):
    def log_message(self, *_: object) -> None:
        pass

    def answer(self, body: bytes, status: int = 200, ctype: str = "application/json",
               headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("content-type", ctype)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        mode = self.path.split("/")[1]
        if mode == "huge":
            self.answer(b'{"data": [' + b'{"id": "x"},' * 200_000 + b'{"id": "y"}]}')
        elif mode == "garbage":
            self.answer(b"<html>not json</html>")
        elif mode == "slow":
            time.sleep(3)
            self.answer(b'{"data": []}')
        elif mode == "redirect":
            self.answer(b"", 302, headers={"location": "http://169.254.169.254/latest/meta-data/"})
        else:  # bad entries among good ones
            self.answer(b'{"data": [{"id": "ok", "context_length": 2048}, {"id": ""}, {"id": 5}, '
                        b'{"id": "neg", "context_length": -1}, "str"]}')

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length", 0)))
        mode = self.path.split("/")[1]
        if mode == "cut":
            self.answer(b'data: {"choices": [{"delta": {"content": "Pa"}}]}\n\n', ctype="text/event-stream")
        elif mode == "notjson":
            self.answer(b"data: {oops\n\n", ctype="text/event-stream")
        elif mode == "bigevent":
            self.answer(b"data: " + b"x" * (2 << 20) + b"\n\n", ctype="text/event-stream")
        elif mode == "stall":
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            self.wfile.write(b'data: {"choices": []}\n\n')
            self.wfile.flush()
            time.sleep(3)
        else:
            self.answer(b'{"choices": "not a list"}')


@pytest.fixture(scope="module")
def hostile() -> Iterator[str]:
    srv = ThreadingHTTPServer(("127.0.0.1", free_port()), Hostile)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()


def code_of(coro: object) -> str:
    async def go() -> str:
        try:
            res = await coro if asyncio.iscoroutine(coro) else [e async for e in coro]  # type: ignore[attr-defined]
        except BackendError as e:
            return e.code
        raise AssertionError(f"no error: {res!r}")
    return asyncio.run(go())


def test_a_hostile_backend_gets_clean_errors(hostile: str) -> None:
    fast = BackendLimits(probe_timeout_s=1.0, idle_timeout_s=1.0, max_event_bytes=1 << 20)
    assert code_of(Backend(f"{hostile}/huge", limits=fast).list_models()) == "backend_bad_answer"
    assert code_of(Backend(f"{hostile}/garbage", limits=fast).list_models()) == "backend_bad_answer"
    assert code_of(Backend(f"{hostile}/slow", limits=fast).list_models()) == "backend_unavailable"
    assert code_of(Backend(f"{hostile}/redirect", limits=fast).list_models()) == "backend_error"  # not followed
    mixed = asyncio.run(Backend(f"{hostile}/mixed", limits=fast).list_models())
    assert [(m.id, m.context_length) for m in mixed] == [("ok", 2048)]
    assert code_of(Backend(f"{hostile}/shape", limits=fast).chat(ASK)) == "backend_bad_answer"
    assert code_of(Backend(f"{hostile}/cut", limits=fast).stream_chat(ASK)) == "backend_stream_cut"
    assert code_of(Backend(f"{hostile}/notjson", limits=fast).stream_chat(ASK)) == "backend_bad_answer"
    assert code_of(Backend(f"{hostile}/bigevent", limits=fast).stream_chat(ASK)) == "backend_bad_answer"
    assert code_of(Backend(f"{hostile}/stall", limits=fast).stream_chat(ASK)) == "backend_stream_cut"


def test_a_dead_backend_is_unhealthy_within_the_deadline() -> None:
    dead = Backend(f"http://127.0.0.1:{free_port()}/v1", limits=BackendLimits(probe_timeout_s=1.0))
    t0 = time.monotonic()
    assert not asyncio.run(dead.probe()) and dead.last_error and time.monotonic() - t0 < 3
    assert code_of(dead.chat(ASK)) == "backend_unavailable"
