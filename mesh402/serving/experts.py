"""Expert parallelism over the mesh: the host's EXPERT streams (:class:`MeshExpertTransport`) and the expert
node's side (:class:`ExpertService`). The torch side (row encoding, expert shards, the host's expert runner)
is :mod:`mesh402.engine.expert_parallel`; here only bytes cross.
"""

from __future__ import annotations

import inspect
import json
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from struct import error as struct_error
from typing import TYPE_CHECKING, Callable, Mapping

from mesh402.engine.expert_parallel import (
    ExpertNodeDown,
    ExpertUnavailable,
    ExpertShardWorker,
    _WireCounters,
)
from mesh402.serving.stage_link import (
    K,
    StageError,
    error_frame,
    expect_stage,
    stage_body,
    stage_frame,
)
from mesh402.serving.work_pay import (
    PAY_PARAM,
    EntrySessionPay,
    PayerOf,
    VoucherSigner,
    WorkerPay,
    WorkTerms,
    pay_map,
    payer_refusal,
)
from mesh402.work.receipts import ExpertReceipt

if TYPE_CHECKING:
    from mesh402.serving.expert_receipts import ExpertAccounts
    from mesh402.work.receipts import ExpertReceipt

# ---------------------------------------------------------------------------
# over the mesh (EXPERT streams; frames are StageFrames of the EXPERT_* kinds)

TERMS_PARAM = "terms"  # EXPERT_RUN param: the host's pay terms for this node (JSON WorkTerms), on a request's first run
TERMS_LIMIT_BYTES = 1024
MAX_PAID_REQUESTS = 4096  # (request, node) vouchering states a host keeps (the oldest are over)


def _rows(payload: bytes) -> int:
    from mesh402.serving.expert_receipts import expert_rows  # the request's layout, read without torch

    return sum(expert_rows(payload).values())


@dataclass
class _PaidRun:
    """The host's pay state of one (request, expert node)."""

    pay: EntrySessionPay
    deferred: bool = True  # the first run's voucher rides the second run: the first may be refused at open


class ExpertPayer:
    """The host's side of paying its expert nodes with escrow vouchers (serving.work_pay), a stage's rule with
    runs for steps: per (request, node) an EntrySessionPay whose 'tokens' are the rows the node runs, accrued
    as each run is sent (as an entry accrues a step), so the host and the node count the same runs. The first
    run of a request to a node carries its terms and the node's current cumulative voucher (as a stage's OPEN
    does: one lost final voucher never leaves the host behind); the second run carries a voucher covering
    both, and every VOUCHER_EVERY-th run one covering it; the request's receipt ask carries the final one. A
    first run the node refused (`unpaid`: nothing was opened there) is forgotten, never vouchered. A request
    that ends without a receipt ask (no token came out, or a node never answered) is vouchered in full by
    `settle`, delivered with that node's next first run."""

    def __init__(self, signer: VoucherSigner, terms: dict[str, WorkTerms]) -> None:
        self.signer = signer
        self.terms = terms  # expert node id -> its terms (nodes without terms work unpaid)
        self.sessions: OrderedDict[tuple[str, str], _PaidRun] = OrderedDict()
        self._lock = threading.Lock()  # runs to different nodes are sent from several engine threads

    def run_params(self, node: str, request_id: str, payload: bytes) -> dict[str, str]:
        """Params for one EXPERT_RUN about to be sent (engine thread: signing and the voucher file's write)."""
        t = self.terms.get(node)
        if t is None or not request_id:
            return {}
        rows = _rows(payload)
        params: dict[str, str] = {}
        with self._lock:
            got = self.sessions.get((request_id, node))
            if got is None:
                got = self.sessions[(request_id, node)] = _PaidRun(EntrySessionPay(self.signer, {node: t},
                                                                                    f"x:{request_id}"))
                params[TERMS_PARAM] = json.dumps(t.to_json(), separators=(",", ":"))
                vouchers = got.pay.opening()
                got.pay.accrue(rows)
                while len(self.sessions) > MAX_PAID_REQUESTS:  # the oldest request is over: vouchered in full
                    self.sessions.popitem(last=False)[1].pay.vouchers()
            else:
                due = got.pay.accrue(rows) or got.deferred
                got.deferred = False
                vouchers = got.pay.vouchers() if due else None
        if vouchers:
            params[PAY_PARAM] = json.dumps(vouchers, separators=(",", ":"))
        return params

    def refused(self, node: str, request_id: str, params: Mapping[str, str]) -> None:
        """The node refused a run (`unpaid`): a request's first run opened nothing there, so it is forgotten;
        a later one was counted by the node as by this host (a stage's refused step is too)."""
        if TERMS_PARAM in params:
            with self._lock:
                self.sessions.pop((request_id, node), None)

    def close_params(self, node: str, request_id: str) -> dict[str, str]:
        """The final voucher of the request for `node` (what its receipt ask carries)."""
        with self._lock:
            got = self.sessions.pop((request_id, node), None)
        due = got.pay.vouchers() if got is not None else None
        return {PAY_PARAM: json.dumps(due, separators=(",", ":"))} if due else {}

    def settle(self, request_id: str) -> int:
        """The request ended: sign the final vouchers its receipt asks did not carry (kept by the issuer and
        delivered with each node's next first run). How many were signed."""
        with self._lock:
            ended = [k for k in self.sessions if k[0] == request_id]
            left = [self.sessions.pop(k) for k in ended]
        for got in left:
            got.pay.vouchers()
        return len(left)


class MeshExpertTransport(_WireCounters):
    """:class:`ExpertTransport` over mesh EXPERT streams, one persistent stream per node.

    ``call`` runs in the engine thread and waits on the event loop ``loop``; ``connect(node)``
    opens a fresh EXPERT stream. Counts bytes on the wire (frame payloads) per node.
    """

    def __init__(self, connect, loop, content_hash: str, epoch: int = 0, timeout: float = 60.0):
        import asyncio

        self.connect = connect
        self.loop = loop
        self.content_hash = content_hash
        self.epoch = epoch
        self.timeout = timeout
        self._streams: dict[str, object] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.by_node: dict[str, int] = {}
        self.pay: ExpertPayer | None = None  # --escrow on a paid host: its expert nodes are paid with vouchers
        # (node, request id, payload, reply) per answered run: the host's audit log (serving.expert_receipts)
        self.on_run: Callable[[str, str, bytes, bytes], None] | None = None
        super().__init__()

    def call(self, node: str, payload: bytes, request_id: str = "") -> bytes:
        import asyncio

        params = self.pay.run_params(node, request_id, payload) if self.pay is not None else {}
        fut = asyncio.run_coroutine_threadsafe(self._call(node, payload, request_id, params), self.loop)
        try:
            reply = fut.result(self.timeout + 5)
        except ExpertUnavailable:
            if self.pay is not None:
                self.pay.refused(node, request_id, params)
            raise
        except ExpertNodeDown:  # a lost run stays accrued: the node may have run it (never vouchered short)
            raise
        except Exception as e:  # timeouts, resets, protocol errors: the node is not usable
            fut.cancel()
            raise ExpertNodeDown(f"expert node {node[:12]}: {e}") from e
        if self.on_run is not None:
            self.on_run(node, request_id, payload, reply)
        self.bytes_sent += len(payload)
        self.bytes_received += len(reply)
        self.by_node[node] = self.by_node.get(node, 0) + len(payload) + len(reply)
        self.calls += 1
        return reply

    async def _call(self, node: str, payload: bytes, request_id: str = "", params: dict[str, str] | None = None
                    ) -> bytes:
        sf = await self._exchange(node, K.STAGE_KIND_EXPERT_RUN, K.STAGE_KIND_EXPERT_RESULT,
                                  request_id=request_id, activations=payload, params=params or {})
        return bytes(sf.activations)

    async def ask_receipt(self, node: str, request_id: str, stage: int) -> "ExpertReceipt":
        """The node's signed receipt for its work on ``request_id`` (EXPERT_RECEIPT on the same stream)."""
        import json


        final = self.pay.close_params(node, request_id) if self.pay is not None else {}
        sf = await self._exchange(node, K.STAGE_KIND_EXPERT_RECEIPT, K.STAGE_KIND_RESULT, request_id=request_id,
                                  params={"stage": str(int(stage)), **final})
        return ExpertReceipt.from_json(json.loads(sf.params["receipt"]))

    async def _exchange(self, node: str, kind: int, want: int, **fields):
        """One frame out and its answer on the node's persistent stream (a broken stream is reopened next time)."""
        import asyncio



        lock = self._locks.setdefault(node, asyncio.Lock())
        async with lock:
            for attempt in (0, 1):
                fs = self._streams.get(node)
                reused = fs is not None
                try:
                    if fs is None:
                        fs = await self.connect(node)
                        self._streams[node] = fs
                    await fs.send(stage_frame(kind, content_hash=self.content_hash, plan_epoch=self.epoch, **fields))
                    return expect_stage(await fs.recv(self.timeout), want, f"expert node {node[:12]}")
                except StageError as e:
                    if e.code == "unpaid":  # alive and well, but it will not work unpaid: the request fails,
                        raise ExpertUnavailable(f"expert node {node[:12]} refused the work: {e}") from e  # not the node
                    self._streams.pop(node, None)
                    raise ExpertNodeDown(f"expert node {node[:12]}: {e}") from e
                except Exception as e:
                    self._streams.pop(node, None)
                    # an idle stream the expert node closed: one retry on a fresh stream before calling it down
                    if reused and attempt == 0 and not isinstance(e, (asyncio.TimeoutError, StageError)):
                        continue
                    raise ExpertNodeDown(f"expert node {node[:12]}: {e}") from e


class ExpertService:
    """The expert-node side of EXPERT streams: loads assigned experts, answers RUN requests.

    ``loader(content_hash, experts, reuse)`` builds an :class:`ExpertShardWorker` (runs in
    ``executor``, a thread of its own so expert work never waits behind this node's own engine),
    sharing the experts it already holds. Workers are kept per plan epoch: a host re-planning keeps
    serving its running sessions from the previous epoch's experts until it sends a request of the
    new epoch; older epochs are dropped then.
    """

    def __init__(self, loader, executor=None, accounts: "ExpertAccounts | None" = None, *,
                 may_assign=None, idle_timeout: float = 120.0, me: str = ""):
        self.loader = loader
        # may_assign(peer, frame, experts) -> None or (code, reason). None: no peer may assign experts here.
        self.may_assign = may_assign
        self.idle_timeout = idle_timeout  # a host's stream silent this long is closed (the host reopens it)
        self.assigners: dict[str, str] = {}  # content hash -> the host whose experts are held: only it runs them
        self.refused = 0
        self.accounts = accounts  # tallies the work per host request and signs receipts (EXPERT_RECEIPT)
        self.executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="expert-shard")
        self.shards: dict[str, dict[int, ExpertShardWorker]] = {}  # content hash -> epoch -> worker
        self.requests = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.me = me  # this node's id: the key of its voucher in a run's pay map
        self.on_receipt: Callable[[str], None] | None = None  # called with the host's node id per signed receipt
        self.pay: WorkerPay | None = None  # --escrow: expert work is paid with vouchers, else refused (`unpaid`)
        # --escrow: the wallet a host peer announces on this node's escrow (None: none). Terms naming another payer
        # are refused: a host must not run work on another entry's float and leave that entry behind here.
        self.payer_of: PayerOf | None = None
        # paid session -> last run, least recent first (silent ones are closed, oldest first)
        self._paid_seen: OrderedDict[str, float] = OrderedDict()

    def latest(self, content_hash: str) -> ExpertShardWorker | None:
        by_epoch = self.shards.get(content_hash) or {}
        return by_epoch[max(by_epoch)] if by_epoch else None

    def held(self) -> dict[str, list[list[int]]]:
        return {ch: [list(e) for e in self.latest(ch).experts] for ch in self.shards if self.latest(ch)}

    async def handle(self, peer: str, fs) -> None:
        import asyncio
        import json


        loop = asyncio.get_running_loop()
        while True:
            if peer in self.assigners.values():
                fs.entitle()  # the host of experts held here: its token rows are work, not chatter
            try:
                frame = await fs.recv(self.idle_timeout)
            except asyncio.TimeoutError:
                return
            if frame is None:
                return
            try:
                sf = stage_body(frame, f"host {peer[:12]}")
                if sf.kind == K.STAGE_KIND_EXPERT_ASSIGN:
                    try:
                        experts = [(int(la), int(e)) for la, e in json.loads(sf.params.get("experts", "[]"))]
                    except (ValueError, TypeError) as e:
                        raise StageError(f"bad expert list: {e}", code="bad_range") from None
                    refused = ("not_allowed", "this node accepts no expert assignments") if self.may_assign is None \
                        else self.may_assign(peer, sf, experts)
                    if inspect.isawaitable(refused):  # the policy may first ask the host to prove it holds the model
                        refused = await refused
                    if refused is not None:  # checked before anything is loaded or stored
                        self.refused += 1
                        raise StageError(refused[1], code=refused[0])
                    worker = await loop.run_in_executor(self.executor, self.loader, sf.content_hash, experts,
                                                        self.latest(sf.content_hash))
                    if self.assigners.get(sf.content_hash) != peer:  # a new host: the old one's experts go
                        self.shards.pop(sf.content_hash, None)
                    self.assigners[sf.content_hash] = peer
                    by_epoch = self.shards.setdefault(sf.content_hash, {})
                    by_epoch[int(sf.plan_epoch)] = worker
                    for old in sorted(by_epoch)[:-2]:  # the previous epoch serves running sessions; older go
                        del by_epoch[old]
                    await fs.send(stage_frame(K.STAGE_KIND_READY, content_hash=sf.content_hash,
                                              plan_epoch=sf.plan_epoch))
                elif sf.kind == K.STAGE_KIND_EXPERT_RUN and self.assigners.get(sf.content_hash) != peer:
                    self.refused += 1
                    raise StageError(f"no experts of {sf.content_hash[:12]} are held here for {peer[:12]}",
                                     code="not_host")
                elif sf.kind == K.STAGE_KIND_EXPERT_RUN:
                    by_epoch = self.shards.get(sf.content_hash) or {}
                    worker = by_epoch.get(int(sf.plan_epoch)) or self.latest(sf.content_hash)
                    if worker is None:
                        raise StageError(f"no experts of {sf.content_hash[:12]} held here", code="not_loaded")
                    for old in [ep for ep in by_epoch if ep < int(sf.plan_epoch)]:
                        del by_epoch[old]  # the host moved on to a newer plan
                    payload = bytes(sf.activations)
                    if self.pay is not None:
                        why = await self._paid(peer, sf, payload)
                        if why is not None:  # checked before any work is done
                            self.refused += 1
                            raise StageError(why, code="unpaid")
                    reply = await loop.run_in_executor(self.executor, self._run, peer, sf.request_id,
                                                       sf.content_hash, worker, payload)
                    self.requests += 1
                    self.bytes_in += len(payload)
                    self.bytes_out += len(reply)
                    await fs.send(stage_frame(K.STAGE_KIND_EXPERT_RESULT, activations=reply))
                elif sf.kind == K.STAGE_KIND_EXPERT_RECEIPT:
                    if self.pay is not None:  # the request is over: its final voucher, then its work is owed
                        session = f"x:{peer}:{sf.request_id}"
                        await self.pay.vouchers(session, pay_map(sf.params.get(PAY_PARAM)), self.me)
                        self.pay.close(session)
                        self._paid_seen.pop(session, None)
                    await fs.send(self._receipt_frame(peer, sf))
                else:
                    raise StageError(f"unexpected stage kind {sf.kind} on an expert stream", code="protocol")
            except Exception as e:  # noqa: BLE001 - answered as an ERROR frame; the stream stays usable
                await fs.send(error_frame("", str(e), "", getattr(e, "code", "expert_error")))

    async def _paid(self, host: str, sf, payload: bytes) -> str | None:
        """The voucher rule for one run (serving.work_pay.WorkerPay, as a stage applies it per step): the host's
        terms on a request's first run, its vouchers, and the rows about to run. None to run it, else why not."""
        import time

        assert self.pay is not None
        if not sf.request_id:
            return "this node is paid with escrow vouchers: a run needs a request id and pay terms"
        session = f"x:{host}:{sf.request_id}"
        now = time.monotonic()
        while self._paid_seen:  # a host that never asked its receipt: the work is owed
            old, seen = next(iter(self._paid_seen.items()))
            if now - seen <= self.idle_timeout:
                break
            self.pay.close(old)
            del self._paid_seen[old]
        if session not in self._paid_seen and len(self._paid_seen) >= MAX_PAID_REQUESTS:
            return "too many paid expert requests in flight here"
        try:
            rows = _rows(payload)
            pay = pay_map(sf.params.get(PAY_PARAM))
            if session not in self.pay.live:  # a request's first run here: the host's terms, its cumulative voucher
                raw = sf.params.get(TERMS_PARAM, "")
                if not raw or len(raw) > TERMS_LIMIT_BYTES:
                    return "this node is paid with escrow vouchers: the run carries no pay terms"
                terms = WorkTerms.from_json(json.loads(raw))
                why = payer_refusal(self.payer_of, host, terms.payer, "the terms name payer")
                if why is not None:
                    return why
                why = await self.pay.open(session, terms, (pay or {}).get(self.me))
            else:
                why = await self.pay.vouchers(session, pay, self.me)
            if why is not None:
                return why
            self._paid_seen[session] = now
            self._paid_seen.move_to_end(session)
        except (ValueError, TypeError, struct_error) as e:
            return f"bad pay params: {e}"
        return self.pay.step(session, rows)

    def _run(self, host: str, request_id: str, content_hash: str, worker: ExpertShardWorker, payload: bytes) -> bytes:
        """Expert thread: answer one EXPERT_RUN and tally it for the host's request."""
        reply = worker.handle(payload)
        if self.accounts is not None:
            self.accounts.record(host, request_id, content_hash, payload, reply)
        return reply

    def _receipt_frame(self, host: str, sf):
        import json


        got = self.accounts.receipt(host, sf.request_id, int(sf.params.get("stage", "1"))) if self.accounts else None
        if got is None:
            raise StageError(f"no expert work of request {sf.request_id} held here", code="no_receipt")
        if self.on_receipt is not None:
            self.on_receipt(host)  # a host this node signed work for may ask it to request validation of it
        return stage_frame(K.STAGE_KIND_RESULT, request_id=sf.request_id,
                           params={"receipt": json.dumps(got.to_json(), separators=(",", ":"))})
