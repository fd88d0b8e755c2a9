"""The entry node charges for requests it routes over the mesh (paid_proxy), with a fake tunnel."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from eth_account import Account

from mesh402.api.schemas import ChatCompletionRequest
from mesh402.api.x402.gate import PaymentGate
from mesh402.api.x402.proxy import paid_proxy
from harness.sse import body_events, sse_body
from harness.x402_payments import decode_b64json, sign_payment
from mesh402.api.errors import APIError
from tests.support.x402_fakes import FakeFacilitator, cfg, request


def chunk(text: str | None = None, finish: str | None = None) -> dict[str, Any]:
    return {"id": "c1", "object": "chat.completion.chunk", "model": "remote",
            "choices": [{"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}]}


class Tunnel:
    def __init__(self, status: int, ctype: str, parts: list[bytes], fail_after: int | None = None) -> None:
        self.status, self.ctype, self.parts, self.fail_after = status, ctype, parts, fail_after
        self.bodies: list[dict[str, Any]] = []

    async def __call__(self, body: bytes) -> tuple[int, dict[str, str], AsyncIterator[bytes]]:
        self.bodies.append(json.loads(body))

        async def gen() -> AsyncIterator[bytes]:
            for i, p in enumerate(self.parts):
                if self.fail_after is not None and i == self.fail_after:
                    raise ConnectionError("peer vanished")
                # split frames mid-event, as a tunnel may
                yield p[:5]
                yield p[5:]
        return self.status, {"content-type": self.ctype}, gen()


async def collect(resp: Any) -> list[Any]:
    return body_events(b"".join([c async for c in resp.body_iterator]))


def paid(gate: PaymentGate, body: dict[str, Any], tunnel: Tunnel, stream: bool = False) -> Any:
    try:  # the 402 the entry node answers for this very request
        asyncio.run(paid_proxy(gate, request(body), "remote", ChatCompletionRequest.model_validate(body), 64, tunnel))
        raise AssertionError("expected 402")
    except APIError as e:
        assert e.status == 402
        req = decode_b64json(e.headers["PAYMENT-REQUIRED"])
    header, _ = sign_payment(Account.create().key.hex(), req)
    r = request(body, {"PAYMENT-SIGNATURE": header})

    async def run() -> Any:
        resp = await paid_proxy(gate, r, "remote", ChatCompletionRequest.model_validate(body), 64, tunnel)
        return resp, (await collect(resp) if stream else None)
    return asyncio.run(run())


BODY = {"model": "remote", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


def test_routed_request_is_paid_at_the_entry_and_settled_after_the_host_answers(tmp_path: Path) -> None:
    fac = FakeFacilitator()
    gate = PaymentGate(cfg(tmp_path), tmp_path, facilitator=fac)
    answer = {"id": "x", "choices": [{"message": {"content": "hello"}}], "usage": {"prompt_tokens": 9, "completion_tokens": 2}}
    resp, _ = paid(gate, BODY, Tunnel(200, "application/json", [json.dumps(answer).encode()]))
    assert resp.status_code == 200 and json.loads(resp.body) == answer
    assert decode_b64json(resp.headers["PAYMENT-RESPONSE"])["success"] is True
    assert len(fac.verified) == 1 and len(fac.settled) == 1


def test_host_failure_settles_nothing(tmp_path: Path) -> None:
    fac = FakeFacilitator()
    gate = PaymentGate(cfg(tmp_path), tmp_path, facilitator=fac)
    resp, _ = paid(gate, BODY, Tunnel(503, "application/json", [b'{"error": {"message": "busy"}}']))
    assert resp.status_code == 503 and fac.settled == []
    resp, events = paid(gate, {**BODY, "stream": True},
                        Tunnel(200, "text/event-stream", sse_body(chunk("a"), chunk("b"), chunk("c")), fail_after=2),
                        stream=True)
    assert [e for e in events if isinstance(e, dict) and "error" in e][0]["error"]["code"] == "host_lost"
    assert events[-2]["x402"]["released"] is True and fac.settled == []


def test_routed_stream_is_metered_from_the_hosts_usage(tmp_path: Path) -> None:
    fac = FakeFacilitator()
    gate = PaymentGate(cfg(tmp_path, price_per_request=0, price_per_1k_tokens=100_000, credit_topup=5_000),
                       tmp_path, facilitator=fac)  # 100 units per token
    usage = {"object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}
    tunnel = Tunnel(200, "text/event-stream", sse_body(chunk("a"), chunk("b"), chunk("c"), chunk(None, "stop"), usage))
    resp, events = paid(gate, {**BODY, "stream": True}, tunnel, stream=True)
    assert tunnel.bodies[0]["stream_options"] == {"include_usage": True}  # asked of the host...
    assert not any(isinstance(e, dict) and e.get("usage") for e in events)  # ...not passed to this client
    assert [e["choices"][0]["delta"].get("content") for e in events[:3]] == ["a", "b", "c"]
    rec = events[-2]["x402"]
    assert rec["settlement"]["success"] is True and rec["credit"]["charged"] == "1000"
    assert rec["credit"]["balance"] == "4000" and events[-1] == "[DONE]"
    assert resp.headers["X-Mesh402-Credit-Token"].startswith("m402c_")


def test_routed_stream_is_cut_when_credit_runs_out(tmp_path: Path) -> None:
    gate = PaymentGate(cfg(tmp_path, price_per_request=0, price_per_1k_tokens=100_000, credit_topup=2_000),
                       tmp_path, facilitator=FakeFacilitator())
    payer = Account.create().address
    gate.ledger.topup(payer, 4_000, "test")  # 40 tokens at 100 units: prompt estimate + a few
    token = gate.ledger.issue_token(payer)
    tunnel = Tunnel(200, "text/event-stream", sse_body(*[chunk(f"t{i}") for i in range(40)]))
    body = {**BODY, "stream": True, "max_tokens": 40}

    async def run() -> list[Any]:
        r = request(body, {"X-Mesh402-Credit": token})
        resp = await paid_proxy(gate, r, "remote", ChatCompletionRequest.model_validate(body), 64, tunnel)
        return await collect(resp)
    events = asyncio.run(run())
    texts = [e for e in events if isinstance(e, dict) and e.get("choices") and e["choices"][0]["delta"].get("content")]
    assert 0 < len(texts) < 40
    finish = [e for e in events if isinstance(e, dict) and e.get("choices") and e["choices"][0].get("finish_reason")]
    assert finish[0]["choices"][0]["finish_reason"] == "length"
    assert any(isinstance(e, dict) and e.get("error", {}).get("code") == "insufficient_credit" for e in events)
    credit = events[-2]["x402"]["credit"]
    assert credit["exhausted"] is True and 0 <= int(credit["balance"]) < 100
    assert gate.ledger.balance(payer) == int(credit["balance"])


def test_a_hosts_usage_is_bounded_by_what_the_entry_relayed(tmp_path: Path) -> None:
    """A routed host that streams 3 tokens and reports 10^9 completion tokens (or a usage object that is not
    numbers) is billed for what the entry relayed, not for its claim."""
    for claimed, charged in (({"prompt_tokens": 7, "completion_tokens": 10**9}, "1100"),
                             ({"prompt_tokens": "lots", "completion_tokens": [1]}, None)):
        fac = FakeFacilitator()
        home = tmp_path / str(len(charged or "x"))
        gate = PaymentGate(cfg(home, price_per_request=0, price_per_1k_tokens=100_000, credit_topup=50_000),
                           home, facilitator=fac)  # 100 units per token; plenty of credit
        usage = {"object": "chat.completion.chunk", "choices": [], "usage": claimed}
        tunnel = Tunnel(200, "text/event-stream",
                        sse_body(chunk("a"), chunk("b"), chunk("c"), chunk(None, "stop"), usage))
        resp, events = paid(gate, {**BODY, "stream": True, "max_tokens": 40}, tunnel, stream=True)
        rec = events[-2]["x402"]
        assert rec["settlement"]["success"] is True
        # 4 chunks with choices relayed (3 tokens + the finish): completion at most 4, never 10^9
        assert rec["credit"]["usage"]["completion_tokens"] <= 4, rec
        if charged is not None:
            assert rec["credit"]["charged"] == charged, rec  # (7 + 4) tokens at 100 units
