"""Stand-ins for the x402 edge's tests in process: a facilitator that verifies and settles without a chain,
a payments config on a made-up token, and a Starlette request (optionally from an admitted mesh peer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from starlette.requests import Request

from mesh402.settings import PaymentsConfig

TOKEN = "0x" + "ab" * 20
PAY_TO = "0x" + "cd" * 20


class FakeFacilitator:
    def __init__(self, *, valid: bool = True, settle_ok: bool = True) -> None:
        self.valid, self.settle_ok = valid, settle_ok
        self.verified: list[Any] = []
        self.settled: list[Any] = []

    async def verify(self, payload: Any, req: Any) -> Any:
        from x402.schemas import VerifyResponse
        self.verified.append(payload)
        auth = payload.payload["authorization"]
        return VerifyResponse(is_valid=self.valid, invalid_reason=None if self.valid else "insufficient_funds",
                              payer=auth["from"])

    async def settle(self, payload: Any, req: Any) -> Any:
        from x402.schemas import SettleResponse
        self.settled.append(payload)
        auth = payload.payload["authorization"]
        if not self.settle_ok:
            return SettleResponse(success=False, error_reason="invalid_transaction_state", transaction="",
                                  network=req.network, payer=auth["from"])
        return SettleResponse(success=True, transaction="0x" + "11" * 32, network=req.network, payer=auth["from"])


def cfg(tmp: Path, **kw: Any) -> PaymentsConfig:
    base = dict(price_per_request=10_000, pay_to=PAY_TO, facilitator_url="http://unused", network="eip155:31337",
                asset=TOKEN, asset_name="Mesh Test USDC", asset_version="2", ledger_path=tmp / "ledger.sqlite")
    return PaymentsConfig(**{**base, **kw})


def request(body: dict[str, Any], headers: dict[str, str] | None = None, peer: bool = False) -> Request:
    raw = json.dumps(body).encode()
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
             "server": ("127.0.0.1", 9337), "scheme": "http", "root_path": ""}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": raw, "more_body": False}
    if peer:  # as the in-process tunnel dispatch marks a request from an admitted mesh member
        from mesh402.api.tunnel import PEER_SCOPE_KEY
        scope[PEER_SCOPE_KEY] = "peer-node-id"
    return Request(scope, receive)
