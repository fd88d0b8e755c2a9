"""Paying the workers of a request as the work is done: the serving side of escrow vouchers.

An entry that sells a split request pays each worker it uses (a stage; an expert node and a routed host
use the same terms) from its escrow with cumulative EIP-712 vouchers (economics.vouchers, contracts/
MeshEscrow.sol). The terms of one session are in the host's signed OPEN grant: who pays (the entry's
wallet), who is paid (the worker's wallet, from its announcement), and the rate, which is the worker's
share of the request's revenue: its FLOPs share of the request's per-request price (`flat`) and of its
per-token price (`per_token_micro`, in millionths of an atomic unit, so small per-1k prices do not round
to zero).

The rule both sides follow (docs/payments.md, "Escrow and vouchers"):
- the entry attaches, to the first step and at least every VOUCHER_EVERY steps, a voucher per worker that
  covers everything the session owes it up to and including that step, and a final one on CLOSE;
- a worker keeps, per entry, what all its sessions owe against the best voucher it holds. Before each step
  it requires that the unvouchered work is no more than its live sessions' last VOUCHER_EVERY steps; an
  entry past that is paused (the step is refused with `unpaid`), and so is an OPEN while it is behind. A
  voucher counts only once the escrow covers it (checked on chain by the worker's book), so a worker works
  at most a window ahead of covered money whatever the entry does next.

Pure logic here; the book (signatures, sqlite, the chain) is injected by the node (serving never imports
economics).
"""

from __future__ import annotations

import json
import re
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Mapping, Protocol

VOUCHER_EVERY = 16  # steps between the vouchers an entry sends each worker of a session
MICRO = 1_000_000  # per_token_micro is in millionths of an atomic unit
PAY_PARAM = "pay"  # step/CLOSE param: JSON {worker node id: voucher JSON}
TERMS_LIMIT = 1 << 64  # any amount beyond this in a grant is malformed
MAX_PREPAID_STEPS = 2 * VOUCHER_EVERY  # the window a worker allows per live session, in steps
_ADDR = re.compile(r"^0x[0-9a-fA-F]{40}$")


def is_address(value: Any) -> bool:
    return isinstance(value, str) and bool(_ADDR.match(value))


@dataclass(frozen=True)
class WorkTerms:
    """One worker's pay for one session, as the host's grant states it (signed with the grant)."""

    payer: str  # the entry's wallet: signs the vouchers, owns the escrow account
    payee: str  # the worker's wallet: the vouchers pay it
    flat: int = 0  # atomic units owed once, at the session's first step (a per-request price's share)
    per_token_micro: int = 0  # millionths of an atomic unit per token the worker processes

    def step_micro(self, tokens: int, first: bool) -> int:
        """What one step of `tokens` rows earns, in millionths of an atomic unit."""
        return (self.flat * MICRO if first else 0) + int(tokens) * self.per_token_micro

    def to_json(self) -> dict[str, Any]:
        return {"payer": self.payer, "payee": self.payee, "flat": self.flat, "per_token_micro": self.per_token_micro}

    @classmethod
    def from_json(cls, d: Any) -> "WorkTerms":
        """Terms from a grant (untrusted until the grant's signature checked; bounded and typed here)."""
        if not isinstance(d, Mapping):
            raise ValueError("pay terms must be an object")
        payer, payee = d.get("payer"), d.get("payee")
        flat, rate = d.get("flat", 0), d.get("per_token_micro", 0)
        if not (is_address(payer) and is_address(payee)):
            raise ValueError("pay terms need payer and payee addresses")
        if not all(type(v) is int and 0 <= v < TERMS_LIMIT for v in (flat, rate)):
            raise ValueError("pay terms amounts must be integers in [0, 2^64)")
        return cls(str(payer), str(payee), int(flat), int(rate))


def share_terms(payer: str, payee: str, share: Fraction, price_per_request: int, price_per_1k: int,
                per_token_share: Fraction | None = None) -> WorkTerms:
    """A worker's terms for a FLOPs `share` of a request priced `price_per_request` + `price_per_1k` per 1000
    tokens; `per_token_share` (default `share`) is the share of a token's price one of its counted units
    earns (a stage counts tokens; an expert node counts rows, each a smaller share). Rounded down: the shares
    of all workers never add up to more than the request earns."""
    per_token_share = share if per_token_share is None else per_token_share
    if not (0 <= share <= 1 and 0 <= per_token_share <= 1):
        raise ValueError("a worker's share is a fraction of the request")
    flat = int(price_per_request * share)  # floor for non-negative Fractions
    per_token_micro = int(Fraction(price_per_1k * MICRO, 1000) * per_token_share)
    return WorkTerms(payer, payee, flat, per_token_micro)


PAY_MAP_LIMIT = 64 * 1024  # bytes of a frame's `pay` param (a voucher per stage of a long chain)


def pay_map(raw: str | None) -> dict[str, Any] | None:
    """A frame's `pay` param ({worker node id: voucher JSON}); None when absent. Bounded; the vouchers
    themselves are checked by the worker's book."""
    if not raw:
        return None
    if len(raw) > PAY_MAP_LIMIT:
        raise ValueError("the pay param is too large")
    try:
        got = json.loads(raw)
    except ValueError:
        raise ValueError("the pay param is not JSON") from None
    if not isinstance(got, dict) or len(got) > 64:
        raise ValueError("the pay param must map at most 64 workers to vouchers")
    return {str(k): v for k, v in got.items()}


PayerOf = Callable[[str], "str | None"]  # peer node id -> the wallet it announces on this node's escrow (None: none)


def payer_refusal(payer_of: PayerOf | None, peer: str, payer: str, what: str) -> str | None:
    """Why `payer` (the wallet some terms or a voucher name, `what` says which) may not pay work for `peer`: it
    must be the wallet that peer announces on this node's escrow, or a peer could run work on another entry's
    float (and leave that entry behind here) or replay its public vouchers. None when it is (or no check is set)."""
    if payer_of is None:
        return None
    announced = payer_of(peer) if isinstance(peer, str) and peer else None
    if announced is None or announced.lower() != str(payer).lower():
        return f"{what} {payer}; {peer[:12] or 'the sender'} announces {announced or 'no wallet on this escrow'}"
    return None


def micro_to_atomic(micro: int) -> int:
    """Atomic units that pay `micro` millionths (rounded up: a worker is never vouchered less than it did)."""
    return -(-int(micro) // MICRO)


class VoucherSigner(Protocol):
    """The entry's issuer (economics.vouchers.VoucherIssuer): raises a worker's cumulative voucher."""

    @property
    def address(self) -> str: ...

    def pay_to_total(self, worker: str, key: str, micro: int) -> Any:
        """A voucher (with `to_json()`) under which `worker` has been paid, for the running total `key`
        (one per session), at least `micro` millionths; durable before it returns."""
        ...


@dataclass
class EntrySessionPay:
    """The entry's side of one session: accrual per worker and the vouchers it owes them."""

    signer: VoucherSigner
    terms: dict[str, WorkTerms]  # worker node id -> terms (workers without terms work unpaid)
    key: str  # the request id: the issuer keeps one running total per (worker, key, chain session)
    accrued: dict[str, int] = field(default_factory=dict)  # worker node -> micro owed this chain session
    steps: int = 0
    session: int = 0  # chain sessions of this request so far (a failover or a cold restart opens new ones)

    @property
    def total_key(self) -> str:
        return f"{self.key}#{self.session}"

    def reopen(self, terms: dict[str, WorkTerms]) -> None:
        """The request moves to new stage sessions (a replacement chain): the old ones are vouchered in full
        now (delivered by the next OPEN's vouchers, `opening`), and the new ones count from zero, flat share
        included, as each worker counts its own sessions. Signs: call it off the event loop."""
        for node, t in self.terms.items():
            if self.accrued.get(node):
                self.signer.pay_to_total(t.payee, self.total_key, self.accrued[node])
        self.session += 1
        self.accrued, self.steps, self.terms = {}, 0, terms

    def accrue(self, tokens: int) -> bool:
        """Account for a step of `tokens` rows through every worker; whether vouchers are due on it (every
        VOUCHER_EVERY steps, the first included)."""
        first = self.steps == 0
        for node, t in self.terms.items():
            self.accrued[node] = self.accrued.get(node, 0) + t.step_micro(tokens, first)
        self.steps += 1
        return first or self.steps % VOUCHER_EVERY == 0

    def step(self, tokens: int) -> dict[str, Any] | None:
        """accrue(), and the vouchers to attach to the step when they are due, else None."""
        return self.vouchers() if self.accrue(tokens) else None

    def opening(self) -> dict[str, Any] | None:
        """The OPEN's vouchers: each worker's current cumulative voucher from this entry, so a worker that
        missed an earlier session's final voucher (a lost CLOSE) sees the entry is not behind."""
        if not self.terms:
            return None
        return {node: self.signer.pay_to_total(t.payee, self.total_key, 0).to_json()
                for node, t in self.terms.items()}

    def vouchers(self) -> dict[str, Any] | None:
        """A voucher per worker covering everything this session owes it now (what CLOSE carries)."""
        if not self.terms:
            return None
        return {node: self.signer.pay_to_total(t.payee, self.total_key, self.accrued.get(node, 0)).to_json()
                for node, t in self.terms.items()}


class WorkerBook(Protocol):
    """A worker's vouchers and money on chain (economics.vouchers.WorkerLedger), as serving needs them."""

    @property
    def wallet(self) -> str: ...

    def held(self, entry: str) -> int:
        """The best cumulative voucher held from `entry` (atomic units; 0 when none)."""
        ...

    def owed(self, entry: str) -> int:
        """Work of finished sessions for `entry` (atomic units)."""
        ...

    def add_owed(self, entry: str, amount: int) -> None: ...

    def add_routed(self, entry: str, amount: int) -> None:
        """A routed request's cost: owed, and counted as what the entry's routed requests earned."""
        ...

    def routed_owed(self, entry: str) -> int: ...

    async def accept(self, entry: str, voucher: Any) -> str | None:
        """Check and keep a voucher (signed by `entry` for this worker, within the escrow's coverage on
        chain); None when kept or not higher than what is held, else why it was refused."""
        ...

    async def headroom(self, entry: str, at_least: int = 0) -> int:
        """How much the escrow covers beyond the best voucher held from `entry` (atomic units), read on chain
        again when a cached value gives less than `at_least`."""
        ...


@dataclass
class _Live:
    entry: str
    terms: WorkTerms
    micro: int = 0  # accrued this session
    steps: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=MAX_PREPAID_STEPS))  # micro of the last steps


@dataclass
class WorkerPayStats:
    sessions_paid: int = 0
    vouchers_kept: int = 0
    vouchers_refused: int = 0
    paused: int = 0  # steps and OPENs refused because an entry fell behind or the escrow did not cover
    last_refusal: str = ""


class WorkerPay:
    """A worker's rule over its live paid sessions: work at most a window ahead of covered vouchers."""

    def __init__(self, book: WorkerBook, *, window_steps: int = MAX_PREPAID_STEPS, rows_per_step: int = 32) -> None:
        self.book = book
        self.window_steps = window_steps
        self.rows_per_step = rows_per_step  # the most tokens one step may carry (a prefill chunk)
        self.live: dict[str, _Live] = {}  # session key (request id + nonce) -> its accrual
        self.stats = WorkerPayStats()

    def _behind(self, entry: str) -> tuple[int, int]:
        """(unvouchered work, allowance) for `entry` in micro units, over every live session."""
        live = [s for s in self.live.values() if s.entry == entry]
        owed = self.book.owed(entry) * MICRO + sum(s.micro for s in live)
        allowance = sum(sum(s.recent) for s in live)
        return owed - self.book.held(entry) * MICRO, allowance

    def unvouchered(self, entry: str) -> int:
        """Work for `entry`, finished and in live sessions, that no voucher covers (micro units; <= 0: paid up)."""
        return self._behind(entry)[0]

    def _refuse(self, why: str) -> str:
        self.stats.paused += 1
        self.stats.last_refusal = why
        return why

    async def open(self, session: str, terms: WorkTerms, voucher: Any = None) -> str | None:
        """Admit a paid session (None) or say why not: terms not for this wallet, the entry (the payer)
        behind on vouchers (after the OPEN's own `voucher`, if any), or its escrow without room for the
        first window of work."""
        if terms.payee.lower() != self.book.wallet.lower():
            return self._refuse(f"the grant pays {terms.payee}, not this worker's wallet {self.book.wallet}")
        if terms.flat == 0 and terms.per_token_micro == 0:
            return self._refuse("the grant pays this worker nothing (the entry sells its requests for free)")
        entry = terms.payer
        if session in self.live:
            return self._refuse("this session is already open")
        if voucher is not None:
            why = await self.book.accept(entry, voucher)
            if why is not None:
                self.stats.vouchers_refused += 1
                return self._refuse(f"voucher refused: {why}")
            self.stats.vouchers_kept += 1
        behind, allowance = self._behind(entry)
        if behind > allowance:
            return self._refuse(f"entry {entry} is {micro_to_atomic(behind)} behind on vouchers: paused")
        need = micro_to_atomic(terms.step_micro(self.window_steps * self.rows_per_step, True))
        room = await self.book.headroom(entry, micro_to_atomic(behind) + need)
        if room < micro_to_atomic(behind) + need:
            return self._refuse(f"the escrow of {entry} covers {room} more for this worker, "
                                f"{micro_to_atomic(behind) + need} needed: lock a float for it")
        self.live[session] = _Live(entry, terms, recent=deque(maxlen=self.window_steps))
        self.stats.sessions_paid += 1
        return None

    async def vouchers(self, session: str, pay: Mapping[str, Any] | None, me: str) -> str | None:
        """Keep this worker's voucher from a frame's `pay` map (others pass through); a refused voucher
        pauses the entry (its reason returned)."""
        s = self.live.get(session)
        if s is None or not pay or me not in pay:
            return None
        why = await self.book.accept(s.entry, pay[me])
        if why is not None:
            self.stats.vouchers_refused += 1
            return self._refuse(f"voucher refused: {why}")
        self.stats.vouchers_kept += 1
        return None

    def step(self, session: str, tokens: int) -> str | None:
        """Account for a step about to run; None to run it, else why the entry is paused."""
        s = self.live.get(session)
        if s is None:
            return None
        m = s.terms.step_micro(tokens, s.steps == 0)
        s.micro += m
        s.steps += 1
        s.recent.append(m)
        behind, allowance = self._behind(s.entry)
        if behind > allowance:
            return self._refuse(f"entry {s.entry} fell {micro_to_atomic(behind)} behind on vouchers: paused")
        return None

    def close(self, session: str) -> None:
        """The session ended (CLOSE, error or silence): its work joins what the entry owes."""
        s = self.live.pop(session, None)
        if s is not None and s.micro:
            self.book.add_owed(s.entry, micro_to_atomic(s.micro))

    def status(self) -> dict[str, Any]:
        return {"live_sessions": len(self.live), **self.stats.__dict__}


VOUCHER_JSON_LIMIT = 2048  # bytes of a routed request's voucher header
MAX_ROUTED_LIVE = 1024  # routed requests admitted on vouchers and not finished yet


@dataclass
class RoutedPayStats:
    admitted: int = 0
    refused: int = 0
    last_refusal: str = ""


class RoutedPay:
    """A host's rule for requests an entry routes to it and pays with an escrow voucher instead of x402.

    The entry pays up front: the voucher a request carries must cover, beyond everything this host already
    earned from that entry (stage work included) and the most its other requests in flight can cost, the most
    this request can cost (`max_cost`, by the host's own prices). So the host never works unvouchered; it
    records the request's real cost when it ends (`done`), which it reports back (`earned`) so the entry nets
    its prepayment into the next voucher (economics.vouchers.VoucherIssuer.routed).

    `payer_of` (set by the node) maps the tunnel peer a request came from to the wallet it announces on this
    node's escrow: the voucher's entry must be that wallet. A voucher is public once redeemed (its signature is
    calldata), so without this any member could replay an entry's latest voucher and spend, in its name, the
    part of its prepayment its requests did not use."""

    def __init__(self, book: WorkerBook, payer_of: PayerOf | None = None) -> None:
        self.book = book
        self.payer_of = payer_of
        self.live: dict[str, tuple[str, int]] = {}  # request id -> (entry, max cost)
        self.inflight: dict[str, int] = {}  # entry -> max cost of its requests in flight
        self.stats = RoutedPayStats()

    def _refuse(self, why: str) -> tuple[None, str]:
        self.stats.refused += 1
        self.stats.last_refusal = why
        return None, why

    async def admit(self, request_id: str, raw: str, max_cost: int, peer: str = "") -> tuple[str | None, str | None]:
        """(the paying entry's wallet, None) when the voucher, sent by tunnel peer `peer`, covers this request,
        else (None, why)."""
        if not isinstance(raw, str) or len(raw) > VOUCHER_JSON_LIMIT:
            return self._refuse("the voucher header is missing or too large")
        try:
            voucher = json.loads(raw)
        except ValueError:
            return self._refuse("the voucher is not JSON")
        entry = voucher.get("entry") if isinstance(voucher, dict) else None
        if not is_address(entry):
            return self._refuse("the voucher names no entry address")
        why = payer_refusal(self.payer_of, peer, str(entry), "the voucher names entry")
        if why is not None:
            return self._refuse(why)
        if len(self.live) >= MAX_ROUTED_LIVE or request_id in self.live:
            return self._refuse("too many routed requests in flight here")
        why = await self.book.accept(str(entry), voucher)
        if why is not None:
            return self._refuse(f"voucher refused: {why}")
        entry = str(entry).lower()
        need = self.book.owed(entry) + self.inflight.get(entry, 0) + int(max_cost)
        held = self.book.held(entry)
        if held < need:
            return self._refuse(f"the voucher covers {held}, this request needs {need} vouchered in total")
        self.live[request_id] = (entry, int(max_cost))
        self.inflight[entry] = self.inflight.get(entry, 0) + int(max_cost)
        self.stats.admitted += 1
        return entry, None

    def done(self, request_id: str, cost: int) -> None:
        """The request ended: its cost (at most what was admitted; 0 when the work failed) is owed."""
        got = self.live.pop(request_id, None)
        if got is None:
            return
        entry, cap = got
        left = self.inflight.get(entry, 0) - cap
        if left > 0:
            self.inflight[entry] = left
        else:
            self.inflight.pop(entry, None)
        amount = min(max(int(cost), 0), cap)
        if amount:
            self.book.add_routed(entry, amount)

    def earned(self, entry: str) -> int:
        """What this host claims from `entry`'s routed requests so far: their recorded costs, and the most its
        requests in flight (this one included) can cost. Reported to the entry at the start of each answer so
        its next voucher builds on it; an in-flight request that costs less than its most is netted later."""
        return self.book.routed_owed(entry) + self.inflight.get(entry.lower(), 0)

    def status(self) -> dict[str, Any]:
        return {"live": len(self.live), **self.stats.__dict__}
