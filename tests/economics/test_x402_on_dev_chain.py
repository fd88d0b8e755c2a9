"""x402 payments end to end on a real local chain: `mesh402 chain dev` (anvil + the repo's contracts),
`mesh402 facilitator`, and two priced `mesh402 serve` nodes (per request, and metered per token)."""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from mesh402.home import Home
from mesh402.node.mesh_runtime import read_console_token
from harness.dev_chain import DevChain, start_chain, start_facilitator, start_paid_node
from harness.procs import MESH402, NodeProcess
from harness.sse import ajson_events, json_events
from harness.x402_payments import decode_b64json, get_402, sign_payment, x402_client
from tests.support.chain import require_contract_toolchain

PRICE = 10_000  # 0.01 USDC per request
RATE = 20_000  # 0.02 USDC per 1k tokens -> 20 atomic units per token
TOPUP = 2_000  # 0.002 USDC smallest credit purchase
CHAT = "/v1/chat/completions"


def body(content: str = "Say hi", max_tokens: int = 6, **kw: object) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0, **kw}


@dataclass
class Env:
    chain: DevChain
    facilitator: str
    paid: str
    paid_home: Path
    metered: str
    metered_home: Path
    metered_proc: NodeProcess
    procs: list[NodeProcess]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    require_contract_toolchain()  # tests never reach the internet: the toolchain is installed at setup time
    tmp = tmp_path_factory.mktemp("econ")
    procs: list[NodeProcess] = []
    try:
        chain = start_chain(tmp, buyers=4)
        procs.append(chain.proc)
        fac, fac_url = start_facilitator(tmp, chain)
        procs.append(fac)
        paid, paid_url = start_paid_node(tmp / "paid", chain, fac_url, "--price", "0.01", "--pay-to", "node-0")
        procs.append(paid)
        metered, metered_url = start_paid_node(tmp / "metered", chain, fac_url, "--price-per-1k", "0.02",
                                               "--credit-topup", "0.002", "--pay-to", "node-1")
        procs.append(metered)
        yield Env(chain, fac_url, paid_url, tmp / "paid", metered_url, tmp / "metered", metered, procs)
    finally:
        for p in reversed(procs):
            p.stop()


def payment_states(home: Path, payer: str) -> list[str]:
    db = sqlite3.connect(f"file:{home / 'payments.sqlite'}?mode=ro", uri=True)
    try:
        return [r[0] for r in db.execute("SELECT state FROM payments WHERE payer=?", (payer.lower(),))]
    finally:
        db.close()


# ---- chain -------------------------------------------------------------------------------------

def test_chain_dev_writes_deployment_with_funded_accounts_and_private_keys(env: Env) -> None:
    dep = env.chain.dep
    assert dep.network == "eip155:31337" and dep.asset.decimals == 6 and dep.asset.version == "2"
    for name in ("facilitator", "node-0", "node-1", "buyer-0"):
        kf = dep.key_file(name)
        assert kf.stat().st_mode & 0o777 == 0o600
    assert env.chain.balance("buyer-0") == 1000 * 10**6
    w3 = env.chain.w3()
    assert w3.eth.get_balance(dep.address("facilitator")) > 0  # gas for settlements
    assert len(w3.eth.get_code(dep.contracts["Multicall3"])) > 0


def test_token_transfer_with_authorization_and_replay_revert(env: Env) -> None:
    from eth_account import Account
    from web3.exceptions import ContractLogicError

    from mesh402.economics.chain import token_contract

    ch, dep = env.chain, env.chain.dep
    w3 = ch.w3()
    tok = token_contract(w3, dep.asset.address)
    required = {"accepts": [{"scheme": "exact", "network": dep.network, "asset": dep.asset.address, "amount": "1234",
                             "payTo": dep.address("buyer-3"), "maxTimeoutSeconds": 60,
                             "extra": {"name": dep.asset.name, "version": dep.asset.version}}]}
    header, auth = sign_payment(ch.key("buyer-2"), required)
    sig = bytes.fromhex(decode_b64json(header)["payload"]["signature"][2:])
    args = (auth["from"], auth["to"], int(auth["value"]), 0, int(auth["validBefore"]), bytes.fromhex(auth["nonce"][2:]),
            sig[64], sig[:32], sig[32:64])
    relayer = Account.from_key(ch.key("facilitator"))
    fn = tok.get_function_by_signature(
        "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,uint8,bytes32,bytes32)")
    tx = fn(*args).build_transaction({"from": relayer.address, "nonce": w3.eth.get_transaction_count(relayer.address)})
    rcpt = w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(relayer.sign_transaction(tx).raw_transaction))
    assert rcpt["status"] == 1
    print(f"transferWithAuthorization gas: {rcpt['gasUsed']}")
    assert rcpt["gasUsed"] < 100_000
    assert ch.nonce_used(auth["from"], auth["nonce"])
    with pytest.raises(ContractLogicError, match="authorization is used"):
        fn(*args).call({"from": relayer.address})


# ---- per-request price ---------------------------------------------------------------------------

def test_unpaid_request_gets_402_with_sized_requirements(env: Env) -> None:
    dep = env.chain.dep
    r = httpx.post(env.paid + CHAT, json=body(max_tokens=8), timeout=30)
    assert r.status_code == 402
    assert r.json()["error"]["type"] == "payment_required"
    req = decode_b64json(r.headers["PAYMENT-REQUIRED"])
    assert req["x402Version"] == 2 and req["resource"]["url"].endswith(CHAT)
    acc = req["accepts"][0]
    assert acc["scheme"] == "exact" and acc["network"] == dep.network and acc["amount"] == str(PRICE)
    assert acc["asset"] == dep.asset.address and acc["payTo"] == dep.address("node-0")
    assert acc["extra"] == {"name": dep.asset.name, "version": "2"}
    long = get_402(env.paid, CHAT, body(max_tokens=400))["accepts"][0]["maxTimeoutSeconds"]
    assert long > acc["maxTimeoutSeconds"] + 30  # the window grows with max_tokens


def test_official_x402_client_buys_a_completion_and_status_shows_revenue(env: Env) -> None:
    from x402.http.clients import x402HttpxClient

    ch = env.chain
    buyer0, node0 = ch.balance("buyer-0"), ch.balance("node-0")

    async def run() -> httpx.Response:
        async with x402HttpxClient(x402_client(ch.key("buyer-0"), ch.dep), timeout=120) as http:
            return await http.post(env.paid + CHAT, json=body())
    r = asyncio.run(run())
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"]
    settle = decode_b64json(r.headers["PAYMENT-RESPONSE"])
    assert settle["success"] is True and settle["transaction"].startswith("0x")
    assert settle["payer"].lower() == ch.dep.address("buyer-0").lower()
    assert ch.balance("buyer-0") == buyer0 - PRICE
    assert ch.balance("node-0") == node0 + PRICE
    out = subprocess.run([*MESH402, "status", "--home", str(env.paid_home)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "revenue 0.01" in out.stdout or "revenue 0.02" in out.stdout, out.stdout
    # the console's Money view lists the settlement with its transaction hash
    console = (Home(env.paid_home).read_state() or {})["mesh"]["console_url"]
    money = httpx.get(f"{console}/api/money", headers={"Authorization": f"Bearer {read_console_token(env.paid_home)}"},
                      timeout=10).json()
    assert money["mode"] == "per_request" and money["offer"]["per_request"] == PRICE
    assert money["asset"]["network"] == "eip155:31337" and money["explorer"] == ""  # a local chain: no explorer
    row = next(p for p in money["settlements"] if p["tx"] == settle["transaction"])
    assert row["state"] == "settled" and row["amount"] == PRICE and row["payer"] == settle["payer"].lower()
    assert money["ledger"]["revenue"] >= PRICE


def _bad(env: Env, case: str) -> tuple[str, dict[str, str]]:
    ch, dep = env.chain, env.chain.dep
    required = get_402(env.paid, CHAT, body())
    key = ch.key("buyer-1")
    if case == "bad_signature":
        return sign_payment(key, required, tamper_signature=True)
    if case == "expired":
        return sign_payment(key, required, valid_before=int(time.time()) - 5)
    if case == "wrong_amount":
        h, auth = sign_payment(key, required, value=PRICE - 1)
        return h, auth
    if case == "wrong_token":
        return sign_payment(key, required, asset=dep.address("buyer-3"))
    if case == "wrong_recipient":
        return sign_payment(key, required, to=dep.address("buyer-1"))
    if case == "insufficient_funds":
        from eth_account import Account
        poor = Account.create()
        return sign_payment(poor.key.hex(), required)
    if case == "replayed_nonce":  # a nonce already spent on chain (by a direct transfer)
        h, auth = sign_payment(key, {"accepts": [{**required["accepts"][0], "amount": "1"}]})
        _transfer_directly(env, h)
        return sign_payment(key, required, nonce=auth["nonce"])
    raise AssertionError(case)


def _transfer_directly(env: Env, header: str) -> None:
    from eth_account import Account

    from mesh402.economics.chain import token_contract
    p = decode_b64json(header)["payload"]
    a, sig = p["authorization"], bytes.fromhex(p["signature"][2:])
    w3 = env.chain.w3()
    tok = token_contract(w3, env.chain.dep.asset.address)
    fn = tok.get_function_by_signature(
        "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)")
    relayer = Account.from_key(env.chain.key("facilitator"))
    tx = fn(a["from"], a["to"], int(a["value"]), 0, int(a["validBefore"]), bytes.fromhex(a["nonce"][2:]), sig
            ).build_transaction({"from": relayer.address, "nonce": w3.eth.get_transaction_count(relayer.address)})
    rcpt = w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(relayer.sign_transaction(tx).raw_transaction))
    assert rcpt["status"] == 1


@pytest.mark.parametrize("case,reason", [
    ("bad_signature", "signature"),
    ("expired", "valid_before"),
    ("replayed_nonce", "nonce"),
    ("wrong_amount", "value_mismatch"),
    ("wrong_token", "asset_mismatch"),
    ("wrong_recipient", "recipient_mismatch"),
    ("insufficient_funds", "insufficient"),
])
def test_bad_payment_gets_402_with_reason_and_no_inference(env: Env, case: str, reason: str) -> None:
    header, auth = _bad(env, case)
    payer = auth["from"]
    before = env.chain.balance(payer)
    t0 = time.monotonic()
    r = httpx.post(env.paid + CHAT, json=body(), headers={"PAYMENT-SIGNATURE": header}, timeout=60)
    assert r.status_code == 402, r.text
    err = r.json()["error"]
    assert reason in (err["code"] or ""), err
    assert err["type"] == "payment_required" and "PAYMENT-REQUIRED" in r.headers
    assert "x-request-id" not in r.headers  # no generation was started
    assert time.monotonic() - t0 < 10
    assert env.chain.balance(payer) == before
    assert payment_states(env.paid_home, payer) == []  # never recorded as a payment in flight


def test_failed_inference_settles_nothing(env: Env) -> None:
    """The payment verifies, then the request fails before generation (prompt + max_tokens > context):
    the authorization is released, never broadcast."""
    ch = env.chain
    big = body(max_tokens=60_000)
    required = get_402(env.paid, CHAT, big)
    header, auth = sign_payment(ch.key("buyer-1"), required)
    before = ch.balance("buyer-1")
    r = httpx.post(env.paid + CHAT, json=big, headers={"PAYMENT-SIGNATURE": header}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert ch.balance("buyer-1") == before
    assert not ch.nonce_used(auth["from"], auth["nonce"])
    assert "released" in payment_states(env.paid_home, auth["from"])


def test_paid_stream_arrives_incrementally_and_reports_settlement_in_band(env: Env) -> None:
    ch = env.chain
    req = body("Write a short poem about the sea.", max_tokens=24, stream=True)
    required = get_402(env.paid, CHAT, req)
    header, auth = sign_payment(ch.key("buyer-2"), required)
    before = ch.balance("buyer-2")
    arrivals: list[tuple[float, dict[str, object]]] = []
    t0 = time.monotonic()
    with httpx.stream("POST", env.paid + CHAT, json=req, headers={"PAYMENT-SIGNATURE": header}, timeout=120) as r:
        assert r.status_code == 200
        assert "PAYMENT-RESPONSE" not in r.headers  # not known yet: nothing is settled before the work is done
        for event in json_events(r):
            arrivals.append((time.monotonic() - t0, event))
    content = [t for t, o in arrivals if o["choices"] and o["choices"][0]["delta"].get("content")]  # type: ignore[index]
    assert len(content) >= 10
    assert content[-1] - content[0] > 0.1  # tokens arrived over time, not in one buffered burst
    record = arrivals[-1][1]
    assert record["choices"] == [] and record["x402"]["settlement"]["success"] is True  # type: ignore[index]
    assert arrivals[-1][0] >= content[-1]
    assert ch.balance("buyer-2") == before - PRICE
    assert ch.nonce_used(auth["from"], auth["nonce"])


def test_retried_request_pays_once(env: Env) -> None:
    ch = env.chain
    req = body("Name a colour.")
    required = get_402(env.paid, CHAT, req)
    h1, a1 = sign_payment(ch.key("buyer-3"), required)
    h2, a2 = sign_payment(ch.key("buyer-3"), required)
    before = ch.balance("buyer-3")
    key = {"Idempotency-Key": "retry-test-1"}
    r1 = httpx.post(env.paid + CHAT, json=req, headers={"PAYMENT-SIGNATURE": h1, **key}, timeout=60)
    assert r1.status_code == 200
    # the client lost the answer and retries with the same key and a freshly signed payment
    r2 = httpx.post(env.paid + CHAT, json=req, headers={"PAYMENT-SIGNATURE": h2, **key}, timeout=60)
    assert r2.status_code == 200 and r2.headers.get("X-Mesh402-Replayed") == "true"
    assert r2.json() == r1.json() and r2.headers["PAYMENT-RESPONSE"] == r1.headers["PAYMENT-RESPONSE"]
    # the same authorization presented again (no key): answered from the ledger, not re-broadcast
    r3 = httpx.post(env.paid + CHAT, json=req, headers={"PAYMENT-SIGNATURE": h1}, timeout=60)
    assert r3.status_code == 200 and r3.json() == r1.json()
    # ... and it cannot buy a different request
    r4 = httpx.post(env.paid + CHAT, json=body("Other"), headers={"PAYMENT-SIGNATURE": h1}, timeout=60)
    assert r4.status_code == 402 and r4.json()["error"]["code"] == "authorization_already_used"
    assert decode_b64json(r4.headers["PAYMENT-RESPONSE"])["success"] is True
    assert ch.balance("buyer-3") == before - PRICE
    assert not ch.nonce_used(a2["from"], a2["nonce"])
    h5, _ = sign_payment(ch.key("buyer-3"), required)
    r5 = httpx.post(env.paid + CHAT, json=body("Other"), headers={"PAYMENT-SIGNATURE": h5, **key}, timeout=60)
    assert r5.status_code == 422  # a key is bound to its request
    # another wallet with the same key and body is not answered from buyer-3's purchase: it pays for its own
    other_before = ch.balance("buyer-2")
    h6, _ = sign_payment(ch.key("buyer-2"), required)
    r6 = httpx.post(env.paid + CHAT, json=req, headers={"PAYMENT-SIGNATURE": h6, **key}, timeout=60)
    assert r6.status_code == 200 and r6.headers.get("X-Mesh402-Replayed") is None
    assert decode_b64json(r6.headers["PAYMENT-RESPONSE"])["payer"].lower() == ch.dep.address("buyer-2").lower()
    assert ch.balance("buyer-2") == other_before - PRICE
    # the key alone, with no payment, replays nothing
    r7 = httpx.post(env.paid + CHAT, json=req, headers={**key}, timeout=60)
    assert r7.status_code == 402


def test_a_wallet_cannot_authorize_more_in_flight_than_it_holds(env: Env) -> None:
    """A wallet holding 1.5 requests' worth opens a stream (authorized, not yet settled) and signs a second
    authorization while the first is in flight: each alone passes the facilitator's balance check, their sum
    does not, so the second is refused before any work; the first is answered and settled."""
    from eth_account import Account

    ch = env.chain
    wallet = Account.create()
    ch.transfer("buyer-1", wallet.address, PRICE + PRICE // 2)
    stream_req = body("Count from one to one hundred in words.", max_tokens=256, stream=True)
    h1, _ = sign_payment(wallet.key.hex(), get_402(env.paid, CHAT, stream_req))
    req2 = body("Other")
    h2, _ = sign_payment(wallet.key.hex(), get_402(env.paid, CHAT, req2))
    with httpx.stream("POST", env.paid + CHAT, json=stream_req, headers={"PAYMENT-SIGNATURE": h1}, timeout=120) as r:
        assert r.status_code == 200
        events = json_events(r)
        next(events)  # the stream is under way: its authorization is in flight
        r2 = httpx.post(env.paid + CHAT, json=req2, headers={"PAYMENT-SIGNATURE": h2}, timeout=60)
        rest = list(events)
    assert r2.status_code == 402 and r2.json()["error"]["code"] == "open_authorizations_exceed_balance", r2.text
    assert rest[-1]["x402"]["settlement"]["success"] is True
    assert ch.balance(wallet.address) == PRICE // 2


# ---- metered credit --------------------------------------------------------------------------------

def test_metered_credit_is_drawn_down_by_exact_usage(env: Env) -> None:
    from mesh402.economics.client import PayingClient

    ch = env.chain
    before = ch.balance("buyer-0")

    async def run() -> tuple[list[dict], PayingClient]:
        async with PayingClient(env.metered, ch.key("buyer-0"), max_per_request=50_000, max_per_session=50_000) as c:
            outs = [await c.chat([{"role": "user", "content": "Say hi"}], max_tokens=5) for _ in range(2)]
            credit = httpx.get(env.metered + "/v1/x402/credit", headers={"X-Mesh402-Credit": c.credit_token or ""})
            assert credit.status_code == 200
            outs.append(credit.json())
            return outs, c
    (o1, o2, credit), c = asyncio.run(run())
    cost = [math.ceil(o["usage"]["total_tokens"] * RATE / 1000) for o in (o1, o2)]
    assert c.spend.settled == TOPUP and len(c.spend.payments) == 1  # one purchase, two requests
    assert int(credit["balance"]) == TOPUP - sum(cost)
    assert ch.balance("buyer-0") == before - TOPUP


def test_credit_belongs_to_the_wallet_across_sessions(env: Env) -> None:
    """A new client session (no token) claims the wallet's leftover credit with a signature instead of paying."""
    from mesh402.economics.client import PayingClient

    ch = env.chain

    async def session() -> PayingClient:
        async with PayingClient(env.metered, ch.key("buyer-0"), max_per_request=50_000) as c:
            await c.chat([{"role": "user", "content": "Say hi"}], max_tokens=3)
            return c
    asyncio.run(session())  # leaves credit on the wallet's account (buying more if it ran low)
    before = ch.balance("buyer-0")
    c = asyncio.run(session())
    assert c.spend.signed == 0 and c.credit_token  # paid from credit bought in the earlier session
    assert ch.balance("buyer-0") == before
    # a claim signed by another wallet gets nothing
    from eth_account import Account
    from eth_account.messages import encode_defunct

    from mesh402.economics.charging import credit_claim_message
    ts = int(time.time())
    other = Account.create()
    nonce = "ab" * 16
    msg = encode_defunct(text=credit_claim_message(ch.dep.address("node-1"), ts, nonce))
    sig = other.sign_message(msg).signature.hex()
    r = httpx.post(env.metered + "/v1/x402/credit/token", json={"address": ch.dep.address("buyer-0"), "timestamp": ts,
                                                                 "nonce": nonce, "signature": sig}, timeout=30)
    assert r.status_code == 401
    # the wallet's own claim is good once: a copy of it (replayed within the window) gets nothing
    own = Account.from_key(ch.key("buyer-0")).sign_message(msg).signature.hex()
    claim = {"address": ch.dep.address("buyer-0"), "timestamp": ts, "nonce": nonce, "signature": own}
    first = httpx.post(env.metered + "/v1/x402/credit/token", json=claim, timeout=30)
    assert first.status_code == 200 and first.json()["token"].startswith("m402c_")
    again = httpx.post(env.metered + "/v1/x402/credit/token", json=claim, timeout=30)
    assert again.status_code == 401 and again.json()["error"]["code"] == "claim_replayed"
    no_nonce = {k: v for k, v in claim.items() if k != "nonce"}
    assert httpx.post(env.metered + "/v1/x402/credit/token", json=no_nonce, timeout=30).status_code == 400


def test_official_client_pays_metered_node_and_keeps_the_change_as_credit(env: Env) -> None:
    from x402.http.clients import x402HttpxClient

    ch = env.chain

    async def run() -> httpx.Response:
        async with x402HttpxClient(x402_client(ch.key("buyer-1"), ch.dep), timeout=120) as http:
            return await http.post(env.metered + CHAT, json=body())
    r = asyncio.run(run())
    assert r.status_code == 200, r.text
    assert decode_b64json(r.headers["PAYMENT-RESPONSE"])["success"] is True
    used = math.ceil(r.json()["usage"]["total_tokens"] * RATE / 1000)
    assert int(r.headers["X-Mesh402-Credit-Charged"]) == used
    assert int(r.headers["X-Mesh402-Credit-Balance"]) >= TOPUP - used
    assert r.headers["X-Mesh402-Credit-Token"].startswith("m402c_")


def test_stream_ends_cleanly_when_credit_runs_out_then_402(env: Env) -> None:
    from mesh402.economics.client import PayingClient

    ch = env.chain

    async def run() -> tuple[dict, int, str]:
        async with PayingClient(env.metered, ch.key("buyer-2"), max_per_request=50_000) as c:
            await c.chat([{"role": "user", "content": "Say hi"}], max_tokens=5)  # buys 0.002 of credit
            out = await c.chat([{"role": "user", "content": "Tell me a long story about a dragon."}],
                               max_tokens=200, stream=True)
            return out, c.spend.credit_balance or 0, c.credit_token or ""
    out, balance, token = asyncio.run(run())
    assert out["error"]["code"] == "insufficient_credit", out
    credit = out["x402"]["credit"]
    assert credit["exhausted"] is True
    assert 0 <= balance < RATE * 2  # spent down to (almost) nothing, never below zero
    assert credit["usage"]["completion_tokens"] < 200
    r = httpx.post(env.metered + CHAT, json=body(max_tokens=5), headers={"X-Mesh402-Credit": token}, timeout=60)
    assert r.status_code == 402 and r.json()["error"]["code"] == "insufficient_credit"
    assert "PAYMENT-REQUIRED" in r.headers  # with an offer to top up


def test_node_restart_loses_no_credit(env: Env) -> None:
    from mesh402.economics.client import PayingClient

    ch = env.chain

    async def buy() -> tuple[str, int]:
        async with PayingClient(env.metered, ch.key("buyer-3"), max_per_request=50_000) as c:
            await c.chat([{"role": "user", "content": "Say hi"}], max_tokens=3)
            return c.credit_token or "", c.spend.credit_balance or 0
    token, balance = asyncio.run(buy())
    assert balance > 0
    hdr = {"X-Mesh402-Credit": token}
    # a long stream is in flight (credit held) when the node is killed
    with httpx.stream("POST", env.metered + CHAT, json=body("Tell me a story.", max_tokens=40, stream=True),
                      headers=hdr, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if '"content"' in line:
                break
        env.metered_proc.kill9()
    port = env.metered.rsplit(":", 1)[1]
    proc, _ = start_paid_node(env.metered_home, ch, env.facilitator, "--price-per-1k", "0.02", "--credit-topup",
                              "0.002", "--pay-to", "node-1", port=int(port))
    env.procs.append(proc)
    env.metered_proc = proc
    r = httpx.get(env.metered + "/v1/x402/credit", headers=hdr, timeout=30)
    assert r.status_code == 200
    assert int(r.json()["balance"]) == balance and r.json()["held"] == "0"
    r = httpx.post(env.metered + CHAT, json=body(max_tokens=3), headers=hdr, timeout=60)
    assert r.status_code == 200 and int(r.headers["X-Mesh402-Credit-Balance"]) < balance


# ---- the paying CLI -------------------------------------------------------------------------------

def test_mesh402_chat_pays_with_a_wallet_file_within_caps(env: Env) -> None:
    ch = env.chain
    wallet = ch.dep.key_file("buyer-1")
    before = ch.balance("buyer-1")
    out = subprocess.run([*MESH402, "chat", "Say hi", "--url", env.paid, "--wallet-file", str(wallet),
                          "--max-tokens", "5", "--max-per-request", "0.05"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() and "paid 0.01 USDC" in out.stderr
    assert ch.balance("buyer-1") == before - PRICE
    capped = subprocess.run([*MESH402, "chat", "Say hi", "--url", env.paid, "--wallet-file", str(wallet),
                             "--max-tokens", "5", "--max-per-request", "0.001"], capture_output=True, text=True,
                            timeout=120)
    assert capped.returncode != 0 and "caps" in capped.stderr
    assert ch.balance("buyer-1") == before - PRICE  # nothing signed over the cap


def test_official_x402_client_streams_a_paid_completion(env: Env) -> None:
    from x402.http.clients import x402HttpxClient

    ch = env.chain
    before = ch.balance("buyer-0")

    async def run() -> list[dict]:
        out = []
        async with x402HttpxClient(x402_client(ch.key("buyer-0"), ch.dep), timeout=120) as http:
            async with http.stream("POST", env.paid + CHAT, json=body("Count to five", max_tokens=10, stream=True)) as r:
                assert r.status_code == 200
                async for event in ajson_events(r):
                    out.append(event)
        return out
    events = asyncio.run(run())
    assert any(e["choices"] and e["choices"][0]["delta"].get("content") for e in events)
    assert events[-1]["x402"]["settlement"]["success"] is True
    assert ch.balance("buyer-0") == before - PRICE


def test_chain_dev_can_deploy_onto_a_running_dev_chain(env: Env, tmp_path: Path) -> None:
    out = subprocess.run([*MESH402, "chain", "dev", "--rpc-url", env.chain.dep.rpc_url, "--dir", str(tmp_path / "d2"),
                          "--nodes", "1", "--buyers", "1"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    dep = json.loads((tmp_path / "d2" / "deployment.json").read_text())
    assert dep["asset"]["address"] != env.chain.dep.asset.address and set(dep["accounts"]) == {
        "facilitator", "node-0", "buyer-0"}
    assert env.chain.balance(dep["accounts"]["buyer-0"]["address"]) == 0  # a different token; the old one is untouched


def test_text_completions_are_paid_too(env: Env) -> None:
    from x402.http.clients import x402HttpxClient

    ch = env.chain
    before = ch.balance("buyer-2")

    async def run() -> httpx.Response:
        async with x402HttpxClient(x402_client(ch.key("buyer-2"), ch.dep), timeout=120) as http:
            return await http.post(env.paid + "/v1/completions", json={"prompt": "The sea is", "max_tokens": 4})
    r = asyncio.run(run())
    assert r.status_code == 200 and r.json()["choices"][0]["text"]
    assert decode_b64json(r.headers["PAYMENT-RESPONSE"])["success"] is True
    assert ch.balance("buyer-2") == before - PRICE


def test_client_hanging_up_mid_stream_pays_for_what_it_received(env: Env) -> None:
    ch = env.chain
    req = body("Tell me a long story about a lighthouse.", max_tokens=60, stream=True)
    required = get_402(env.paid, CHAT, req)
    header, auth = sign_payment(ch.key("buyer-3"), required)
    before = ch.balance("buyer-3")
    with httpx.stream("POST", env.paid + CHAT, json=req, headers={"PAYMENT-SIGNATURE": header}, timeout=60) as r:
        for line in r.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break  # got a token, then hang up
    deadline = time.monotonic() + 20
    while ch.balance("buyer-3") == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ch.balance("buyer-3") == before - PRICE
    assert ch.nonce_used(auth["from"], auth["nonce"])
