"""The stage protocol's messages and the link they travel on.

A link is anything with `send(frame)`, `recv(timeout)`, `finish()` and `reset()`: a mesh
`FramedStream` over QUIC in production, an in-memory pipe in unit tests.

Per session the host opens one stream to the first remote stage; each stage opens one to the
next, so activations flow host -> s1 -> s2 -> ... and the sampled token comes back along the same
streams. Frames carry request id, plan epoch and activation hashes (receipts use them).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, Protocol

from mesh402.mesh.framing import FrameError, make_frame
from mesh402.mesh.identity import verify
from mesh402.mesh.proto import mesh_pb2 as pb
from mesh402.serving.work_pay import WorkTerms

K = pb.StageKind


class StageError(Exception):
    """A stage answered with an error, or broke the protocol. `node` names the stage at fault if known."""

    def __init__(self, message: str, node: str = "", code: str = "stage_error") -> None:
        super().__init__(message)
        self.node = node
        self.code = code


# Stage failures that a replacement stage can cure (others are the request's own fault).
# "bad_output": the last stage returned what it cannot have drawn honestly (a token the grammar forbids,
# outside the vocabulary, malformed logprobs): a fault of that stage, which a replacement does not share.
RECOVERABLE_CODES = frozenset({"timeout", "unreachable", "closed", "stage_error", "bad_output"})
MAX_GRANT_BYTES = 2 * 1024 * 1024  # a grant carries the session's grammar (a compiled JSON schema or tool list)


def is_link_failure(e: BaseException) -> bool:
    """A broken stream or connection: the peer went away (iroh raises its own error type)."""
    return isinstance(e, (ConnectionError, OSError, EOFError, FrameError)) or type(e).__name__ == "IrohError"


class Link(Protocol):
    async def send(self, frame: pb.Frame) -> None: ...
    async def recv(self, timeout: float | None = None, expect: tuple[str, ...] | None = None) -> pb.Frame | None: ...
    async def finish(self) -> None: ...
    async def reset(self, code: int = 1) -> None: ...
    def entitle(self) -> None: ...  # authorized traffic: the peer's large work allowance (mesh402.mesh.quota)


@dataclass(frozen=True)
class Hop:
    """One stage of a chain: which node, which layers."""

    node: str  # node id, hex
    start: int
    end: int

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "start": self.start, "end": self.end}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Hop":
        return cls(str(d["node"]), int(d["start"]), int(d["end"]))


def stage_frame(kind: int, **fields: Any) -> pb.Frame:
    params = fields.pop("params", None)
    sf = pb.StageFrame(kind=kind, **fields)
    if params:
        sf.params.update({k: str(v) for k, v in params.items()})
    return make_frame(stage=sf)


def error_frame(request_id: str, message: str, node: str, code: str = "stage_error") -> pb.Frame:
    return stage_frame(K.STAGE_KIND_ERROR, request_id=request_id, error=message, params={"node": node, "code": code})


def stage_body(frame: pb.Frame | None, where: str) -> pb.StageFrame:
    """The stage body of a frame; raises StageError for EOF, a non-stage frame or an ERROR frame."""
    if frame is None:
        raise StageError(f"{where} closed the stream", code="closed")
    if frame.WhichOneof("body") != "stage":
        raise StageError(f"{where} sent a {frame.WhichOneof('body')} frame on a stage stream", code="protocol")
    sf = frame.stage
    if sf.kind == K.STAGE_KIND_ERROR:
        raise StageError(sf.error or "stage error", node=sf.params.get("node", ""), code=sf.params.get("code", "stage_error"))
    return sf


def expect_stage(frame: pb.Frame | None, want: int, where: str) -> pb.StageFrame:
    """Like stage_body, and the frame must be of kind `want`."""
    sf = stage_body(frame, where)
    if sf.kind != want:
        raise StageError(f"{where} sent stage kind {sf.kind}, expected {want}", code="protocol")
    return sf


def dump_json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)


@dataclass(frozen=True)
class OpenGrant:
    """The host's signed permission for one session on its chain: every stage checks it before it holds
    KV for the session, and takes the rest of the chain and the session's parameters from it (nothing a
    stage forwards unsigned can steer where activations go or how the last stage samples)."""

    request_id: str
    content_hash: str
    epoch: int
    hops: tuple[Hop, ...]  # the remote stages, in order
    max_len: int
    sampling: str  # the session's SamplingParams as JSON (the last stage samples with them)
    receipts: bool  # the entry wants a signed work receipt per stage
    nonce: str  # fresh per OPEN the host sends: one grant opens one session, once
    # node id -> how the entry pays that stage with escrow vouchers (serving.work_pay); empty: no vouchers
    pay: dict[str, WorkTerms] = field(default_factory=dict)

    def payload(self) -> bytes:
        body: dict[str, Any] = {"rid": self.request_id, "ch": self.content_hash, "epoch": self.epoch,
                                "hops": [h.to_json() for h in self.hops], "max_len": self.max_len,
                                "sampling": self.sampling, "receipts": self.receipts, "nonce": self.nonce}
        if self.pay:
            body["pay"] = {node: t.to_json() for node, t in self.pay.items()}
        return dump_json(body).encode()

    def sign(self, signer: Any) -> dict[str, str]:
        """OPEN params: the grant, the host's id and its signature over the grant."""
        body = self.payload()
        return {"grant": body.decode(), "host": signer.node_id_hex, "sig": signer.sign(body).hex()}

    @classmethod
    def verify(cls, params: Any) -> tuple["OpenGrant", str]:
        """(grant, host id) from OPEN params whose signature checks out; raises StageError otherwise."""

        try:
            body, host, sig = params["grant"].encode(), str(params["host"]), bytes.fromhex(params["sig"])
            if len(body) > MAX_GRANT_BYTES or not verify(bytes.fromhex(host), body, sig):
                raise ValueError("bad signature")
            d = json.loads(body)
            pay = d.get("pay", {})
            if not isinstance(pay, dict) or len(pay) > 64:
                raise ValueError("pay terms must map at most 64 stages")
            grant = cls(str(d["rid"]), str(d["ch"]), int(d["epoch"]), tuple(Hop.from_json(h) for h in d["hops"]),
                        int(d["max_len"]), str(d["sampling"]), bool(d["receipts"]), str(d["nonce"])[:64],
                        {str(node): WorkTerms.from_json(t) for node, t in pay.items()})
        except (KeyError, ValueError, TypeError, AttributeError) as e:
            raise StageError(f"OPEN without a valid grant from the host: {e}", code="bad_grant") from None
        if not 0 < len(grant.hops) <= 64 or not 0 < grant.max_len <= 1 << 24:
            raise StageError("OPEN grant out of bounds", code="bad_grant")
        return grant, host


class MemoryLink:
    """An in-memory link end for tests: two of them make a pipe."""

    def __init__(self, inbox: asyncio.Queue, outbox: asyncio.Queue) -> None:
        self._in, self._out = inbox, outbox
        self.broken = False

    @classmethod
    def pair(cls) -> tuple["MemoryLink", "MemoryLink"]:
        a: asyncio.Queue = asyncio.Queue()
        b: asyncio.Queue = asyncio.Queue()
        return cls(a, b), cls(b, a)

    async def send(self, frame: pb.Frame) -> None:
        if self.broken:
            raise ConnectionError("link is broken")
        copy = pb.Frame()
        copy.CopyFrom(frame)
        await self._out.put(copy)

    async def recv(self, timeout: float | None = None, expect: tuple[str, ...] | None = None) -> pb.Frame | None:
        if self.broken:
            raise ConnectionError("link is broken")
        item = await asyncio.wait_for(self._in.get(), timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    async def finish(self) -> None:
        await self._out.put(None)

    def entitle(self) -> None:
        """No quota in memory."""

    async def reset(self, code: int = 1) -> None:
        await self._out.put(ConnectionResetError(f"stream reset ({code})"))

    def break_(self) -> None:
        """Simulate the peer vanishing: both directions fail from now on."""
        self.broken = True
        self._out.put_nowait(ConnectionResetError("peer vanished"))
