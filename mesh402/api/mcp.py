"""The MCP server at the console's `/mcp` (streamable HTTP, the official `mcp` SDK): an agent can chat with
any mesh model, list models and nodes, read the node's status, and post to and read the blackboard.

It is a route of the management app, so the console token check covers it (a node always has one: given,
or generated into its home). The SDK's own Host/Origin check is on for a loopback
console (DNS rebinding). Sessions are stateless JSON: each tool call stands alone, nothing to expire.

Chat and model listing go through the node's own OpenAI app in process (no socket, no URL): routing,
`model: "auto"`, payments and limits apply exactly as for an HTTP client. A node that charges answers a
tool call with its 402 message (pay over the OpenAI API with an x402 client instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from typing import Any

import httpx
from mcp.server.mcpserver import MCPServer
from mcp.server.transport_security import TransportSecuritySettings

from mesh402.api.management.access import MCP_PATH
from mesh402.mesh.board import BoardError
from mesh402.mesh.board_sync import BoardSync
from mesh402.mesh.service import MeshService

CHAT_TIMEOUT_S = 300.0
MAX_TOKENS_CAP = 4096
MAX_PROMPT_CHARS = 64 * 1024


class McpError(Exception):
    """A tool call that cannot be answered; the SDK turns it into an error result."""


class MeshMcp:
    def __init__(self, mesh: MeshService, board: BoardSync, api_app: Callable[[], Any], *,
                 api_key: Callable[[], str | None] = lambda: None,
                 node_info: Callable[[], dict[str, Any]] = dict, loopback: bool = True) -> None:
        """`api_app()`: the node's OpenAI ASGI app; `api_key()`: the key it requires of direct clients."""
        self.mesh = mesh
        self.board = board
        self.api_app = api_app
        self.api_key = api_key
        self.node_info = node_info
        self.server: MCPServer[Any] = MCPServer(name="mesh402", instructions=(
            "A mesh402 node: chat with any model of its LLM mesh (model 'auto' picks one), see the models and "
            "nodes, and use the mesh blackboard (short signed posts every member can read)."))
        self._tools()
        security = None if loopback else TransportSecuritySettings(enable_dns_rebinding_protection=False)
        self.starlette = self.server.streamable_http_app(
            streamable_http_path=MCP_PATH, stateless_http=True, json_response=True,
            host="127.0.0.1" if loopback else "0.0.0.0", transport_security=security)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        ready = asyncio.Event()

        async def run() -> None:  # the session manager's task group lives in this one task
            async with self.server.session_manager.run():
                ready.set()
                await self._stop.wait()

        self._task = asyncio.create_task(run())
        await asyncio.wait({self._task, asyncio.create_task(ready.wait())}, return_when=asyncio.FIRST_COMPLETED)

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self._task, 5.0)

    # ---------------------------------------------------------------- the node's own API, in process
    async def _api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        key = self.api_key()
        headers = {"authorization": f"Bearer {key}"} if key else {}
        transport = httpx.ASGITransport(app=self.api_app())
        async with httpx.AsyncClient(transport=transport, base_url="http://mesh402.local",
                                     timeout=CHAT_TIMEOUT_S) as c:
            r = await c.request(method, path, json=body, headers=headers)
        try:
            data = r.json()
        except ValueError:
            raise McpError(f"the node answered {r.status_code} without JSON") from None
        if r.status_code != 200:
            err = data.get("error") if isinstance(data, dict) else None
            msg = err.get("message") if isinstance(err, dict) else err
            raise McpError(f"{r.status_code}: {msg or r.text[:300]}")
        return data

    # ---------------------------------------------------------------- tools
    def _tools(self) -> None:
        srv = self.server

        @srv.tool(description="Ask a model of the mesh. `model`: an id from list_models, or 'auto' to let the "
                  "mesh pick. Returns the answer text, the model that answered and its token usage.")
        async def chat(prompt: str, model: str = "auto", system: str = "", max_tokens: int = 256,
                       temperature: float = 0.7) -> dict[str, Any]:
            if not prompt or len(prompt) + len(system) > MAX_PROMPT_CHARS:
                raise McpError(f"the prompt must be 1 to {MAX_PROMPT_CHARS} characters")
            messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
            data = await self._api("POST", "/v1/chat/completions", {
                "model": model, "messages": messages, "max_tokens": max(1, min(int(max_tokens), MAX_TOKENS_CAP)),
                "temperature": float(temperature)})
            choice = (data.get("choices") or [{}])[0]
            return {"text": (choice.get("message") or {}).get("content", ""), "model": data.get("model"),
                    "finish_reason": choice.get("finish_reason"), "usage": data.get("usage")}

        @srv.tool(description="The models this node's API serves: its own and the mesh's, with their state "
                  "(ready, loading, waiting) and the node hosting each.")
        async def list_models() -> list[dict[str, Any]]:
            data = await self._api("GET", "/v1/models")
            return [{k: m.get(k) for k in ("id", "state", "host", "context_length") if k in m} for m in data["data"]]

        @srv.tool(description="The members of the mesh this node knows: node id, name, kind, state, RTT and models.")
        def list_nodes() -> list[dict[str, Any]]:
            out = []
            for p in self.mesh.status().get("peers", []):
                ann = p.get("announcement") or {}
                out.append({"node_id": p.get("node_id"), "name": ann.get("name"), "kind": ann.get("kind"),
                            "state": p.get("state"), "connected": p.get("connected"), "rtt_ms": p.get("rtt_ms"),
                            "models": [m.get("model_id") for m in ann.get("models", []) if isinstance(m, dict)]})
            return out

        @srv.tool(description="This node's status: ids, mesh, models and their state, peers counted by state.")
        def status() -> dict[str, Any]:
            s = self.mesh.status()
            peers: dict[str, int] = {}
            for p in s.get("peers", []):
                peers[str(p.get("state"))] = peers.get(str(p.get("state")), 0) + 1
            info = self.node_info()
            return {"node_id": s.get("node_id"), "mesh_id": s.get("mesh_id"), "peers": peers,
                    "models": info.get("models"), "api_url": info.get("api_url"),
                    "board": {k: v for k, v in self.board.board.status().items() if k != "limits"}}

        @srv.tool(description="Post to the mesh blackboard as this node (signed; every member sees it). "
                  "topic: at most 64 characters; text: at most 4096 bytes; ttl_s: at most 48 h.")
        def board_post(topic: str, text: str, ttl_s: int = 3600) -> dict[str, Any]:
            try:
                return self.board.post(topic, text, ttl_s).view()
            except BoardError as e:
                raise McpError(f"{e.code}: {e}") from None

        @srv.tool(description="Read the mesh blackboard: live posts (of a topic), oldest first, the newest `limit`.")
        def board_read(topic: str = "", limit: int = 50) -> list[dict[str, Any]]:
            return self.board.board.read(topic or None, max(0, min(int(limit), 1024)))

        del chat, list_models, list_nodes, status, board_post, board_read  # registered on the server


def tool_text(result: Any) -> Any:
    """A tool result's JSON (structured content, else the first text block parsed) — for clients and tests."""
    structured = getattr(result, "structured_content", None) or getattr(result, "structuredContent", None)
    if structured is not None:
        return structured.get("result", structured) if isinstance(structured, dict) and len(structured) == 1 else structured
    text = result.content[0].text
    try:
        return json.loads(text)
    except ValueError:
        return text
