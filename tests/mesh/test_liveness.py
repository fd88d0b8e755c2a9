"""Liveness state machine on a fake clock: suspicion, probe-confirmed down, leave, prune, return."""

from __future__ import annotations

from mesh402.clock import FakeClock
from mesh402.mesh.config import MeshTimers
from mesh402.mesh.liveness import LivenessTable, PeerState

A, B, C = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32


def table(**over):
    clock = FakeClock()
    return LivenessTable(MeshTimers(failures_to_suspect=3, prune_after=100, down_report_ignore=60, **over), clock), clock


def test_failures_lead_to_suspect_once():
    t, _ = table()
    assert t.connected(A, boot_id=7)
    assert t.state(A) == PeerState.ALIVE
    assert not t.heartbeat_failed(A)
    assert not t.heartbeat_failed(A)
    assert t.heartbeat_failed(A)  # third: suspect, caller probes
    assert t.state(A) == PeerState.SUSPECT
    assert not t.heartbeat_failed(A)  # already suspect: no second probe


def test_any_frame_clears_failures():
    t, _ = table()
    t.connected(A)
    t.heartbeat_failed(A)
    t.heartbeat_failed(A)
    t.seen(A)
    assert not t.heartbeat_failed(A)
    assert not t.heartbeat_failed(A)
    assert t.heartbeat_failed(A)


def test_rtt_ewma():
    t, _ = table()
    t.connected(A)
    t.heartbeat_ok(A, 10.0)
    t.heartbeat_ok(A, 20.0)
    assert 10.0 < t.get(A).rtt_ms < 20.0
    assert t.rtts() == {A: t.get(A).rtt_ms}


def test_down_left_prune_and_return():
    t, clock = table()
    t.connected(A)
    t.connected(B)
    assert t.mark_down(A)
    assert not t.mark_down(A)
    assert t.mark_left(B)
    t.seen(A)  # a frame does not resurrect a down peer; only a new handshake does
    assert t.state(A) == PeerState.DOWN
    assert t.rtts() == {}
    clock.advance(99)
    assert t.prunable() == []
    clock.advance(2)
    assert sorted(t.prunable()) == [A, B]
    assert t.connected(A, boot_id=8)  # restarted
    assert t.state(A) == PeerState.ALIVE
    assert t.prunable() == [B]


def test_down_reports_rate_limited_per_reporter():
    t, clock = table()
    t.connected(C)
    assert t.accept_down_report(A, C)
    assert not t.accept_down_report(A, C)
    assert t.accept_down_report(B, C)
    clock.advance(61)
    assert t.accept_down_report(A, C)
    t.mark_down(C)
    assert not t.accept_down_report(B, C)


def test_fast_timers_are_short():
    f = MeshTimers.fast()
    assert f.heartbeat_interval < 1 and f.probe_timeout < 2
    assert MeshTimers.fast(heartbeat_interval=0.1).heartbeat_interval == 0.1
