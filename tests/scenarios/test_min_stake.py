"""Issue 14, property 4: serving paid work needs stake. An entry started with `--min-stake` gives no layers to a
peer whose ERC-8004 agent has less than the minimum staked in MeshStaking, on a real chain with real node
processes: first the peer has no agent, then an agent with too little stake, and the model waits for a node
it may use; once the peer's operator stakes enough, the entry splits the model over it and serves; when the
operator unstakes, the entry takes the layers back at its next read of the stake (`--stake-recheck`).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.dev_chain import start_chain
from harness.mesh_nodes import MeshNode, MeshNodes, wait_until
from harness.procs import MESH402
from harness.reference import ready_plan
from tests.support.chain import require_contract_toolchain

pytestmark = pytest.mark.timeout(300)
USDC = 10**6


def _verdict(entry: MeshNode, peer: MeshNode) -> dict[str, Any] | None:
    ms = entry.status()["node"]["distributed"].get("min_stake") or {}
    return (ms.get("peers") or {}).get(peer.node_id)


def _no_split_over(entry: MeshNode, peer: MeshNode, seconds: float) -> None:
    """For `seconds`, the entry has no ready plan (it cannot hold the model alone) and gives the peer nothing."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert ready_plan(entry) is None, ready_plan(entry)
        held = (peer.status()["node"].get("distributed") or {}).get("stage", {}).get("held")
        assert not held, f"the peer got layers: {held}"
        time.sleep(0.5)


def test_an_entry_with_min_stake_gives_no_layers_to_an_unstaked_peer_until_it_stakes(tmp_path: Path) -> None:
    from mesh402.economics.staking import Staking
    require_contract_toolchain()
    chain = start_chain(tmp_path, buyers=1, nodes=2)
    nodes = MeshNodes(tmp_path / "nodes")
    try:
        chain.transfer("buyer-0", "node-1", 10 * USDC)  # the peer's operator will stake from it
        # ~98 MB model: neither node holds it alone; the entry has the larger budget, so it is the host
        a = nodes.start("a", no_model=False, timeout=120,
                        extra=["--mode", "exact", "--max-vram", "0.09", "--min-stake", "5", "--stake-recheck", "3",
                               "--deployment", str(chain.dir)])
        b = nodes.start("b", join=a.token(), no_model=False, timeout=120, extra=["--mode", "exact", "--max-vram", "0.08"])

        wait_until(lambda: (v := _verdict(a, b)) is not None and "no ERC-8004 agent" in v["reason"], timeout=90,
                   what="the entry read that the peer has no agent")
        _no_split_over(a, b, 3.0)

        r = subprocess.run([*MESH402, "register", "--home", str(b.home), "--deployment", str(chain.dir),
                            "--account", "node-1"], capture_output=True, text=True, timeout=180)
        assert r.returncode == 0 and "binding verified" in r.stdout, r.stdout + r.stderr
        staking = Staking(chain.w3(), chain.dep.contracts["MeshStaking"])
        agent = int(json.loads((b.home / "erc8004.json").read_text())["agentId"])
        staking.stake(chain.key("node-1"), agent, 2 * USDC)  # an agent, but below the entry's minimum
        wait_until(lambda: (v := _verdict(a, b)) is not None and "below the minimum 5000000" in v["reason"],
                   timeout=60, what="the entry read the peer's stake as too small")
        assert _verdict(a, b)["agent"] == agent and _verdict(a, b)["stake"] == 2 * USDC  # type: ignore[index]
        _no_split_over(a, b, 3.0)

        staking.stake(chain.key("node-1"), agent, 3 * USDC)  # now exactly the minimum
        wait_until(lambda: (p := ready_plan(a)) is not None and len(p["stages"]) == 2, timeout=90,
                   what="a 2-stage plan once the peer is staked")
        plan = ready_plan(a)
        assert plan is not None and plan["host"] == a.node_id
        assert {s[0] for s in plan["stages"]} == {a.node_id, b.node_id}
        assert _verdict(a, b)["ok"] is True  # type: ignore[index]
        body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Say hi"}],
                "max_tokens": 4, "temperature": 0}
        resp = httpx.post(f"http://127.0.0.1:{a.api_port}/v1/chat/completions", json=body, timeout=120)
        assert resp.status_code == 200, resp.text
        assert resp.json()["usage"]["completion_tokens"] >= 1

        staking.request_unstake(chain.key("node-1"), agent, 1 * USDC)  # active 4: under the minimum again
        wait_until(lambda: ready_plan(a) is None and "below the minimum" in (_verdict(a, b) or {}).get("reason", ""),
                   timeout=60, what="the entry to drop the split once the peer's stake fell under the minimum")
        end = time.monotonic() + 2.0
        while time.monotonic() < end:  # the peer may keep its copy loaded a while; it gets no work from the entry
            assert ready_plan(a) is None
            time.sleep(0.5)
        steps = b.status()["node"]["distributed"]["stage"]["steps"]
        resp = httpx.post(f"http://127.0.0.1:{a.api_port}/v1/chat/completions", json=body, timeout=120)
        assert resp.status_code == 503, resp.text
        assert b.status()["node"]["distributed"]["stage"]["steps"] == steps
    finally:
        nodes.stop_all()
        chain.proc.stop()
