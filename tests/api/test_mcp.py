"""The MCP server at the console's /mcp, against a real node process on the bundled model, with the SDK's
own streamable-HTTP client: it lists the tools, answers a chat through the node's API (model "auto" and a
named model, the API key passed on in process), lists models and nodes, posts to and reads the blackboard,
and refuses a client without the console token."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import httpx2
import pytest
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

from mesh402.api.mcp import tool_text
from harness.procs import MESH402, NodeProcess, free_port

MODEL = "smollm2-135m-instruct"
CONSOLE_TOKEN, API_KEY = "console-secret-51c2", "api-key-9d04"

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    home: Path = tmp_path_factory.mktemp("mcp-node")
    port, console = free_port(), free_port()
    proc = NodeProcess([*MESH402, "serve", "--home", str(home), "--port", str(port), "--console", str(console),
                        "--bind-ip", "127.0.0.1", "--mesh-fast-timers"], home,
                       env={"MESH402_CONSOLE_TOKEN": CONSOLE_TOKEN, "MESH402_API_KEY": API_KEY})
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/ready", timeout=180)
        # /mcp starts the MCP server on its first request (the SDK is imported then, not at the node's start)
        first = httpx.post(f"http://127.0.0.1:{console}/mcp", json={}, timeout=60,
                           headers={"Authorization": f"Bearer {CONSOLE_TOKEN}"})
        assert first.status_code not in (404, 503), first.text
        yield port, console
    finally:
        proc.stop()


async def session_calls(console: int, token: str | None, calls: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(240.0)) as http:
        async with streamable_http_client(f"http://127.0.0.1:{console}/mcp", http_client=http) as (read, write):
            async with ClientSession(read, write) as s:
                await s.initialize()
                out: dict[str, Any] = {"tools": sorted(t.name for t in (await s.list_tools()).tools)}
                for name, args in calls:
                    r = await s.call_tool(name, args)
                    out[name] = ("error", r.content[0].text) if r.is_error else tool_text(r)
                return out


def test_an_agent_chats_lists_and_uses_the_board_through_mcp(node: tuple[int, int]) -> None:
    port, console = node
    out = asyncio.run(session_calls(console, CONSOLE_TOKEN, [
        ("list_models", {}),
        ("chat", {"prompt": "What is the capital of France?", "model": MODEL, "max_tokens": 8, "temperature": 0}),
        ("board_post", {"topic": "agents", "text": "hello from an MCP client", "ttl_s": 600}),
        ("board_read", {"topic": "agents"}),
        ("status", {}),
        ("list_nodes", {}),
    ]))
    assert {"chat", "list_models", "list_nodes", "status", "board_post", "board_read"} <= set(out["tools"])
    assert [m["id"] for m in out["list_models"]] == [MODEL] and out["list_models"][0]["state"] == "ready"
    direct = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120,
                        headers={"Authorization": f"Bearer {API_KEY}"},
                        json={"model": MODEL, "max_tokens": 8, "temperature": 0,
                              "messages": [{"role": "user", "content": "What is the capital of France?"}]})
    assert direct.status_code == 200, direct.text
    chat = out["chat"]
    assert chat["model"] == MODEL and chat["text"] == direct.json()["choices"][0]["message"]["content"]
    assert chat["text"] and chat["usage"]["completion_tokens"] > 0
    assert [p["text"] for p in out["board_read"]] == ["hello from an MCP client"]
    assert out["status"]["node_id"] == out["board_read"][0]["author"]
    assert out["list_nodes"] == []  # a mesh of one


def test_model_auto_routes_through_mcp(node: tuple[int, int]) -> None:
    _, console = node
    out = asyncio.run(session_calls(console, CONSOLE_TOKEN, [("chat", {"prompt": "Say hi", "max_tokens": 4})]))
    assert out["chat"]["model"] == MODEL and out["chat"]["text"]


def test_no_console_token_no_mcp(node: tuple[int, int]) -> None:
    _, console = node
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(f"http://127.0.0.1:{console}/mcp", headers={**headers, "accept": "application/json, text/event-stream"},
                       json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, timeout=10)
        assert r.status_code == 401
    with pytest.raises(BaseException):
        asyncio.run(session_calls(console, None, []))
