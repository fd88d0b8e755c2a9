"""x402 v2 at the API edge: one `PaymentGate` the OpenAI routes call around each generation.

    charge = await gate.authorize(request, model_id, prompt_tokens, max_tokens, stream)   # before any work
    if charge.replay: return charge.replay           # a retried request, answered from the ledger
    ... generate ...
    response = await gate.respond(charge, fin, body, headers)   # settle after success (non-streaming)
    await gate.release(charge, reason)                           # on failure: nothing is settled

Two ways to pay:
- per request (`--price` only): the standard `exact` scheme, one EIP-3009 authorization per request,
  verified with the facilitator before any work and settled only after the answer is complete;
- metered (`--price-per-1k`): prepaid credit bought with the same `exact` scheme (the authorization is
  a top-up attached to a request, settled after it succeeds) and drawn down by the tokens actually used.
  The leftover stays on the payer's account; `X-Mesh402-Credit: <token>` spends it on later requests.

Streaming is never buffered: tokens flow as they are generated, settlement runs after the last token
and its outcome arrives in-band as a final SSE chunk (`"choices": []` plus an `x402` object) before
`data: [DONE]`; the same record is kept in the ledger.

Trust (docs/security.md): an `Idempotency-Key` belongs to the payer that proved itself (a locally checked
EIP-3009 signature, or a credit token), so another client with the same key and body gets no one else's
answer; a payer's authorizations in flight are capped (`max_exposure`), since a stream's tokens go out
before its payment settles; an answer is staged in the ledger before its payment is settled, so a crash
in between leaves the retry the answer (once settled) or the settlement's outcome.

Requests that arrive through the mesh tunnel are charged like any client's: an admitted member is not
trusted to have been paid by anyone (on an open mesh anyone is a member). An entry node that routes to
a host that charges pays that host itself (api/x402/proxy.py) or lets its client pay it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import re
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from mesh402.api.errors import APIError
from mesh402.api.tunnel import PEER_SCOPE_KEY
from mesh402.economics.charging import (
    BILLING_HEADER,
    CLAIM_NONCE_RE,
    CLAIM_WINDOW_S,
    CREDIT_BALANCE_HEADER,
    CREDIT_CHARGED_HEADER,
    CREDIT_HEADER,
    CREDIT_TOKEN_HEADER,
    VOUCHER_EARNED_HEADER,
    VOUCHER_HEADER,
    IDEMPOTENCY_HEADER,
    REPLAY_HEADER,
    Pricing,
    b64json,
    credit_claim_message,
)
from mesh402.economics.ledger import IN_FLIGHT, Ledger, auth_id_for
from mesh402.economics.networks import Asset
from mesh402.settings import PaymentsConfig

log = logging.getLogger(__name__)

AUTH_HEADER = "x-mesh402-internal-auth"  # in a staged answer's stored headers: its payment (never sent)
DEFAULT_EXPOSURE_REQUESTS = 4  # without --max-exposure: a payer may have this many requests' worth in flight


@dataclass
class Charge:
    """One request's payment state between authorize() and respond()/finish_stream()/release()."""
    mode: str  # exact | credit | voucher (a routed request an entry paid with an escrow voucher)
    request_id: str
    model_id: str = ""
    prompt_tokens: int = 0
    max_tokens: int = 0
    stream: bool = False
    payer: str | None = None
    auth_id: str | None = None
    payload: Any = None  # x402 PaymentPayload
    requirements: Any = None  # x402 PaymentRequirements
    amount: int = 0  # the authorization's amount
    hold_id: str | None = None
    available: int = 0  # credit usable by this request: held balance + pending top-up
    completion_seen: int = 0
    keys: list[str] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)  # to add to the response
    replay: Response | None = None
    exhausted: bool = False
    finished: bool = False
    timing: dict[str, float] = field(default_factory=dict)  # facilitator round trips, ms
    gate: "PaymentGate | None" = None
    extra: int = 0  # added to this request's price: what the entry pays the host it routes to
    staged: bool = False  # its answer is in the ledger, its payment marked settling

    def cost(self, prompt_tokens: int, completion_tokens: int) -> int:
        assert self.gate is not None
        return self.gate.cost(prompt_tokens, completion_tokens) + self.extra

    def take_token(self) -> bool:
        """Metering while streaming: count one more completion token; False once credit runs out."""
        self.completion_seen += 1
        if self.mode != "credit" or self.gate is None or self.completion_seen >= self.max_tokens:
            return True
        if self.cost(self.prompt_tokens, self.completion_seen + 1) > self.available:
            self.exhausted = True
            return False
        return True


class PaymentGate(Pricing):
    """The x402 edge of a node that charges: 402 answers, verification before work, settlement after."""

    def __init__(self, cfg: PaymentsConfig, home: Path, *, facilitator: Any = None) -> None:
        if not cfg.pay_to:
            raise ValueError("payments need --pay-to ADDRESS (where buyers' USDC goes)")
        if not (cfg.network and cfg.asset and cfg.asset_name and cfg.asset_version):
            raise ValueError("payments need a network and an asset with its EIP-712 name and version")
        super().__init__(cfg, Asset(cfg.network, cfg.asset, cfg.asset_name, cfg.asset_version, cfg.asset_decimals))
        self.ledger = Ledger(cfg.ledger_path or Path(home) / "payments.sqlite")
        if facilitator is None:
            from x402.http import FacilitatorConfig, HTTPFacilitatorClient
            if not cfg.facilitator_url:
                raise ValueError("payments need --facilitator URL")
            facilitator = HTTPFacilitatorClient(FacilitatorConfig(url=cfg.facilitator_url, timeout=60.0))
        self.facilitator = facilitator
        self._recovered = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self.recovery = self.ledger.recover()
        # --escrow: routed requests an entry pays with an escrow voucher (serving.work_pay.RoutedPay; set by the node)
        self.routed: Any = None

    def requirements(self, amount: int, timeout_s: int) -> Any:
        from x402.schemas import PaymentRequirements
        return PaymentRequirements(
            scheme="exact", network=self.asset.network, asset=self.asset.address, amount=str(amount),
            pay_to=self.cfg.pay_to or "", max_timeout_seconds=int(timeout_s),
            extra={"name": self.asset.name, "version": self.asset.version})

    # ---- 402 -------------------------------------------------------------------------------------

    def payment_required(self, request: Request, req: Any, message: str, code: str = "payment_required",
                         settle: dict[str, Any] | None = None, status: int = 402) -> APIError:
        from x402.schemas import PaymentRequired, ResourceInfo
        desc = ("prepaid inference credit (metered per token)" if self.metered else "one LLM completion")
        pr = PaymentRequired(error=message, resource=ResourceInfo(url=str(request.url), description=desc,
                                                                  mime_type="application/json"), accepts=[req])
        headers = {"PAYMENT-REQUIRED": base64.b64encode(pr.model_dump_json(by_alias=True, exclude_none=True)
                                                        .encode()).decode()}
        if settle is not None:
            headers["PAYMENT-RESPONSE"] = b64json(settle)
        if self.metered:
            headers[BILLING_HEADER] = "metered"
        return APIError(status, message, type="payment_required", code=code, headers=headers)

    # ---- authorize -------------------------------------------------------------------------------

    async def authorize(self, request: Request, model_id: str, prompt_tokens: int, max_tokens: int,
                        stream: bool, extra: int = 0) -> Charge:
        """Check payment before any work; raises APIError(402/409/...) or returns a Charge. `extra` is added
        to the price (an entry passing on what the host it routes to charges)."""
        rid = uuid.uuid4().hex
        self._start_recovery()
        body = await request.body()
        fp = hashlib.sha256(request.url.path.encode() + b"\0" + body).hexdigest()
        window = self.window_s(model_id, prompt_tokens, max_tokens)
        amount = (self.topup_amount(prompt_tokens, max_tokens, extra) if self.metered
                  else self.cfg.price_per_request + extra)
        reqs = self.requirements(amount, math.ceil(window * 1.2) + 10)
        charge = Charge("credit" if self.metered else "exact", rid, model_id, prompt_tokens, max_tokens, stream,
                        gate=self, extra=extra)

        if self.routed is not None and request.headers.get(VOUCHER_HEADER) and request.scope.get(PEER_SCOPE_KEY):
            return await self._voucher_charge(request, charge, reqs)

        idem = request.headers.get(IDEMPOTENCY_HEADER)
        if idem and len(idem) > 200:
            raise APIError(400, "Idempotency-Key is longer than 200 characters", param=IDEMPOTENCY_HEADER)
        sig = request.headers.get("PAYMENT-SIGNATURE") or request.headers.get("X-PAYMENT")
        payload = auth = None
        payer: str | None = None  # an Idempotency-Key is kept and looked up under its payer only
        signed = False  # whether the payer is the authorization's `from` (proven only when it matters)
        if sig:
            payload, auth = self._decode(request, reqs, sig)
            charge.auth_id = auth_id_for(payload.accepted.network, payload.accepted.asset, auth["from"],
                                         auth["nonce"])
            payer, signed = str(auth["from"]).lower(), True
        elif self.metered and request.headers.get(CREDIT_HEADER):
            payer = self.ledger.account_for_token(request.headers[CREDIT_HEADER].strip())
        if idem and payer:
            idem_key = "idem:" + hashlib.sha256(f"{payer}\0{idem}".encode()).hexdigest()
            # A key already stored under this payer is replayed only to that payer: the signature is checked
            # here (a new key is stored only after the facilitator verified it, so this is the retry path).
            if not (signed and self.ledger.response(idem_key) is not None
                    and not self._signed_by_payer(request, reqs, payload, auth or {})):
                charge.keys.append(idem_key)
        if charge.auth_id:
            charge.keys.append("auth:" + charge.auth_id)

        # A retry of a request already answered: replay it, pay nothing, generate nothing.
        for key in charge.keys:
            stored = self.ledger.response(key)
            if stored is None:
                continue
            if stored.fingerprint != fp:
                if key.startswith("idem:"):
                    raise APIError(422, "this Idempotency-Key was used for a different request",
                                   code="idempotency_key_reused", param=IDEMPOTENCY_HEADER)
                row = self.ledger.payment(charge.auth_id or "")
                raise self.payment_required(request, reqs, "this payment authorization was already used for "
                                            "another request; sign a new one", "authorization_already_used",
                                            settle=json.loads(row.settle_json) if row and row.settle_json else None)
            if stored.state == "settling":  # answered, payment being settled (or a crash came in between)
                replay = self._staged_replay(request, reqs, charge.keys, stored)
                if replay is None:
                    continue  # its payment was never settled: the answer was dropped, this is a new request
                charge.replay = replay
                return charge
            if stored.state != "done":
                raise APIError(409, "the same request (same Idempotency-Key or payment) is still in progress",
                               code="request_in_progress")
            headers = {**stored.headers, REPLAY_HEADER: "true"}
            charge.replay = Response(stored.body or b"", status_code=stored.status or 200, headers=headers)
            return charge

        if payload is not None:
            assert charge.auth_id is not None and auth is not None
            row = self.ledger.payment(charge.auth_id)
            if row is not None and row.state in IN_FLIGHT:
                raise APIError(409, "this payment authorization is in use by a request in progress",
                               code="request_in_progress")
            if row is not None and row.state in ("settled", "failed"):
                raise self.payment_required(request, reqs, f"this payment authorization was already {row.state}"
                                            f"{' in ' + row.tx if row.tx else ''}; sign a new one",
                                            "authorization_already_used",
                                            settle=json.loads(row.settle_json) if row.settle_json else None)
            cap = self.cfg.max_exposure or DEFAULT_EXPOSURE_REQUESTS * amount
            open_ = self.ledger.exposure(auth["from"])
            if open_ + amount > cap:  # checked before the facilitator: N signatures buy N * 0 tokens
                raise APIError(429, f"this wallet already has {self.asset.fmt(open_)} authorized for requests in "
                               f"flight here (at most {self.asset.fmt(cap)}); wait for them to settle",
                               type="rate_limit_error", code="exposure_limit", headers={"Retry-After": "5"})
            if open_ and self.cfg.rpc_url:  # the facilitator checks each authorization alone, not their sum
                await self._covers(request, reqs, auth["from"], open_ + amount)
            t0 = time.perf_counter()
            await self._verify(request, reqs, payload, auth, window)
            charge.timing["verify"] = round((time.perf_counter() - t0) * 1000, 1)
            charge.payer, charge.payload, charge.requirements, charge.amount = auth["from"], payload, reqs, amount
            ok = self.ledger.claim_payment(
                charge.auth_id, payer=auth["from"], amount=amount, network=self.asset.network,
                asset=self.asset.address, pay_to=self.cfg.pay_to or "", kind="credit" if self.metered else "request",
                request_id=rid, payload_json=payload.model_dump_json(by_alias=True, exclude_none=True),
                requirements_json=reqs.model_dump_json(by_alias=True, exclude_none=True))
            if not ok:
                raise APIError(409, "this payment authorization is in use by a request in progress",
                               code="request_in_progress")

        if self.metered:
            try:
                self._fund_credit(request, charge, reqs, stream)
            except BaseException:
                if charge.auth_id and payload is not None:
                    self.ledger.mark_released(charge.auth_id, "credit check failed")
                raise
        elif payload is None:
            raise self.payment_required(
                request, reqs, f"payment required: {self.asset.fmt(amount)} per request "
                f"(x402 exact on {self.asset.network}; send PAYMENT-SIGNATURE)")

        if charge.keys and self.ledger.begin_response(charge.keys, fp, charge.payer) is not None:
            await self.release(charge, "a concurrent retry took this request")
            raise APIError(409, "the same request (same Idempotency-Key or payment) is still in progress",
                           code="request_in_progress")
        return charge

    async def _voucher_charge(self, request: Request, charge: Charge, reqs: Any) -> Charge:
        """A request an entry routed here through the mesh tunnel (never a direct client: only the tunnel sets
        the peer scope key) paying with an escrow voucher: it must cover the most this request can cost on top
        of what the entry owes this node; else 402 (the entry may then pay with x402). Nothing is settled:
        the request's cost is recorded as owed when it ends (`complete`), and redeemed with the vouchers."""
        most = charge.cost(charge.prompt_tokens, charge.max_tokens)
        entry, why = await self.routed.admit(charge.request_id, request.headers[VOUCHER_HEADER], most,
                                             str(request.scope.get(PEER_SCOPE_KEY) or ""))
        if entry is None:
            raise self.payment_required(request, reqs, f"escrow voucher not accepted: {why}", "voucher_refused")
        charge.mode, charge.payer, charge.amount, charge.available = "voucher", entry, most, most
        charge.headers[VOUCHER_EARNED_HEADER] = str(self.routed.earned(entry))
        return charge

    async def _covers(self, request: Request, reqs: Any, payer: str, total: int) -> None:
        """402 unless `payer`'s balance on chain covers `total` (its authorizations in flight here plus this
        one). Asked only when it has some in flight; an unreachable RPC lets the request through (the
        exposure cap still bounds what it can take)."""
        from mesh402.economics.chain import erc20_balance  # lazy: web3 only on this path
        try:
            bal = await asyncio.to_thread(erc20_balance, self.cfg.rpc_url or "", self.asset.address, payer)
        except Exception as e:
            log.warning("balance check for %s failed: %s", payer, e)
            return
        if bal < total:
            raise self.payment_required(
                request, reqs, f"payment rejected: the wallet holds {self.asset.fmt(bal)}, less than the "
                f"{self.asset.fmt(total)} it has authorized for requests in flight here (this one included)",
                "open_authorizations_exceed_balance")

    def _decode(self, request: Request, reqs: Any, sig: str) -> tuple[Any, dict[str, Any]]:
        from x402.schemas import PaymentPayload
        try:
            data = json.loads(base64.b64decode(sig.strip(), validate=False))
            if int(data.get("x402Version", 0)) != 2:
                raise ValueError("only x402Version 2 is accepted")
            payload = PaymentPayload.model_validate(data)
            auth = payload.payload["authorization"]
            _ = (auth["from"], auth["to"], auth["value"], auth["validBefore"], auth["nonce"])
        except Exception as e:
            raise self.payment_required(request, reqs, f"malformed PAYMENT-SIGNATURE: {e}",
                                        "invalid_payload") from None
        return payload, auth

    def _signed_by_payer(self, request: Request, reqs: Any, payload: Any, auth: dict[str, Any]) -> bool:
        """Whether the authorization's EOA signature recovers to its `from` (checked here before an answer
        stored under the payer's Idempotency-Key is replayed; ~20-70 ms of pure-Python secp256k1, so only
        then). A bad EOA signature is refused; a contract wallet's (not 65 bytes) cannot be checked here:
        its request goes on as a new one (the same authorization still replays its answer)."""
        from x402.mechanisms.evm.eip712 import hash_eip3009_authorization
        from x402.mechanisms.evm.types import ExactEIP3009Payload
        from x402.mechanisms.evm.verify import verify_eoa_signature
        try:
            data = ExactEIP3009Payload.from_dict(payload.payload)
            sig = bytes.fromhex(str(data.signature or "").removeprefix("0x"))
        except (ValueError, TypeError, AttributeError):
            sig = b""
        if len(sig) != 65:
            return False
        try:
            h = hash_eip3009_authorization(data.authorization, self.asset.chain_id, payload.accepted.asset,
                                           self.asset.name, self.asset.version)
            ok = verify_eoa_signature(h, sig, str(auth["from"]))
        except Exception:
            ok = False
        if not ok:
            raise self.payment_required(request, reqs, "payment rejected: the authorization is not signed by its "
                                        "`from` wallet", "invalid_exact_evm_payload_signature")
        return True

    def _staged_replay(self, request: Request, reqs: Any, keys: list[str], stored: Any) -> Response | None:
        """A retry of a request whose answer was staged before its payment settled: the answer once the
        payment settled (or is pending on chain), its outcome if settlement failed, 409 while it is still
        being settled, None (answer dropped) if it was never settled."""
        headers = dict(stored.headers)
        auth_id = headers.pop(AUTH_HEADER, "")
        row = self.ledger.payment(auth_id) if auth_id else None
        settle = json.loads(row.settle_json) if row is not None and row.settle_json else None
        if row is None or row.state == "released":
            self.ledger.drop_responses(keys)
            return None
        if row.state == "failed":
            self.ledger.drop_responses(keys)
            raise self.payment_required(request, reqs, f"settlement failed: {row.reason}", row.reason or
                                        "settle_failed", settle=settle)
        if row.state == "settling" and not row.tx:
            raise APIError(409, "this request's payment is being settled; retry shortly", code="request_in_progress",
                           headers={"Retry-After": "2"})
        body = stored.body or b""
        if headers.get("content-type", "").startswith("text/event-stream"):
            record = {"object": "chat.completion.chunk", "choices": [], "x402": {"settlement": settle}}
            body += b"data: " + json.dumps(record).encode() + b"\n\n" + b"data: [DONE]\n\n"
        if settle is not None:
            headers["PAYMENT-RESPONSE"] = b64json(settle)
        return Response(body, status_code=stored.status or 200, headers={**headers, REPLAY_HEADER: "true"})

    def stage(self, charge: Charge, headers: dict[str, str], body: bytes) -> None:
        """Keep the answer before its payment is settled (see _staged_replay), in the same transaction that
        marks the payment `settling`."""
        if charge.keys and charge.auth_id and charge.payload is not None:
            self.ledger.finish_response(charge.keys, 200, {**headers, AUTH_HEADER: charge.auth_id}, body,
                                        state="settling", settling=charge.auth_id)
            charge.staged = True

    async def _verify(self, request: Request, reqs: Any, payload: Any, auth: dict[str, Any], window: int) -> None:
        acc = payload.accepted
        mismatch = None
        if acc.scheme != "exact":
            mismatch = ("unsupported_scheme", f"scheme {acc.scheme!r} is not accepted here; use 'exact'")
        elif acc.network != reqs.network:
            mismatch = ("invalid_network", f"network {acc.network} does not match {reqs.network}")
        elif acc.asset.lower() != reqs.asset.lower():
            mismatch = ("invalid_exact_evm_payload_asset_mismatch",
                        f"asset {acc.asset} is not this node's token {reqs.asset}")
        elif acc.pay_to.lower() != reqs.pay_to.lower() or str(auth["to"]).lower() != reqs.pay_to.lower():
            mismatch = ("invalid_exact_evm_payload_recipient_mismatch", f"payment must go to {reqs.pay_to}")
        elif str(acc.amount) != reqs.amount or str(auth["value"]) != reqs.amount:
            mismatch = ("invalid_exact_evm_payload_authorization_value_mismatch",
                        f"this request costs {reqs.amount} atomic units, the authorization is for {auth['value']}")
        if mismatch is None:
            left = int(auth["validBefore"]) - int(time.time())
            if left <= 0:
                mismatch = ("invalid_exact_evm_payload_authorization_valid_before", "the authorization has expired")
            elif left < window:
                mismatch = ("authorization_window_too_short",
                            f"the authorization expires in {left}s but this request may take up to {window}s "
                            f"to generate and settle; sign with validBefore at least now+{window}")
        if mismatch is not None:
            raise self.payment_required(request, reqs, f"payment rejected: {mismatch[1]}", mismatch[0])
        try:
            res = await self.facilitator.verify(payload, reqs)
        except Exception as e:
            log.warning("facilitator verify failed: %s", e)
            raise APIError(502, f"the payment facilitator is unreachable: {type(e).__name__}",
                           type="server_error", code="facilitator_unavailable") from None
        if not res.is_valid:
            reason = res.invalid_reason or "invalid_payment"
            detail = f" ({res.invalid_message})" if res.invalid_message else ""
            raise self.payment_required(request, reqs, f"payment rejected: {reason}{detail}"[:500], reason)

    def _fund_credit(self, request: Request, charge: Charge, reqs: Any, stream: bool) -> None:
        full = charge.cost(charge.prompt_tokens, charge.max_tokens)
        need = charge.cost(charge.prompt_tokens, 1) if stream else full
        if charge.payload is not None:  # a top-up pays for this request; existing credit is used first
            held = self.ledger.hold(charge.payer or "", full, charge.request_id, minimum=0)
            assert held is not None
            charge.hold_id, charge.available = held[0], held[1] + charge.amount
            charge.headers[CREDIT_TOKEN_HEADER] = self.ledger.issue_token(charge.payer or "")
            return
        token = request.headers.get(CREDIT_HEADER)
        if not token:
            raise self.payment_required(
                request, reqs, f"payment required: {self.asset.fmt(self.cfg.price_per_1k_tokens)} per 1k tokens"
                f"{' + ' + self.asset.fmt(self.cfg.price_per_request) + ' per request' if self.cfg.price_per_request else ''}"
                f", from prepaid credit; buy {self.asset.fmt(int(reqs.amount))} with x402 exact "
                f"(PAYMENT-SIGNATURE) or send {CREDIT_HEADER}: <token>")
        payer = self.ledger.account_for_token(token.strip())
        if payer is None:
            raise APIError(401, f"unknown {CREDIT_HEADER} token", type="authentication_error",
                           code="invalid_credit_token")
        held = self.ledger.hold(payer, full, charge.request_id, minimum=need)
        if held is None:
            bal = self.ledger.balance(payer)
            raise self.payment_required(
                request, reqs, f"insufficient credit: {self.asset.fmt(bal)} left, this request needs "
                f"{self.asset.fmt(need)}{'' if stream else ' (prompt + max_tokens)'}; top up with x402",
                "insufficient_credit")
        charge.payer, charge.hold_id, charge.available = payer, held[0], held[1]

    # ---- settle / release -----------------------------------------------------------------------

    async def _settle_payment(self, charge: Charge, on_success: Any = None) -> dict[str, Any]:
        """Settle the charge's authorization; -> the SettlementResponse JSON (success or not). `on_success(tx,
        settle_json)` records a success (default: the payment row alone)."""
        assert charge.auth_id is not None
        if not charge.staged:  # (a staged answer was marked settling with it, in one transaction)
            self.ledger.mark_settling(charge.auth_id)
        t0 = time.perf_counter()
        try:
            from x402.server_base import settle_with_pending_retry_async
            res = await settle_with_pending_retry_async(self.facilitator, charge.payload, charge.requirements)
            out = res.model_dump(by_alias=True, exclude_none=True)
        except Exception as e:
            log.warning("settlement failed: %s", e)
            out = {"success": False, "errorReason": "unexpected_settle_error", "errorMessage": str(e)[:300],
                   "transaction": "", "network": self.asset.network, "payer": charge.payer}
        charge.timing["settle"] = round((time.perf_counter() - t0) * 1000, 1)
        if out.get("success"):
            out.setdefault("amount", str(charge.amount))
            (on_success or partial(self.ledger.mark_settled, charge.auth_id))(out.get("transaction", ""),
                                                                              json.dumps(out))
        elif out.get("errorReason") == "settlement_pending" and out.get("transaction"):
            # broadcast but not yet confirmed: the row stays `settling` and is finished on the next start;
            # the answer is delivered (the transfer is on its way) and the client sees the pending state
            log.warning("settlement %s still pending", out.get("transaction"))
            out["pending"] = True
            self.ledger.mark_pending(charge.auth_id, out["transaction"], json.dumps(out))
        else:
            self.ledger.mark_failed(charge.auth_id, out.get("errorReason") or "settle_failed", json.dumps(out))
        return out

    async def complete(self, charge: Charge, fin: Any | None) -> dict[str, Any]:
        """After a successful generation: settle / draw down credit. -> {"ok", "headers", "x402"}."""
        charge.finished = True
        if fin is not None:
            self.observe(charge.model_id, fin)
            completion = int(fin.completion_tokens)
            prompt = int(fin.prompt_tokens)
        else:
            completion, prompt = charge.completion_seen, charge.prompt_tokens
        headers = dict(charge.headers)
        info: dict[str, Any] = {}
        if charge.mode == "voucher":  # paid up front by the entry's voucher: the cost is owed, nothing settles
            cost = min(charge.cost(prompt, completion), charge.amount)
            self.routed.done(charge.request_id, cost)
            info["voucher"] = {"entry": charge.payer, "charged": str(cost)}
            return {"ok": True, "headers": headers, "x402": info}
        ok = True
        closed: tuple[int, int] | None = None
        if charge.payload is not None:
            hold_id = charge.hold_id
            if hold_id:  # a top-up: settled, credited and its request charged in one ledger transaction

                def record(tx: str, settle_json: str) -> None:
                    nonlocal closed
                    assert hold_id is not None
                    closed = self.ledger.settle_topup(
                        charge.auth_id or "", tx, settle_json, payer=charge.payer or "", amount=charge.amount,
                        hold_id=hold_id, cost=charge.cost(prompt, completion), ref=charge.request_id)
                settle = await self._settle_payment(charge, record)
            else:
                settle = await self._settle_payment(charge)
            headers["PAYMENT-RESPONSE"] = b64json(settle)
            info["settlement"] = settle
            ok = bool(settle.get("success") or settle.get("pending"))
            if ok and closed is None and charge.hold_id:  # pending on chain: credited now, once (by its ref)
                self.ledger.topup(charge.payer or "", charge.amount, charge.auth_id or "", into_hold=charge.hold_id)
        if charge.timing:
            headers["Server-Timing"] = ", ".join(f"x402-{k};dur={v}" for k, v in charge.timing.items())
            info["timing_ms"] = dict(charge.timing)
        if charge.hold_id:
            cost = charge.cost(prompt, completion) if ok else 0
            charged, bal = closed or self.ledger.close_hold(charge.hold_id, cost, charge.request_id)
            headers[CREDIT_CHARGED_HEADER] = str(charged)
            headers[CREDIT_BALANCE_HEADER] = str(bal)
            info["credit"] = {"charged": str(charged), "balance": str(bal), "asset": self.asset.address,
                              "usage": {"prompt_tokens": prompt, "completion_tokens": completion}}
            if charge.exhausted:
                info["credit"]["exhausted"] = True
        return {"ok": ok, "headers": headers, "x402": info}

    async def release(self, charge: Charge, reason: str) -> None:
        """The work failed or never started: settle nothing, return held credit."""
        if charge.finished:
            return
        charge.finished = True
        if charge.mode == "voucher":
            self.routed.done(charge.request_id, 0)
        if charge.auth_id and charge.payload is not None:
            self.ledger.mark_released(charge.auth_id, reason[:300])
        if charge.hold_id:
            self.ledger.close_hold(charge.hold_id, 0, charge.request_id)
        if charge.keys:
            self.ledger.drop_responses(charge.keys)

    async def respond(self, charge: Charge, fin: Any, body: dict[str, Any], headers: dict[str, str]) -> Response:
        """Non-streaming success: stage the answer, settle, then answer with PAYMENT-RESPONSE (402 if
        settlement failed)."""
        if charge.keys:
            staged = JSONResponse(body, headers=headers)
            self.stage(charge, {k: v for k, v in headers.items() if k != CREDIT_TOKEN_HEADER}
                       | {"content-type": "application/json"}, bytes(staged.body))
        res = await self.complete(charge, fin)
        if not res["ok"]:
            settle = res["x402"].get("settlement") or {}
            err = self.payment_required_for(charge, f"settlement failed: {settle.get('errorReason')}",
                                            settle.get("errorReason") or "settle_failed", settle)
            if charge.keys:
                self.ledger.drop_responses(charge.keys)
            return err.response()
        all_headers = {**headers, **res["headers"]}
        resp = JSONResponse(body, headers=all_headers)
        if charge.keys:
            stored = {k: v for k, v in all_headers.items() if k != CREDIT_TOKEN_HEADER}
            stored["content-type"] = "application/json"
            self.ledger.finish_response(charge.keys, 200, stored, bytes(resp.body))
        return resp

    def payment_required_for(self, charge: Charge, message: str, code: str, settle: dict[str, Any]) -> APIError:
        return APIError(402, message, type="payment_required", code=code,
                        headers={"PAYMENT-RESPONSE": b64json(settle)})

    async def finish_stream(self, charge: Charge, fin: Any | None, error: str | None) -> dict[str, Any] | None:
        """End of a paid stream -> the in-band x402 record. A completed stream (or one cut off when credit
        ran out) is settled / drawn down; a server-side failure settles nothing."""
        if error is not None:
            await self.release(charge, error)
            return {"settlement": None, "released": True, "reason": "generation failed; nothing was charged"}
        res = await self.complete(charge, fin)
        if not res["ok"] and charge.keys:
            self.ledger.drop_responses(charge.keys)
            charge.keys = []
        return res["x402"]

    def stage_stream(self, charge: Charge, transcript: bytes) -> None:
        """Keep what a paid stream delivered before its payment is settled (a crash then loses no answer)."""
        self.stage(charge, {"content-type": "text/event-stream"}, transcript)

    def store_stream(self, charge: Charge, transcript: bytes) -> None:
        """Keep the whole SSE body so a retry (same Idempotency-Key / authorization) is replayed."""
        if charge.keys:
            self.ledger.finish_response(charge.keys, 200, {"content-type": "text/event-stream"}, transcript)

    def abandon_stream(self, charge: Charge) -> None:
        """The client went away mid-stream. Tokens it received are paid for (credit: exactly those;
        per request: the price, once any token was delivered); otherwise nothing is settled."""
        if charge.finished:
            return

        async def run() -> None:
            if charge.completion_seen == 0:
                await self.release(charge, "client disconnected before any token")
            else:
                await self.complete(charge, None)
                if charge.keys:
                    self.ledger.drop_responses(charge.keys)
        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- crash recovery ---------------------------------------------------------------------------

    def _start_recovery(self) -> None:
        """Settlements in flight when the node stopped are finished (the work was already delivered)."""
        if self._recovered:
            return
        self._recovered = True
        rows = self.ledger.settling()
        if not rows:
            return

        async def run() -> None:
            from x402.schemas import PaymentPayload, PaymentRequirements
            for row in rows:
                try:
                    c = Charge("exact", row.request_id or "", payer=row.payer, auth_id=row.auth_id,
                               payload=PaymentPayload.model_validate_json(row.payload_json or "{}"),
                               requirements=PaymentRequirements.model_validate_json(row.requirements_json or "{}"),
                               amount=row.amount)
                    out = await self._settle_payment(c)
                    if out.get("success") and row.kind == "credit":
                        self.ledger.topup(row.payer, row.amount, row.auth_id)
                except Exception:
                    log.exception("re-settling %s failed", row.auth_id)
        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def install_routes(self, app: Any) -> None:
        """GET /v1/x402/credit: the balance behind an X-Mesh402-Credit token. (Revenue is not served over
        HTTP; `mesh402 status` reads it from the ledger file.)"""

        @app.get("/v1/x402/credit")
        async def credit(request: Request) -> dict[str, Any]:
            token = request.headers.get(CREDIT_HEADER, "").strip()
            payer = self.ledger.account_for_token(token) if token else None
            if payer is None:
                raise APIError(401, f"send {CREDIT_HEADER}: <token> from a credit purchase",
                               type="authentication_error", code="invalid_credit_token")
            return {"payer": payer, "balance": str(self.ledger.balance(payer)), "held": str(self.ledger.held(payer)),
                    "asset": self.asset.address, "network": self.asset.network}

        @app.post("/v1/x402/credit/token")
        async def claim(request: Request) -> dict[str, Any]:
            """A new credit token for the wallet that proves itself with a signature (EIP-191) over
            `credit_claim_message(host, timestamp)`: credit belongs to the wallet, not to a lost token."""
            try:
                data = await request.json()
                address, ts, sig = str(data["address"]), int(data["timestamp"]), str(data["signature"])
                nonce = str(data["nonce"])
                if not re.fullmatch(CLAIM_NONCE_RE, nonce) or len(address) > 64 or len(sig) > 200:
                    raise ValueError(nonce)
            except Exception:
                raise APIError(400, "body must be {address, timestamp, nonce (32 hex digits), signature}") from None
            if abs(time.time() - ts) > CLAIM_WINDOW_S:
                raise APIError(401, "claim timestamp is too old or in the future", type="authentication_error",
                               code="stale_claim")
            from eth_account import Account
            from eth_account.messages import encode_defunct
            try:
                signer = Account.recover_message(
                    encode_defunct(text=credit_claim_message(self.cfg.pay_to or "", ts, nonce)), signature=sig)
            except Exception:
                signer = ""
            if signer.lower() != address.lower():
                raise APIError(401, "signature does not match the address", type="authentication_error",
                               code="invalid_signature")
            if not self.ledger.use_claim(address, nonce, CLAIM_WINDOW_S):
                raise APIError(401, "this claim was used already; sign a new one (fresh nonce)",
                               type="authentication_error", code="claim_replayed")
            bal = self.ledger.balance(address)
            return {"payer": address.lower(), "balance": str(bal), "token": self.ledger.issue_token(address)}

    def status(self) -> dict[str, Any]:
        return {"asset": self.asset.address, "network": self.asset.network, "pay_to": self.cfg.pay_to,
                "price_per_request": self.cfg.price_per_request, "price_per_1k_tokens": self.cfg.price_per_1k_tokens,
                **self.ledger.summary(), **({"routed_vouchers": self.routed.status()} if self.routed else {})}
