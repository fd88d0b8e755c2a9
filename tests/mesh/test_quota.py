"""Per-peer quotas, pure: token buckets, the frame/byte allowance and its work tier, abuse and bans."""

from __future__ import annotations

import pytest

from mesh402.clock import FakeClock
from mesh402.mesh.limits import MeshLimits
from mesh402.mesh.quota import PeerQuota, QuotaBook, QuotaExceeded, TokenBucket


def test_token_bucket_starts_full_refills_at_its_rate_and_says_how_long_to_wait() -> None:
    b = TokenBucket(rate=10, burst=5)
    assert all(b.take(1, 0.0) for _ in range(5)) and not b.take(1, 0.0)
    assert b.wait(1, 0.0) == pytest.approx(0.1)
    assert b.take(1, 0.1) and not b.take(1, 0.1)
    assert b.take(5, 10.0) and b.wait(50, 10.0) == pytest.approx(0.5)  # never waits for more than a full bucket


def test_frames_over_the_allowance_are_refused_and_entitled_streams_have_their_own() -> None:
    lim = MeshLimits(frames_per_s=10, frame_burst=20, bytes_per_s=1000, byte_burst=4000, abuse_refusals=5)
    q = PeerQuota.of(lim)
    for _ in range(20):
        q.charge(100, False, 0.0)
    with pytest.raises(QuotaExceeded):
        q.charge(100, False, 0.0)
    for _ in range(100):  # an authorized session's activations do not touch the chatter allowance
        q.charge(10_000, True, 0.0)
    with pytest.raises(QuotaExceeded, match="byte"):
        q.charge(3500, False, 1.0)  # a second later: 10 frames back, but 2000 + 1000 bytes only
    assert q.frames.tokens == 10  # the frame was not taken for a refused byte charge
    q2 = PeerQuota.of(lim)
    with pytest.raises(QuotaExceeded):
        q2.charge(5000, False, 0.0)  # one frame larger than the whole byte burst
    assert q2.frames.tokens == 20  # nothing taken for a refused frame
    assert (q.frames_in, q.frames_refused) == (120, 2)


def test_sustained_refusals_make_a_peer_abusive_and_a_ban_runs_out() -> None:
    clock = FakeClock()
    lim = MeshLimits(frames_per_s=1, frame_burst=1, abuse_refusals=3, abuse_window=10, abuse_ban=60)
    book = QuotaBook(lim, clock)
    q = book.of(b"p" * 32)
    q.charge(10, False, 0.0)
    for t in (1.5, 1.6):
        with pytest.raises(QuotaExceeded):
            q.charge(10, False, t - 1.0)
    assert not q.abusive(1.0)
    with pytest.raises(QuotaExceeded):
        q.charge(10, False, 0.7)
    assert q.abusive(1.0) and not q.abusive(30.0)  # three within the window; long ago they do not count
    book.ban(b"p" * 32)
    assert book.ban_left(b"p" * 32) == pytest.approx(60)
    clock.advance(61)
    assert book.ban_left(b"p" * 32) is None and book.banned == {}


def test_the_book_is_bounded_and_keeps_peers_with_open_streams() -> None:
    book = QuotaBook(MeshLimits(max_origins=2), FakeClock())
    busy = book.of(b"b" * 32)
    busy.open_streams = 1
    for i in range(10):
        book.of(bytes([i]) * 32)
    assert len(book.peers) == 4 and b"b" * 32 in book.peers


def test_a_ban_marks_the_address_fresh_identities_from_it_are_paced_and_start_without_a_burst() -> None:
    clock = FakeClock()
    lim = MeshLimits(frames_per_s=10, frame_burst=100, abuse_ban=60, rejoin_interval=5)
    book = QuotaBook(lim, clock)
    assert book.may_connect("10.0.0.1") and book.may_connect("10.0.0.1")  # unmarked: no pacing
    book.ban(b"a" * 32, "10.0.0.1")
    assert not book.may_connect("10.0.0.1") and book.may_connect("10.0.0.2")  # others are not held back
    clock.advance(5)
    assert book.may_connect("10.0.0.1") and not book.may_connect("10.0.0.1")  # one per interval
    book.admitted(b"b" * 32, "10.0.0.1")
    fresh = book.of(b"b" * 32)
    now = clock.monotonic()
    assert fresh.refill_wait(now) > 0 and fresh.frames.wait(1, now) > 0  # no burst to spend
    assert fresh.work_frames.wait(1, now) == 0  # authorized work is not held back
    assert fresh.refusals.maxlen == lim.abuse_refusals // 10  # cut off sooner
    book.admitted(b"c" * 32, "10.0.0.2")
    assert book.of(b"c" * 32).refill_wait(now) == 0  # an unmarked address: the full burst
    book.ban(b"b" * 32, "10.0.0.1")  # a second ban from there: the interval doubles
    clock.advance(9)
    assert not book.may_connect("10.0.0.1")
    clock.advance(1)
    assert book.may_connect("10.0.0.1")
    clock.advance(61)
    assert book.mark_left("10.0.0.1") is None and book.may_connect("10.0.0.1") and book.may_connect("10.0.0.1")


def test_a_peer_out_of_allowance_waits_for_its_refill_before_any_stream_is_accepted() -> None:
    lim = MeshLimits(frames_per_s=10, frame_burst=2, bytes_per_s=1000, byte_burst=1000)
    q = PeerQuota.of(lim)
    q.charge(500, False, 0.0)
    q.charge(500, False, 0.0)
    assert q.refill_wait(0.0) == pytest.approx(0.1)
    assert q.refill_wait(0.1) == 0


def test_new_identities_share_one_burst_pool_beyond_it_they_earn_their_burst() -> None:
    """A Sybil with many addresses: each fresh identity from a fresh address, none of them marked."""
    clock = FakeClock()
    lim = MeshLimits(frames_per_s=10, frame_burst=100, newcomer_burst=3, newcomers_per_s=0.5)
    book = QuotaBook(lim, clock)
    starts = [book.admitted(bytes([i]) * 32, f"10.0.{i}.1") for i in range(6)]
    assert starts == ["burst"] * 3 + ["earning"] * 3
    now = clock.monotonic()
    full, late = book.of(bytes([0]) * 32), book.of(bytes([5]) * 32)
    assert full.refill_wait(now) == 0 and late.refill_wait(now) > 0  # the late one has no burst to spend
    assert late.refusals.maxlen == lim.abuse_refusals  # but it is no suspect: the usual patience
    assert late.work_frames.wait(1, now) == 0  # nor is authorized work held back
    clock.advance(2.0)  # it earns at the sustained rate: 20 frames in 2 s, never the 100 of a burst
    assert sum(late.frames.take(1, clock.monotonic()) for _ in range(100)) == 20
    assert book.admitted(bytes([0]) * 32, "10.0.0.1") is None  # a known peer keeps what it has
    assert book.admitted(bytes([9]) * 32, "10.0.9.1") == "burst"  # the pool refilled one in 2 s
    assert book.of(b"z" * 32).refill_wait(clock.monotonic()) > 0  # first seen on a stream: same pool
