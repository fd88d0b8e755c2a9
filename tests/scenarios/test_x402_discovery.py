"""GET /.well-known/x402 on paid node processes (real chain and facilitator, the `paid_host_mesh` of
tests/support/paid_mesh.py): the document names the same requirements the node's 402 asks (scheme,
network, asset, payTo, amount) and the per-model price table; for a model routed to a host that charges,
the entry lists its own price plus the host's. A free node answers 404."""

from __future__ import annotations

import httpx
import pytest

from harness.dev_chain import DevChain
from harness.mesh_nodes import MeshNode
from tests.support.paid_mesh import ENTRY_PRICE, HOST_PRICE, MODEL, asked

pytestmark = pytest.mark.timeout(400)
Mesh = tuple[DevChain, dict[str, MeshNode]]


def discovery(node: MeshNode) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{node.api_port}/.well-known/x402", timeout=10)


def test_the_document_matches_what_the_402_asks(paid_host_mesh: Mesh) -> None:
    chain, n = paid_host_mesh
    r = discovery(n["host"])
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["x402Version"] == 2
    chat = next(i for i in doc["items"] if i["resource"].endswith("/v1/chat/completions"))
    assert chat["type"] == "http" and chat["resource"].startswith(f"http://127.0.0.1:{n['host'].api_port}")
    offered, real = chat["accepts"][0], asked(n["host"])
    for key in ("scheme", "network", "asset", "payTo", "amount"):
        assert offered[key] == real[key], key
    assert offered["amount"] == str(HOST_PRICE) and offered["payTo"].lower() == chain.dep.address("node-0").lower()
    meta = chat["metadata"]
    assert meta["billing"] == "per_request" and meta["scheme"] == "exact" and meta["decimals"] == 6
    [row] = [m for m in meta["models"] if m["id"] == MODEL]
    assert row == {**row, "pricePerRequest": str(HOST_PRICE), "pricePer1kTokens": "0", "host": "self",
                   "verified": True, "state": "ready"}


def test_a_routed_model_costs_the_entry_price_plus_the_host_price(paid_host_mesh: Mesh) -> None:
    _, n = paid_host_mesh
    meta = discovery(n["wallet"]).json()["items"][0]["metadata"]
    [row] = [m for m in meta["models"] if m["id"] == MODEL]
    assert row["host"] == n["host"].node_id
    assert row["pricePerRequest"] == str(ENTRY_PRICE + HOST_PRICE)
    assert asked(n["wallet"])["amount"] == str(ENTRY_PRICE + HOST_PRICE)  # what its 402 asks, as listed


def test_a_free_node_sells_nothing(paid_host_mesh: Mesh) -> None:
    _, n = paid_host_mesh
    r = discovery(n["free"])
    assert r.status_code == 404 and "free" in r.json()["error"]["message"]
