"""The blackboard store's rules, in process: signatures, bounds, per-author caps and rate, the total cap,
expiry, and the copy kept in the home."""

from __future__ import annotations

import pytest

from mesh402.clock import FakeClock
from mesh402.mesh.board import (
    NONCE_LEN,
    Board,
    BoardError,
    BoardLimits,
    signing_message,
)
from mesh402.mesh.identity import NodeIdentity
from mesh402.mesh.proto import mesh_pb2 as pb

MESH = "m" * 32


def board(ident: NodeIdentity | None = None, clock: FakeClock | None = None, members: set[bytes] | None = None,
          **limits: object) -> Board:
    return Board(lambda: MESH, (lambda a: members is None or a in members), ident, clock or FakeClock(),
                 BoardLimits(**limits))  # type: ignore[arg-type]


def signed(ident: NodeIdentity, clock: FakeClock, topic: str = "t", text: str = "hello", ttl_s: int = 60,
           nonce: bytes = b"\x01" * NONCE_LEN, created_ms: int | None = None) -> pb.BoardPost:
    p = pb.BoardPost(author=ident.node_id, topic=topic, text=text, ttl_s=ttl_s, nonce=nonce,
                     created_ms=int(clock.time() * 1000) if created_ms is None else created_ms)
    p.signature = ident.sign(signing_message(MESH, p))
    return p


def code_of(b: Board, p: pb.BoardPost) -> str:
    with pytest.raises(BoardError) as e:
        b.offer(p)
    return e.value.code


def test_a_signed_post_is_taken_once_and_read_back() -> None:
    clock, me = FakeClock(), NodeIdentity.generate()
    b = board(me, clock)
    s = b.create("jobs", "need a 7B model", ttl_s=120)
    assert b.offer(s.post) is None  # already held: not taken (nor relayed) again
    [row] = b.read("jobs")
    assert row["text"] == "need a 7B model" and row["author"] == me.node_id.hex() and row["ttl_s"] == 120
    assert b.read("other") == []


def test_tampered_foreign_or_malformed_posts_are_refused() -> None:
    clock, a = FakeClock(), NodeIdentity.generate()
    b = board(clock=clock)
    p = signed(a, clock)
    p.text = "changed by a relay"
    assert code_of(b, p) == "bad_signature"
    q = signed(a, clock)
    q.author = NodeIdentity.generate().node_id  # someone else's name on a's signature
    assert code_of(b, q) == "bad_signature"
    other_mesh = signed(a, clock)
    other_mesh.signature = a.sign(signing_message("x" * 32, other_mesh))
    assert code_of(b, other_mesh) == "bad_signature"
    assert code_of(b, signed(a, clock, nonce=b"\x01")) == "malformed"
    assert code_of(b, signed(a, clock, topic="")) == "bad_topic"
    assert code_of(b, signed(a, clock, topic="a\nb")) == "bad_topic"
    assert code_of(b, signed(a, clock, text="x" * 4097)) == "bad_text"
    assert code_of(b, signed(a, clock, text="\x1b[2Jclear")) == "bad_text"
    assert code_of(b, signed(a, clock, ttl_s=48 * 3600 + 1)) == "bad_ttl"
    assert code_of(b, signed(a, clock, created_ms=int(clock.time() * 1000) + 120_000)) == "from_future"
    assert code_of(b, signed(a, clock, created_ms=int(clock.time() * 1000) - 61_000, ttl_s=60)) == "expired"
    assert b.posts == {}


def test_only_known_members_may_author() -> None:
    clock, a, stranger = FakeClock(), NodeIdentity.generate(), NodeIdentity.generate()
    b = board(clock=clock, members={a.node_id})
    assert b.offer(signed(a, clock)) is not None
    assert code_of(b, signed(stranger, clock)) == "unknown_author"


def test_one_author_is_capped_in_posts_bytes_and_rate_while_others_still_post() -> None:
    clock, flood, honest = FakeClock(), NodeIdentity.generate(), NodeIdentity.generate()
    b = board(clock=clock, author_posts=8, author_bytes=1000, author_rate_per_min=6)
    codes = []
    for i in range(20):
        try:
            b.offer(signed(flood, clock, nonce=i.to_bytes(NONCE_LEN, "big")))
        except BoardError as e:
            codes.append(e.code)
    assert len(b.read(author=flood.node_id.hex())) == 8 and set(codes) == {"author_full"}
    assert b.offer(signed(honest, clock)) is not None
    # bytes: 3 posts of 400 bytes fill the 1000-byte share
    big = NodeIdentity.generate()
    b.offer(signed(big, clock, text="x" * 400, nonce=b"\x01" * 8))
    b.offer(signed(big, clock, text="x" * 400, nonce=b"\x02" * 8))
    assert code_of(b, signed(big, clock, text="x" * 400, nonce=b"\x03" * 8)) == "author_full"
    # rate: once its posts expire the flooder has no burst left, and refills at 6 a minute
    clock.advance(61)
    b.prune()
    taken = 0
    for i in range(100, 110):
        try:
            b.offer(signed(flood, clock, nonce=i.to_bytes(NONCE_LEN, "big")))
            taken += 1
        except BoardError as e:
            assert e.code == "rate_limited"
    assert taken == 6  # 61 s of refill at 6/min, not the 8-post share
    assert b.counters["board.rate_limited"] == 4


def test_a_full_board_evicts_the_biggest_author_never_a_small_one() -> None:
    clock = FakeClock()
    big, small, late = NodeIdentity.generate(), NodeIdentity.generate(), NodeIdentity.generate()
    b = board(clock=clock, total_posts=10, author_posts=8)
    for i in range(8):
        b.offer(signed(big, clock, nonce=i.to_bytes(NONCE_LEN, "big")))
    b.offer(signed(small, clock, nonce=b"\x01" * 8))
    b.offer(signed(small, clock, nonce=b"\x02" * 8))
    assert len(b.posts) == 10
    assert b.offer(signed(late, clock)) is not None  # room made at the biggest author's expense
    assert len(b.read(author=big.node_id.hex())) == 7 and len(b.posts) == 10
    assert b.counters["board.evicted"] == 1


def test_posts_expire_and_the_home_copy_survives_a_restart_within_ttl() -> None:
    clock, me = FakeClock(), NodeIdentity.generate()
    b = board(me, clock)
    b.create("short", "gone soon", ttl_s=10)
    b.create("long", "still here", ttl_s=600)
    saved = b.dump()
    clock.advance(11)
    assert [r["topic"] for r in b.read()] == ["long"]
    fresh = board(None, clock, members=set())  # after a restart gossip knows nobody yet
    assert fresh.load(saved) == 1 and fresh.read()[0]["text"] == "still here"
    assert board(None, clock).load("not json") == 0
    other = Board(lambda: "y" * 32, lambda a: True, None, clock)
    assert other.load(saved) == 0  # another mesh's copy
    clock.advance(600)
    assert fresh.read() == []


def test_watchers_get_new_posts_and_are_capped() -> None:
    clock, me = FakeClock(), NodeIdentity.generate()
    b = board(me, clock, max_watchers=1, watch_queue=2)
    q = b.subscribe()
    with pytest.raises(BoardError):
        b.subscribe()
    for i in range(3):
        b.create("t", f"post {i}")
    assert q.get_nowait()["text"] == "post 0"
    assert b.counters["board.watch_dropped"] == 1
    b.unsubscribe(q)
    b.subscribe()
