"""Multi-node helpers: start `mesh402` node processes that form a mesh on loopback.

Model-free nodes (`serve --no-model`, `client`) with temp homes, free ports and
fast mesh timers; wait on the management API; kill everything at teardown.
Tests get a :class:`MeshNodes` from the `mesh_nodes` fixture (tests/support/nodes.py):

    def test_x(mesh_nodes):
        a = mesh_nodes.start("a")                       # serve --no-model, creates a mesh
        b = mesh_nodes.start("b", join=a.token(), kind="client")
        mesh_nodes.wait_full_mesh([a, b])
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import httpx

from mesh402.home import Home
from harness.procs import MESH402, NodeProcess, free_port


class MeshNode:
    def __init__(self, name: str, proc: NodeProcess, home: Path, api_port: int, console_port: int, args: list[str]):
        self.name = name
        self.proc = proc
        self.home = home
        self.api_port = api_port
        self.console_port = console_port
        self.args = args
        self._node_id: Optional[str] = None

    @property
    def console(self) -> str:
        return f"http://127.0.0.1:{self.console_port}"

    def status(self, timeout: float = 5.0) -> dict[str, Any]:
        """The full status (with the console token: the invite token is in it)."""
        r = httpx.get(f"{self.console}/api/status", headers=self.console_headers, timeout=timeout)
        r.raise_for_status()
        return r.json()

    @property
    def node_id(self) -> str:
        if self._node_id is None:
            self._node_id = self.status()["node_id"]
        return self._node_id

    @property
    def console_headers(self) -> dict[str, str]:
        """The console token the node wrote to its home (what the CLI presents): every console route but the
        open status (which leaves the invite token out) needs it."""
        from mesh402.node.mesh_runtime import read_console_token

        tok = read_console_token(self.home)
        return {"Authorization": f"Bearer {tok}"} if tok else {}

    def token(self, expires: str = "1h") -> str:
        r = httpx.post(f"{self.console}/api/invite", json={"expires": expires}, headers=self.console_headers,
                       timeout=5.0)
        r.raise_for_status()
        return r.json()["token"]

    def peers(self) -> dict[str, dict]:
        return {p["node_id"]: p for p in self.status()["peers"]}

    def counters(self) -> dict[str, int]:
        return self.status()["counters"]

    def distributed_up(self) -> bool:
        """Whether the node's serving side is running: a node joins the mesh first and imports torch and
        starts serving after (seconds on a loaded machine); until then requests get no mesh routing."""
        return bool((self.status().get("node") or {}).get("distributed"))

    def ready_replicas(self, model: str) -> int:
        """How many nodes this node would route `model` to: ready plans it believes (a claim alone is not
        enough: the claimant proved it holds the model, or a host this node uses vouches for it)."""
        dist = (self.status().get("node") or {}).get("distributed") or {}
        return len((dist.get("replicas") or {}).get(model, []))

    def alive(self) -> bool:
        return self.proc.proc.poll() is None

    def log(self) -> str:
        return self.proc.log()


def wait_until(pred: Callable[[], bool], timeout: float = 20.0, step: float = 0.05, what: str = "condition") -> float:
    """Poll ``pred`` until true; returns seconds waited. Exceptions count as false."""
    t0 = time.monotonic()
    last: Optional[BaseException] = None
    while time.monotonic() - t0 < timeout:
        try:
            if pred():
                return time.monotonic() - t0
        except (httpx.HTTPError, KeyError, ValueError) as e:
            last = e
        time.sleep(step)
    raise AssertionError(f"{what} not reached in {timeout}s (last error: {last!r})")


class MeshNodes:
    """Factory of node processes; everything started is stopped at teardown."""

    def __init__(self, root: Path):
        self.root = root
        self.nodes: list[MeshNode] = []

    def start(
        self,
        name: str,
        *,
        join: Optional[str] = None,
        kind: str = "serving",
        home: Optional[Path] = None,
        fast: bool = True,
        extra: Optional[list[str]] = None,
        wait: bool = True,
        timeout: float = 60.0,
        api_port: Optional[int] = None,
        console_port: Optional[int] = None,
        no_model: bool = True,
        env: Optional[dict[str, str]] = None,
        launcher: Optional[list[str]] = None,
    ) -> MeshNode:
        """`launcher`: the command that runs the CLI (default `python -m mesh402.cli`; a test-only entry
        point such as tests.support.tamper_node for a cheating node)."""
        home = home or (self.root / name)
        api_port = api_port or free_port()
        console_port = console_port or free_port()
        cmd = ["client"] if kind == "client" else (["serve", "--no-model"] if no_model else ["serve"])
        args = [*(launcher or MESH402), *cmd, "--home", str(home), "--port", str(api_port), "--console", str(console_port),
                "--bind-ip", "127.0.0.1"]
        if fast:
            args.append("--mesh-fast-timers")
        if join:
            args += ["--join", join]
        args += list(extra or [])
        proc = NodeProcess(args, home, env=env)
        node = MeshNode(name, proc, home, api_port, console_port, args)
        self.nodes.append(node)
        if wait:
            proc.wait_http(f"{node.console}/api/status", timeout=timeout)
            # the console answers a moment before node.json names it: CLI subcommands need the file
            wait_until(lambda: bool(((Home(home).read_state() or {}).get("mesh") or {}).get("console_port")),
                       timeout, what=f"{name}'s node.json")
        return node

    def restart(self, node: MeshNode, *, join: Optional[str] = None, wait: bool = True) -> MeshNode:
        """Start a stopped node again with the same home (no token: it rejoins from memory)."""
        kind = "client" if "client" in node.args else "serving"
        return self.start(node.name, home=node.home, kind=kind, join=join, wait=wait,
                          api_port=node.api_port, console_port=node.console_port)

    @staticmethod
    def kill9(node: MeshNode) -> None:
        node.proc.kill9()

    @staticmethod
    def terminate(node: MeshNode) -> int | None:
        return node.proc.stop(signal.SIGTERM)

    @staticmethod
    def sees(a: MeshNode, b: MeshNode, state: str = "alive") -> bool:
        p = a.peers().get(b.node_id)
        return p is not None and p["state"] == state and (state != "alive" or p["connected"])

    def full_mesh(self, nodes: list[MeshNode]) -> bool:
        return all(self.sees(a, b) for a in nodes for b in nodes if a is not b)

    def wait_full_mesh(self, nodes: list[MeshNode], timeout: float = 20.0) -> float:
        return wait_until(lambda: self.full_mesh(nodes), timeout, what="full mesh")

    def stop_all(self) -> None:
        for n in self.nodes:
            try:
                n.proc.stop(signal.SIGTERM, timeout=10)
            except Exception:
                pass

