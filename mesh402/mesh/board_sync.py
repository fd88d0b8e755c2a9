"""How blackboard posts travel (the store and its rules are mesh402.mesh.board).

BLACKBOARD streams carry `BoardSync` frames one way: the opener sends batches of posts and finishes.
A node floods each post it takes for the first time to its connected peers (not back to the peer it came
from); every receiver checks and caps it again before relaying (a post already held is not relayed, so a
flood dies out). When a peer connects, each side sends it every live post (a restarted or partitioned node
catches up). The board is kept in `<home>/board.json` (written atomically), so a restarted node keeps
the posts within their TTL.

Deadlines and caps on what a peer sends: each frame within `stream_idle_timeout`, at most 64 posts a
frame and 32 frames a stream (more: the stream is reset); the relay queue holds at most 4096 posts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

from mesh402.home import write_atomic
from mesh402.mesh.board import Board, BoardError, BoardLimits, Stored
from mesh402.mesh.framing import FramedStream, StreamType, make_frame
from mesh402.mesh.proto import mesh_pb2 as pb
from mesh402.mesh.tasks import TaskGroup

if TYPE_CHECKING:
    from mesh402.mesh.service import MeshService

log = logging.getLogger("mesh402.mesh")

BOARD_FILE = "board.json"
POSTS_PER_FRAME = 64
FRAMES_PER_STREAM = 32
RELAY_QUEUE = 4096
FLUSH_S = 0.2  # new posts go out in batches this often
SAVE_S = 1.0  # the home copy is rewritten at most this often
SEND_TIMEOUT_S = 10.0


class BoardSync:
    def __init__(self, mesh: MeshService, home: Path, limits: BoardLimits | None = None) -> None:
        self.mesh = mesh
        self.path = Path(home) / BOARD_FILE
        self.board = Board(lambda: mesh.mesh_id or "", self._is_member, mesh.identity, mesh.clock,
                           limits or BoardLimits())
        self._relay: deque[tuple[pb.BoardPost, bytes | None]] = deque()
        self._wake = asyncio.Event()
        self._tasks = TaskGroup(self.board.counters)  # the loops and the sends to peers

    def _is_member(self, author: bytes) -> bool:
        if author == self.mesh.node_id:
            return True
        g = self.mesh.gossip
        return g is not None and g.get(author) is not None

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        with contextlib.suppress(OSError):
            n = self.board.load(self.path.read_text())
            if n:
                log.info("blackboard: %d posts kept from before the restart", n)
        self.mesh.register_handler(StreamType.BLACKBOARD, self.handle)
        self._tasks.spawn(self._flush_loop())
        self._tasks.spawn(self._peer_loop())

    async def stop(self) -> None:
        self._tasks.stopping = True
        await self._tasks.cancel_all()
        self._save()

    # ---------------------------------------------------------------- posting
    def post(self, topic: str, text: str, ttl_s: int | None = None) -> Stored:
        """A post by this node: taken here, then flooded to the mesh. Raises BoardError."""
        stored = self.board.create(topic, text, ttl_s)
        self._queue(stored.post, None)
        return stored

    def _queue(self, post: pb.BoardPost, source: bytes | None) -> None:
        if len(self._relay) >= RELAY_QUEUE:
            self.board.counters["board.relay_dropped"] += 1
            return
        self._relay.append((post, source))
        self._wake.set()

    # ---------------------------------------------------------------- receiving
    async def handle(self, peer_id: bytes, fs: FramedStream) -> None:
        """A BLACKBOARD stream a peer opened: its posts, checked one by one."""
        for _ in range(FRAMES_PER_STREAM):
            frame = await fs.recv(self.mesh.timers.stream_idle_timeout, expect=("board",))
            if frame is None:
                return
            posts = frame.board.posts
            if len(posts) > POSTS_PER_FRAME:
                self.board.counters["board.frame_too_many"] += 1
                await fs.reset(2)
                return
            for p in posts:
                try:
                    stored = self.board.offer(p)
                except BoardError:
                    continue  # counted by the board; the rest of the batch still counts
                if stored is not None:
                    self._queue(stored.post, bytes(peer_id))
        self.board.counters["board.stream_too_long"] += 1
        await fs.reset(2)

    # ---------------------------------------------------------------- sending
    async def _send(self, peer: bytes, posts: list[pb.BoardPost]) -> None:
        try:
            fs = await self.mesh.open_stream(peer, StreamType.BLACKBOARD)
            for i in range(0, min(len(posts), POSTS_PER_FRAME * FRAMES_PER_STREAM), POSTS_PER_FRAME):
                await asyncio.wait_for(fs.send(make_frame(board=pb.BoardSync(posts=posts[i:i + POSTS_PER_FRAME]))),
                                       SEND_TIMEOUT_S)
            await asyncio.wait_for(fs.finish(), SEND_TIMEOUT_S)
            self.board.counters["board.sent"] += len(posts)
        except Exception as e:  # a peer that is going away: it syncs again when it reconnects
            self.board.counters["board.send_failed"] += 1
            log.debug("blackboard: sending to %s failed: %s", peer.hex()[:12], e)

    async def _flush_loop(self) -> None:
        last_save = 0.0
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), SAVE_S)
            self._wake.clear()
            await asyncio.sleep(FLUSH_S)  # gather a burst into one batch
            batch: list[tuple[pb.BoardPost, bytes | None]] = []
            while self._relay and len(batch) < POSTS_PER_FRAME * FRAMES_PER_STREAM:
                batch.append(self._relay.popleft())
            if self._relay:
                self._wake.set()
            if batch:
                peers = self.mesh.connected_peers()
                sends = []
                for peer in peers:
                    posts = [p for p, src in batch if src != peer and bytes(p.author) != peer]
                    if posts:
                        sends.append(self._send(peer, posts))
                await asyncio.gather(*sends)
            now = self.mesh.clock.monotonic()
            if self.board.prune() or (self.board.dirty and now - last_save >= SAVE_S):
                self._save()
                last_save = now

    async def _peer_loop(self) -> None:
        """A peer that (re)connects gets every live post: it may have missed some."""
        events = self.mesh.subscribe()
        try:
            while True:
                ev = await events.get()
                if ev.get("type") != "peer_up":
                    continue
                posts = self.board.live()
                node = str(ev.get("node_id", ""))
                if posts and len(node) == 64:
                    self._tasks.spawn(self._send(bytes.fromhex(node), posts))
        finally:
            self.mesh.unsubscribe(events)

    def _save(self) -> None:
        if not self.board.dirty:
            return
        try:
            write_atomic(self.path, self.board.dump(), 0o600)
            self.board.dirty = False
        except OSError as e:
            log.warning("blackboard: cannot write %s: %s", self.path, e)
