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

import hashlib
import json
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from typing import Any, ClassVar, Iterable, Mapping, Union

from mesh402.mesh.identity import verify

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

    @classmethod
    def from_wire(cls, d: Any) -> "Receipt":
        """A receipt that arrived from a peer: every field typed and bounded (ValueError otherwise), so a
        forged one fails here or on its signature, never deeper in the entry's accounting."""
        if not isinstance(d, dict):
            raise ValueError("a receipt must be a JSON object")
        out: dict[str, Any] = {}
        for name, kind in _WIRE_FIELDS.items():
            v = d.get(name, "" if kind is str else 0)
            if kind is int:
                if type(v) is not int or not 0 <= v <= MAX_WIRE_INT:
                    raise ValueError(f"receipt field {name} must be an integer in [0, {MAX_WIRE_INT}]")
            elif not isinstance(v, str) or len(v) > MAX_WIRE_STR:
                raise ValueError(f"receipt field {name} must be a string of at most {MAX_WIRE_STR} characters")
            out[name] = v
        return cls(**out)


MAX_WIRE_INT = 2**53  # JSON-safe; any real token count, layer index or timestamp is far below
MAX_WIRE_STR = 256  # hex ids, hashes and signatures are at most 128 characters
_WIRE_FIELDS = {"request_id": str, "stage": int, "node_id": str, "model_hash": str, "layer_start": int,
                "layer_end": int, "tokens": int, "input_hash": str, "output_hash": str, "prev": str,
                "issued_at": int, "signature": str}


def bound_chain(receipts: list[Receipt], mine: Receipt,
                hops: Iterable[tuple[str, int, int]]) -> tuple[list[Receipt], list[str]]:
    """What an entry keeps of the chain the first stage returned: the longest prefix that is this request's
    chain as the entry planned and fed it, and why the rest is not ([] when all of it is).

    Stage 0 must be the entry's own receipt (`mine`: its request id, its token count, its output hash);
    stage k >= 1 must be signed by the node of the plan's hop k, for exactly that hop's layers, name the
    same request, model and token count, and follow the receipt before it (prev and input hash). So a
    middle stage cannot drop the stages after it and claim their layers, and a chain forged with throwaway
    keys (any token count) is refused: nothing in it is signed by the planned nodes."""
    hops = list(hops)
    if not receipts or receipts[0].digest != mine.digest or receipts[0] != mine:
        return [mine], ["stage 0 is not this entry's own receipt"]
    kept: list[Receipt] = [mine]
    for k, r in enumerate(receipts[1:], start=1):
        if k > len(hops):
            return kept, [f"{len(receipts) - k} receipt(s) beyond the plan's {len(hops)} remote stage(s)"]
        node, start, end = hops[k - 1]
        p = kept[-1]
        why = ("stage number" if r.stage != k else
               f"not signed by the planned node {node[:12]}" if r.node_id != node or not verify_receipt(r) else
               f"layers [{r.layer_start}, {r.layer_end}) are not the planned [{start}, {end})"
               if (r.layer_start, r.layer_end) != (start, end) else
               "another request or model" if (r.request_id, r.model_hash) != (mine.request_id, mine.model_hash) else
               f"{r.tokens} tokens, the entry sent {mine.tokens}" if r.tokens != mine.tokens else
               "does not follow the receipt before it" if (r.prev, r.input_hash) != (p.digest, p.output_hash) else "")
        if why:
            return kept, [f"stage {k}: {why}"]
        kept.append(r)
    return kept, []


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


def verify_receipt(r: Receipt | ExpertReceipt) -> bool:
    """Whether the receipt (a stage's or an expert node's) is signed by the node it names."""
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
        self.logprobs: list[bytes] = []  # last stage: per-step logprobs returned (canonical JSON; b"": none)

    def step(self, n_tokens: int, input_hash: bytes, output_hash: bytes, record: dict[str, Any] | None = None,
             fingerprint: bytes | None = None, token: int | None = None, logprobs: bytes = b"") -> None:
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
                self.logprobs.append(bytes(logprobs))

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
