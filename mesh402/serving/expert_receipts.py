"""Work receipts for MoE expert-parallel requests (docs/payments.md, "Receipts and work units").

An expert-parallel host sends each MoE layer's token rows to the nodes holding the chosen experts
(serving/experts.py). Each EXPERT_RUN frame names the host's request, so:

- an expert node (:class:`ExpertAccounts`) tallies per (host, request) the rows it ran per
  (layer, expert) and running hashes of the payloads it received and sent, and signs an
  `ExpertReceipt` when the host asks (`EXPERT_RECEIPT`, once per request);
- the host (:class:`ExpertHostReceipts`, the `receipts` of its LocalModel) signs its own receipt when
  a request ends (the trunk for every token plus the experts it ran itself), asks every expert node
  that worked on the request for its receipt, and hands them all to the entry's receipt sink, which
  stores them in one transaction. A node that does not answer earns nothing for the request; the
  others' receipts are kept.

No torch here: the rows of a request are read from the message header.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import struct
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from mesh402.work.receipts import (
    ExpertReceipt,
    ExpertTallies,
    StageTally,
    expert_receipt_errors,
    flat_rows,
    sign_expert_receipt,
)
from mesh402.work.store import kept

log = logging.getLogger(__name__)

RECEIPT_TIMEOUT_S = 10.0  # an expert node slower than this to sign earns nothing for the request
_REQ = b"XQ1"  # experts.encode_request's magic


def expert_rows(payload: bytes) -> dict[tuple[int, int], int]:
    """(layer, expert) -> rows an expert request asks for (experts.encode_request's layout: header, the
    fp32 rows, then per expert its id, count and row indices), read without touching the activations."""
    if payload[:3] != _REQ:
        raise ValueError("not an expert request")
    layer, n, h, ng = struct.unpack_from("<IIII", payload, 3)
    o = 19 + n * h * 4
    out: dict[tuple[int, int], int] = {}
    for _ in range(ng):
        e, c = struct.unpack_from("<II", payload, o)
        o += 8 + 4 * c
        out[(layer, e)] = c
    if o != len(payload):
        raise ValueError("trailing bytes in expert request")
    return out


def _total(rows: Any) -> int:
    return sum(n for _, _, n in rows)


class ExpertAccounts:
    """An expert node's side: what it ran for each (host, request id), and its signature on it."""

    def __init__(self, signer: Any, tallies: ExpertTallies | None = None) -> None:
        self.signer = signer  # mesh402.mesh.identity.NodeIdentity
        self.tallies = tallies or ExpertTallies()

    def record(self, host: str, request_id: str, model_hash: str, payload: bytes, reply: bytes) -> None:
        """One answered EXPERT_RUN (a request id of "" is a host that keeps no receipts: nothing kept)."""
        if request_id:
            self.tallies.record(host, request_id, model_hash, expert_rows(payload),
                                hashlib.sha256(payload).digest(), hashlib.sha256(reply).digest())

    def receipt(self, host: str, request_id: str, stage: int) -> ExpertReceipt | None:
        tally = self.tallies.take(host, request_id)
        return tally.receipt(self.signer, stage) if tally is not None else None


MAX_LOGGED_RUNS = 1 << 16  # runs per (request, node) the host keeps hashes of for an audit; beyond: not audited
MAX_LOGGED_REQUESTS = 256  # requests the run log holds at once (finished ones are taken at once)


@dataclass
class RunSample:
    """What the host keeps of its runs on one expert node for one request: every run's payload and reply
    hashes (what the node's receipt runs over) and one run, drawn uniformly as they come (reservoir sampling
    with the host's own randomness, so the node cannot tell which run will be audited)."""
    in_hashes: list[bytes] = field(default_factory=list)
    out_hashes: list[bytes] = field(default_factory=list)
    step: int = -1
    payload: bytes = b""
    reply: bytes = b""

    def add(self, payload: bytes, reply: bytes, rng: Any) -> None:
        n = len(self.in_hashes)
        self.in_hashes.append(hashlib.sha256(payload).digest())
        self.out_hashes.append(hashlib.sha256(reply).digest())
        if rng.randrange(n + 1) == 0:
            self.step, self.payload, self.reply = n, bytes(payload), bytes(reply)


class RunLog:
    """The host's audit log of expert runs (the transport's `on_run`; called from engine threads)."""

    def __init__(self) -> None:
        import secrets
        import threading
        from collections import OrderedDict

        self._rng = secrets.SystemRandom()
        self._lock = threading.Lock()
        self.runs: OrderedDict[str, dict[str, RunSample | None]] = OrderedDict()

    def __call__(self, node: str, request_id: str, payload: bytes, reply: bytes) -> None:
        if not request_id:
            return
        with self._lock:
            per = self.runs.setdefault(request_id, {})
            while len(self.runs) > MAX_LOGGED_REQUESTS:
                self.runs.popitem(last=False)
            if node not in per:
                per[node] = RunSample()
            sample = per[node]
            if sample is None:
                return
            if len(sample.in_hashes) >= MAX_LOGGED_RUNS:
                per[node] = None  # too long to keep: this request's runs on the node go unaudited
                return
            sample.add(payload, reply, self._rng)

    def take(self, request_id: str) -> dict[str, RunSample | None]:
        with self._lock:
            return self.runs.pop(request_id, {})


@dataclass
class ExpertHostReceipts:
    """The `receipts` of an expert-parallel host's LocalModel on a paid entry (like SoloReceipts).

    `runner` is the engine's RemoteExperts (it knows which rows ran locally and which nodes got rows for
    each request); `transport` answers `ask_receipt(node, request_id, stage)`; `sink` is EntryReceipts."""
    signer: Any
    sink: Any
    content_hash: str
    n_layers: int
    runner: Any
    transport: Any
    loop: asyncio.AbstractEventLoop
    timeout_s: float = RECEIPT_TIMEOUT_S
    pending: set = field(default_factory=set)
    # the entry's audit policy (work.evidence.Auditor) and the mode the nodes run: expert runs are spot-checked
    auditor: Any = None
    mode: str = "exact"
    runs: RunLog | None = None

    def __post_init__(self) -> None:
        if self.auditor is not None and self.runs is None:
            self.runs = RunLog()
            self.transport.on_run = self.runs

    def tally(self, request_id: str) -> StageTally:
        return StageTally(request_id, self.content_hash, 0, self.n_layers)

    def finish(self, tally: StageTally) -> Future | None:
        """Called when the request is released: collect and keep its receipts in a task on the loop; the
        future is done once they are committed."""
        local, sent = self.runner.take(tally.request_id)
        if not tally.tokens:  # no receipts, but the runs sent are vouchered (--escrow)
            if getattr(self.transport, "pay", None) is not None:
                fut = asyncio.run_coroutine_threadsafe(self._settle(tally.request_id), self.loop)
                self.pending.add(fut)
                fut.add_done_callback(self.pending.discard)
            return None
        fut = asyncio.run_coroutine_threadsafe(self.collect(tally, local, sent), self.loop)
        self.pending.add(fut)  # a strong reference until done
        fut.add_done_callback(self.pending.discard)
        return fut

    async def collect(self, tally: StageTally, local: dict[tuple[int, int], int],
                      sent: dict[str, dict[tuple[int, int], int]]) -> list[ExpertReceipt]:
        """`sent`: per expert node, the rows this host sent it (and got answers for) per (layer, expert)."""
        in_hash, out_hash = tally.digests()
        mine = sign_expert_receipt(self.signer, request_id=tally.request_id, stage=0, model_hash=self.content_hash,
                                   host=self.signer.node_id_hex, trunk_tokens=tally.tokens, rows=flat_rows(local),
                                   input_hash=in_hash, output_hash=out_hash)
        asked = await asyncio.gather(*(self._ask(n, tally.request_id, i + 1, flat_rows(sent[n]))
                                       for i, n in enumerate(sorted(sent))))
        receipts = [mine] + [r for r in asked if r is not None]
        await self._settle(tally.request_id)  # nodes whose receipt ask did not carry their final voucher
        checks = self._audit(tally.request_id, receipts[1:])
        await kept(self.sink(receipts, checks or None))  # committed before the answer's end goes out
        return receipts

    def _audit(self, request_id: str, receipts: list[ExpertReceipt]) -> list[Any]:
        """Spot checks of the expert nodes the entry's auditor picks (each node's first request per epoch, others
        at the audit rate): the sampled run of each, backed by the node's own receipt (work.evidence.expert_check)."""
        if self.runs is None:
            return []
        from mesh402.work.evidence import expert_check  # lazy: kept off this module's import path

        logged = self.runs.take(request_id)
        out = []
        for r in receipts:
            sample = logged.get(r.node_id)
            if sample is None or sample.step < 0:
                continue
            if self.auditor.pick([r.node_id], len(sample.in_hashes)) is None:
                continue
            out.append(expert_check(r, sample.in_hashes, sample.out_hashes, sample.step, sample.payload, sample.reply,
                                    self.mode))
        return out

    async def _settle(self, request_id: str) -> None:
        """With --escrow (the transport's ExpertPayer): sign the request's final vouchers no receipt ask
        carried (a node that never answered, a request that produced no token)."""
        pay = getattr(self.transport, "pay", None)
        if pay is not None:
            await asyncio.to_thread(pay.settle, request_id)

    async def _ask(self, node: str, request_id: str, stage: int, rows: Any) -> ExpertReceipt | None:
        """The node's receipt for the request, kept only when it claims exactly `rows` (what this host sent
        it): an expert node cannot claim rows, experts or layers it was never sent."""
        try:
            r = await asyncio.wait_for(self.transport.ask_receipt(node, request_id, stage), self.timeout_s)
        except Exception as e:  # noqa: BLE001 - a node that does not answer just earns nothing here
            log.info("expert node %s gave no receipt for %s: %s", node[:12], request_id, e)
            return None
        if not isinstance(r, ExpertReceipt):
            return None
        errs = expert_receipt_errors(r, request_id, self.content_hash, self.signer.node_id_hex, self.n_layers)
        if r.node_id != node or r.stage != stage:
            errs.append("signed by another node or for another stage")
        if r.rows != rows:
            errs.append(f"claims rows {_total(r.rows)} ran, this host sent {_total(rows)}")
        if errs:  # one bad receipt must not cost the others theirs: it is left out alone
            log.warning("expert receipt of %s for %s dropped: %s", node[:12], request_id, "; ".join(errs))
            return None
        return r
