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
        await kept(self.sink(receipts, None))  # committed before the answer's end goes out (LocalStepper.finish)
        return receipts

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
