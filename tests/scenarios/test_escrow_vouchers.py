"""Issue 14 (escrow vouchers) on real node processes, real QUIC and a real local chain (anvil + facilitator):
a paid split request pays its stage with EIP-712 vouchers from the entry's escrow as the work is done.
(a) the entry is killed right after the request, or in the middle of a streamed one: the worker still
redeems everything it was vouchered, on chain, and loses at most the unvouchered window (32 steps); (b) an entry that stops raising its vouchers (a test-only entry point) gets one request's window of
free work at most: its next request is refused `unpaid`, and the worker redeems what it holds. The escrow is
funded with `mesh402 escrow deposit` and the float locked with `mesh402 escrow lock` (a) or by the entry's
keeper (`--escrow-float`, b). Property 6: a paid entry that routes a request to another member's paid host
pays it with a voucher from the same escrow, not with x402; forged and inflated vouchers from a hostile member
are refused and buy nothing."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.dev_chain import DevChain
from harness.mesh_nodes import MeshNode, MeshNodes, wait_until
from harness.reference import ready_plan as plan_of
from harness.x402_payments import X402SyncTransport, buy_chat
from mesh402.serving.work_pay import MAX_PREPAID_STEPS
from tests.support.chain import paid_chain
from tests.support.escrow_mesh import USDC, escrow_args, escrow_cli, escrow_of, escrow_status, fund_escrow
from tests.support.split_mesh import SPLIT_ARGS

MODEL = "smollm2-135m-instruct"
PRICE = 10_000  # 0.01 USDC per request (escrow_args)
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DevChain, str]]:
    tmp = tmp_path_factory.mktemp("escrow-chain")
    chain, fac, paid = paid_chain(tmp, nodes=8)
    try:
        yield chain, paid[paid.index("--facilitator") + 1]
    finally:
        fac.stop()
        chain.proc.stop()


def paid_split(nodes: MeshNodes, chain: DevChain, fac: str, accounts: tuple[str, str], launcher: list[str] | None = None,
               keeper: bool = False, price: tuple[str, ...] = (), fund: int = USDC) -> tuple[MeshNode, MeshNode, str, str]:
    """Two escrow nodes splitting the model; (host, worker, host account, worker account) once the host's
    escrow covers the worker (locked with `mesh402 escrow lock`, or by the host's keeper with `keeper`) and
    the host sees the worker's escrow label."""
    extra = (*price, *(("--escrow-float", "0.5") if keeper else ()))
    a = nodes.start("a", no_model=False, extra=[*SPLIT_ARGS, *escrow_args(chain, fac, accounts[0], *extra)],
                    launcher=launcher)
    b = nodes.start("b", join=a.token(), no_model=False,
                    extra=[*SPLIT_ARGS, *escrow_args(chain, fac, accounts[1], *extra)], timeout=120, launcher=launcher)
    wait_until(lambda: plan_of(a) is not None and plan_of(b) is not None, timeout=180, what="a ready split plan")
    plan = plan_of(a)
    assert len(plan["stages"]) == 2, plan
    host, worker = (a, b) if plan["host"] == a.node_id else (b, a)
    host_acct, worker_acct = (accounts[0], accounts[1]) if host is a else (accounts[1], accounts[0])
    fund_escrow(chain, host_acct, fund, lock_for=None if keeper else worker_acct)
    if keeper:
        esc, entry, wallet = escrow_of(chain), chain.dep.address(host_acct), chain.dep.address(worker_acct)
        wait_until(lambda: esc.coverage(entry, wallet) >= USDC // 2, timeout=90, what="the keeper's float")
    assert "free" in escrow_cli(chain, "status", "--account", host_acct, "--worker", chain.dep.address(worker_acct))
    wait_until(lambda: "escrow" in ((host.peers().get(worker.node_id, {}).get("announcement") or {}).get("labels")
                                    or {}), timeout=60,
               what="the worker's escrow label at the host")
    wait_until(lambda: "escrow" in ((worker.peers().get(host.node_id, {}).get("announcement") or {}).get("labels")
                                    or {}), timeout=60,
               what="the host's escrow label at the worker (its grants must name that wallet as the payer)")
    return host, worker, host_acct, worker_acct


def redeemed(chain: DevChain, host_acct: str, worker_acct: str) -> int:
    return escrow_of(chain).channel(chain.dep.address(host_acct), chain.dep.address(worker_acct)).redeemed


def test_entry_killed_after_a_paid_request_worker_redeems_everything(dev, tmp_path: Path) -> None:
    chain, fac = dev
    nodes = MeshNodes(tmp_path / "nodes")
    try:
        host, worker, host_acct, worker_acct = paid_split(nodes, chain, fac, ("node-0", "node-1"))
        before = chain.balance(worker_acct)
        assert buy_chat(chain, host.api_port, BODY) == 200
        MeshNodes.kill9(host)  # right after the answer: no goodbye, maybe no CLOSE
        wallet = chain.dep.address(worker_acct)
        entry = chain.dep.address(host_acct).lower()
        held = lambda: (escrow_status(worker).get("held") or {}).get(entry, {})  # noqa: E731
        wait_until(lambda: held().get("vouchered", 0) > 0 and held().get("owed", 0) > 0, timeout=60,
                   what="the worker's voucher and its work recorded")
        vouchered = held()["vouchered"]
        assert vouchered >= held()["owed"]  # the entry vouchered all the work it got before it died
        wait_until(lambda: redeemed(chain, host_acct, worker_acct) == vouchered, timeout=60,
                   what="the worker's redemption on chain")
        assert chain.balance(wallet) - before == vouchered
        assert 0 < vouchered <= PRICE  # its layer share of the request's price, never more than the entry sold
    finally:
        nodes.stop_all()


PER_1K = 5  # USDC per 1k tokens on top of the per-request price: a step is worth enough to see the window
KILL_AT = 40  # streamed chunks before the kill: past the vouchers of steps 16 and 32


def test_entry_killed_mid_stream_worker_redeems_all_vouchered_and_loses_at_most_the_window(dev, tmp_path: Path) -> None:
    chain, fac = dev
    nodes = MeshNodes(tmp_path / "nodes")
    try:
        host, worker, host_acct, worker_acct = paid_split(nodes, chain, fac, ("node-4", "node-5"),
                                                          price=("--price-per-1k", str(PER_1K)), fund=10 * USDC)
        wallet = chain.dep.address(worker_acct)
        before = chain.balance(wallet)
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
                "max_tokens": 200, "temperature": 0, "stream": True}
        chunks = 0
        pay = X402SyncTransport(chain.key("buyer-0"), chain.dep, cap=5 * USDC)
        with httpx.Client(transport=pay, timeout=180) as c, \
                c.stream("POST", f"http://127.0.0.1:{host.api_port}/v1/chat/completions", json=body) as r:
            assert r.status_code == 200, r.read()
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                delta = json.loads(line[6:])["choices"][0].get("delta") or {}
                chunks += bool(delta.get("content"))
                if chunks == KILL_AT:
                    MeshNodes.kill9(host)  # mid-stream: no CLOSE, no last voucher
                    break
        assert chunks == KILL_AT, f"the answer ended after {chunks} chunks, before the kill"
        entry = chain.dep.address(host_acct).lower()
        held = lambda: (escrow_status(worker).get("held") or {}).get(entry, {})  # noqa: E731
        # the worker's session ends (the entry is gone) and its work joins what the entry owes
        wait_until(lambda: held().get("owed", 0) >= held().get("vouchered", 0) > PRICE, timeout=60,
                   what="the worker's mid-stream vouchers and its work recorded")
        vouchered, owed = held()["vouchered"], held()["owed"]
        wait_until(lambda: redeemed(chain, host_acct, worker_acct) == vouchered, timeout=60,
                   what="the worker's redemption on chain")
        assert chain.balance(wallet) - before == vouchered  # everything vouchered, on chain
        per_token = PER_1K * USDC // 1000  # the whole price of a token: more than the worker's share of it
        lost = owed - vouchered
        print(f"killed after {chunks} chunks: vouchered {vouchered}, owed {owed}, lost {lost} "
              f"(window bound {MAX_PREPAID_STEPS * per_token})")
        assert 0 <= lost <= MAX_PREPAID_STEPS * per_token  # at most the unvouchered window of 32 decode steps
    finally:
        nodes.stop_all()


def test_entry_that_stops_vouchering_is_refused_and_the_worker_redeems(dev, tmp_path: Path) -> None:
    chain, fac = dev
    nodes = MeshNodes(tmp_path / "nodes")
    launcher = [sys.executable, "-m", "tests.support.stingy_entry_node"]
    try:
        host, worker, host_acct, worker_acct = paid_split(nodes, chain, fac, ("node-2", "node-3"), launcher, keeper=True)
        assert buy_chat(chain, host.api_port, BODY) == 200  # vouchered (OPEN and first step)
        assert buy_chat(chain, host.api_port, BODY) == 200  # unvouchered, within the worker's window
        entry = chain.dep.address(host_acct).lower()
        held = lambda: (escrow_status(worker).get("held") or {}).get(entry, {})  # noqa: E731
        wait_until(lambda: held().get("owed", 0) > held().get("vouchered", 0) > 0, timeout=60,
                   what="the worker behind on vouchers")
        assert buy_chat(chain, host.api_port, BODY) != 200  # refused: the entry is behind
        refusal = (escrow_status(worker).get("worker") or {}).get("last_refusal", "")
        assert "behind on vouchers" in refusal, refusal
        vouchered = held()["vouchered"]
        wait_until(lambda: redeemed(chain, host_acct, worker_acct) == vouchered, timeout=60,
                   what="the worker's redemption on chain")
    finally:
        nodes.stop_all()


def test_a_routed_request_to_a_paid_host_is_paid_with_a_voucher_and_forged_ones_buy_nothing(dev, tmp_path: Path
                                                                                            ) -> None:
    import asyncio

    from mesh402.economics.escrow import sign_voucher
    from tests.support.hostile import EvilMember
    chain, fac = dev
    nodes = MeshNodes(tmp_path / "nodes")
    try:
        host = nodes.start("host", no_model=False, extra=escrow_args(chain, fac, "node-6"), timeout=120)
        entry = nodes.start("entry", join=host.token(), extra=escrow_args(chain, fac, "node-7"), timeout=120)
        fund_escrow(chain, "node-7", USDC, lock_for="node-6")  # the entry's float for the host
        wait_until(lambda: any(m.get("state") == "ready" for m in httpx.get(
            f"http://127.0.0.1:{entry.api_port}/v1/models", timeout=5).json()["data"]), timeout=120,
            what="the entry sees the host's model")
        wait_until(lambda: {"escrow", "x402"} <= set((entry.peers().get(host.node_id, {}).get("announcement") or {})
                                                       .get("labels") or {}), timeout=60,
                   what="the host's price and escrow label at the entry")
        host_wallet, entry_wallet = chain.dep.address("node-6"), chain.dep.address("node-7")
        before = chain.balance("node-6")

        assert buy_chat(chain, entry.api_port, BODY) == 200  # the client pays the entry (its price + the host's)
        held = (escrow_status(host).get("held") or {}).get(entry_wallet.lower(), {})
        assert held == {"owed": PRICE, "vouchered": PRICE}, held  # paid up front, exactly its price
        wait_until(lambda: escrow_of(chain).channel(entry_wallet, host_wallet).redeemed == PRICE, timeout=60,
                   what="the host's redemption")
        assert chain.balance("node-6") == before + PRICE  # the redemption, and no x402 payment besides

        # a second request nets against what the host reported: still exactly one price per request
        assert buy_chat(chain, entry.api_port, BODY) == 200
        held = (escrow_status(host).get("held") or {}).get(entry_wallet.lower(), {})
        assert held == {"owed": 2 * PRICE, "vouchered": 2 * PRICE}, held
        wait_until(lambda: escrow_of(chain).channel(entry_wallet, host_wallet).redeemed == 2 * PRICE, timeout=60,
                   what="the host's second redemption")
        assert chain.balance("node-6") == before + 2 * PRICE

        esc = escrow_of(chain)
        chain_id = chain.w3().eth.chain_id
        # the entry's real voucher raised 50x, signed by someone else (the host itself), named as the entry's
        inflated = {**sign_voucher(chain.key("node-6"), chain_id, esc.address, host_wallet, 50 * PRICE).to_json(),
                    "entry": entry_wallet}
        # a voucher from a wallet with no escrow for this host (properly signed by its own key)
        uncovered = sign_voucher(chain.key("buyer-0"), chain_id, esc.address, host_wallet, PRICE).to_json()

        async def attack(voucher: dict) -> tuple[int, dict[str, str], bytes]:
            async with EvilMember(tmp_path / "evil", host.token()) as evil:
                await evil.wait_connected(host.node_id)
                return await evil.tunnel(host.node_id, "POST", "/v1/chat/completions", json.dumps(BODY).encode(),
                                         {"x-mesh402-voucher": json.dumps(voucher)})
        # a valid voucher of the entry's with room for one more request (as a redeemed one is public, with
        # whatever prepayment the entry's requests did not use): only the member announcing its wallet may use it
        valid = sign_voucher(chain.key("node-7"), chain_id, esc.address, host_wallet, 3 * PRICE).to_json()
        for bad in (inflated, uncovered, valid):
            status, headers, body = asyncio.run(attack(bad))
            assert status == 402 and b"voucher_refused" in body and b"choices" not in body, (status, body[:300])
        # the same, sent by a direct HTTP client: only the mesh tunnel's requests may pay with vouchers, so it is
        # the usual 402 and nothing is kept
        r = httpx.post(f"http://127.0.0.1:{host.api_port}/v1/chat/completions", json=BODY, timeout=60,
                       headers={"x-mesh402-voucher": json.dumps(valid)})
        assert r.status_code == 402 and r.json()["error"]["code"] == "payment_required", r.text
        held = (escrow_status(host).get("held") or {}).get(entry_wallet.lower(), {})
        assert held == {"owed": 2 * PRICE, "vouchered": 2 * PRICE}, held  # nothing served, nothing kept
    finally:
        nodes.stop_all()
