"""Serving the streams a peer opens on its connection.

Each stream starts with one byte naming its type (mesh402.mesh.framing.StreamType). Control streams
go to the mesh's own handlers; the others to handlers registered by the layers above (stage, tunnel,
expert, ...). A stream that breaks the wire rules, times out or goes over the peer's quota is reset and
counted; the connection stays, unless the peer keeps going over its quota (``on_abuse``). When the
connection's accept loop ends, ``on_lost`` hears why.

The peer's stream credit is spent before each stream is accepted, and every frame on it is charged to the
peer's quota before its body is read (mesh402.mesh.quota). A peer out of allowance gets none of its new
streams accepted until it refills.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Awaitable, Callable, Mapping

from mesh402.mesh import framing
from mesh402.mesh.context import MeshContext
from mesh402.mesh.conns import BiStream, PeerConn
from mesh402.mesh.framing import FrameError, FramedStream, StreamType
from mesh402.mesh.identity import short_id
from mesh402.mesh.quota import PeerQuota, QuotaExceeded

log = logging.getLogger("mesh402.mesh")

STREAM_TYPE_TIMEOUT = 10.0  # seconds for the type byte of a stream a peer opened

# A handler registered by the layers above: (peer id, stream); the stream is finished when it returns.
Handler = Callable[[bytes, FramedStream], Awaitable[None]]
# The mesh's own handlers for control streams get the connection itself.
ControlHandler = Callable[[PeerConn, FramedStream], Awaitable[None]]


class StreamRouter:
    def __init__(self, ctx: MeshContext, control: Mapping[StreamType, ControlHandler],
                 on_lost: Callable[[PeerConn, str], None], on_abuse: Callable[[PeerConn], None]) -> None:
        self.ctx = ctx
        self.control = dict(control)
        self.on_lost = on_lost
        self.on_abuse = on_abuse  # the peer kept going over its quota
        self.handlers: dict[StreamType, Handler] = {StreamType.ECHO: self._echo}

    def register(self, stream_type: StreamType, handler: Handler) -> None:
        if stream_type in framing.CONTROL_STREAMS:
            raise ValueError(f"{stream_type.name} is handled by the mesh itself")
        self.handlers[stream_type] = handler

    async def serve(self, pc: PeerConn) -> None:
        """Accept the peer's streams until the connection ends."""
        reason = "closed"
        ctx = self.ctx
        quota = ctx.quotas.of(pc.node_id)
        try:
            while not pc.closed:
                # Out of stream credit, or out of the allowance a new stream's first frame is charged to:
                # accept nothing, QUIC holds the peer back at its own end meanwhile.
                wait = quota.refill_wait(ctx.clock.monotonic())
                if wait > 0:
                    quota.streams_delayed += 1
                    ctx.counters["quota.streams_delayed"] += 1
                    await ctx.clock.sleep(wait)
                    continue
                quota.streams.take(1, ctx.clock.monotonic())
                bi = await pc.conn.accept_bi()
                ctx.tasks.spawn(self.handle(pc, bi))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            reason = framing.iroh_error_text(e)
        self.on_lost(pc, reason)

    async def handle(self, pc: PeerConn, bi: BiStream) -> None:
        quota = self.ctx.quotas.of(pc.node_id)
        quota.open_streams += 1
        try:
            await self._handle(pc, bi, quota)
        finally:
            quota.open_streams -= 1

    async def _handle(self, pc: PeerConn, bi: BiStream, quota: PeerQuota) -> None:
        ctx = self.ctx
        recv = bi.recv()
        try:
            stype = await framing.read_stream_type(recv, STREAM_TYPE_TIMEOUT)
        except FrameError as e:
            ctx.counters[f"frame.{e.code}"] += 1
            await FramedStream(bi.send(), recv, StreamType.GOSSIP).reset(2)
            return
        except Exception:
            return
        fs = FramedStream(bi.send(), recv, stype)
        fs.meter = lambda n, entitled: quota.charge(n, entitled, ctx.clock.monotonic())
        try:
            own = self.control.get(stype)
            if own is not None:
                await own(pc, fs)
            else:
                handler = self.handlers.get(stype)
                if handler is None:
                    ctx.counters["stream.no_handler"] += 1
                    await fs.reset(3)
                    return
                ctx.liveness.seen(pc.node_id)
                await handler(pc.node_id, fs)
                with contextlib.suppress(Exception):
                    await fs.finish()
        except QuotaExceeded:
            ctx.counters["quota.frames_refused"] += 1
            await fs.reset(6)
            if quota.abusive(ctx.clock.monotonic()) and not pc.closed:
                self.on_abuse(pc)
        except FrameError as e:
            ctx.counters[f"frame.{e.code}"] += 1
            await fs.reset(2)
        except asyncio.TimeoutError:
            ctx.counters["stream.timeout"] += 1
            await fs.reset(4)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            ctx.counters["stream.error"] += 1
            log.debug("stream %s from %s failed: %s", stype.name, short_id(pc.node_id), framing.iroh_error_text(e))
            await fs.reset(5)

    async def _echo(self, peer_id: bytes, fs: FramedStream) -> None:
        """Diagnostics: send every frame back (without its payload when asked to discard it)."""
        while True:
            frame = await fs.recv(self.ctx.timers.stream_idle_timeout, expect=("echo",))
            if frame is None:
                return
            if frame.echo.discard:
                frame.echo.payload = b""
            await fs.send(frame)
