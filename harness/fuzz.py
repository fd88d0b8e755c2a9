"""Fuzzing a live node's control-frame decoders from an admitted member (issue 13): hypothesis builds
frames of every kind the wire carries (Hello, Gossip with random announcements and labels, Ping,
PeerDown, StageFrame, HttpTunnelFrame, Echo, ...) from the protobuf descriptors, signs some of the
announcements so they pass the signature check and reach the limits behind it, then mangles some of
the encodings; a member sends each case on a fresh stream of the frame's own type (or a random one).

Shared by tests/mesh/test_fuzz_live.py (1,000 cases) and benchmarks/fuzz.py (10,000)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from mesh402.mesh.framing import PROTOCOL_GENERATION, StreamType
from mesh402.mesh.gossip import sign_announcement
from mesh402.mesh.identity import NodeIdentity
from mesh402.mesh.proto import mesh_pb2 as pb
from mesh402.mesh.service import MeshService

F = FieldDescriptor
INTS = {F.TYPE_INT32: (-(2**31), 2**31 - 1), F.TYPE_SINT32: (-(2**31), 2**31 - 1), F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
        F.TYPE_UINT32: (0, 2**32 - 1), F.TYPE_FIXED32: (0, 2**32 - 1), F.TYPE_INT64: (-(2**63), 2**63 - 1),
        F.TYPE_SINT64: (-(2**63), 2**63 - 1), F.TYPE_SFIXED64: (-(2**63), 2**63 - 1), F.TYPE_UINT64: (0, 2**64 - 1),
        F.TYPE_FIXED64: (0, 2**64 - 1), F.TYPE_ENUM: (0, 64)}
# The stream each Frame body travels on.
NATURAL = {"hello": StreamType.GOSSIP, "welcome": StreamType.GOSSIP, "reject": StreamType.GOSSIP,
           "gossip": StreamType.GOSSIP, "ping": StreamType.PING, "pong": StreamType.PING,
           "peer_down": StreamType.PEER_DOWN, "peer_leaving": StreamType.PEER_LEAVING, "stage": StreamType.STAGE,
           "http": StreamType.HTTP_TUNNEL, "echo": StreamType.ECHO}


def scalar(f: FieldDescriptor) -> st.SearchStrategy[Any]:
    if f.type in INTS:
        lo, hi = INTS[f.type]
        return st.integers(lo, hi)
    if f.type == F.TYPE_BOOL:
        return st.booleans()
    if f.type == F.TYPE_STRING:
        return st.text(max_size=48)
    if f.type == F.TYPE_BYTES:
        return st.binary(max_size=96)
    if f.type == F.TYPE_FLOAT:
        return st.floats(width=32)
    return st.floats()


@functools.cache  # strategies are built once per message type, not per draw
def message(desc: Descriptor, depth: int = 2) -> st.SearchStrategy[Message]:
    """Any message of type ``desc``: a random subset of its fields with random values (nested up to ``depth``)."""
    cls = message_factory.GetMessageClass(desc)
    opt: dict[str, st.SearchStrategy[Any]] = {}
    for f in desc.fields:
        if f.type == F.TYPE_MESSAGE and f.message_type.GetOptions().map_entry:
            k, v = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            if v.type == F.TYPE_MESSAGE:
                if depth > 0:
                    opt[f.name] = st.dictionaries(scalar(k), message(v.message_type, depth - 1), max_size=3)
                continue
            opt[f.name] = st.dictionaries(scalar(k), scalar(v), max_size=6)
            continue
        one = (message(f.message_type, depth - 1) if depth > 0 else None) if f.type == F.TYPE_MESSAGE else scalar(f)
        if one is not None:
            opt[f.name] = st.lists(one, max_size=3) if f.is_repeated else one

    def build(values: dict[str, Any]) -> Message:
        m = cls()
        for name, v in values.items():
            fd = desc.fields_by_name[name]
            target = getattr(m, name) if fd.is_repeated or fd.type == F.TYPE_MESSAGE else None
            if isinstance(v, dict):
                for key, val in v.items():
                    if isinstance(val, Message):
                        target[key].CopyFrom(val)  # type: ignore[index]
                    else:
                        target[key] = val  # type: ignore[index]
            elif isinstance(v, list):
                for item in v:
                    target.add().CopyFrom(item) if isinstance(item, Message) else target.append(item)  # type: ignore[union-attr]
            elif isinstance(v, Message):
                target.CopyFrom(v)  # type: ignore[union-attr]
            else:
                setattr(m, name, v)
        return m

    return st.fixed_dictionaries({}, optional=opt).map(build)


@dataclass(frozen=True)
class Part:
    """One frame, before it is signed and mangled (so cases can be drawn before the mesh exists)."""
    frame: pb.Frame
    ours: tuple[pb.PeerAnnouncement, ...]  # gossip: announcements the member signs as its own
    fresh: tuple[bool, ...]  # ... each stamped with the current time, or left with its random one
    how: int  # 0: bits flipped, 1: random bytes instead, 2: a lying length prefix, else as encoded
    flips: tuple[tuple[int, int], ...]  # (position modulo the length, bit)
    junk: bytes
    lie: int

    def encode(self, me: NodeIdentity, mesh_id: str, now_ms: int) -> bytes:
        f = pb.Frame()
        f.CopyFrom(self.frame)
        for ann, fresh in zip(self.ours, self.fresh):
            a = pb.PeerAnnouncement()
            a.CopyFrom(ann)
            a.node_id, a.mesh_id = me.node_id, mesh_id
            a.issued_at_ms = now_ms if fresh else a.issued_at_ms
            f.gossip.announcements.append(sign_announcement(me, mesh_id, a))
        if f.WhichOneof("body") == "gossip" and self.ours:
            f.gossip.sender_id = me.node_id
        data = f.SerializeToString()
        if self.how == 0 and data:
            b = bytearray(data)
            for i, bit in self.flips:
                b[i % len(b)] ^= 1 << bit
            data = bytes(b)
        elif self.how == 1:
            data = self.junk
        return struct.pack("<I", self.lie if self.how == 2 else len(data)) + data


@dataclass(frozen=True)
class Case:
    stream_type: int  # the first byte of the stream
    parts: tuple[Part, ...]

    def encode(self, me: NodeIdentity, mesh_id: str) -> bytes:
        now_ms = int(time.time() * 1000)
        return b"".join(p.encode(me, mesh_id, now_ms) for p in self.parts)


def cases() -> st.SearchStrategy[Case]:
    """Streams a member could open: frames of any body, some announcements validly signed by the member,
    some encodings mangled (bits flipped, lying length prefixes, random bytes), some on the wrong stream."""
    bodies = [f for f in pb.Frame.DESCRIPTOR.oneofs_by_name["body"].fields]
    anns = st.lists(st.tuples(message(pb.PeerAnnouncement.DESCRIPTOR), st.booleans()), max_size=2)

    @st.composite
    def part(draw: st.DrawFn) -> Part:
        body = draw(st.sampled_from(bodies))
        f = pb.Frame(gen=PROTOCOL_GENERATION if draw(st.integers(0, 9)) else draw(st.integers(0, 2**32 - 1)))
        getattr(f, body.name).CopyFrom(draw(message(body.message_type)))
        ours = draw(anns) if body.name == "gossip" else []  # signed: they reach the limits and the table
        how = draw(st.integers(0, 9))
        return Part(f, tuple(a for a, _ in ours), tuple(b for _, b in ours), how,
                    tuple(draw(st.lists(st.tuples(st.integers(0, 2**16), st.integers(0, 7)), min_size=1, max_size=4)))
                    if how == 0 else (),
                    draw(st.binary(max_size=200)) if how == 1 else b"",
                    draw(st.integers(0, 2**32 - 1)) if how == 2 else 0)

    @st.composite
    def case(draw: st.DrawFn) -> Case:
        parts = draw(st.lists(part(), min_size=1, max_size=3))
        natural = NATURAL.get(parts[0].frame.WhichOneof("body") or "", StreamType.GOSSIP)
        stype = natural if draw(st.integers(0, 4)) else draw(st.sampled_from([*map(int, StreamType), 0, 0x0B, 0xFF]))
        return Case(int(stype), tuple(parts))

    return case()


def generate(n: int) -> list[Case]:
    """``n`` cases from hypothesis (generation only: shrinking means nothing against a node with state)."""
    out: list[Case] = []

    @settings(max_examples=n, database=None, phases=[Phase.generate], deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(cases())
    def collect(c: Case) -> None:
        out.append(c)

    collect()
    return out[:n]


@dataclass
class FuzzStats:
    sent: int = 0
    open_failures: int = 0
    replies: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


async def send_all(svc: MeshService, target: bytes, todo: list[Case], concurrency: int = 16) -> FuzzStats:
    """Each case on a fresh stream; a reply (if any) is read for a moment, then the stream is reset."""
    stats = FuzzStats()
    sem = asyncio.Semaphore(concurrency)
    t0 = time.monotonic()

    async def one(c: Case) -> None:
        async with sem:
            for attempt in range(5):  # a fuzzed PeerDown may make the node probe us: a new connection replaces ours
                try:
                    fs = await asyncio.wait_for(svc.open_stream(target, StreamType.ECHO), 5)
                    break
                except Exception as e:
                    stats.open_failures += 1
                    if len(stats.errors) < 5:
                        stats.errors.append(repr(e)[:200])
                    await asyncio.sleep(0.2)
            else:
                return
            fs.stream_type = c.stream_type  # type: ignore[assignment]  # any first byte, valid or not
            with contextlib.suppress(Exception):
                await asyncio.wait_for(fs.write_raw(c.encode(svc.identity, svc.mesh_id or "")), 5)
                await fs.finish()
                stats.sent += 1
                if await fs.recv(0.3) is not None:
                    stats.replies += 1
            await fs.reset(0)

    # The cyclic GC stays off while the streams churn: in iroh-ffi 1.2 a collection that runs an iroh
    # object's __del__ while a uniffi continuation callback holds its handle map deadlocks the process
    # (seen in this sender after a few thousand streams). Collected once, at the end.
    gc.disable()
    try:
        await asyncio.gather(*(one(c) for c in todo))
    finally:
        gc.enable()
    stats.seconds = time.monotonic() - t0
    return stats
