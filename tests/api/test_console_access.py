"""Who may use the console, against a real node process with a console token and an API key: forged
Host (DNS rebinding) and cross-origin requests are refused even with the token; the page and its files
answer without the token but say nothing about the node (the open status leaves out the invite token); the login sets an HttpOnly, SameSite=Strict
cookie that is not the token; wrong tokens are throttled; the playground reaches the API with the
node's key without the page ever holding it."""

from __future__ import annotations

import json

import httpx
import pytest

from harness.mesh_nodes import MeshNode, MeshNodes

pytestmark = pytest.mark.timeout(300)  # a hang guard, with room for a loaded 2-worker run

TOKEN = "access-test-console-token-42"
API_KEY = "access-test-api-key-42"


def start(mesh_nodes: MeshNodes) -> MeshNode:
    n = mesh_nodes.start("guarded", wait=False, env={"MESH402_CONSOLE_TOKEN": TOKEN, "MESH402_API_KEY": API_KEY})
    n.proc.wait_http(f"{n.console}/api/session", timeout=60)
    return n


def test_host_origin_token_and_cookie(mesh_nodes: MeshNodes) -> None:
    n = start(mesh_nodes)
    url = n.console
    bearer = {"authorization": f"Bearer {TOKEN}"}
    port = n.console_port

    # DNS rebinding: a hostile name that resolves to loopback is refused, token or not
    for host in (f"evil.example:{port}", f"attacker.localhost.evil.example:{port}", "evil.example"):
        for path in ("/", "/api/status", "/api/session", "/static/console.js"):
            r = httpx.get(url + path, headers={**bearer, "host": host}, timeout=5)
            assert r.status_code == 403, (host, path, r.status_code)
            assert "not allowed" in r.json()["error"]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}"):
        assert httpx.get(url + "/api/status", headers={**bearer, "host": host}, timeout=5).status_code == 200

    # cross-origin: another site's page (or another port of this machine) cannot read or change anything
    for origin in ("http://evil.example", f"http://127.0.0.1:{n.api_port}", "null"):
        r = httpx.post(url + "/api/invite", json={"expires": "1h"}, headers={**bearer, "origin": origin}, timeout=5)
        assert r.status_code == 403, origin
    r = httpx.get(url + "/api/status", headers={**bearer, "sec-fetch-site": "cross-site"}, timeout=5)
    assert r.status_code == 403
    r = httpx.post(url + "/api/invite", json={"expires": "1h"},
                   headers={**bearer, "origin": f"http://127.0.0.1:{port}", "sec-fetch-site": "same-origin"}, timeout=5)
    assert r.status_code == 200 and r.json()["token"].startswith("m402")

    # without the token: the page and its files, but nothing about the node
    node_id = httpx.get(url + "/api/status", headers=bearer, timeout=5).json()["node_id"]
    page = httpx.get(url + "/", timeout=5)
    assert page.status_code == 200 and "default-src 'none'" in page.headers["content-security-policy"]
    assert node_id not in page.text and node_id[:12] not in page.text
    for path in ("/api/events", "/api/traffic", "/api/money", "/api/earnings", "/api/playground/models"):
        assert httpx.get(url + path, timeout=5).status_code == 401, path
    st = httpx.get(url + "/api/status", timeout=5).json()  # the open status: no invite token in it
    assert st["invite_token"] is None and "m402" not in json.dumps(st)
    assert httpx.get(url + "/api/session", timeout=5).json() == {"auth_required": True, "authenticated": False}

    # login: a cookie that is not the token, HttpOnly and SameSite=Strict; it opens the API and the stream
    assert httpx.post(url + "/api/login", json={"token": "wrong"}, timeout=5).status_code == 401
    r = httpx.post(url + "/api/login", json={"token": TOKEN}, timeout=5)
    assert r.status_code == 200
    set_cookie = r.headers["set-cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie and TOKEN not in set_cookie
    with httpx.Client(base_url=url, cookies=r.cookies, timeout=5) as c:
        assert c.get("/api/session").json()["authenticated"] is True
        st = c.get("/api/status").json()
        assert st["node_id"] == node_id and st["invite_token"].startswith("m402")
        with c.stream("GET", "/api/events") as ev:
            assert ev.status_code == 200 and ev.headers["content-type"].startswith("text/event-stream")
        # the playground reaches the API with the node's key: the page never holds it
        assert httpx.get(f"http://127.0.0.1:{n.api_port}/v1/models", timeout=5).status_code == 401
        models = c.get("/api/playground/models")
        assert models.status_code == 200 and models.json()["object"] == "list"
        r = c.post("/api/playground/chat", json={"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text  # authenticated upstream
        assert c.post("/api/playground/chat", json={"model": "x", "messages": "hi"}).status_code == 400
        # the traffic view counted the refused request: no prompt text, no row for the unknown name
        tv = c.get("/api/traffic").json()
        assert tv["recent"][0]["status"] == 404 and tv["recent"][0]["prompt"] is None
        assert all(row["model"] != "no-such-model" for row in tv["rows"])
        assert c.post("/api/logout").status_code == 200

    # guessing: ten wrong tokens a minute (one was tried above), then refused for a while, even the right one
    codes = [httpx.post(url + "/api/login", json={"token": f"guess-{i}"}, timeout=5).status_code for i in range(10)]
    assert codes == [401] * 9 + [429]
    r = httpx.post(url + "/api/login", json={"token": TOKEN}, timeout=5)
    assert r.status_code == 429 and r.headers["retry-after"] == "60"


def test_event_streams_are_capped(mesh_nodes: MeshNodes) -> None:
    """A page left open in many tabs (or a client opening streams in a loop) holds at most MAX_EVENT_STREAMS
    subscriptions; the next is refused until one closes."""
    import asyncio
    import contextlib

    from mesh402.api.management.app import MAX_EVENT_STREAMS

    n = mesh_nodes.start("streams")

    async def run() -> tuple[int, int]:
        async with contextlib.AsyncExitStack() as stack:
            client = await stack.enter_async_context(httpx.AsyncClient(base_url=n.console, timeout=10, headers=n.console_headers, limits=httpx.Limits(max_connections=MAX_EVENT_STREAMS + 8)))
            held = []  # (response, its byte iterator): dropping the iterator would close the stream
            for _ in range(MAX_EVENT_STREAMS):
                r = await stack.enter_async_context(client.stream("GET", "/api/events"))
                assert r.status_code == 200
                chunks = r.aiter_bytes()
                await chunks.__anext__()  # the snapshot: the stream is open and subscribed
                held.append((r, chunks))
            async with client.stream("GET", "/api/events") as refused:
                over = refused.status_code
            await held.pop()[0].aclose()
            # the node frees the slot once it notices the disconnect: retry (each refusal is an immediate 503)
            again = 503
            for _ in range(100):
                async with client.stream("GET", "/api/events") as r:
                    again = r.status_code
                if again == 200:
                    break
                await asyncio.sleep(0.1)
            return over, again

    over, again = asyncio.run(run())
    assert (over, again) == (503, 200)
    assert httpx.get(f"{n.console}/api/status", timeout=5).status_code == 200
