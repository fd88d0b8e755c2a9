"""One member flooding another: many ECHO streams, each writing large frames as fast as QUIC takes
them (the echo is asked to discard the payload, so the replies are small). Shared by the flood tests
(tests/mesh/test_member_abuse.py) and benchmarks/flood.py.

The sender hands QUIC ``batch`` frames per write (one call into iroh per batch, not per frame), so one
Python process on one core can offer thousands of 64 KiB frames a second; how many it gets through is
up to the target's flow control.

Counts what the sender managed to write (offered frames) and how often the target reset a stream or
refused a new one; what the target accepted is in its own counters (``quota.*``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from mesh402.mesh.framing import CONTROL_MAX_FRAME, StreamType, encode_frame, make_frame
from mesh402.mesh.proto import mesh_pb2 as pb
from mesh402.mesh.service import MeshService


@dataclass
class FloodStats:
    seconds: float = 0.0
    frames: int = 0  # written by the sender (QUIC took them)
    bytes: int = 0
    replies: int = 0  # echoes back: frames the target accepted and handled
    resets: int = 0  # streams the target reset or stopped under us
    open_failures: int = 0  # a new stream could not be opened (e.g. the connection was closed)

    @property
    def frames_per_s(self) -> float:
        return self.frames / self.seconds if self.seconds else 0.0


def echo_bytes(payload: int) -> bytes:
    """One ECHO frame of about ``payload`` bytes, encoded once (the flood writes the same bytes)."""
    return encode_frame(make_frame(echo=pb.Echo(payload=b"\x5a" * payload, discard=True)), CONTROL_MAX_FRAME)


async def flood(svc: MeshService, target: bytes, seconds: float, streams: int = 64, payload: int = 64 * 1024,
                stop: asyncio.Event | None = None, until_cut_off: bool = False, batch: int = 4) -> FloodStats:
    """Flood ``target`` from ``svc`` for ``seconds`` (or until ``stop`` is set, or with ``until_cut_off``
    until the target closes the connection) on ``streams`` streams at once, ``batch`` frames per write."""
    data = echo_bytes(payload) * batch
    st = FloodStats()
    t0 = time.monotonic()
    end = t0 + seconds

    def over() -> bool:
        return (time.monotonic() >= end or (stop is not None and stop.is_set())
                or (until_cut_off and target not in svc.conns))

    async def drain(fs) -> None:  # read the small replies so the echo never blocks on us
        with contextlib.suppress(Exception):
            while await fs.recv(5.0) is not None:
                st.replies += 1

    async def one() -> None:
        while not over():
            try:
                fs = await asyncio.wait_for(svc.open_stream(target, StreamType.ECHO), 2.0)
            except Exception:
                st.open_failures += 1
                await asyncio.sleep(0.05)
                continue
            reader = asyncio.ensure_future(drain(fs))
            try:
                while not over():
                    async with asyncio.timeout(2.0):
                        await fs.write_raw(data)
                    st.frames += batch
                    st.bytes += len(data)
            except Exception:
                st.resets += 1
            finally:
                reader.cancel()
                with contextlib.suppress(BaseException):
                    await reader
                await fs.reset(0)

    await asyncio.gather(*(one() for _ in range(streams)))
    st.seconds = time.monotonic() - t0
    return st
