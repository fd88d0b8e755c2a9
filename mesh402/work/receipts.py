"""Per-stage work receipts, chained stage to stage, kept by the entry node in SQLite.

Every stage of a request signs, with its node key (Ed25519), a receipt naming: the request id, the model
hash, its layer range, the tokens it processed, the hash of the activations it received and of those it
produced, and the digest of the previous stage's receipt. A chain is valid when every signature holds,
the stages cover the model's layers in order, stage k's output hash equals stage k+1's input hash, and
each `prev` names the receipt before it. A stage therefore cannot claim more tokens or other layers
without breaking the chain that the next stage and the entry node hold.

An MoE model split by experts has no chain: its host and each expert node that ran rows for a request
sign an `ExpertReceipt` (the rows each ran per (layer, expert), and running hashes of the payloads it
received and sent), which the host collects when the request ends.

The entry node writes each request's receipts and the revenue it took for the request in one SQLite
transaction (WAL, synchronous=FULL), so a crash or restart mid-epoch loses no committed receipt, and a
request is either fully accounted or not at all.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import inspect
import json
import sqlite3
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping, Union

RECEIPT_PREFIX = b"mesh402 stage receipt v1\n"
EXPERT_RECEIPT_PREFIX = b"mesh402 expert receipt v1\n"  # its own domain: never mistaken for a stage receipt


class _Signed:
    """A receipt's signed body (its kind's prefix + canonical JSON without the signature) and digest."""
    PREFIX: ClassVar[bytes]

    def body(self) -> bytes:
        d = asdict(self)  # type: ignore[call-overload]
        d.pop("signature")
        return self.PREFIX + json.dumps(d, sort_keys=True, separators=(",", ":")).encode()

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.body() + bytes.fromhex(self.signature or "")).hexdigest()  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Receipt(_Signed):
    request_id: str
    stage: int  # 0 = first stage
    node_id: str  # hex Ed25519 public key of the stage's node
    model_hash: str
    layer_start: int
    layer_end: int  # exclusive
    tokens: int  # tokens this stage processed for the request (prefill + decode steps)
    input_hash: str  # hex; for stage 0, the hash of the prompt tokens
    output_hash: str  # hex
    prev: str = ""  # hex digest of the previous stage's receipt; "" for stage 0
    issued_at: int = 0
    signature: str = field(default="", compare=False)

    PREFIX = RECEIPT_PREFIX

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Receipt":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


ExpertRows = tuple[tuple[int, int, int], ...]  # (layer, expert, rows run), sorted


@dataclass(frozen=True)
class ExpertReceipt(_Signed):
    """One node's work on one request of an MoE expert-parallel host (serving/expert_receipts.py).

    Stage 0 is the host: it ran the trunk (everything but the routed experts) for `trunk_tokens` tokens
    and its local experts on `rows`; its hashes run over the token steps, like a solo receipt's. Stages
    1.. are expert nodes (trunk_tokens 0): `rows` they ran, hashes over the EXPERT_RUN payloads they
    received and the results they sent. Work units: workunits.MoEFlops.units(trunk_tokens, rows)."""
    request_id: str
    stage: int
    node_id: str
    model_hash: str
    host: str  # node id of the host that sent the rows (stage 0's node_id)
    trunk_tokens: int
    rows: ExpertRows
    input_hash: str
    output_hash: str
    issued_at: int = 0
    signature: str = field(default="", compare=False)

    PREFIX = EXPERT_RECEIPT_PREFIX
    kind = "expert"  # class attribute: in to_json (storage), not in the signed body

    @property
    def tokens(self) -> int:
        """Rows of routed-expert work plus trunk tokens (display only; units come from MoEFlops)."""
        return self.trunk_tokens + sum(n for _, _, n in self.rows)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "rows": [list(r) for r in self.rows], "kind": self.kind}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ExpertReceipt":
        fields_ = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        fields_["rows"] = _rows(d.get("rows", ()))
        return cls(**fields_)


AnyReceipt = Union[Receipt, ExpertReceipt]


def _rows(rows: Iterable[Any]) -> ExpertRows:
    return tuple(sorted((int(la), int(e), int(n)) for la, e, n in rows))


def receipt_from_json(d: dict[str, Any]) -> AnyReceipt:
    return ExpertReceipt.from_json(d) if d.get("kind") == ExpertReceipt.kind else Receipt.from_json(d)


def sign_expert_receipt(identity: Any, *, rows: Iterable[Any], **fields: Any) -> ExpertReceipt:
    r = ExpertReceipt(node_id=identity.node_id_hex, issued_at=int(fields.pop("issued_at", time.time())),
                      rows=_rows(rows), **fields)
    return replace(r, signature=identity.sign(r.body()).hex())


def expert_receipt_errors(r: ExpertReceipt, request_id: str, model_hash: str, host: str,
                          n_layers: int | None = None) -> list[str]:
    """Why one expert receipt does not belong to this request of this host ([] if it does)."""
    tag = f"stage {r.stage}"
    errs = []
    if not isinstance(r, ExpertReceipt):
        return [f"{tag}: not an expert receipt"]
    if not verify_receipt(r):
        errs.append(f"{tag}: bad signature")
    if (r.request_id, r.model_hash, r.host) != (request_id, model_hash, host):
        errs.append(f"{tag}: request, model or host differs")
    if (r.stage == 0) != (r.node_id == host) or (r.stage == 0) != (r.trunk_tokens > 0) or r.trunk_tokens < 0:
        errs.append(f"{tag}: only the host (stage 0) runs the trunk")
    if any(n <= 0 or la < 0 or e < 0 or (n_layers is not None and la >= n_layers) for la, e, n in r.rows):
        errs.append(f"{tag}: bad expert rows")
    if len({(la, e) for la, e, _ in r.rows}) != len(r.rows):
        errs.append(f"{tag}: an expert is listed twice")
    return errs


def expert_errors(receipts: Iterable[ExpertReceipt], n_layers: int | None = None) -> list[str]:
    """Why a request's expert receipts are not one valid set ([] if they are): the host's (stage 0) and at
    most one per expert node, all signed and naming the same request, model and host. Stages may skip
    numbers: an expert node that did not answer the host's receipt request is simply absent."""
    rs = sorted(receipts, key=lambda r: r.stage)
    if not rs or rs[0].stage != 0:
        return ["no host receipt (stage 0)"]
    h = rs[0]
    errs = [e for r in rs for e in expert_receipt_errors(r, h.request_id, h.model_hash, h.node_id, n_layers)]
    if len({r.stage for r in rs}) != len(rs) or len({r.node_id for r in rs}) != len(rs):
        errs.append("a stage or node appears twice")
    return errs


def receipt_errors(receipts: list[AnyReceipt], n_layers: int | None = None) -> list[str]:
    """chain_errors for a pipeline or solo request, expert_errors for an MoE expert-parallel one."""
    kinds = {isinstance(r, ExpertReceipt) for r in receipts}
    if kinds == {True}:
        return expert_errors(receipts, n_layers)  # type: ignore[arg-type]
    if kinds == {True, False}:
        return ["stage and expert receipts mixed in one request"]
    return chain_errors(receipts, n_layers)  # type: ignore[arg-type]


def sign_receipt(identity: Any, **fields: Any) -> Receipt:
    """A receipt signed by `identity` (mesh402.mesh.identity.NodeIdentity); node_id is filled in."""
    r = Receipt(node_id=identity.node_id_hex, issued_at=int(fields.pop("issued_at", time.time())), **fields)
    return replace(r, signature=identity.sign(r.body()).hex())


def verify_receipt(r: Receipt) -> bool:
    from mesh402.mesh.identity import verify
    try:
        return verify(bytes.fromhex(r.node_id), r.body(), bytes.fromhex(r.signature))
    except ValueError:
        return False


def chain_errors(receipts: Iterable[Receipt], n_layers: int | None = None) -> list[str]:
    """Why a request's receipts do not form a valid chain ([] if they do)."""
    rs = sorted(receipts, key=lambda r: r.stage)
    errs: list[str] = []
    if not rs:
        return ["no receipts"]
    first = rs[0]
    for i, r in enumerate(rs):
        tag = f"stage {r.stage}"
        if r.stage != i:
            errs.append(f"{tag}: stages are not numbered 0..{len(rs) - 1}")
        if not verify_receipt(r):
            errs.append(f"{tag}: bad signature")
        if (r.request_id, r.model_hash, r.tokens) != (first.request_id, first.model_hash, first.tokens):
            errs.append(f"{tag}: request, model or token count differs from stage 0")
        if r.layer_start >= r.layer_end:
            errs.append(f"{tag}: empty layer range")
        if i == 0:
            if r.layer_start != 0:
                errs.append(f"{tag}: first stage does not start at layer 0")
            if r.prev:
                errs.append(f"{tag}: first stage names a previous receipt")
        else:
            p = rs[i - 1]
            if r.layer_start != p.layer_end:
                errs.append(f"{tag}: layers [{r.layer_start},{r.layer_end}) do not follow [{p.layer_start},{p.layer_end})")
            if r.input_hash != p.output_hash:
                errs.append(f"{tag}: input hash is not the previous stage's output hash")
            if r.prev != p.digest:
                errs.append(f"{tag}: prev does not name the previous receipt")
    if n_layers is not None and rs[-1].layer_end != n_layers:
        errs.append(f"last stage ends at layer {rs[-1].layer_end}, model has {n_layers}")
    return errs


class StageTally:
    """What one stage accumulates over a request, step by step, to sign its receipt at the end.

    A request's input and output hashes are running hashes over the per-step activation hashes (of the
    bytes received and of the bytes sent on). Both use the same domain, so stage k's output tally equals
    stage k+1's input tally exactly when every payload arrived unchanged and in order. With `keep=True`
    (remote stages of a paid request) the per-step hashes and input records are kept too, so the stage
    can reveal any step after the fact (work.evidence)."""

    DOMAIN = b"mesh402 activation tally v1"

    def __init__(self, request_id: str, model_hash: str, layer_start: int, layer_end: int, *,
                 keep: bool = False) -> None:
        self.request_id, self.model_hash = request_id, model_hash
        self.layer_start, self.layer_end = layer_start, layer_end
        self.tokens = 0
        self._in = hashlib.sha256(self.DOMAIN)
        self._out = hashlib.sha256(self.DOMAIN)
        self.keep = keep
        self.in_hashes: list[bytes] = []
        self.out_hashes: list[bytes] = []
        self.records: list[dict[str, Any]] = []  # per step: kind, pos, n_real, dtype, shape, data
        self.prefix_records: list[dict[str, Any]] = []  # steps of a restored KV prefix (an earlier request's)
        self.fingerprints: list[bytes] = []  # last stage: per-step logits fingerprint
        self.tokens_out: list[int] = []  # last stage: per-step token (-1: none drawn)
        self.sampling = ""  # last stage: the session's sampling parameters (JSON), revealed with a step

    def step(self, n_tokens: int, input_hash: bytes, output_hash: bytes, record: dict[str, Any] | None = None,
             fingerprint: bytes | None = None, token: int | None = None) -> None:
        self.tokens += int(n_tokens)
        self._in.update(bytes(input_hash))
        self._out.update(bytes(output_hash))
        if self.keep:
            self.in_hashes.append(bytes(input_hash))
            self.out_hashes.append(bytes(output_hash))
            if record is not None:
                self.records.append(record)
            if fingerprint is not None:
                self.fingerprints.append(fingerprint)
                self.tokens_out.append(-1 if token is None else int(token))

    def digests(self) -> tuple[str, str]:
        """The running input and output hashes so far (hex)."""
        return self._in.hexdigest(), self._out.hexdigest()

    def receipt(self, identity: Any, stage: int, prev: str = "") -> Receipt:
        in_hash, out_hash = self.digests()
        return sign_receipt(identity, request_id=self.request_id, stage=stage, model_hash=self.model_hash,
                            layer_start=self.layer_start, layer_end=self.layer_end, tokens=self.tokens,
                            input_hash=in_hash, output_hash=out_hash, prev=prev)


class ExpertTally:
    """What an expert node accumulates over one request of a host: rows run per (layer, expert) and
    running hashes (the StageTally domain) over the payloads received and the results sent."""

    def __init__(self, request_id: str, model_hash: str, host: str) -> None:
        self.request_id, self.model_hash, self.host = request_id, model_hash, host
        self.rows: dict[tuple[int, int], int] = {}
        self._in = hashlib.sha256(StageTally.DOMAIN)
        self._out = hashlib.sha256(StageTally.DOMAIN)

    def step(self, rows: Mapping[tuple[int, int], int], input_hash: bytes, output_hash: bytes) -> None:
        add_rows(self.rows, rows)
        self._in.update(bytes(input_hash))
        self._out.update(bytes(output_hash))

    def receipt(self, identity: Any, stage: int) -> ExpertReceipt:
        return sign_expert_receipt(identity, request_id=self.request_id, stage=int(stage), model_hash=self.model_hash,
                                   host=self.host, trunk_tokens=0, rows=flat_rows(self.rows),
                                   input_hash=self._in.hexdigest(), output_hash=self._out.hexdigest())


def add_rows(into: dict[tuple[int, int], int], rows: Mapping[tuple[int, int], int]) -> None:
    for k, n in rows.items():
        into[k] = into.get(k, 0) + int(n)


def flat_rows(rows: Mapping[tuple[int, int], int]) -> ExpertRows:
    return _rows((la, e, n) for (la, e), n in rows.items() if n > 0)


class ExpertTallies:
    """An expert node's open tallies, one per (host, request id). Bounded, because nothing forces a host to
    ask for its receipts: a tally idle for `max_idle_s` is dropped, and past `max_open` the least recently
    used one is. Keyed by host too, so a host can only have its own requests signed. Thread-safe: the
    expert thread records, the event loop takes."""

    def __init__(self, max_open: int = 4096, max_idle_s: float = 3600.0, clock: Any = time.monotonic) -> None:
        self.max_open, self.max_idle_s, self.clock = int(max_open), float(max_idle_s), clock
        self._open: OrderedDict[tuple[str, str], tuple[float, ExpertTally]] = OrderedDict()
        self._lock = threading.Lock()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._open)

    def record(self, host: str, request_id: str, model_hash: str, rows: Mapping[tuple[int, int], int],
               input_hash: bytes, output_hash: bytes) -> None:
        key = (host, request_id)
        with self._lock:
            now = self.clock()
            _, tally = self._open.pop(key, (now, None))
            tally = tally or ExpertTally(request_id, model_hash, host)
            tally.step(rows, input_hash, output_hash)
            self._open[key] = (now, tally)
            self._evict(now)

    def _evict(self, now: float) -> None:
        while self._open:
            t, _ = next(iter(self._open.values()))
            if len(self._open) <= self.max_open and now - t <= self.max_idle_s:
                return
            self._open.popitem(last=False)
            self.dropped += 1

    def take(self, host: str, request_id: str) -> ExpertTally | None:
        """The request's tally, removed (a receipt is signed once)."""
        with self._lock:
            self._evict(self.clock())
            got = self._open.pop((host, request_id), None)
        return got[1] if got else None


def token_step_hash(tokens: Iterable[int]) -> bytes:
    """A step whose input (or output) is token ids rather than activations: the first stage's input, and
    a solo request's input and sampled token."""
    return hashlib.sha256(json.dumps([int(t) for t in tokens], separators=(",", ":")).encode()).digest()


@dataclass(frozen=True)
class SoloReceipts:
    """A paid entry that serves a model whole signs one receipt per request covering all its layers, so
    its own work counts in the epoch split like a stage's (otherwise its solo revenue would be shared
    out among the nodes of its split requests)."""
    signer: Any  # NodeIdentity
    sink: Any  # EntryReceipts
    content_hash: str
    n_layers: int

    def tally(self, request_id: str) -> "StageTally":
        return StageTally(request_id, self.content_hash, 0, self.n_layers)

    def finish(self, tally: "StageTally") -> Any:
        """Sign and hand the receipt to the sink; what the sink returned (see `kept`)."""
        return self.sink([tally.receipt(self.signer, 0)], None) if tally.tokens else None


def running_hash(step_hashes: Iterable[bytes]) -> str:
    """The tally over a list of per-step hashes (what a receipt's input_hash/output_hash commit to)."""
    h = hashlib.sha256(StageTally.DOMAIN)
    for x in step_hashes:
        h.update(bytes(x))
    return h.hexdigest()


def epoch_of(ts: float, epoch_seconds: int) -> int:
    return int(ts) // int(epoch_seconds)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    request_id TEXT PRIMARY KEY, epoch INTEGER NOT NULL, revenue INTEGER NOT NULL, model_hash TEXT NOT NULL,
    created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS receipts (
    request_id TEXT NOT NULL, stage INTEGER NOT NULL, node_id TEXT NOT NULL, digest TEXT NOT NULL,
    body TEXT NOT NULL, units INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (request_id, stage));
CREATE INDEX IF NOT EXISTS requests_epoch ON requests(epoch);
CREATE TABLE IF NOT EXISTS payouts (
    epoch INTEGER NOT NULL, node_id TEXT NOT NULL, units INTEGER NOT NULL, amount INTEGER NOT NULL,
    account TEXT, PRIMARY KEY (epoch, node_id));
CREATE TABLE IF NOT EXISTS epochs (
    epoch INTEGER PRIMARY KEY, revenue INTEGER NOT NULL, epoch_id TEXT, root TEXT, tx TEXT, closed_at REAL);
CREATE TABLE IF NOT EXISTS spot_checks (
    request_id TEXT NOT NULL, stage INTEGER NOT NULL, node_id TEXT NOT NULL, digest TEXT NOT NULL,
    body BLOB NOT NULL, PRIMARY KEY (request_id, stage));
CREATE TABLE IF NOT EXISTS validations (
    epoch INTEGER NOT NULL, node_id TEXT NOT NULL, request_hash TEXT NOT NULL, validator TEXT NOT NULL,
    agent_id INTEGER, statement TEXT NOT NULL, verdict TEXT, PRIMARY KEY (epoch, node_id));
"""


class ReceiptStore:
    """The entry node's receipts and per-request revenue (`<home>/receipts.sqlite`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._db.close()

    def record(self, receipts: list[AnyReceipt], *, revenue: int, epoch: int, n_layers: int | None = None,
               flops: Any = None, checks: Iterable[Any] = (), unpaid: Iterable[int] = (),
               expert_flops: Any = None) -> None:
        """Store one request's receipts (a pipeline/solo chain, or an MoE request's expert receipts), its
        revenue and its spot checks (work.evidence) atomically; refuses receipts that do not verify.
        With `flops(model_hash, start, end)` (stage receipts) and `expert_flops(model_hash)` -> MoEFlops
        (expert receipts), each receipt's work units are computed and stored now. Stages in `unpaid` (they
        did not reveal an audited step) earn 0 units."""
        errs = receipt_errors(receipts, n_layers)
        if errs:
            raise ValueError("receipt chain rejected: " + "; ".join(errs))
        rid, model = receipts[0].request_id, receipts[0].model_hash
        unpaid = set(unpaid)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT INTO requests VALUES (?,?,?,?,?)", (rid, int(epoch), int(revenue), model, time.time()))
                self._db.executemany("INSERT INTO receipts VALUES (?,?,?,?,?,?)", [
                    (r.request_id, r.stage, r.node_id, r.digest, json.dumps(r.to_json()),
                     0 if r.stage in unpaid else receipt_units(r, flops, expert_flops))
                    for r in receipts])
                self._db.executemany("INSERT INTO spot_checks VALUES (?,?,?,?,?)", [
                    (c.request_id, c.stage, c.node_id, c.digest, zlib.compress(c.body())) for c in checks])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def receipts(self, request_id: str) -> list[AnyReceipt]:
        rows = self._db.execute("SELECT body FROM receipts WHERE request_id=? ORDER BY stage", (request_id,)).fetchall()
        return [receipt_from_json(json.loads(b)) for (b,) in rows]

    def count(self, epoch: int | None = None) -> int:
        if epoch is None:
            return int(self._db.execute("SELECT COUNT(*) FROM receipts").fetchone()[0])
        return int(self._db.execute("SELECT COUNT(*) FROM receipts JOIN requests USING (request_id) WHERE epoch=?",
                                    (int(epoch),)).fetchone()[0])

    def revenue(self, epoch: int) -> int:
        return int(self._db.execute("SELECT COALESCE(SUM(revenue),0) FROM requests WHERE epoch=?", (int(epoch),)).fetchone()[0])

    def epoch_receipts(self, epoch: int) -> Iterable[AnyReceipt]:
        for (b,) in self._db.execute("SELECT r.body FROM receipts r JOIN requests q USING (request_id) WHERE q.epoch=? "
                                     "ORDER BY r.request_id, r.stage", (int(epoch),)):
            yield receipt_from_json(json.loads(b))

    def work_units(self, epoch: int, flops: Any = None, expert_flops: Any = None) -> dict[str, int]:
        """Work units per node in an epoch: Σ over its receipts of flops(model, layers) · tokens, or for
        expert receipts expert_flops(model).units(...) (without `flops`, or for expert receipts without
        `expert_flops`: the units stored when the receipts were recorded)."""
        units: dict[str, int] = {}
        if flops is None:
            for node, u in self._db.execute("SELECT r.node_id, SUM(r.units) FROM receipts r JOIN requests q "
                                            "USING (request_id) WHERE q.epoch=? GROUP BY r.node_id", (int(epoch),)):
                units[node] = int(u)
            return units
        for b, stored in self._db.execute("SELECT r.body, r.units FROM receipts r JOIN requests q USING (request_id) "
                                          "WHERE q.epoch=? ORDER BY r.request_id, r.stage", (int(epoch),)):
            r = receipt_from_json(json.loads(b))
            u = stored if isinstance(r, ExpertReceipt) and expert_flops is None else receipt_units(r, flops, expert_flops)
            units[r.node_id] = units.get(r.node_id, 0) + int(u)
        return units

    def unpaid_epochs(self) -> list[int]:
        """Epochs with receipts and no payout on record (the `epochs` table), oldest first."""
        return [int(e) for (e,) in self._db.execute(
            "SELECT DISTINCT epoch FROM requests WHERE epoch NOT IN (SELECT epoch FROM epochs) ORDER BY epoch")]

    def payout_recorded(self, epoch: int) -> bool:
        return self._db.execute("SELECT 1 FROM epochs WHERE epoch=?", (int(epoch),)).fetchone() is not None

    def save_payout(self, epoch: int, revenue: int, rows: dict[str, tuple[int, int, str | None]], *,
                    epoch_id: str | None = None, root: str | None = None, tx: str | None = None) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT OR REPLACE INTO epochs VALUES (?,?,?,?,?,?)",
                                 (int(epoch), int(revenue), epoch_id, root, tx, time.time()))
                self._db.execute("DELETE FROM payouts WHERE epoch=?", (int(epoch),))
                self._db.executemany("INSERT INTO payouts VALUES (?,?,?,?,?)",
                                     [(int(epoch), n, int(u), int(a), acct) for n, (u, a, acct) in rows.items()])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def spot_checks(self, epoch: int, node_id: str | None = None) -> list[Any]:
        """The spot checks of an epoch's audited requests (of one node), in request order."""
        from mesh402.work.evidence import SpotCheck
        q = ("SELECT c.body FROM spot_checks c JOIN requests q USING (request_id) WHERE q.epoch=?"
             + (" AND c.node_id=?" if node_id else "") + " ORDER BY q.created_at, c.request_id, c.stage")
        args = (int(epoch), node_id) if node_id else (int(epoch),)
        return [SpotCheck.from_json(json.loads(zlib.decompress(b))) for (b,) in self._db.execute(q, args)]

    def save_validation(self, epoch: int, node_id: str, request_hash: str, validator: str, agent_id: int | None,
                        statement: str, verdict: str | None = None) -> None:
        """The validation request made for a node's work in an epoch (hex keccak hash; verdict JSON once known)."""
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO validations VALUES (?,?,?,?,?,?,?)",
                             (int(epoch), node_id, request_hash, validator, agent_id, statement, verdict))

    def validations(self, epoch: int) -> dict[str, dict[str, Any]]:
        """node id -> {request_hash, validator, agent_id, statement, verdict} for an epoch."""
        rows = self._db.execute("SELECT node_id, request_hash, validator, agent_id, statement, verdict FROM validations "
                                "WHERE epoch=?", (int(epoch),)).fetchall()
        return {n: {"request_hash": h, "validator": v, "agent_id": a, "statement": s, "verdict": d}
                for n, h, v, a, s, d in rows}

    def earnings(self) -> list[dict[str, Any]]:
        """Per node and epoch: work units, amount paid, payout account (for status and the management API)."""
        rows = self._db.execute("SELECT p.epoch, p.node_id, p.units, p.amount, p.account, e.tx FROM payouts p "
                                "LEFT JOIN epochs e USING (epoch) ORDER BY p.epoch, p.node_id").fetchall()
        return [{"epoch": e, "node_id": n, "units": u, "amount": a, "account": acct, "tx": tx}
                for e, n, u, a, acct, tx in rows]


def receipt_units(r: AnyReceipt, flops: Any, expert_flops: Any) -> int:
    """A receipt's work units (0 without the FLOPs table its kind needs)."""
    if isinstance(r, ExpertReceipt):
        return expert_flops(r.model_hash).units(r.trunk_tokens, r.rows) if expert_flops else 0
    return flops(r.model_hash, r.layer_start, r.layer_end) * r.tokens if flops else 0


class EntryReceipts:
    """The entry node's receipt sink: each request's verified chain goes to <home>/receipts.sqlite in the
    epoch of its arrival (epoch length `epoch_s`), written off the event loop. The serving code waits for
    the write (`kept`) before the answer's last byte goes out, so a kill -9 after an answer loses no
    receipt of it."""

    def __init__(self, home: Path, epoch_s: int = 3600) -> None:
        self.store = ReceiptStore(Path(home) / "receipts.sqlite")
        self.epoch_s = int(epoch_s)
        self.kept = 0
        self.rejected = 0
        self.audited = 0
        self._models: dict[str, Any] = {}  # model hash -> GGUF path, or its FLOPs table once read
        self._flops: dict[tuple[str, int, int], int] = {}
        self._moe: dict[str, Any] = {}

    def add_model(self, model_hash: str, path: Any) -> None:
        """Where a model's GGUF file is, so receipts for it get work units from its tensor table."""
        self._models.setdefault(model_hash, path)

    def _meta(self, model_hash: str) -> Any:
        src = self._models.get(model_hash)
        if src is None:
            raise KeyError(f"no model file known for {model_hash[:16]}")
        if not hasattr(src, "n_layers"):
            from mesh402.models.gguf_meta import read_gguf_meta
            src = self._models[model_hash] = read_gguf_meta(src)
        return src

    def flops(self, model_hash: str, start: int, end: int) -> int:
        key = (model_hash, start, end)
        if key not in self._flops:
            from mesh402.work.units import flops_per_token
            self._flops[key] = flops_per_token(self._meta(model_hash), start, end)
        return self._flops[key]

    def expert_flops(self, model_hash: str) -> Any:
        """workunits.MoEFlops of a model (for expert receipts), memoised."""
        if model_hash not in self._moe:
            from mesh402.work.units import moe_flops
            self._moe[model_hash] = moe_flops(self._meta(model_hash))
        return self._moe[model_hash]

    def _record(self, receipts: list[AnyReceipt], evidence: list[Any] | None = None) -> None:
        import logging

        from mesh402.work.evidence import NO_REVEAL, spot_checks  # (it imports this module)
        try:
            known = bool(receipts) and receipts[0].model_hash in self._models
            checks = spot_checks(receipts, evidence) if evidence is not None and not receipt_errors(receipts) else []
            silent = [c.stage for c in checks if c.fault == NO_REVEAL]  # audited, revealed nothing: not paid for it
            self.store.record(receipts, revenue=0, epoch=epoch_of(time.time(), self.epoch_s),
                              flops=self.flops if known else None, expert_flops=self.expert_flops if known else None,
                              checks=[c for c in checks if c.fault != NO_REVEAL], unpaid=silent)
            self.kept += 1
            self.audited += bool(checks)
        except Exception as e:
            self.rejected += 1
            logging.getLogger(__name__).warning("receipts for %s not kept: %s",
                                                receipts[0].request_id if receipts else "?", e)

    def __call__(self, receipts: list[AnyReceipt], evidence: list[Any] | None = None) -> Any:
        """Start writing a request's receipts off the event loop; the future returned is done once they are
        committed (await it through `kept` before the answer's end goes out). Without a loop: written now."""
        try:
            return asyncio.get_running_loop().run_in_executor(None, self._record, list(receipts), evidence)
        except RuntimeError:  # no loop: write now
            self._record(list(receipts), evidence)
            return None


async def kept(pending: Any) -> None:
    """Wait for what a receipt sink returned (a future or awaitable of the write, or None when it wrote at
    once). Shielded: a caller cancelled now (a client gone) does not cut the write off."""
    if isinstance(pending, concurrent.futures.Future):
        pending = asyncio.wrap_future(pending)
    if inspect.isawaitable(pending):
        await asyncio.shield(pending)
