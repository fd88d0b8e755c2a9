"""A host that sells inference never works for free through the mesh (real chain, real node processes).

The host charges 0.01 USDC per request. A member tunnelling to it without paying gets the 402 like any
client. A free entry passes the host's 402 to its client, who pays the host through it. A paid entry with
a wallet (--payout-key-file) charges its own price plus the host's and pays the host itself; one without
a wallet refuses before its client pays anything.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.dev_chain import DevChain, paid_mesh_env
from harness.mesh_nodes import MeshNode, wait_until
from harness.x402_payments import decode_b64json, x402_client
from tests.support.hostile import EvilMember
from tests.support.chain import require_contract_toolchain

MODEL = "smollm2-135m-instruct"
HOST_PRICE, ENTRY_PRICE = 10_000, 2_000
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4, "temperature": 0}

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def paid_host_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DevChain, dict[str, MeshNode]]]:
    require_contract_toolchain()
    with paid_mesh_env(tmp_path_factory.mktemp("paid-host"), buyers=2, nodes=3) as (chain, fac_url, nodes):
        pay = ["--deployment", str(chain.dir), "--facilitator", fac_url]
        host = nodes.start("host", no_model=False, extra=["--price", "0.01", "--pay-to", "node-0", *pay])
        token = host.token()
        free = nodes.start("free", join=token)
        wallet = nodes.start("wallet", join=token, extra=[
            "--price", "0.002", "--pay-to", "node-1", *pay, "--payout-key-file", str(chain.dep.key_file("node-1"))])
        broke = nodes.start("broke", join=token, extra=["--price", "0.002", "--pay-to", "node-2", *pay])
        entries = {"free": free, "wallet": wallet, "broke": broke}
        for n in entries.values():
            wait_until(lambda n=n: any(m.get("state") == "ready" for m in httpx.get(
                f"http://127.0.0.1:{n.api_port}/v1/models", timeout=5).json()["data"]), timeout=120,
                what=f"{n.name} sees the host's model")
            wait_until(lambda n=n: "x402" in n.peers()[host.node_id]["announcement"]["labels"], timeout=30,
                       what=f"{n.name} knows the host's price")
        yield chain, {"host": host, **entries}


def buy(chain: DevChain, node: MeshNode, buyer: str) -> httpx.Response:
    from x402.http.clients import x402HttpxClient

    async def go() -> httpx.Response:
        async with x402HttpxClient(x402_client(chain.key(buyer), chain.dep), timeout=180) as c:
            return await c.post(f"http://127.0.0.1:{node.api_port}/v1/chat/completions", json=BODY)
    return asyncio.run(go())


def asked(node: MeshNode) -> dict:
    """What an unpaid request to `node` is asked to pay (the 402's first requirement)."""
    unpaid = httpx.post(f"http://127.0.0.1:{node.api_port}/v1/chat/completions", json=BODY, timeout=60)
    assert unpaid.status_code == 402, unpaid.text
    return decode_b64json(unpaid.headers["payment-required"])["accepts"][0]


def test_a_member_tunnelling_to_a_paid_host_pays_like_any_client(paid_host_mesh, tmp_path: Path) -> None:
    chain, n = paid_host_mesh
    host = n["host"]

    async def attack() -> tuple[int, dict[str, str], bytes]:
        async with EvilMember(tmp_path / "evil", host.token()) as evil:
            await evil.wait_connected(host.node_id)
            return await evil.tunnel(host.node_id, "POST", "/v1/chat/completions", json.dumps(BODY).encode())

    status, headers, body = asyncio.run(attack())
    assert status == 402, body[:300]
    required = decode_b64json(headers["payment-required"])
    assert required["accepts"][0]["payTo"].lower() == chain.dep.address("node-0").lower()
    assert b"choices" not in body


def test_a_free_entry_lets_its_client_pay_the_host(paid_host_mesh) -> None:
    chain, n = paid_host_mesh
    free = n["free"]
    accepts = asked(free)
    assert accepts["payTo"].lower() == chain.dep.address("node-0").lower() and int(accepts["amount"]) == HOST_PRICE
    buyer, seller = chain.dep.address("buyer-0"), chain.dep.address("node-0")
    b0, s0 = chain.balance(buyer), chain.balance(seller)
    r = buy(chain, free, "buyer-0")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] and "via=mesh" in r.headers["x-mesh402-route"]
    wait_until(lambda: chain.balance(buyer) == b0 - HOST_PRICE, timeout=30, what="the buyer paid the host")
    assert chain.balance(seller) == s0 + HOST_PRICE


def test_a_paid_entry_passes_the_hosts_price_on_and_pays_the_host(paid_host_mesh) -> None:
    chain, n = paid_host_mesh
    wallet = n["wallet"]
    accepts = asked(wallet)
    assert accepts["payTo"].lower() == chain.dep.address("node-1").lower()
    assert int(accepts["amount"]) == ENTRY_PRICE + HOST_PRICE  # its own price plus the host's
    chain.transfer("buyer-0", "node-1", 50_000)  # the entry's float: it pays the host before it is paid
    buyer, entry, host = (chain.dep.address(a) for a in ("buyer-1", "node-1", "node-0"))
    b0, e0, h0 = chain.balance(buyer), chain.balance(entry), chain.balance(host)
    r = buy(chain, wallet, "buyer-1")
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
    wait_until(lambda: chain.balance(host) == h0 + HOST_PRICE and chain.balance(buyer) == b0 - ENTRY_PRICE - HOST_PRICE,
               timeout=30, what="the client paid the entry and the entry paid the host")
    assert chain.balance(entry) == e0 + ENTRY_PRICE


def test_a_paid_entry_without_a_wallet_refuses_before_its_client_pays(paid_host_mesh) -> None:
    chain, n = paid_host_mesh
    broke = n["broke"]
    buyer = chain.dep.address("buyer-0")
    b0 = chain.balance(buyer)
    r = httpx.post(f"http://127.0.0.1:{broke.api_port}/v1/chat/completions", json=BODY, timeout=60)
    assert r.status_code == 503 and r.json()["error"]["code"] == "host_charges", r.text
    assert "--payout-key-file" in r.json()["error"]["message"]
    r = buy(chain, broke, "buyer-0")  # a paying client is refused the same way, and pays nothing
    assert r.status_code == 503
    assert chain.balance(buyer) == b0
