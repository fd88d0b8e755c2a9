"""A paying client for mesh402 nodes: pays per request or buys and spends prepaid credit, within caps.

    async with PayingClient("http://127.0.0.1:9337", key, max_per_request=50_000, max_per_session=500_000) as c:
        reply = await c.chat([{"role": "user", "content": "hi"}], max_tokens=32)

- A 402 is paid with the official x402 SDK's `exact` EVM scheme (EIP-3009 signature, no gas for the buyer).
- On a metered node the payment buys credit; the node answers with a credit token that later requests
  spend (`X-Mesh402-Credit`) until it runs out, then the next 402 is paid again.
- Caps (atomic token units) are checked before anything is signed: one payment may not exceed
  `max_per_request`, and all payments together may not exceed `max_per_session`.
- Credit belongs to the wallet: in a new session the client signs a claim (EIP-191) and gets a fresh token
  for credit bought earlier, before paying again.
- Every request carries an Idempotency-Key; a transport error is retried once with the same key and the
  same signed payment, so the node answers it from its ledger instead of charging twice.
"""

from __future__ import annotations

import base64
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from mesh402.economics.charging import (
    BILLING_HEADER,
    CREDIT_HEADER,
    CREDIT_TOKEN_HEADER,
    IDEMPOTENCY_HEADER,
    credit_claim_message,
)


class SpendCapExceeded(RuntimeError):
    pass


class PaymentFailed(RuntimeError):
    def __init__(self, status: int, body: Any) -> None:
        msg = body.get("error", {}).get("message") if isinstance(body, dict) else str(body)
        super().__init__(f"HTTP {status}: {msg}")
        self.status = status
        self.body = body


@dataclass
class Spend:
    signed: int = 0  # total of all authorizations signed this session (atomic units)
    settled: int = 0
    payments: list[dict[str, Any]] = field(default_factory=list)
    credit_balance: int | None = None


class PayingClient:
    def __init__(self, base_url: str, private_key: str, *, max_per_request: int | None = None,
                 max_per_session: int | None = None, api_key: str | None = None, timeout: float = 600.0) -> None:
        from eth_account import Account
        from x402 import x402Client
        from x402.mechanisms.evm.exact import register_exact_evm_client

        self.base = base_url.rstrip("/")
        self.account = Account.from_key(private_key)
        self.max_per_request = max_per_request
        self.max_per_session = max_per_session
        self.spend = Spend()
        self.credit_token: str | None = None
        self._claimed = False  # asked the node once for a token to credit this wallet already holds
        self._x402 = x402Client()
        register_exact_evm_client(self._x402, self.account)
        self._x402.set_spend_controls(False)  # our own caps below apply to any asset the node asks for
        self._x402.register_policy(self._cap_policy)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=self.base, timeout=timeout, headers=headers)

    @property
    def address(self) -> str:
        return self.account.address

    async def __aenter__(self) -> "PayingClient":
        return self

    async def __aexit__(self, *_: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    def _cap_policy(self, _version: int, reqs: list[Any]) -> list[Any]:
        out = []
        for r in reqs:
            amount = int(r.amount if hasattr(r, "amount") else r.get_amount())
            if self.max_per_request is not None and amount > self.max_per_request:
                continue
            if self.max_per_session is not None and self.spend.signed + amount > self.max_per_session:
                continue
            out.append(r)
        return out

    async def _sign(self, resp: httpx.Response) -> tuple[str, int]:
        from x402.http.utils import (
            decode_payment_required_header,
            encode_payment_signature_header,
        )
        from x402.schemas import NoMatchingRequirementsError

        header = resp.headers.get("PAYMENT-REQUIRED")
        if not header:
            raise PaymentFailed(resp.status_code, _json(resp))
        required = decode_payment_required_header(header)
        try:
            payload = await self._x402.create_payment_payload(required)
        except NoMatchingRequirementsError:
            asks = ", ".join(f"{r.amount} of {r.asset}" for r in required.accepts)
            raise SpendCapExceeded(
                f"the node asks for {asks} (atomic units); caps: {self.max_per_request} per request, "
                f"{self.max_per_session} per session, {self.spend.signed} signed so far") from None
        amount = int(payload.accepted.amount)
        self.spend.signed += amount
        return encode_payment_signature_header(payload), amount

    def _note_payment(self, headers: httpx.Headers | dict[str, str], amount: int) -> dict[str, Any] | None:
        pr = headers.get("PAYMENT-RESPONSE")
        settle = json.loads(base64.b64decode(pr)) if pr else None
        self._note(settle, amount, headers.get(CREDIT_TOKEN_HEADER), headers.get("X-Mesh402-Credit-Balance"))
        return settle

    def _note(self, settle: dict[str, Any] | None, amount: int, token: str | None, balance: str | None) -> None:
        if settle is not None:
            self.spend.payments.append(settle)
            if settle.get("success"):
                self.spend.settled += amount
            else:
                self.spend.signed -= amount  # nothing moved
        if token:
            self.credit_token = token
        if balance is not None:
            self.spend.credit_balance = int(balance)

    async def _claim_credit(self, resp: httpx.Response) -> bool:
        """On a metered node, credit belongs to the wallet: prove it with a signature and get a token
        for what is left (e.g. bought in an earlier session). True if there is credit to spend."""
        if self._claimed or self.credit_token or resp.headers.get(BILLING_HEADER) != "metered":
            return False
        self._claimed = True
        from eth_account.messages import encode_defunct
        from x402.http.utils import decode_payment_required_header
        try:
            pay_to = decode_payment_required_header(resp.headers["PAYMENT-REQUIRED"]).accepts[0].pay_to
        except Exception:
            return False
        ts, nonce = int(time.time()), secrets.token_hex(16)
        sig = self.account.sign_message(encode_defunct(text=credit_claim_message(pay_to, ts, nonce))).signature.hex()
        r = await self._http.post("/v1/x402/credit/token", json={
            "address": self.address, "timestamp": ts, "nonce": nonce,
            "signature": sig if sig.startswith("0x") else "0x" + sig})
        if r.status_code != 200 or int(r.json().get("balance", 0)) <= 0:
            return False
        self.credit_token = r.json()["token"]
        self.spend.credit_balance = int(r.json()["balance"])
        return True

    def _headers(self, key: str, signature: str | None) -> dict[str, str]:
        h = {IDEMPOTENCY_HEADER: key}
        if self.credit_token and signature is None:
            h[CREDIT_HEADER] = self.credit_token
        if signature:
            h["PAYMENT-SIGNATURE"] = signature
        return h

    async def request(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST a non-streaming request, paying as needed; returns the JSON body."""
        key = uuid.uuid4().hex
        sig, amount = None, 0
        for attempt in range(6):
            try:
                resp = await self._http.post(path, json=body, headers=self._headers(key, sig))
            except httpx.TransportError:
                if attempt >= 2:
                    raise
                continue  # same key, same signature: the node answers from its ledger, never charges twice
            if resp.status_code == 402 and sig is None:
                if await self._claim_credit(resp):
                    continue  # spend credit this wallet already has
                sig, amount = await self._sign(resp)
                key = uuid.uuid4().hex  # a new request: the unpaid attempt was not answered
                continue
            if resp.status_code == 401 and _code(resp) == "invalid_credit_token":
                self.credit_token = None
                continue
            if resp.status_code != 200:
                if sig is not None:
                    self._note_payment(resp.headers, amount)
                raise PaymentFailed(resp.status_code, _json(resp))
            if sig is not None:
                self._note_payment(resp.headers, amount)
            else:
                self._note(None, 0, resp.headers.get(CREDIT_TOKEN_HEADER), resp.headers.get("X-Mesh402-Credit-Balance"))
            return resp.json()
        raise PaymentFailed(402, "payment was not accepted")

    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """POST a streaming request; yields each SSE JSON object (the last one carries `x402`)."""
        body = {**body, "stream": True}
        key = uuid.uuid4().hex
        sig, amount = None, 0
        for _ in range(4):
            async with self._http.stream("POST", path, json=body, headers=self._headers(key, sig)) as resp:
                if resp.status_code == 402 and sig is None:
                    await resp.aread()
                    if await self._claim_credit(resp):
                        continue
                    sig, amount = await self._sign(resp)
                    key = uuid.uuid4().hex
                    continue
                if resp.status_code == 401:
                    await resp.aread()
                    if _code(resp) == "invalid_credit_token":
                        self.credit_token = None
                        continue
                if resp.status_code != 200:
                    await resp.aread()
                    raise PaymentFailed(resp.status_code, _json(resp))
                if resp.headers.get(CREDIT_TOKEN_HEADER):
                    self.credit_token = resp.headers[CREDIT_TOKEN_HEADER]
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        return
                    obj = json.loads(data)
                    rec = obj.get("x402")
                    if rec is not None:
                        credit = rec.get("credit") or {}
                        self._note(rec.get("settlement") if sig else None, amount, None, credit.get("balance"))
                    yield obj
                return
        raise PaymentFailed(402, "payment was not accepted")

    async def chat(self, messages: list[dict[str, Any]], *, model: str | None = None, max_tokens: int = 128,
                   stream: bool = False, on_delta: Callable[[str], None] | None = None,
                   **params: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"messages": messages, "max_tokens": max_tokens, **params}
        if model:
            body["model"] = model
        if not stream:
            return await self.request("/v1/chat/completions", body)
        text: list[str] = []
        last: dict[str, Any] = {}
        async for obj in self.stream("/v1/chat/completions", body):
            for ch in obj.get("choices") or []:
                piece = (ch.get("delta") or {}).get("content")
                if piece:
                    text.append(piece)
                    if on_delta:
                        on_delta(piece)
            if "error" in obj:
                last["error"] = obj["error"]
            if "x402" in obj:
                last["x402"] = obj["x402"]
        return {"choices": [{"message": {"role": "assistant", "content": "".join(text)}}], **last}


def _json(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return resp.text


def _code(resp: httpx.Response) -> str | None:
    body = _json(resp)
    return body.get("error", {}).get("code") if isinstance(body, dict) else None
