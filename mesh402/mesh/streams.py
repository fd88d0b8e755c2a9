"""Serving the streams a peer opens on its connection.

Each stream starts with one byte naming its type (mesh402.mesh.framing.StreamType). Control streams
go to the mesh's own handlers; the others to handlers registered by the layers above (stage, tunnel,
expert, ...). A stream that breaks the wire rules or times out is reset and counted; the connection
stays. When the connection's accept loop ends, ``on_lost`` hears why.
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

log = logging.getLogger("mesh402.mesh")

STREAM_TYPE_TIMEOUT = 10.0  # seconds for the type byte of a stream a peer opened

# A handler registered by the layers above: (peer id, stream); the stream is finished when it returns.
Handler = Callable[[bytes, FramedStream], Awaitable[None]]
# The mesh's own handlers for control streams get the connection itself.
ControlHandler = Callable[[PeerConn, FramedStream], Awaitable[None]]


class StreamRouter:
    def __init__(self, ctx: MeshContext, control: Mapping[StreamType, ControlHandler],
                 on_lost: Callable[[PeerConn, str], None]) -> None:
        self.ctx = ctx
        self.control = dict(control)
        self.on_lost = on_lost
        self.handlers: dict[StreamType, Handler] = {StreamType.ECHO: self._echo}

    def register(self, stream_type: StreamType, handler: Handler) -> None:
        if stream_type in framing.CONTROL_STREAMS:
            raise ValueError(f"{stream_type.name} is handled by the mesh itself")
        self.handlers[stream_type] = handler

    async def serve(self, pc: PeerConn) -> None:
        """Accept the peer's streams until the connection ends."""
        reason = "closed"
        try:
            while not pc.closed:
                bi = await pc.conn.accept_bi()
                self.ctx.tasks.spawn(self.handle(pc, bi))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            reason = framing.iroh_error_text(e)
        self.on_lost(pc, reason)

    async def handle(self, pc: PeerConn, bi: BiStream) -> None:
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
