"""Expert parallelism for MoE models: the host runs the trunk, expert shards run experts.

The host (a :class:`~mesh402.engine.model.Stage` whose ``experts`` is a
:class:`RemoteExperts`) computes attention, norms and the router. At each MoE
layer it sends, to every node holding some chosen expert, the token rows routed
to that node's experts (``rows x hidden`` fp32 once per node, plus per-expert row
indices) and gets back each expert's output on its rows. The host weights and
sums them in ascending expert order exactly as solo inference does, so outputs
are bit-identical to a single node holding every expert: no expert is ever
dropped. Wire bytes per token and MoE layer are about ``hidden x 4 x (nodes
touched + top-k)``: activations, never weights.

Every expert has one or more owners (hot experts are replicated by
:func:`mesh402.placement.plan_experts`); the host uses the first live owner and
moves to a replica when a node stops answering, without interrupting
generation.

Each request carries the host's request id, so expert nodes can sign a work receipt per request
(:mod:`mesh402.serving.expert_receipts`). The mesh transport and the expert node's service are in
:mod:`mesh402.serving.experts`; this module is the torch side.

The request/reply messages are plain bytes (:func:`encode_request` /
:func:`encode_reply`), so any byte transport carries them: :class:`LoopbackTransport`
in process (tests, benchmarks), a mesh stream between nodes.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import numpy as np
import torch

from mesh402.engine.moe import ExpertBank
from mesh402.engine.weights import WeightSource, open_source

__all__ = ["ExpertNodeDown", "ExpertUnavailable", "ExpertShardWorker", "ExpertTransport", "LoopbackTransport",
           "SocketTransport", "serve_expert_shard",
           "RemoteExperts", "encode_request", "decode_request", "encode_reply", "decode_reply",
           "owners_from_plan", "local_workers_for_plan"]

log = logging.getLogger(__name__)

ExpertId = tuple[int, int]
_REQ = b"XQ1"
_REP = b"XA1"


class ExpertNodeDown(ConnectionError):
    """The node holding some experts did not answer (dead, unreachable, or reset the stream)."""


class ExpertUnavailable(RuntimeError):
    """Every owner of an expert is down: the output cannot be computed exactly."""


# ---------------------------------------------------------------------------
# messages

def encode_request(layer: int, x: torch.Tensor, groups: Mapping[int, Sequence[int] | torch.Tensor]) -> bytes:
    """Rows ``x`` [n, hidden] fp32 and, per expert, indices into ``x`` of the rows it must run on."""
    x = x.detach().to("cpu", torch.float32).contiguous()
    n, h = x.shape
    parts = [_REQ, struct.pack("<IIII", layer, n, h, len(groups)), x.numpy().tobytes()]
    for e in sorted(groups):
        idx = np.asarray(groups[e].cpu() if isinstance(groups[e], torch.Tensor) else groups[e], dtype=np.uint32)
        parts.append(struct.pack("<II", e, idx.size))
        parts.append(idx.tobytes())
    return b"".join(parts)


def decode_request(buf: bytes) -> tuple[int, torch.Tensor, dict[int, torch.Tensor]]:
    if buf[:3] != _REQ:
        raise ValueError("not an expert request")
    layer, n, h, ng = struct.unpack_from("<IIII", buf, 3)
    o = 19
    x = torch.from_numpy(np.frombuffer(buf, dtype=np.float32, count=n * h, offset=o).copy()).view(n, h)
    o += n * h * 4
    groups = {}
    for _ in range(ng):
        e, c = struct.unpack_from("<II", buf, o)
        o += 8
        groups[e] = torch.from_numpy(np.frombuffer(buf, dtype=np.uint32, count=c, offset=o).astype(np.int64))
        o += 4 * c
    if o != len(buf):
        raise ValueError("trailing bytes in expert request")
    return layer, x, groups


def encode_reply(ys: Mapping[int, torch.Tensor]) -> bytes:
    parts = [_REP, struct.pack("<I", len(ys))]
    for e in sorted(ys):
        y = ys[e].detach().to("cpu", torch.float32).contiguous()
        parts.append(struct.pack("<III", e, y.shape[0], y.shape[1]))
        parts.append(y.numpy().tobytes())
    return b"".join(parts)


def decode_reply(buf: bytes) -> dict[int, torch.Tensor]:
    if buf[:3] != _REP:
        raise ValueError("not an expert reply")
    (ng,) = struct.unpack_from("<I", buf, 3)
    o = 7
    out = {}
    for _ in range(ng):
        e, n, h = struct.unpack_from("<III", buf, o)
        o += 12
        out[e] = torch.from_numpy(np.frombuffer(buf, dtype=np.float32, count=n * h, offset=o).copy()).view(n, h)
        o += n * h * 4
    return out


# ---------------------------------------------------------------------------
# the shard side

class ExpertShardWorker:
    """Holds some experts (of any layers) and answers expert requests."""

    def __init__(self, source: WeightSource | str, experts: Iterable[ExpertId], *, mode: str = "exact",
                 device: str = "cpu", reuse: "ExpertShardWorker | None" = None):
        src = source if isinstance(source, WeightSource) else open_source(source)
        self.bank = ExpertBank(src, experts, mode=mode, device=device,
                               reuse=reuse.bank if reuse is not None else None)
        self._lock = threading.Lock()

    @property
    def experts(self) -> list[ExpertId]:
        return self.bank.ids

    @property
    def weight_bytes(self) -> int:
        return self.bank.nbytes

    def handle(self, payload: bytes) -> bytes:
        layer, x, groups = decode_request(payload)
        with self._lock:
            ys = {e: self.bank.run(layer, e, x[idx]) for e, idx in groups.items()}
        return encode_reply(ys)


# ---------------------------------------------------------------------------
# transports

class ExpertTransport(Protocol):
    def call(self, node: str, payload: bytes, request_id: str = "") -> bytes:
        """Send a request (for the host's request ``request_id``) to ``node`` and wait for its reply;
        raises :class:`ExpertNodeDown`."""
        ...

    async def ask_receipt(self, node: str, request_id: str, stage: int) -> Any:
        """``node``'s signed receipt (a work.receipts.ExpertReceipt) for its work on ``request_id`` (receipts
        on a paid host)."""
        ...


class ExpertWorkTally(Protocol):
    """What an expert node keeps per host request to sign a receipt (serving.expert_receipts.ExpertAccounts)."""

    def record(self, host: str, request_id: str, content_hash: str, payload: bytes, reply: bytes) -> None: ...

    def receipt(self, host: str, request_id: str, stage: int) -> Any: ...


class _WireCounters:
    """Bytes on the wire and requests made, for the benchmarks and status (all transports count alike)."""

    def __init__(self) -> None:
        self.bytes_sent = self.bytes_received = self.calls = 0
        self._lock = threading.Lock()

    @property
    def wire_bytes(self) -> int:
        return self.bytes_sent + self.bytes_received

    def reset_counters(self) -> None:
        with self._lock:
            self.bytes_sent = self.bytes_received = self.calls = 0


class LoopbackTransport(_WireCounters):
    """In-process transport to :class:`ExpertShardWorker` objects, counting bytes on the wire.

    ``delay_s`` is added once per request (a round trip between nodes). ``kill(node)``
    makes a node stop answering, like kill -9. ``accounts[node]`` (an ExpertAccounts) makes that node
    tally its work for the host ``host`` and sign receipts, as ExpertService does on the mesh.
    """

    def __init__(self, workers: Mapping[str, ExpertShardWorker], delay_s: float = 0.0, *,
                 accounts: Mapping[str, ExpertWorkTally] | None = None, host: str = "host", content_hash: str = ""):
        self.workers = dict(workers)
        self.accounts = dict(accounts or {})
        self.host, self.content_hash = host, content_hash
        self.delay_s = delay_s
        self.dead: set[str] = set()
        # (node, request id, payload, reply) per answered run: the host's audit log (serving.expert_receipts)
        self.on_run: Callable[[str, str, bytes, bytes], None] | None = None
        super().__init__()

    def kill(self, node: str) -> None:
        self.dead.add(node)

    def call(self, node: str, payload: bytes, request_id: str = "") -> bytes:
        if node in self.dead or node not in self.workers:
            raise ExpertNodeDown(f"expert node {node} does not answer")
        with self._lock:
            self.bytes_sent += len(payload)
            self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s)
        reply = self.workers[node].handle(payload)
        if node in self.accounts:
            self.accounts[node].record(self.host, request_id, self.content_hash, payload, reply)
        if self.on_run is not None:
            self.on_run(node, request_id, payload, reply)
        with self._lock:
            self.bytes_received += len(reply)
        return reply

    async def ask_receipt(self, node: str, request_id: str, stage: int) -> Any:
        got = None if node in self.dead or node not in self.accounts else \
            self.accounts[node].receipt(self.host, request_id, stage)
        if got is None:
            raise ExpertNodeDown(f"expert node {node} gave no receipt for {request_id}")
        return got


class SocketTransport(_WireCounters):
    """Length-prefixed requests over TCP to :func:`serve_expert_shard` processes (benchmarks, tools).

    ``addrs[node] = (host, port)``; one persistent connection per node. ``delay_s`` adds a
    simulated round trip per request.
    """

    def __init__(self, addrs: Mapping[str, tuple[str, int]], delay_s: float = 0.0, timeout: float = 30.0):
        self.addrs = dict(addrs)
        self.delay_s = delay_s
        self.timeout = timeout
        self._socks: dict[str, object] = {}
        super().__init__()

    def call(self, node: str, payload: bytes, request_id: str = "") -> bytes:  # benchmarks: no receipts
        import socket

        try:
            sock = self._socks.get(node)
            if sock is None:
                sock = socket.create_connection(self.addrs[node], timeout=self.timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._socks[node] = sock
            if self.delay_s:
                time.sleep(self.delay_s)
            sock.sendall(struct.pack("<I", len(payload)) + payload)
            n = struct.unpack("<I", _recv_exact(sock, 4))[0]
            reply = _recv_exact(sock, n)
        except (OSError, KeyError, ConnectionError) as e:
            self._socks.pop(node, None)
            raise ExpertNodeDown(f"expert node {node}: {e}") from e
        with self._lock:
            self.bytes_sent += len(payload) + 4
            self.bytes_received += len(reply) + 4
            self.calls += 1
        return reply


def _recv_exact(sock, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return bytes(buf)


def serve_expert_shard(worker: ExpertShardWorker, port: int = 0, host: str = "127.0.0.1", ready=None) -> None:
    """Serve expert requests over TCP forever (one thread per connection). ``ready(port)`` is called
    once listening."""
    import socket

    srv = socket.create_server((host, port))
    if ready is not None:
        ready(srv.getsockname()[1])

    def conn(c):
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with c:
            while True:
                try:
                    n = struct.unpack("<I", _recv_exact(c, 4))[0]
                    reply = worker.handle(_recv_exact(c, n))
                    c.sendall(struct.pack("<I", len(reply)) + reply)
                except (ConnectionError, OSError):
                    return

    while True:
        c, _ = srv.accept()
        threading.Thread(target=conn, args=(c,), daemon=True).start()


# ---------------------------------------------------------------------------
# the host side

class RemoteExperts:
    """An :class:`~mesh402.engine.moe.ExpertRunner` that sends rows to the nodes holding the experts.

    ``owners[(layer, e)]``: nodes holding that expert, in order of preference (``local_node``
    first when it holds it). Experts held by ``local_node`` run on ``local`` (no wire).
    """

    def __init__(self, owners: Mapping[ExpertId, Sequence[str]], transport: ExpertTransport, *,
                 local: ExpertBank | None = None, local_node: str | None = None, parallel: bool = True):
        self.owners = {k: tuple(v) for k, v in owners.items()}
        self.transport = transport
        self.local = local
        self.local_node = local_node
        self.dead: set[str] = set()
        self.failovers = 0
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="experts") if parallel else None
        # Receipts: the request the engine thread steps now (it runs one step at a time), and per request
        # the rows run here and the nodes that got rows; "" when the host keeps no receipts.
        self.request_id = ""
        self._work: dict[str, RequestWork] = {}
        self._work_lock = threading.Lock()

    def begin(self, request_id: str) -> None:
        """The engine thread is about to step ``request_id`` (LocalModel's step hook)."""
        self.request_id = request_id

    def take(self, request_id: str) -> tuple[dict[ExpertId, int], dict[str, dict[ExpertId, int]]]:
        """(rows run locally per expert, per node the rows it answered for per expert) for a finished
        request, forgotten here. An expert node's receipt must claim exactly its rows here."""
        with self._work_lock:
            w = self._work.pop(request_id, None) or RequestWork()
        return w.local_rows, w.remote_rows

    def _note(self, request_id: str, node: str | None = None, layer: int = 0,
              rows: Mapping[int, torch.Tensor] | None = None) -> None:
        """Rows of `layer` run for `request_id`: on this node (node None), or answered by `node`."""
        if not request_id:
            return
        with self._work_lock:
            w = self._work.get(request_id)
            if w is None:
                while len(self._work) >= MAX_TRACKED_REQUESTS:  # requests never taken: drop the oldest
                    self._work.pop(next(iter(self._work)))
                w = self._work[request_id] = RequestWork()
            into = w.local_rows if node is None else w.remote_rows.setdefault(node, {})
            for e, r in (rows or {}).items():
                into[(layer, e)] = into.get((layer, e), 0) + int(r.numel())

    def owner(self, layer: int, e: int) -> str:
        for n in self.owners.get((layer, e), ()):
            if n not in self.dead:
                return n
        raise ExpertUnavailable(f"no live node holds expert {e} of layer {layer} "
                                f"(owners {list(self.owners.get((layer, e), ()))}, down {sorted(self.dead)})")

    def _remote(self, node: str, layer: int, x: torch.Tensor, groups: Mapping[int, torch.Tensor], rid: str = ""):
        # send each row once per node: compact the union of the rows this node needs
        rows = torch.unique(torch.cat([groups[e] for e in groups]))
        pos = torch.full((x.shape[0],), -1, dtype=torch.long)
        pos[rows] = torch.arange(rows.numel())
        local_groups = {e: pos[groups[e]] for e in groups}
        reply = self.transport.call(node, encode_request(layer, x[rows], local_groups), rid)
        ys = decode_reply(reply)
        if set(ys) != set(groups) or any(ys[e].shape[0] != groups[e].numel() for e in groups):
            raise ExpertNodeDown(f"expert node {node} answered for the wrong experts")
        self._note(rid, node, layer, groups)
        return ys

    def run_experts(self, layer, x, groups):
        rid = self.request_id
        x = x.detach()
        pending = dict(groups)
        out: dict[int, torch.Tensor] = {}
        while pending:
            by_node: dict[str, dict[int, torch.Tensor]] = {}
            for e, rows in pending.items():
                by_node.setdefault(self.owner(layer, e), {})[e] = rows
            local_g = by_node.pop(self.local_node, None) if self.local is not None else None
            # remote requests go out first (concurrently), local experts run while they travel
            jobs = {}
            for node, g in by_node.items():
                par = self._pool is not None and (len(by_node) > 1 or local_g)
                jobs[node] = self._pool.submit(self._remote, node, layer, x, g, rid) if par else None
            if local_g:
                out.update({e: self.local.run(layer, e, x[rows]) for e, rows in local_g.items()})
                self._note(rid, layer=layer, rows=local_g)
                for e in local_g:
                    pending.pop(e)
            for node, fut in jobs.items():
                g = by_node[node]
                try:
                    ys = fut.result() if fut is not None else self._remote(node, layer, x, g, rid)
                except ExpertNodeDown as e:
                    log.warning("expert node %s stopped answering (%s); its experts go to replicas", node[:12], e)
                    self.dead.add(node)  # its experts go to a replica on the next round
                    self.failovers += 1
                    continue
                out.update(ys)
                for e in g:
                    pending.pop(e)
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)


@dataclass
class RequestWork:
    """What a host's expert runner did for one request: rows of its local experts, and per node the rows it
    sent there and got answers for."""
    local_rows: dict[ExpertId, int] = field(default_factory=dict)
    remote_rows: dict[str, dict[ExpertId, int]] = field(default_factory=dict)


MAX_TRACKED_REQUESTS = 4096  # bounded even if a request's receipts are never collected


def owners_from_plan(plan) -> dict[ExpertId, tuple[str, ...]]:
    """``(layer, e) -> owners`` of an :class:`~mesh402.placement.ExpertPlan`, the host first when it holds it."""
    out: dict[ExpertId, list[str]] = {}
    for sh in sorted(plan.shards, key=lambda s: (s.node_id != plan.host, s.node_id)):
        for ex in sh.experts:
            out.setdefault(tuple(ex), []).append(sh.node_id)
    return {k: tuple(v) for k, v in out.items()}


def local_workers_for_plan(source: WeightSource | str, plan, *, mode: str = "exact"):
    """In-process shards of a plan: ``(host bank or None, {node: ExpertShardWorker})`` (tests, benchmarks)."""
    src = source if isinstance(source, WeightSource) else open_source(source)
    host_bank, workers = None, {}
    for sh in plan.shards:
        if sh.node_id == plan.host:
            if sh.experts:
                host_bank = ExpertBank(src, sh.experts, mode=mode)
        else:
            workers[sh.node_id] = ExpertShardWorker(src, sh.experts, mode=mode)
    return host_bank, workers
