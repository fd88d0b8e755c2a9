"""The peer-health tracker on a fake clock: exponential backoff with a cap, cleared by a success."""

from __future__ import annotations

import math

from mesh402.clock import FakeClock
from mesh402.mesh.health import Backoff, HealthTracker

A, B = b"\x01" * 32, b"\x02" * 32


def tracker(base: float = 1.0, cap: float = 8.0) -> tuple[HealthTracker[bytes], FakeClock]:
    clock = FakeClock()
    return HealthTracker(clock, Backoff(base=base, cap=cap)), clock


def test_backoff_doubles_up_to_the_cap() -> None:
    b = Backoff(base=1.0, cap=8.0)
    assert [b.delay(n) for n in range(7)] == [0.0, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert Backoff(base=0.3).delay(3) == 0.3 * 4  # no cap: the join schedule
    assert Backoff(base=2.0, cap=30.0, factor=3.0).delay(3) == 18.0
    assert Backoff(base=1.0, cap=60.0).delay(10_000) == 60.0  # a long outage does not overflow
    assert math.isfinite(Backoff(base=1.0).delay(10_000))


def test_a_new_peer_may_be_tried() -> None:
    h, _ = tracker()
    assert h.may_try(A) and h.retry_in(A) == 0.0 and h.failures(A) == 0 and h.get(A) is None


def test_failures_back_off_and_a_success_clears_them() -> None:
    h, clock = tracker()
    for n, delay in enumerate([1.0, 2.0, 4.0, 8.0, 8.0], start=1):
        assert h.failed(A) == clock.monotonic() + delay
        assert h.failures(A) == n and not h.may_try(A)
        assert h.retry_in(A) == delay
        clock.advance(delay - 0.01)
        assert not h.may_try(A)
        clock.advance(0.01)
        assert h.may_try(A) and h.retry_in(A) == 0.0
    h.succeeded(A)
    rec = h.get(A)
    assert rec is not None and rec.failures == 0 and rec.total_failures == 5 and rec.successes == 1
    assert rec.last_success == clock.monotonic() and h.may_try(A)
    h.failed(A)  # the schedule starts over
    assert h.retry_in(A) == 1.0


def test_peers_are_independent_and_usable_keeps_the_callers_order() -> None:
    h, clock = tracker()
    h.failed(B)
    assert h.may_try(A) and not h.may_try(B)
    assert h.usable([B, A]) == [A]
    clock.advance(1.0)
    assert h.usable([B, A]) == [B, A]


def test_forget_and_clear() -> None:
    h, _ = tracker()
    h.failed(A)
    h.failed(B)
    h.forget(A)
    assert h.may_try(A) and h.get(A) is None and not h.may_try(B)
    h.clear()
    assert h.may_try(B)


def test_any_hashable_key() -> None:
    """Replica retry and pipeline failover name peers by hex id: the same tracker serves them."""
    h: HealthTracker[str] = HealthTracker(FakeClock(), Backoff(base=0.5, cap=2.0))
    h.failed("aa")
    assert h.usable(["aa", "bb"]) == ["bb"]
