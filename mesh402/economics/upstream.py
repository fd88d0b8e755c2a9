"""An entry node buying from the host it routes a request to, when that host sells inference.

A host that charges answers a tunnelled request like any client's: 402 with its x402 requirements. A free
entry passes that 402 to its client, who then pays the host directly (the payment headers cross the
tunnel). A paid entry charges its client its own price plus the host's (`HostOffer`, from the host's
signed announcement) and pays the host itself from the wallet that receives its revenue
(`--payout-key-file`), never more than the offer it priced the request with: a host that asks for more
than it announced is refused.

When both nodes run with `--escrow` on the same MeshEscrow, the entry pays with an escrow voucher instead
(`RoutedVouchers`, node/escrow_pay.py): the tunnelled request carries one covering the most it can cost, the
host serves it without an x402 payment and redeems its vouchers with its stage work's. A host that refuses the
voucher (402 `voucher_refused`) is paid with x402 `exact` as above.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from mesh402.economics.charging import (
    CREDIT_HEADER,
    CREDIT_TOKEN_HEADER,
    IDEMPOTENCY_HEADER,
    VOUCHER_EARNED_HEADER,
    VOUCHER_HEADER,
)

log = logging.getLogger(__name__)


Reply = tuple[int, dict[str, str], AsyncIterator[bytes]]
Send = Callable[[dict[str, str]], Awaitable[Reply]]  # extra request headers -> the host's reply


class UpstreamPaymentError(Exception):
    """The host wants a payment this entry will not make (no wallet, other asset, above its offer)."""


async def _drain(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([c async for c in chunks])


def _message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])[:300]
    except (ValueError, KeyError, TypeError):
        return body[:300].decode(errors="replace")


class RoutedVoucherSource(Protocol):
    """The entry's escrow side for routed requests (node.escrow_pay.RoutedVouchers)."""

    def voucher(self, host: str, most: int) -> tuple[str, Callable[[], None]] | None:
        """The voucher header for a request to `host` that can cost at most `most`, and what to call when the
        request is over; None when `host` is not paid with vouchers (no escrow label on the same escrow)."""
        ...

    def earned(self, host: str, reported: str) -> None:
        """The host's report of what it earned from this entry's routed requests (untrusted)."""
        ...


async def _then(chunks: AsyncIterator[bytes], done: Callable[[], None]) -> AsyncIterator[bytes]:
    try:
        async for c in chunks:
            yield c
    finally:
        done()


class UpstreamBuyer:
    """The entry's wallet paying hosts with x402 `exact`, with a credit token kept per metered host."""

    def __init__(self, private_key: str, network: str, asset: str) -> None:
        from eth_account import Account
        from x402 import x402Client
        from x402.mechanisms.evm.exact import register_exact_evm_client

        self.account = Account.from_key(private_key)
        self.network, self.asset = network, asset.lower()
        self._x402 = x402Client()
        register_exact_evm_client(self._x402, self.account)
        self._x402.set_spend_controls(False)  # the cap per request is checked here, before anything is sent
        self.credit: dict[str, str] = {}  # host node id -> credit token at that host
        self.paid = 0  # atomic units authorized to hosts since start
        self.vouchers: RoutedVoucherSource | None = None  # --escrow: hosts on the same escrow take vouchers
        self.vouchered = 0  # routed requests paid with a voucher since start

    async def send(self, host: str, send: Send, cap: int, voucher_cap: int | None = None) -> Reply:
        """The host's reply to the request, paying it (at most `cap`) if it asks to be paid: with an escrow
        voucher for at most `voucher_cap` when the host takes them, else (or when it refuses it) x402."""
        routed = self.vouchers.voucher(host, cap if voucher_cap is None else voucher_cap) \
            if self.vouchers is not None and cap > 0 else None
        if routed is not None:
            header, done = routed
            try:
                status, headers, chunks = await send({IDEMPOTENCY_HEADER: uuid.uuid4().hex, VOUCHER_HEADER: header})
            except BaseException:
                done()
                raise
            earned = headers.pop(VOUCHER_EARNED_HEADER.lower(), None)  # for this node, not its client
            if earned is not None and self.vouchers is not None:
                self.vouchers.earned(host, earned)
            if status != 402:
                self.vouchered += 1
                return status, headers, _then(chunks, done)
            done()
            await _drain(chunks)
            log.info("host %s refused this node's escrow voucher: paying it with x402", host[:12])
        extra = {IDEMPOTENCY_HEADER: uuid.uuid4().hex}
        token = self.credit.get(host)
        if token:
            extra[CREDIT_HEADER] = token
        status, headers, chunks = await send(extra)
        if status == 401 and token:  # the host forgot the token (restarted): pay afresh
            await _drain(chunks)
            self.credit.pop(host, None)
            return await self.send(host, send, cap)
        if status != 402:
            self._keep_token(host, headers)
            return status, headers, chunks
        await _drain(chunks)
        signature, amount = await self._pay(headers, cap)
        status, headers, chunks = await send({IDEMPOTENCY_HEADER: uuid.uuid4().hex, "payment-signature": signature})
        if status == 402:  # e.g. this wallet cannot cover it: the entry's failure, never the client's to pay
            raise UpstreamPaymentError(f"the host refused this node's payment: {_message(await _drain(chunks))}")
        self._keep_token(host, headers)
        if status < 400:
            self.paid += amount
        return status, headers, chunks

    def _keep_token(self, host: str, headers: dict[str, str]) -> None:
        token = headers.get(CREDIT_TOKEN_HEADER.lower())
        if token:
            self.credit[host] = token

    async def _pay(self, headers: dict[str, str], cap: int) -> tuple[str, int]:
        from x402.http.utils import (
            decode_payment_required_header,
            encode_payment_signature_header,
        )

        raw = headers.get("payment-required")
        if not raw:
            raise UpstreamPaymentError("the host answered 402 without x402 requirements")
        try:
            required = decode_payment_required_header(raw)
        except Exception as e:
            raise UpstreamPaymentError(f"the host's x402 requirements are unreadable: {e}") from None
        usable = [r for r in required.accepts if r.scheme == "exact" and r.network == self.network
                  and r.asset.lower() == self.asset]
        if not usable:
            raise UpstreamPaymentError(f"the host takes no payment this node can make ({self.network}, {self.asset})")
        amount = int(usable[0].amount)
        if amount > cap:
            raise UpstreamPaymentError(f"the host asks {amount} atomic units, more than the {cap} it announced "
                                       "for this request")
        required.accepts = usable[:1]
        payload = await self._x402.create_payment_payload(required)
        return encode_payment_signature_header(payload), amount
