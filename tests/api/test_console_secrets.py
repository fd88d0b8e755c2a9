"""A node started with no console token configured still keeps its secrets from other local processes: it
generates a console token into its home (0600); every console route but the open status answers 401
without it (or with a wrong one), and no open route's body holds a secret (the invite token, a minted
invite, the console token, the API key, the mesh secret). The walk covers every route the node's console
app has (built by the same function the node uses), so a route added later is checked too: it must be
closed, or the test's short list of open routes must say why it is not. The node's own CLI reads the token
from the home and keeps working with no flag."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from starlette.routing import Mount
from starlette.testclient import TestClient

from harness.mesh_nodes import MeshNodes
from harness.procs import MESH402
from mesh402.api.management.playground import Playground
from mesh402.api.management.routes import console_app
from mesh402.api.traffic import Traffic

pytestmark = pytest.mark.timeout(300)  # a hang guard, with room for a loaded 2-worker run

API_KEY = "secrets-test-api-key-77"
MCP_PATH = "/mcp"  # mesh402.api.management.access.MCP_PATH: the node adds it to the console app
# What answers without the token, each for a reason: the page and its files (no data), the session
# endpoints (the login itself), and the status with the invite token left out.
OPEN = {("GET", "/"), ("GET", "/static/console.js"), ("GET", "/api/session"), ("POST", "/api/login"),
        ("POST", "/api/logout"), ("GET", "/api/status")}


def app_of(home: Path, token: str = "x") -> Any:
    """The console app a node builds, with stand-ins for the node's parts (only its routes are used)."""
    return console_app(None, token=token, node_info=dict, traffic=Traffic(), money=dict,  # type: ignore[arg-type]
                       pg=Playground("http://127.0.0.1:9", None), board_sync=SimpleNamespace(board=None),  # type: ignore[arg-type]
                       home=home, runtime=lambda: None)


def routes(home: Path) -> list[tuple[str, str]]:
    """(method, path) of every route of the console app a node serves, plus the guard's own endpoints."""
    app = app_of(home)
    out = [("GET", "/api/session"), ("POST", "/api/login"), ("POST", "/api/logout"), ("POST", MCP_PATH)]
    for r in app.routes:
        if isinstance(r, Mount):
            assert r.path == "/static", f"a new mount {r.path}: add a file of it to this walk"
            out.append(("GET", "/static/console.js"))
            continue
        path = r.path.replace("{epoch}", "1")  # type: ignore[attr-defined]
        assert "{" not in path, f"a route with a new path parameter: give it a value here: {path}"
        out += [(m, path) for m in sorted(r.methods - {"HEAD"})]  # type: ignore[attr-defined]
    return out


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*MESH402, *args], capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "COLUMNS": "200"})


def test_default_console_token_keeps_every_secret_route_closed(mesh_nodes: MeshNodes, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MESH402_CONSOLE_TOKEN"}
    a = mesh_nodes.start("a", env={**env, "MESH402_API_KEY": API_KEY})
    token_file = a.home / "console.token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    token = token_file.read_text().strip()
    assert len(token) >= 24
    bearer = {"Authorization": f"Bearer {token}"}
    url = a.console

    full = httpx.get(f"{url}/api/status", headers=bearer, timeout=5).json()
    assert full["invite_token"].startswith("m402")
    minted = httpx.post(f"{url}/api/invite", json={"expires": "1h"}, headers=bearer, timeout=5)
    assert minted.status_code == 200
    secrets = {"invite token": full["invite_token"], "minted invite": minted.json()["token"], "console token": token,
               "api key": API_KEY, "mesh secret": (a.home / "mesh.secret").read_text().strip()}

    walked = routes(tmp_path)
    assert ("POST", "/api/invite") in walked and ("POST", "/api/board") in walked  # the walk sees the app
    opened = set()
    for method, path in walked:
        for headers in ({}, {"Authorization": "Bearer wrong-token"}):
            r = httpx.request(method, url + path, headers=headers, json={}, timeout=5)
            leaked = [name for name, s in secrets.items() if s in r.text]
            assert not leaked, (method, path, leaked)
            if r.status_code != 401:
                opened.add((method, path))
    assert opened == OPEN, f"open without the console token: {sorted(opened - OPEN)}; closed: {sorted(OPEN - opened)}"
    open_status = httpx.get(f"{url}/api/status", timeout=5).json()
    assert open_status["invite_token"] is None and open_status["node_id"] == a.node_id  # status, no secret

    # the token (header or the page's login cookie) opens them; the node's own CLI finds it in the home
    assert httpx.get(f"{url}/api/traffic", headers=bearer, timeout=5).status_code == 200
    login = httpx.post(f"{url}/api/login", json={"token": token}, timeout=5)
    assert login.status_code == 200
    assert httpx.get(f"{url}/api/money", cookies=login.cookies, timeout=5).status_code == 200
    r = cli("invite", "--home", str(a.home))
    assert r.returncode == 0 and r.stdout.strip().startswith("m402"), r.stderr
    r = cli("status", "--home", str(a.home), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["invite_token"] == full["invite_token"], r.stderr
    assert token not in a.log()  # the start message names the file, not the token

    # the token outlives a restart (a logged-in page stays logged in)
    mesh_nodes.terminate(a)
    a2 = mesh_nodes.restart(a)
    assert (a2.home / "console.token").read_text().strip() == token
    assert httpx.get(f"{url}/api/money", cookies=login.cookies, timeout=5).status_code == 200


def test_the_open_status_is_open_to_loopback_only(tmp_path: Path) -> None:
    """With --console-listen-all a client from another machine gets nothing without the token, not even the
    status; the guard answers before the app runs (in process: the client address is the point here)."""
    app = app_of(tmp_path, token="t0k")
    for client in (("203.0.113.5", 4242), ("::ffff:10.0.0.2", 4242), ("testclient", 1)):
        with TestClient(app, base_url="http://127.0.0.1", client=client) as c:
            assert c.get("/api/status").status_code == 401, client
            assert c.post("/api/invite", json={}).status_code == 401
