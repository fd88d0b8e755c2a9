"""--discover-registry: a node finds a mesh through the ERC-8004 registry (a registered node whose binding
verifies, serving a registration file with a live listing of its open mesh) and joins it; a mesh that
admits by secret is listed without an invite."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx

from harness.dev_chain import start_chain
from harness.mesh_nodes import MeshNodes, wait_until
from harness.procs import MESH402
from tests.support.chain import require_contract_toolchain


def register(chain_dir: Path, home: Path, account: str) -> None:
    r = subprocess.run([*MESH402, "register", "--home", str(home), "--deployment", str(chain_dir), "--account", account],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "node binding verified" in r.stdout, r.stdout + r.stderr


def test_discover_registry_joins_a_registered_open_mesh(tmp_path: Path) -> None:
    require_contract_toolchain()
    chain = start_chain(tmp_path, buyers=1)
    nodes = MeshNodes(tmp_path / "nodes")
    try:
        secret = nodes.start("secret")
        register(chain.dir, secret.home, "node-0")
        o = nodes.start("open", extra=["--mesh-policy", "open"])
        register(chain.dir, o.home, "node-1")
        def doc_of(node) -> dict:  # the live listing appears once the node's mesh runtime is up
            url = f"http://127.0.0.1:{node.api_port}/.well-known/agent-registration.json"
            wait_until(lambda: "listing" in httpx.get(url, timeout=10).json()["mesh402"], timeout=60,
                       what="a listing in the registration file")
            return httpx.get(url, timeout=10).json()

        listing = doc_of(o)["mesh402"]["listing"]
        assert listing["policy"] == "open" and listing["invite"] and listing["publisher_node"] == o.node_id
        doc_s = doc_of(secret)
        assert doc_s["mesh402"]["listing"]["policy"] == "private" and doc_s["mesh402"]["listing"]["invite"] == ""
        c = nodes.start("c", extra=["--discover-registry", str(chain.dir)])
        wait_until(lambda: c.status()["mesh_id"] == o.status()["mesh_id"], timeout=30,
                   what="the --discover-registry node joins the registered open mesh")
        nodes.wait_full_mesh([o, c], timeout=30)
    finally:
        nodes.stop_all()
        chain.proc.stop()
