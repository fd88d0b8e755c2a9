"""`mesh402 register` on a real local chain: two running nodes, each with its own EVM owner key, register
as ERC-8004 agents; the node-key binding verifies for the right node and a forged one does not; the
registration file is served at /.well-known/agent-registration.json; status shows the agent."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from web3.logs import DISCARD

from harness.dev_chain import DevChain, start_chain
from harness.mesh_nodes import MeshNode, MeshNodes
from harness.procs import MESH402
from tests.support.chain import require_contract_toolchain


@dataclass
class Env:
    chain: DevChain
    a: MeshNode
    b: MeshNode
    w3: Any
    registry: Any
    tmp: Path


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MESH402, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    from mesh402.economics.chain import contract_at
    require_contract_toolchain()
    tmp = tmp_path_factory.mktemp("identity")
    nodes = MeshNodes(tmp / "nodes")
    chain = None
    try:
        chain = start_chain(tmp, buyers=1)
        a = nodes.start("a")
        b = nodes.start("b", join=a.token())
        w3 = chain.w3()
        yield Env(chain, a, b, w3, contract_at(w3, "IdentityRegistry", chain.dep.contracts["IdentityRegistry"]), tmp)
    finally:
        nodes.stop_all()
        if chain is not None:
            chain.proc.stop()


def register(env: Env, node: MeshNode, account: str, *extra: str) -> subprocess.CompletedProcess[str]:
    r = cli("register", "--home", str(node.home), "--deployment", str(env.chain.dir), "--account", account, *extra)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def agent_of(node: MeshNode) -> int:
    import json
    return int(json.loads((node.home / "erc8004.json").read_text())["agentId"])


def test_register_serves_the_registration_file_and_binds_the_node_key(env: Env) -> None:
    from mesh402.economics.erc8004 import BINDING_KEY, verify_binding
    from mesh402.home import Home
    r = register(env, env.a, "node-0")
    assert "node binding verified" in r.stdout, r.stdout
    print("\nmesh402 register:", [ln.strip() for ln in r.stdout.splitlines() if "gas:" in ln])
    aid = agent_of(env.a)
    api = Home(env.a.home).read_state()["api_url"]
    uri = api + "/.well-known/agent-registration.json"
    reg = env.registry.functions
    assert reg.tokenURI(aid).call() == uri
    assert reg.ownerOf(aid).call() == env.chain.dep.address("node-0")
    assert len(reg.getMetadata(aid, BINDING_KEY).call()) == 96
    doc = httpx.get(uri, timeout=10).json()
    assert doc["type"] == "https://eips.ethereum.org/EIPS/eip-8004#registration-v1"
    assert doc["services"][0]["endpoint"] == api + "/v1" and doc["x402Support"] is False
    assert doc["mesh402"]["nodeId"] == env.a.node_id and doc["mesh402"]["meshId"] == env.a.status()["mesh_id"]
    assert doc["mesh402"]["hardware"]["cpu_cores"] > 0
    assert doc["registrations"] == [{"agentId": aid, "agentRegistry": f"eip155:31337:{env.registry.address}"}]
    # a peer checks the claim on chain: right node verifies, any other node id does not
    assert verify_binding(env.w3, env.registry.address, aid, env.a.node_id)
    assert not verify_binding(env.w3, env.registry.address, aid, env.b.node_id)
    assert not verify_binding(env.w3, env.registry.address, aid + 1000, env.a.node_id)  # no such agent
    # registering again reuses the agent and sends nothing
    again = register(env, env.a, "node-0")
    assert agent_of(env.a) == aid and "gas:" not in again.stdout
    # the management API serves the node's earnings (none yet)
    assert httpx.get(f"{env.a.console}/api/earnings", headers=env.a.console_headers, timeout=10).json() == {"epochs": [], "payouts": [], "spot_checks": []}
    # a node that never registered answers 404 on the well-known path
    assert httpx.get(f"http://127.0.0.1:{env.b.api_port}/.well-known/agent-registration.json").status_code == 404


def test_second_node_own_key_and_agent_wallet_proof(env: Env) -> None:
    from eth_account import Account

    from mesh402.economics.chain import _write_secret
    from mesh402.economics.erc8004 import verify_binding
    wallet = Account.create()
    wfile = env.tmp / "wallet-b.key"
    _write_secret(wfile, "0x" + bytes(wallet.key).hex())
    r = register(env, env.b, "node-1", "--wallet-key-file", str(wfile))
    assert "setAgentWallet" in r.stdout and "node binding verified" in r.stdout, r.stdout
    print("\nmesh402 register --wallet-key-file:", [ln.strip() for ln in r.stdout.splitlines() if "gas:" in ln])
    bid = agent_of(env.b)
    reg = env.registry.functions
    assert reg.ownerOf(bid).call() == env.chain.dep.address("node-1") != env.chain.dep.address("node-0")
    assert reg.getAgentWallet(bid).call() == wallet.address
    assert verify_binding(env.w3, env.registry.address, bid, env.b.node_id)
    assert not verify_binding(env.w3, env.registry.address, bid, env.a.node_id)
    # status shows the verified agent
    st = cli("status", "--home", str(env.b.home))
    assert st.returncode == 0 and f"erc8004: agent {bid}" in st.stdout and "binding verified" in st.stdout, st.stdout


def test_forged_bindings_are_rejected(env: Env) -> None:
    from mesh402.economics.evm import send_tx
    from mesh402.economics.erc8004 import (BINDING_KEY, make_binding, read_agent, registered_agents,
                                            verify_binding)
    from mesh402.mesh.identity import NodeIdentity
    reg = env.registry
    aid = agent_of(env.a)
    real = bytes(reg.functions.getMetadata(aid, BINDING_KEY).call())
    key = env.chain.key("buyer-0")
    owner = env.chain.dep.address("buyer-0")

    def new_agent(value: bytes) -> int:
        rcpt = send_tx(env.w3, key, reg.functions.register("https://forged", [(BINDING_KEY, value)]))
        return int(reg.events.Registered().process_receipt(rcpt, errors=DISCARD)[0]["args"]["agentId"])

    # 1. node a's genuine binding copied onto another agent (replay): names the wrong agent and owner
    replay = new_agent(real)
    # 2. claims node a's id, signed by another Ed25519 key
    other = NodeIdentity.generate()
    sig_by_other = bytes.fromhex(env.a.node_id) + make_binding(other, 31337, reg.address, replay + 1, owner)[32:]
    wrong_key = new_agent(sig_by_other)
    # 3. garbage of the wrong length
    garbage = new_agent(b"\x01" * 10)
    for forged in (replay, wrong_key, garbage):
        assert not verify_binding(env.w3, reg.address, forged, env.a.node_id), forged
        assert read_agent(env.w3, reg.address, forged).node_id is None
    assert read_agent(env.w3, reg.address, wrong_key).claimed_node_id == env.a.node_id  # shown, but unverified
    # 4. a genuine binding stops verifying once the agent changes hands
    send_tx(env.w3, env.chain.key("node-0"), reg.functions.transferFrom(
        env.chain.dep.address("node-0"), owner, aid))
    assert not verify_binding(env.w3, reg.address, aid, env.a.node_id)
    send_tx(env.w3, key, reg.functions.transferFrom(owner, env.chain.dep.address("node-0"), aid))
    assert verify_binding(env.w3, reg.address, aid, env.a.node_id)
    # discovery lists every agent with a binding, verified ones with their node id
    found = {i.agent_id: i for i in registered_agents(env.w3, reg.address)}
    assert found[aid].node_id == env.a.node_id and found[agent_of(env.b)].node_id == env.b.node_id
    assert all(found[f].node_id is None for f in (replay, wrong_key, garbage))


def test_peers_show_gossiped_claims_verified_and_a_false_claim_unverified(env: Env) -> None:
    import json

    from harness.mesh_nodes import wait_until
    aid, bid = agent_of(env.a), agent_of(env.b)
    wait_until(lambda: (env.a.peers()[env.b.node_id]["announcement"]["labels"].get("erc8004", "")).endswith(f"/{bid}"),
               timeout=30, what="b's agent claim gossiped to a")
    st = cli("status", "--home", str(env.a.home))
    assert f"peer {env.b.node_id[:12]}: agent {bid} on eip155:31337, verified" in st.stdout, st.stdout
    # b now claims a's agent: gossiped, shown, but unverified
    info = json.loads((env.b.home / "erc8004.json").read_text())
    (env.b.home / "erc8004.json").write_text(json.dumps({**info, "agentId": aid}))
    wait_until(lambda: env.a.peers()[env.b.node_id]["announcement"]["labels"].get("erc8004", "").endswith(f"/{aid}"),
               timeout=30, what="b's false claim gossiped to a")
    st = cli("status", "--home", str(env.a.home))
    assert f"peer {env.b.node_id[:12]}: agent {aid} on eip155:31337, unverified" in st.stdout, st.stdout

