"""Hand-made x402 payments (good and deliberately bad) signed with eth-account, and purchases through the
official x402 SDK client, against nodes on a dev chain (harness/dev_chain.py)."""

from __future__ import annotations

import base64
import json
import secrets
import time
from typing import Any

import httpx

from mesh402.economics.networks import Deployment
from harness.dev_chain import DevChain


def decode_b64json(value: str) -> dict[str, Any]:
    return json.loads(base64.b64decode(value))


def sign_payment(key: str, required: dict[str, Any], *, value: int | None = None, to: str | None = None,
                 asset: str | None = None, valid_before: int | None = None, nonce: str | None = None,
                 chain_id: int | None = None, tamper_signature: bool = False) -> tuple[str, dict[str, Any]]:
    """A PAYMENT-SIGNATURE header for the first of `required['accepts']`, with any field overridden."""
    from eth_account import Account
    from eth_account.messages import encode_typed_data

    req = dict(required["accepts"][0])
    acct = Account.from_key(key)
    auth = {"from": acct.address, "to": to or req["payTo"], "value": str(value if value is not None else req["amount"]),
            "validAfter": "0", "validBefore": str(valid_before or int(time.time()) + int(req["maxTimeoutSeconds"])),
            "nonce": nonce or "0x" + secrets.token_hex(32)}
    domain = {"name": req["extra"]["name"], "version": req["extra"]["version"],
              "chainId": chain_id or int(req["network"].split(":")[1]), "verifyingContract": asset or req["asset"]}
    types = {"TransferWithAuthorization": [
        {"name": "from", "type": "address"}, {"name": "to", "type": "address"}, {"name": "value", "type": "uint256"},
        {"name": "validAfter", "type": "uint256"}, {"name": "validBefore", "type": "uint256"},
        {"name": "nonce", "type": "bytes32"}]}
    msg = {**auth, "value": int(auth["value"]), "validAfter": 0, "validBefore": int(auth["validBefore"]),
           "nonce": bytes.fromhex(auth["nonce"][2:])}
    signed = acct.sign_message(encode_typed_data(domain_data=domain, message_types=types, message_data=msg))
    sig = signed.signature.hex()
    sig = sig if sig.startswith("0x") else "0x" + sig
    if tamper_signature:
        sig = sig[:10] + ("0" if sig[10] != "0" else "1") + sig[11:]
    accepted = dict(req)
    if asset:
        accepted["asset"] = asset
    payload = {"x402Version": 2, "resource": required.get("resource"), "accepted": accepted,
               "payload": {"signature": sig, "authorization": auth}}
    return base64.b64encode(json.dumps(payload).encode()).decode(), auth


def get_402(base: str, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
    r = httpx.post(base + path, json=body, headers=headers or {}, timeout=60)
    assert r.status_code == 402, r.text
    return decode_b64json(r.headers["PAYMENT-REQUIRED"])


def x402_client(key: str, dep: Deployment, cap: int = 1_000_000) -> Any:
    """The official x402 SDK client, with the local test token allow-listed (its only required change)."""
    from eth_account import Account
    from x402 import x402Client
    from x402.mechanisms.evm.exact import register_exact_evm_client

    c = x402Client()
    register_exact_evm_client(c, Account.from_key(key))
    c.set_spend_controls({"allowed_assets": [{"network": dep.network, "asset": dep.asset.address,
                                              "max_amount_per_payment": str(cap)}]})
    return c


def buy_chat(chain: DevChain, api_port: int, body: dict[str, Any], buyer: str = "buyer-0") -> int:
    """One chat completion bought from a paid node with the official x402 SDK client; the HTTP status."""
    import asyncio

    from x402.http.clients import x402HttpxClient

    async def buy() -> int:
        async with x402HttpxClient(x402_client(chain.key(buyer), chain.dep), timeout=180) as client:
            r = await client.post(f"http://127.0.0.1:{api_port}/v1/chat/completions", json=body)
            return r.status_code
    return asyncio.run(buy())


class X402SyncTransport(httpx.BaseTransport):
    """An httpx transport that pays a 402 with the official SDK's sync client and sends the request again
    (what the SDK's requests adapter does), so a sync client such as `openai.OpenAI(http_client=...)`
    buys from a paid node; streamed answers stay streamed."""

    def __init__(self, key: str, dep: Deployment, cap: int = 1_000_000) -> None:
        from eth_account import Account
        from x402 import x402ClientSync
        from x402.http.x402_http_client import x402HTTPClientSync
        from x402.mechanisms.evm.exact import register_exact_evm_client

        client = x402ClientSync()
        register_exact_evm_client(client, Account.from_key(key))
        client.set_spend_controls({"allowed_assets": [{"network": dep.network, "asset": dep.asset.address,
                                                       "max_amount_per_payment": str(cap)}]})
        self.client, self.http = client, x402HTTPClientSync(client)
        self.inner = httpx.HTTPTransport()
        self.paid = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if response.status_code != 402:
            return response
        content = response.read()
        response.close()
        try:
            body = json.loads(content)
        except ValueError:
            body = None
        required = self.http.get_payment_required_response(response.headers.get, body)
        payload = self.client.create_payment_payload(required)
        request.headers.update(self.http.encode_payment_signature_header(payload))
        self.paid += 1
        return self.inner.handle_request(request)

    def close(self) -> None:
        self.inner.close()
