"""The mesh blackboard: short signed posts (topic, text, author, TTL) every member can read and write.

This module holds the store and its rules, without I/O: what a valid post is, the caps that keep one
member from flooding the board, expiry, and the JSON form a node keeps in its home. How posts travel
(BLACKBOARD streams, flooding, sync on connect) is mesh402.mesh.board_sync.

A post is signed by its author's node key, so relays cannot change it and nobody can post in another
member's name; only a member the node knows from gossip may author posts (a key minted offline is
not a member, so caps per author also bound a flood). Every cap is per author except the total one:

- text at most 4096 bytes, topic at most 64 characters, TTL at most 48 h, `created_ms` at most 60 s
  in the future (else `bad_*`, `from_future`); an expired post is never taken (`expired`);
- at most 32 live posts and 64 KiB of text per author (`author_full`), and new posts at 10 a minute
  with a burst of 32 (`rate_limited`), so a peer's sync after a reconnect still fits;
- at most 1024 live posts in all: a full board makes room by dropping a post of the author holding
  the most, and only for an author holding fewer (`board_full`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import struct
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError

from mesh402.clock import Clock, SystemClock
from mesh402.mesh.identity import NODE_ID_LEN, SIGNATURE_LEN, NodeIdentity, verify
from mesh402.mesh.proto import mesh_pb2 as pb

DOMAIN = b"mesh402-board-v1\0"
NONCE_LEN = 8


@dataclass(frozen=True)
class BoardLimits:
    max_topic_chars: int = 64
    max_text_bytes: int = 4096
    max_ttl_s: int = 48 * 3600
    default_ttl_s: int = 3600
    max_future_ms: int = 60_000  # a post dated further ahead than this is refused (clock skew)
    author_posts: int = 32  # live posts per author
    author_bytes: int = 64 * 1024  # live text bytes per author
    author_rate_per_min: float = 10.0  # new posts per author and minute, after a burst of author_posts
    total_posts: int = 1024
    max_watchers: int = 64  # SSE/CLI watchers at once, each with a bounded queue
    watch_queue: int = 256


class BoardError(ValueError):
    """A post refused; `code` names why (and the counter it increments)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def signing_message(mesh_id: str, p: pb.BoardPost) -> bytes:
    mid = mesh_id.encode()
    return (DOMAIN + struct.pack("<H", len(mid)) + mid + bytes(p.author)
            + struct.pack("<QI", int(p.created_ms), int(p.ttl_s)) + bytes(p.nonce)
            + p.topic.encode() + b"\0" + p.text.encode())


def post_id(mesh_id: str, p: pb.BoardPost) -> str:
    return hashlib.sha256(signing_message(mesh_id, p)).hexdigest()[:32]


def _clean(s: str) -> bool:
    """No control characters: a topic or text shows up in terminals and consoles."""
    return not any(unicodedata.category(c) == "Cc" and c not in "\n\t" for c in s)


def check_post(p: pb.BoardPost, mesh_id: str, now_ms: int, limits: BoardLimits) -> None:
    """Everything about one post that needs no other post: shape, bounds, time, signature."""
    if len(p.author) != NODE_ID_LEN or len(p.signature) != SIGNATURE_LEN or len(p.nonce) != NONCE_LEN:
        raise BoardError("malformed", "author, nonce or signature has the wrong length")
    if not 0 < len(p.topic) <= limits.max_topic_chars or not _clean(p.topic) or "\n" in p.topic:
        raise BoardError("bad_topic", f"the topic must be 1 to {limits.max_topic_chars} characters on one line")
    if not 0 < len(p.text.encode()) <= limits.max_text_bytes or not _clean(p.text):
        raise BoardError("bad_text", f"the text must be 1 to {limits.max_text_bytes} bytes without control characters")
    if not 0 < p.ttl_s <= limits.max_ttl_s:
        raise BoardError("bad_ttl", f"the TTL must be 1 s to {limits.max_ttl_s} s")
    if p.created_ms > now_ms + limits.max_future_ms:
        raise BoardError("from_future", "the post is dated in the future")
    if p.created_ms + p.ttl_s * 1000 <= now_ms:
        raise BoardError("expired", "the post has expired")
    if not verify(bytes(p.author), signing_message(mesh_id, p), bytes(p.signature)):
        raise BoardError("bad_signature", "the signature does not match the author")


@dataclass
class Stored:
    post: pb.BoardPost
    id: str
    expires_ms: int
    size: int

    def view(self) -> dict[str, Any]:
        p = self.post
        return {"id": self.id, "topic": p.topic, "text": p.text, "author": bytes(p.author).hex(),
                "created_ms": int(p.created_ms), "ttl_s": int(p.ttl_s), "expires_ms": self.expires_ms}


@dataclass
class _Bucket:
    tokens: float
    at: float  # monotonic seconds of the last refill


@dataclass
class Board:
    """The posts this node holds. `mesh_id()` names the mesh the signatures bind to; `is_member(author)`
    says whether gossip knows the author (the node itself included)."""

    mesh_id: Callable[[], str]
    is_member: Callable[[bytes], bool]
    identity: NodeIdentity | None = None
    clock: Clock = field(default_factory=SystemClock)
    limits: BoardLimits = field(default_factory=BoardLimits)
    posts: dict[str, Stored] = field(default_factory=dict)
    counters: Counter[str] = field(default_factory=Counter)
    dirty: bool = False  # changed since the home copy was written
    _buckets: dict[bytes, _Bucket] = field(default_factory=dict)
    _watchers: set[asyncio.Queue[dict[str, Any]]] = field(default_factory=set)

    # ---------------------------------------------------------------- taking posts
    def now_ms(self) -> int:
        return int(self.clock.time() * 1000)

    def create(self, topic: str, text: str, ttl_s: int | None = None) -> Stored:
        """A post by this node, signed and taken like any other (the caps apply to it too)."""
        if self.identity is None:
            raise BoardError("no_identity", "this board cannot sign posts")
        p = pb.BoardPost(author=self.identity.node_id, topic=topic, text=text, created_ms=self.now_ms(),
                         ttl_s=int(ttl_s if ttl_s is not None else self.limits.default_ttl_s),
                         nonce=secrets.token_bytes(NONCE_LEN))
        p.signature = self.identity.sign(signing_message(self.mesh_id(), p))
        stored = self.offer(p)
        if stored is None:
            raise BoardError("duplicate", "the same post is already on the board")
        return stored

    def offer(self, p: pb.BoardPost, *, check_member: bool = True) -> Stored | None:
        """Take a post from anyone: the stored post when new, None when already held; BoardError when
        refused (counted under board.<code>)."""
        try:
            return self._offer(p, check_member)
        except BoardError as e:
            self.counters[f"board.{e.code}"] += 1
            raise

    def _offer(self, p: pb.BoardPost, check_member: bool) -> Stored | None:
        mesh_id = self.mesh_id()
        pid = post_id(mesh_id, p)
        if pid in self.posts:
            return None
        now = self.now_ms()
        check_post(p, mesh_id, now, self.limits)
        author = bytes(p.author)
        if check_member and not self.is_member(author):
            raise BoardError("unknown_author", "the author is not a member this node knows")
        self.prune(now)
        mine = [s for s in self.posts.values() if bytes(s.post.author) == author]
        size = len(p.text.encode()) + len(p.topic.encode())
        if len(mine) >= self.limits.author_posts or sum(s.size for s in mine) + size > self.limits.author_bytes:
            raise BoardError("author_full", "this author already holds its share of the board")
        if len(self.posts) >= self.limits.total_posts and not self._make_room(author, len(mine)):
            raise BoardError("board_full", "the board is full")
        if not self._take_token(author):
            raise BoardError("rate_limited", "this author posts faster than the board takes")
        stored = Stored(pb.BoardPost(), pid, int(p.created_ms) + int(p.ttl_s) * 1000, size)
        stored.post.CopyFrom(p)
        self.posts[pid] = stored
        self.dirty = True
        self.counters["board.accepted"] += 1
        self._notify(stored)
        return stored

    def _take_token(self, author: bytes) -> bool:
        now = self.clock.monotonic()
        cap = float(self.limits.author_posts)
        b = self._buckets.get(author)
        if b is None:
            if len(self._buckets) >= 4 * self.limits.total_posts:  # a bounded table: forget idle authors
                full = [k for k, v in self._buckets.items() if v.tokens + (now - v.at) * self._rate() >= cap]
                for k in full or list(self._buckets)[: len(self._buckets) // 2]:
                    del self._buckets[k]
            b = self._buckets[author] = _Bucket(cap, now)
        b.tokens = min(cap, b.tokens + (now - b.at) * self._rate())
        b.at = now
        if b.tokens < 1.0:
            return False
        b.tokens -= 1.0
        return True

    def _rate(self) -> float:
        return self.limits.author_rate_per_min / 60.0

    def _make_room(self, author: bytes, held: int) -> bool:
        """A full board drops the oldest post of the author holding the most, if that is more than `held`."""
        per: Counter[bytes] = Counter(bytes(s.post.author) for s in self.posts.values())
        top, n = per.most_common(1)[0]
        if top == author or n <= held:
            return False
        victim = min((s for s in self.posts.values() if bytes(s.post.author) == top), key=lambda s: s.post.created_ms)
        del self.posts[victim.id]
        self.counters["board.evicted"] += 1
        return True

    # ---------------------------------------------------------------- reading
    def prune(self, now_ms: int | None = None) -> int:
        now = self.now_ms() if now_ms is None else now_ms
        gone = [k for k, s in self.posts.items() if s.expires_ms <= now]
        for k in gone:
            del self.posts[k]
        if gone:
            self.dirty = True
            self.counters["board.expired_dropped"] += len(gone)
        return len(gone)

    def live(self) -> list[pb.BoardPost]:
        self.prune()
        return [s.post for s in sorted(self.posts.values(), key=lambda s: s.post.created_ms)]

    def read(self, topic: str | None = None, limit: int = 100, author: str | None = None) -> list[dict[str, Any]]:
        """The newest `limit` live posts (of a topic / an author), oldest first."""
        self.prune()
        rows = [s for s in self.posts.values() if (topic is None or s.post.topic == topic)
                and (author is None or bytes(s.post.author).hex() == author)]
        rows.sort(key=lambda s: (s.post.created_ms, s.id))
        return [s.view() for s in rows[-max(0, limit):]] if limit > 0 else []

    def status(self) -> dict[str, Any]:
        self.prune()
        return {"posts": len(self.posts), "authors": len({bytes(s.post.author) for s in self.posts.values()}),
                "watchers": len(self._watchers), "counters": dict(self.counters), "limits": self.limits.__dict__}

    # ---------------------------------------------------------------- watching
    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        if len(self._watchers) >= self.limits.max_watchers:
            raise BoardError("too_many_watchers", "too many watchers of the board; try again later")
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=self.limits.watch_queue)
        self._watchers.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[dict[str, Any]]) -> None:
        self._watchers.discard(q)

    def _notify(self, stored: Stored) -> None:
        view = stored.view()
        for q in list(self._watchers):
            try:
                q.put_nowait(view)
            except asyncio.QueueFull:
                self.counters["board.watch_dropped"] += 1

    # ---------------------------------------------------------------- the copy in the home
    def dump(self) -> str:
        return json.dumps({"mesh_id": self.mesh_id(), "posts": [
            base64.b64encode(p.SerializeToString()).decode() for p in self.live()]})

    def load(self, text: str) -> int:
        """Posts kept before a restart: each checked again (signature, expiry, caps); the author need not
        be known yet (gossip comes later). A copy from another mesh is ignored. Returns how many were taken."""
        try:
            doc = json.loads(text)
        except ValueError:
            return 0
        if not isinstance(doc, dict) or doc.get("mesh_id") != self.mesh_id() or not isinstance(doc.get("posts"), list):
            return 0
        taken = 0
        for raw in doc["posts"][: self.limits.total_posts]:
            p = pb.BoardPost()
            try:
                p.ParseFromString(base64.b64decode(str(raw)))
                if self.offer(p, check_member=False) is not None:
                    taken += 1
            except (BoardError, DecodeError, ValueError):  # a damaged or stale entry loses that post only
                continue
        self.dirty = False
        return taken
