"""A paid entry node sells a model that another node hosts: paid once, at the entry, over a real chain."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.dev_chain import DevChain, start_chain, start_facilitator
from harness.mesh_nodes import MeshNodes, wait_until
from harness.procs import NodeProcess
from harness.x402_payments import x402_client
from tests.support.chain import require_contract_toolchain

PRICE = 10_000  # 0.01 USDC


@pytest.fixture(scope="module")
def paid_mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DevChain, MeshNodes, object, object]]:
    require_contract_toolchain()
    tmp: Path = tmp_path_factory.mktemp("econ-mesh")
    procs: list[NodeProcess] = []
    nodes = MeshNodes(tmp / "nodes")
    try:
        chain = start_chain(tmp, buyers=2)
        procs.append(chain.proc)
        fac, fac_url = start_facilitator(tmp, chain)
        procs.append(fac)
        host = nodes.start("host", no_model=False)
        nodes.start("replica", join=host.token(), no_model=False)
        entry = nodes.start("entry", join=host.token(), extra=[
            "--price", "0.01", "--pay-to", "node-0", "--deployment", str(chain.dir), "--facilitator", fac_url])
        wait_until(lambda: any(m.get("state") == "ready" for m in httpx.get(
            f"http://127.0.0.1:{entry.api_port}/v1/models", timeout=5).json()["data"]), timeout=120,
            what="the entry node sees the host's model")
        yield chain, nodes, host, entry
    finally:
        nodes.stop_all()
        for p in reversed(procs):
            p.stop()


def test_entry_charges_once_for_a_model_hosted_elsewhere(paid_mesh) -> None:
    from x402.http.clients import x402HttpxClient

    chain, _, host, entry = paid_mesh
    buyer, seller = chain.dep.address("buyer-1"), chain.dep.address("node-0")
    b0, s0 = chain.balance(buyer), chain.balance(seller)
    body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Say hi"}],
            "max_tokens": 6, "temperature": 0}
    unpaid = httpx.post(f"http://127.0.0.1:{entry.api_port}/v1/chat/completions", json=body, timeout=60)
    assert unpaid.status_code == 402
    import asyncio

    async def buy() -> httpx.Response:
        async with x402HttpxClient(x402_client(chain.key("buyer-1"), chain.dep), timeout=120) as c:
            return await c.post(f"http://127.0.0.1:{entry.api_port}/v1/chat/completions", json=body)

    r = asyncio.run(buy())
    assert r.status_code == 200, r.text
    assert "via=mesh" in r.headers.get("x-mesh402-route", "")
    assert r.json()["choices"][0]["message"]["content"]
    assert "payment-response" in {k.lower() for k in r.headers}
    wait_until(lambda: chain.balance(buyer) == b0 - PRICE, timeout=30, what="buyer paid the price")
    assert chain.balance(seller) == s0 + PRICE
    # the host was not charged again and took no payment of its own: it has no ledger at all
    assert not (host.home / "payments.sqlite").exists()


def test_paid_request_retries_on_another_replica_when_the_chosen_one_died(paid_mesh) -> None:
    import asyncio

    from x402.http.clients import x402HttpxClient

    chain, nodes, _, entry = paid_mesh
    buyer = chain.dep.address("buyer-0")
    body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Say hi"}],
            "max_tokens": 4, "temperature": 0, "user": "sticky-buyer"}

    async def buy() -> httpx.Response:
        async with x402HttpxClient(x402_client(chain.key("buyer-0"), chain.dep), timeout=120) as c:
            return await c.post(f"http://127.0.0.1:{entry.api_port}/v1/chat/completions", json=body)

    # the retry needs a second replica the entry already knows to be ready
    wait_until(lambda: entry.ready_replicas(body["model"]) == 2, timeout=90, step=0.3, what="two replicas ready")
    first = asyncio.run(buy())
    assert first.status_code == 200, first.text
    served = first.headers["x-mesh402-route"].split("node=")[1].split(";")[0]
    victim = next(n for n in nodes.nodes if n.name in ("host", "replica") and n.node_id.startswith(served))
    b0 = chain.balance(buyer)
    nodes.kill9(victim)
    second = asyncio.run(buy())  # the sticky choice is dead: the entry retries on the other replica
    assert second.status_code == 200, second.text
    assert served not in second.headers["x-mesh402-route"]
    wait_until(lambda: chain.balance(buyer) == b0 - PRICE, timeout=30, what="paid exactly once for the retry")
