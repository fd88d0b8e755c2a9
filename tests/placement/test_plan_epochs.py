"""Plan epochs: accept newer plans only, sessions stay on their epoch (mesh402.placement.plans)."""
from __future__ import annotations

from mesh402.placement import (
    Accepted,
    Plan,
    PlanBook,
    Refused,
    RefusalReason,
    StageAssignment,
    WaitingForCapacity,
    next_epoch,
)

K = "m@0"


def plan(epoch: int, host: str = "h", nodes=("h", "s")) -> Plan:
    n = len(nodes)
    stages = tuple(StageAssignment(x, i * 10, (i + 1) * 10, 1000) for i, x in enumerate(nodes))
    assert n >= 1
    return Plan(K, epoch, host, stages)


def test_accepts_newer_refuses_stale_and_duplicate():
    book = PlanBook()
    assert book.current(K) is None and book.epoch(K) is None
    r = book.accept(plan(1))
    assert isinstance(r, Accepted) and r.previous_epoch is None and book.epoch(K) == 1
    r = book.accept(plan(3))
    assert r == Accepted(K, 3, 1)
    stale = book.accept(plan(2))
    assert isinstance(stale, Refused) and not stale
    assert stale.reason is RefusalReason.STALE_EPOCH and stale.current_epoch == 3
    conflicting = book.accept(plan(3, nodes=("h", "t")))
    assert conflicting.reason is RefusalReason.STALE_EPOCH
    dup = book.accept(plan(3))
    assert dup.reason is RefusalReason.DUPLICATE
    assert book.current(K) == plan(3)


def test_only_the_host_authors_its_plans():
    book = PlanBook()
    r = book.accept(plan(1), sender="s")
    assert isinstance(r, Refused) and r.reason is RefusalReason.NOT_FROM_HOST
    assert book.current(K) is None
    assert isinstance(book.accept(plan(1), sender="h"), Accepted)


def test_session_stays_on_its_epoch():
    book = PlanBook()
    book.accept(plan(1))
    pin = book.pin(K, "req-1")
    assert pin.epoch == 1
    book.accept(plan(2, nodes=("h", "t")))
    # the open session keeps its plan; new sessions get the new one
    assert book.plan_for(pin) == plan(1)
    assert book.pin(K, "req-2").epoch == 2
    assert book.retained_epochs(K) == (1,)
    assert isinstance(book.check_epoch(K, 1), Accepted)
    assert isinstance(book.check_epoch(K, 2), Accepted)
    book.unpin(pin)
    book.unpin(pin)  # idempotent
    assert book.plan_for(pin) is None and book.retained_epochs(K) == ()
    r = book.check_epoch(K, 1)
    assert r.reason is RefusalReason.RETIRED_EPOCH
    assert book.check_epoch(K, 5).reason is RefusalReason.UNKNOWN_EPOCH


def test_unpinned_old_plan_is_dropped_at_once():
    book = PlanBook()
    book.accept(plan(1))
    book.accept(plan(2))
    assert book.retained_epochs(K) == ()
    assert book.check_epoch(K, 1).reason is RefusalReason.RETIRED_EPOCH


def test_new_sessions_open_on_the_current_epoch_only():
    book = PlanBook()
    assert book.pin(K, "x").reason is RefusalReason.NO_PLAN
    book.accept(plan(4))
    assert book.pin(K, "x", epoch=3).reason is RefusalReason.STALE_EPOCH
    assert book.pin(K, "x", epoch=5).reason is RefusalReason.UNKNOWN_EPOCH
    assert book.pin(K, "x", epoch=4).epoch == 4
    assert book.sessions(K, 4) == frozenset({"x"})


def test_waiting_for_capacity_withdraws_the_model_but_keeps_sessions():
    book = PlanBook()
    book.accept(plan(1))
    pin = book.pin(K, "long")
    w = WaitingForCapacity(K, 2, "a stage died and nothing can take its layers", host="h")
    assert isinstance(book.accept(w), Accepted)
    assert book.pin(K, "new").reason is RefusalReason.NO_PLAN
    assert book.check_epoch(K, 2).reason is RefusalReason.NO_PLAN
    assert book.plan_for(pin) == plan(1)  # the running session may finish (or fail) on its own plan
    assert isinstance(book.accept(plan(3)), Accepted)


def test_next_epoch():
    assert next_epoch() == 1
    assert next_epoch(None, 3, 7) == 8
