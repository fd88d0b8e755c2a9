"""PaymentGate and the paid SSE stream in-process, with a fake facilitator (no chain, no model)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account

from mesh402.api.bodies import sse
from mesh402.api.errors import APIError
from mesh402.settings import NodeConfig
from mesh402.api.x402.gate import PaymentGate
from mesh402.api.x402.stream import paid_sse
from mesh402.serving.generation import Delta, Finished
from harness.x402_payments import decode_b64json, sign_payment
from tests.support.x402_fakes import FakeFacilitator, cfg, request


def required_for(gate: PaymentGate, body: dict[str, Any], max_tokens: int = 8, prompt: int = 10) -> dict[str, Any]:
    with pytest.raises(APIError) as e:
        asyncio.run(gate.authorize(request(body), "m", prompt, max_tokens, False))
    assert e.value.status == 402
    return decode_b64json(e.value.headers["PAYMENT-REQUIRED"])


BODY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def fin(prompt: int = 10, completion: int = 3) -> Finished:
    return Finished("length", prompt, completion, 0, 0.05, 0.2)


def test_free_node_has_no_gate(tmp_path: Path) -> None:
    from mesh402.api.openai import create_app
    from mesh402.serving.registry import ModelRegistry
    app = create_app(NodeConfig(home=tmp_path), ModelRegistry())
    assert app.state.payment_gate is None
    assert not any(getattr(r, "path", "").startswith("/v1/x402") for r in app.routes)


def test_requests_from_admitted_mesh_peers_are_charged_like_any_client(tmp_path: Path) -> None:
    """A member of an open mesh is anyone: a tunnelled request without payment gets the 402 too."""
    fac = FakeFacilitator()
    gate = PaymentGate(cfg(tmp_path), tmp_path, facilitator=fac)
    with pytest.raises(APIError) as e:
        asyncio.run(gate.authorize(request(BODY, peer=True), "m", 10, 8, False))
    assert e.value.status == 402 and "PAYMENT-REQUIRED" in e.value.headers
    assert fac.verified == [] and fac.settled == []


def test_window_is_sized_from_max_tokens_and_measured_speed(tmp_path: Path) -> None:
    gate = PaymentGate(cfg(tmp_path), tmp_path, facilitator=FakeFacilitator())
    short, long = gate.window_s("m", 10, 16), gate.window_s("m", 10, 1000)
    assert long > short + 300
    gate.observe("m", Finished("length", 10, 101, 0, 0.1, 1.1))  # a fast node: 100 tok/s
    for _ in range(20):
        gate.observe("m", Finished("length", 10, 101, 0, 0.1, 1.1))
    assert gate.window_s("m", 10, 1000) < long / 4
    # a slow node needs a longer window than a client signed for: refused before any facilitator call
    slow = PaymentGate(cfg(tmp_path / "s"), tmp_path / "s", facilitator=FakeFacilitator())
    req = required_for(slow, BODY)
    header, _ = sign_payment(Account.create().key.hex(), req, valid_before=int(__import__("time").time()) + 20)
    with pytest.raises(APIError) as e:
        asyncio.run(slow.authorize(request(BODY, {"PAYMENT-SIGNATURE": header}), "m", 10, 8, False))
    assert e.value.code == "authorization_window_too_short"
    assert slow.facilitator.verified == []  # type: ignore[attr-defined]


def _events(n: int, fail_after: int | None = None) -> AsyncIterator[Delta | Finished]:
    async def gen() -> AsyncIterator[Delta | Finished]:
        for i in range(n):
            if fail_after is not None and i == fail_after:
                raise RuntimeError("GPU fell off the bus")
            yield Delta(f"t{i} ", i)
        yield fin(10, n)
    return gen()


def _chunk(delta: Delta | None, finish: str | None, first: bool) -> dict[str, Any]:
    text = delta.text if delta is not None else None
    d: dict[str, Any] = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
    return {"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": d, "finish_reason": finish}]}


def _usage(f: Finished) -> dict[str, int]:
    return {"prompt_tokens": f.prompt_tokens, "completion_tokens": f.completion_tokens}


async def _drain(agen: AsyncIterator[bytes]) -> list[Any]:
    out = []
    async for b in agen:
        s = b.decode()[6:].strip()
        out.append(s if s == "[DONE]" else json.loads(s))
    return out


def _paid_charge(gate: PaymentGate, body: dict[str, Any], stream: bool = True, key: str | None = None) -> Any:
    req = required_for(gate, body)
    header, auth = sign_payment(Account.create().key.hex(), req)
    headers = {"PAYMENT-SIGNATURE": header, **({"Idempotency-Key": key} if key else {})}
    return asyncio.run(gate.authorize(request(body, headers), "m", 10, 8, stream)), auth


def test_failure_mid_stream_settles_nothing(tmp_path: Path) -> None:
    fac = FakeFacilitator()
    gate = PaymentGate(cfg(tmp_path), tmp_path, facilitator=fac)
    charge, auth = _paid_charge(gate, BODY)
    events = asyncio.run(_drain(paid_sse(gate, charge, _events(6, fail_after=2), _chunk, sse, _usage, False, 10)))
    assert [e["choices"][0]["delta"].get("content") for e in events[1:3]] == ["t0 ", "t1 "]
    assert events[-1] == "[DONE]"
    assert events[-3]["error"]["type"] == "server_error"
    assert events[-2]["x402"]["settlement"] is None and events[-2]["x402"]["released"] is True
    assert fac.settled == []
    assert gate.ledger.payment(charge.auth_id).state == "released"


def test_stream_settles_after_the_last_token_and_replays_on_retry(tmp_path: Path) -> None:
    fac = FakeFacilitator()
    gate = PaymentGate(cfg(tmp_path), tmp_path, facilitator=fac)
    body = {**BODY, "stream": True}
    charge, _ = _paid_charge(gate, body, key="k1")
    settled_at: list[int] = []

    async def run() -> list[Any]:
        out = []
        async for b in paid_sse(gate, charge, _events(5), _chunk, sse, _usage, True, 10):
            settled_at.append(len(fac.settled))
            out.append(b)
        return out
    raw = asyncio.run(run())
    assert settled_at[:6] == [0] * 6  # role + 5 tokens went out before anything was settled
    rec = json.loads(raw[-2].decode()[6:])
    assert rec["choices"] == [] and rec["x402"]["settlement"]["success"] is True
    assert len(fac.settled) == 1
    # the same request again with the same key: replayed from the ledger, no new payment
    again = asyncio.run(gate.authorize(request(body, {"Idempotency-Key": "k1"}), "m", 10, 8, True))
    assert again.replay is not None and again.replay.body == b"".join(raw)
    assert len(fac.settled) == 1 and len(fac.verified) == 1


def test_failed_settlement_withholds_the_answer(tmp_path: Path) -> None:
    fac = FakeFacilitator(settle_ok=False)
    gate = PaymentGate(cfg(tmp_path), tmp_path, facilitator=fac)
    charge, _ = _paid_charge(gate, BODY, stream=False, key="k2")
    resp = asyncio.run(gate.respond(charge, fin(), {"choices": []}, {}))
    assert resp.status_code == 402
    assert decode_b64json(resp.headers["PAYMENT-RESPONSE"])["success"] is False
    assert gate.ledger.response("idem:k2") is None
    assert gate.ledger.payment(charge.auth_id).state == "failed"


def test_invalid_payment_is_refused_with_the_facilitators_reason(tmp_path: Path) -> None:
    gate = PaymentGate(cfg(tmp_path), tmp_path, facilitator=FakeFacilitator(valid=False))
    with pytest.raises(APIError) as e:
        _paid_charge(gate, BODY)
    assert e.value.status == 402 and e.value.code == "insufficient_funds"
    assert "PAYMENT-REQUIRED" in e.value.headers


def test_metered_stream_cut_off_charges_exactly_the_tokens_delivered(tmp_path: Path) -> None:
    fac = FakeFacilitator()
    gate = PaymentGate(cfg(tmp_path, price_per_request=0, price_per_1k_tokens=100_000, credit_topup=2_000),
                       tmp_path, facilitator=fac)  # 100 atomic units per token
    # buy 2000 units of credit with a request that uses 10 + 3 tokens
    charge, auth = _paid_charge(gate, BODY, stream=False)
    res = asyncio.run(gate.respond(charge, fin(10, 3), {"x": 1}, {}))
    assert res.headers["X-Mesh402-Credit-Charged"] == "1300" and res.headers["X-Mesh402-Credit-Balance"] == "700"
    token = res.headers["X-Mesh402-Credit-Token"]
    # 700 left: a stream with a 2-token prompt can afford 5 completion tokens (2 + 5 = 7 tokens)
    c2 = asyncio.run(gate.authorize(request(BODY, {"X-Mesh402-Credit": token}), "m", 2, 50, True))
    events = asyncio.run(_drain(paid_sse(gate, c2, _events(50), _chunk, sse, _usage, True, 2)))
    contents = [e for e in events if isinstance(e, dict) and e.get("choices") and e["choices"][0]["delta"].get("content")]
    assert len(contents) == 5
    assert any(isinstance(e, dict) and e.get("error", {}).get("code") == "insufficient_credit" for e in events)
    credit = events[-2]["x402"]["credit"]
    assert credit == {**credit, "charged": "700", "balance": "0", "exhausted": True}
    # nothing left: a clear 402 before any work
    with pytest.raises(APIError) as e:
        asyncio.run(gate.authorize(request(BODY, {"X-Mesh402-Credit": token}), "m", 2, 50, True))
    assert e.value.status == 402 and e.value.code == "insufficient_credit"
    assert len(fac.settled) == 1


def test_client_disconnect_mid_stream_charges_tokens_seen(tmp_path: Path) -> None:
    gate = PaymentGate(cfg(tmp_path, price_per_request=0, price_per_1k_tokens=100_000, credit_topup=5_000),
                       tmp_path, facilitator=FakeFacilitator())
    charge, _ = _paid_charge(gate, BODY, stream=False)
    token = asyncio.run(gate.respond(charge, fin(10, 3), {}, {})).headers["X-Mesh402-Credit-Token"]
    payer = charge.payer

    async def run() -> None:
        c2 = await gate.authorize(request(BODY, {"X-Mesh402-Credit": token}), "m", 2, 20, True)
        agen = paid_sse(gate, c2, _events(20), _chunk, sse, _usage, False, 2)
        for _ in range(4):  # role + 3 tokens, then the client goes away
            await agen.__anext__()
        await agen.aclose()
        await asyncio.sleep(0.05)  # the settlement task runs detached from the closed response
    asyncio.run(run())
    assert gate.ledger.balance(payer) == 5_000 - 1_300 - (2 + 3) * 100
    assert gate.ledger.held(payer) == 0


def test_metered_stream_counts_tokens_that_show_no_text(tmp_path: Path) -> None:
    """Tool-call tokens (held back by the call parser) and tokens that decode to no text yet are generated
    work: a Delta carries how many tokens it covers, and every one is charged before its text is sent."""
    gate = PaymentGate(cfg(tmp_path, price_per_request=0, price_per_1k_tokens=100_000, credit_topup=5_000),
                       tmp_path, facilitator=FakeFacilitator())
    charge, _ = _paid_charge(gate, BODY, stream=False)
    token = asyncio.run(gate.respond(charge, fin(10, 3), {}, {})).headers["X-Mesh402-Credit-Token"]
    payer = charge.payer

    async def hidden() -> AsyncIterator[Delta | Finished]:
        yield Delta("", None, tokens=4)  # e.g. a tool call's opening marker and name, not yet shown
        yield Delta('{"city": "Paris"}', 7, tokens=6)
        yield fin(2, 10)

    async def run(hang_up: bool) -> None:
        c2 = await gate.authorize(request(BODY, {"X-Mesh402-Credit": token}), "m", 2, 20, True)
        agen = paid_sse(gate, c2, hidden(), _chunk, sse, _usage, True, 2)
        if not hang_up:
            assert (await _drain(agen))[-1] == "[DONE]"
            return
        for _ in range(2):  # role, then the chunk of the 4 hidden tokens; then the client goes away
            await agen.__anext__()
        await agen.aclose()
        await asyncio.sleep(0.05)  # the settlement task runs detached from the closed response
    asyncio.run(run(hang_up=True))
    assert gate.ledger.balance(payer) == 5_000 - 1_300 - (2 + 4) * 100
    asyncio.run(run(hang_up=False))
    assert gate.ledger.balance(payer) == 5_000 - 1_300 - (2 + 4) * 100 - (2 + 10) * 100
    assert gate.ledger.held(payer) == 0


class PendingFacilitator(FakeFacilitator):
    async def settle(self, payload: Any, req: Any) -> Any:
        from x402.schemas import SettleResponse
        self.settled.append(payload)
        return SettleResponse(success=False, error_reason="settlement_pending", transaction="0x" + "22" * 32,
                              network=req.network, payer=payload.payload["authorization"]["from"])


def test_pending_settlement_is_retried_once_then_finished_on_the_next_start(tmp_path: Path) -> None:
    fac = PendingFacilitator()
    gate = PaymentGate(cfg(tmp_path), tmp_path, facilitator=fac)
    charge, _ = _paid_charge(gate, BODY, stream=False)
    resp = asyncio.run(gate.respond(charge, fin(), {"ok": 1}, {}))
    assert resp.status_code == 200 and len(fac.settled) == 2  # the SDK's one retry on settlement_pending
    assert decode_b64json(resp.headers["PAYMENT-RESPONSE"])["pending"] is True
    row = gate.ledger.payment(charge.auth_id)
    assert row is not None and row.state == "settling" and row.tx == "0x" + "22" * 32
    gate.ledger.close()
    # the node restarts: the first request it sees kicks off settling what was left in flight
    fac2 = FakeFacilitator()
    gate2 = PaymentGate(cfg(tmp_path), tmp_path, facilitator=fac2)

    async def poke() -> None:
        with pytest.raises(APIError):
            await gate2.authorize(request(BODY), "m", 10, 8, False)
        await asyncio.sleep(0.05)
    asyncio.run(poke())
    assert len(fac2.settled) == 1 and gate2.ledger.payment(charge.auth_id).state == "settled"  # type: ignore[union-attr]
