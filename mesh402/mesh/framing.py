"""Stream types and length-prefixed protobuf frames.

Every bidirectional stream on ALPN ``mesh402/1`` starts with one byte naming
its type (:class:`StreamType`). Frames follow, each ``[len u32 LE][Frame]``
where ``Frame`` is the protobuf envelope in ``proto/mesh.proto``. A frame
longer than the stream's limit, cut short, undecodable, carrying the wrong
protocol generation or no body raises a :class:`FrameError` subclass whose
``code`` names the counter the service increments.

The pure functions (:func:`encode_frame`, :func:`decode_frame`,
:func:`split_frames`) work on bytes and are what the property tests fuzz;
:class:`FramedStream` applies the same rules to an iroh stream pair.
"""

from __future__ import annotations

import asyncio
import enum
import struct
from typing import Callable, Optional

from google.protobuf.message import DecodeError

from mesh402.mesh import iroh_fastcopy  # noqa: F401  (must precede iroh use)
from mesh402.mesh.proto import mesh_pb2 as pb

PROTOCOL_GENERATION = 1  # of the frame envelope (Frame.gen)
# Of the mesh protocol as a whole: which messages and rules a peer follows. Exchanged in Hello/Welcome;
# a peer speaking another version is refused with a message naming both. 2: bounded announcements,
# gossip in several frames, per-peer quotas (1: the software before versions, which sends none).
PROTOCOL_VERSION = 2
HEADER = struct.Struct("<I")
# Hard ceiling for any frame; stage traffic (activations) may use it all.
MAX_FRAME_SIZE = 64 * 1024 * 1024
# Control streams (gossip, ping, peer down/leaving) and anything from a peer
# that has not been admitted yet are held to this much smaller limit.
CONTROL_MAX_FRAME = 1024 * 1024
# The HTTP tunnel carries bodies in chunks of at most 256 KiB: its frames stay small, so a peer cannot
# make a host buffer a whole 64 MiB frame before the body cap is checked.
TUNNEL_MAX_FRAME = 1024 * 1024
READ_CHUNK = 64 * 1024  # one read into iroh takes whatever has arrived, up to this much


class StreamType(enum.IntEnum):
    GOSSIP = 0x01  # Hello/Welcome on the first one, then Gossip both ways
    STAGE = 0x02  # pipeline stages: ASSIGN/OPEN, activations, tokens, receipts (serving/stage_worker.py)
    HTTP_TUNNEL = 0x03  # a request to the peer's own OpenAI routes (api/tunnel.py)
    ROUTE_REQUEST = 0x04  # reserved (never used)
    PEER_DOWN = 0x05
    PEER_LEAVING = 0x06
    PING = 0x07  # heartbeat, probe, RTT
    BLACKBOARD = 0x08  # blackboard posts: BoardSync batches, one way (mesh/board_sync.py)
    PLUGIN = 0x09  # reserved
    EXPERT = 0x0A  # MoE expert parallel: token rows to the nodes holding their experts
    ECHO = 0x0F  # diagnostics: frame round trip and bulk throughput


CONTROL_STREAMS = frozenset(
    {StreamType.GOSSIP, StreamType.PEER_DOWN, StreamType.PEER_LEAVING, StreamType.PING}
)


class FrameError(Exception):
    """A frame or stream that breaks the wire rules. ``code`` names the counter."""

    code = "frame_error"


class UnknownStreamType(FrameError):
    code = "bad_stream_type"


class FrameTooLarge(FrameError):
    code = "frame_too_large"


class TruncatedFrame(FrameError):
    code = "truncated"


class MalformedFrame(FrameError):
    code = "malformed"


class BadGeneration(FrameError):
    code = "bad_generation"


class UnexpectedFrame(FrameError):
    code = "unexpected_frame"


def version_name(v: int) -> str:
    return str(v) if v else "1 or older (no version in its handshake)"


def parse_stream_type(b: int) -> StreamType:
    try:
        return StreamType(b)
    except ValueError:
        raise UnknownStreamType(f"unknown stream type 0x{b:02x}") from None


def max_frame_for(stream_type: StreamType) -> int:
    if stream_type in CONTROL_STREAMS:
        return CONTROL_MAX_FRAME
    return TUNNEL_MAX_FRAME if stream_type == StreamType.HTTP_TUNNEL else MAX_FRAME_SIZE


def make_frame(**body) -> pb.Frame:
    """``make_frame(ping=pb.Ping(...))`` -> Frame with gen set."""
    return pb.Frame(gen=PROTOCOL_GENERATION, **body)


def encode_frame(frame: pb.Frame, max_size: int = MAX_FRAME_SIZE) -> bytes:
    if frame.gen == 0:
        frame.gen = PROTOCOL_GENERATION
    data = frame.SerializeToString()
    if len(data) > max_size:
        raise FrameTooLarge(f"frame of {len(data)} bytes exceeds {max_size}")
    return HEADER.pack(len(data)) + data


def check_length(n: int, max_size: int) -> None:
    if n > max_size:
        raise FrameTooLarge(f"frame length {n} exceeds {max_size}")


def decode_body(data: bytes, expect: Optional[tuple[str, ...]] = None) -> pb.Frame:
    """Parse one frame body (without the length prefix) and check it."""
    frame = pb.Frame()
    try:
        frame.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise MalformedFrame(f"undecodable frame: {e}") from None
    if frame.gen != PROTOCOL_GENERATION:
        raise BadGeneration(f"protocol generation {frame.gen}, expected {PROTOCOL_GENERATION}")
    kind = frame.WhichOneof("body")
    if kind is None:
        raise MalformedFrame("frame has no body")
    if expect is not None and kind not in expect:
        raise UnexpectedFrame(f"unexpected {kind} frame (expected {'/'.join(expect)})")
    return frame


def decode_frame(buf: bytes, max_size: int = MAX_FRAME_SIZE) -> tuple[pb.Frame, int]:
    """Decode the first frame in ``buf``. Returns (frame, bytes consumed)."""
    if len(buf) < HEADER.size:
        raise TruncatedFrame(f"{len(buf)} bytes is shorter than a frame header")
    (n,) = HEADER.unpack_from(buf)
    check_length(n, max_size)
    end = HEADER.size + n
    if len(buf) < end:
        raise TruncatedFrame(f"frame announces {n} bytes, {len(buf) - HEADER.size} present")
    return decode_body(bytes(buf[HEADER.size:end])), end


def split_frames(buf: bytes, max_size: int = MAX_FRAME_SIZE) -> list[pb.Frame]:
    """Decode a whole stream payload (after the type byte) into frames."""
    out = []
    pos = 0
    while pos < len(buf):
        frame, used = decode_frame(buf[pos:], max_size)
        out.append(frame)
        pos += used
    return out


def iroh_error_text(e: BaseException) -> str:
    """IrohError has an empty str(); this gives something a person can read."""
    msg = getattr(e, "message", None)
    if callable(msg):
        try:
            return msg()
        except Exception:  # pragma: no cover
            pass
    return str(e) or type(e).__name__


class FramedStream:
    """Framing over one iroh bidirectional stream (``send``, ``recv`` halves)."""

    def __init__(self, send, recv, stream_type: StreamType, max_frame: Optional[int] = None):
        self.send_stream = send
        self.recv_stream = recv
        self.stream_type = stream_type
        self.max_frame = max_frame if max_frame is not None else max_frame_for(stream_type)
        self._header_pending = False
        self._rbuf = bytearray()  # bytes read from iroh but not yet consumed as frames
        self._reading: Optional[asyncio.Future[bytes]] = None  # the rest of a frame, being read (_read_rest)
        self.bytes_in = 0
        self.bytes_out = 0
        # On a stream the peer opened: charges each frame (size, entitled) to the peer's quota before its
        # body is read, raising a FrameError when it is over (mesh402.mesh.quota).
        self.meter: Optional[Callable[[int, bool], None]] = None
        self.entitled = False

    def entitle(self) -> None:
        """The handler authorized this stream's traffic (a session with the host's grant, the host's
        expert traffic): its frames count against the peer's large work allowance from now on."""
        self.entitled = True

    @classmethod
    def opened(cls, bi, stream_type: StreamType, max_frame: Optional[int] = None) -> "FramedStream":
        """A stream we opened: the type byte goes out with the first write."""
        s = cls(bi.send(), bi.recv(), stream_type, max_frame)
        s._header_pending = True
        return s

    async def write_raw(self, data: bytes) -> None:
        if self._header_pending:
            data = bytes([int(self.stream_type)]) + data
            self._header_pending = False
        await self.send_stream.write_all(data)
        self.bytes_out += len(data)

    async def send(self, frame: pb.Frame) -> None:
        await self.write_raw(encode_frame(frame, self.max_frame))

    async def finish(self) -> None:
        if self._header_pending:
            await self.write_raw(b"")
        await self.send_stream.finish()

    async def _fill(self, n: int) -> bool:
        """Buffer at least n bytes. A frame's first read takes whatever has arrived (usually a small frame
        whole: one call into iroh, not one for the header and one for the body); the rest of a frame is
        read in one call that returns when it is all there (a read returns whatever has arrived, and a
        large frame arriving in packets would otherwise cost a call into iroh per few kilobytes). False
        on a clean end of stream with nothing buffered."""
        while len(self._rbuf) < n:
            try:
                if self._rbuf or self._reading is not None:
                    chunk = await self._read_rest(n - len(self._rbuf))
                else:
                    chunk = await self.recv_stream.read(max(READ_CHUNK, n))
            except Exception as e:  # IrohError: FinishedEarly / Reset / ConnectionLost
                if not self._rbuf:
                    raise
                raise TruncatedFrame(f"stream ended inside a frame: {iroh_error_text(e)}") from None
            if not chunk:
                if not self._rbuf:
                    return False
                raise TruncatedFrame(f"stream ended inside a frame ({len(self._rbuf)} of {n} bytes)")
            self._rbuf += chunk
        return True

    async def _read_rest(self, k: int) -> bytes:
        """Exactly ``k`` more bytes. iroh's read_exact loses what it has read if cancelled, so it runs as its
        own task: a caller's timeout leaves it running and the next call takes its bytes."""
        t = self._reading
        if t is None:
            t = self._reading = asyncio.ensure_future(self.recv_stream.read_exact(k))
            t.add_done_callback(_retrieve)
        try:
            return await asyncio.shield(t)
        finally:
            if t.done():
                self._reading = None

    def _take(self, n: int) -> bytes:
        out = bytes(self._rbuf[:n])
        del self._rbuf[:n]
        return out

    async def recv(
        self, timeout: Optional[float] = None, expect: Optional[tuple[str, ...]] = None
    ) -> Optional[pb.Frame]:
        """Next frame, or None on clean end of stream. Raises FrameError subclasses,
        asyncio.TimeoutError, or the iroh error if the connection is lost between frames."""
        if timeout is not None:
            return await asyncio.wait_for(self._recv(expect), timeout)
        return await self._recv(expect)

    async def _recv(self, expect) -> Optional[pb.Frame]:
        if not await self._fill(HEADER.size):
            return None
        (n,) = HEADER.unpack(bytes(self._rbuf[:HEADER.size]))
        check_length(n, self.max_frame)
        if self.meter is not None:
            self.meter(HEADER.size + n, self.entitled)
        if not await self._fill(HEADER.size + n):
            raise TruncatedFrame("stream ended inside a frame")
        self._take(HEADER.size)
        body = self._take(n)
        self.bytes_in += HEADER.size + n
        return decode_body(body, expect)

    async def reset(self, code: int = 1) -> None:
        if self._reading is not None:
            self._reading.cancel()
            self._reading = None
        try:
            await self.send_stream.reset(code)
        except Exception:
            pass
        try:
            await self.recv_stream.stop(code)
        except Exception:
            pass


def _retrieve(t: "asyncio.Future[bytes]") -> None:
    """A read left running by a timeout may fail once its stream is abandoned: nobody needs to hear it."""
    if not t.cancelled():
        t.exception()


async def read_stream_type(recv, timeout: float) -> StreamType:
    b = await asyncio.wait_for(recv.read(1), timeout)
    if not b:
        raise TruncatedFrame("stream closed before its type byte")
    return parse_stream_type(b[0])
