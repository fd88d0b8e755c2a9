"""A mesh selling inference for the scenarios (real anvil chain, facilitator and node processes): a host that
charges 0.01 USDC per request, a free entry, a paid entry with a wallet (--payout-key-file) and a paid entry
without one. The `paid_host_mesh` fixture (module scope) is wired by tests/scenarios/conftest.py."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from harness.dev_chain import DevChain, paid_mesh_env
from harness.mesh_nodes import MeshNode, wait_until
from harness.x402_payments import decode_b64json
from tests.support.chain import require_contract_toolchain

MODEL = "smollm2-135m-instruct"
HOST_PRICE, ENTRY_PRICE = 10_000, 2_000
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4, "temperature": 0}


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


def asked(node: MeshNode) -> dict:
    """What an unpaid request to `node` is asked to pay (the 402's first requirement)."""
    unpaid = httpx.post(f"http://127.0.0.1:{node.api_port}/v1/chat/completions", json=BODY, timeout=60)
    assert unpaid.status_code == 402, unpaid.text
    return decode_b64json(unpaid.headers["payment-required"])["accepts"][0]
