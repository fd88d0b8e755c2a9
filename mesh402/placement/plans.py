"""Plan epochs as pure bookkeeping: which plan is current, which old ones live sessions still use.

The host of a model is the only author of its plans. It numbers them with increasing epochs and
pushes each to the nodes in it. A receiver keeps them in a :class:`PlanBook`:

* ``accept`` takes a plan only if its epoch is newer than the current one (and, if the sender is
  given, only from the plan's host); otherwise it returns a typed :class:`Refused`.
* a session is pinned to the epoch current when it opened and keeps using that plan until it ends,
  even after newer plans arrive; old plans are dropped when their last session ends.
* ``check_epoch`` tells a stage whether a frame's epoch is one it can serve.

No I/O and no clocks; one book per node, used from one thread (or under the caller's lock).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from mesh402.placement.types import (
    ExpertPlan,
    ModelKey,
    NodeId,
    Plan,
    PlanLike,
    WaitingForCapacity,
)

__all__ = ["Accepted", "PlanBook", "Refused", "RefusalReason", "SessionPin", "next_epoch"]


class RefusalReason(str, Enum):
    STALE_EPOCH = "stale_epoch"  # older than (or conflicting with) the current plan
    DUPLICATE = "duplicate"  # the current plan again: harmless redelivery
    NOT_FROM_HOST = "not_from_host"  # pushed by a node that is not the plan's host
    UNKNOWN_EPOCH = "unknown_epoch"  # a frame for a plan this node has not received (yet)
    RETIRED_EPOCH = "retired_epoch"  # a frame for an old plan no live session uses any more
    NO_PLAN = "no_plan"  # nothing servable (no plan, or waiting for capacity)


@dataclass(frozen=True)
class Accepted:
    model_key: ModelKey
    epoch: int
    previous_epoch: int | None = None


@dataclass(frozen=True)
class Refused:
    model_key: ModelKey
    epoch: int | None
    reason: RefusalReason
    detail: str = ""
    current_epoch: int | None = None

    def __bool__(self) -> bool:  # so that ``if book.accept(p):`` reads naturally
        return False


@dataclass(frozen=True)
class SessionPin:
    """A session's claim on one plan epoch."""

    model_key: ModelKey
    epoch: int
    session_id: str


def next_epoch(*seen: int | None) -> int:
    """The epoch for a new plan: one more than any epoch seen (from gossip or the book), 1 if none."""
    known = [e for e in seen if e is not None]
    return max(known) + 1 if known else 1


class PlanBook:
    """Current and still-pinned plans per model, with the epoch rules above."""

    def __init__(self) -> None:
        self._current: dict[ModelKey, PlanLike] = {}
        self._retained: dict[tuple[ModelKey, int], PlanLike] = {}
        self._pins: dict[tuple[ModelKey, int], set[str]] = {}

    # -- plans -----------------------------------------------------------
    def current(self, model_key: ModelKey) -> PlanLike | None:
        return self._current.get(model_key)

    def epoch(self, model_key: ModelKey) -> int | None:
        cur = self._current.get(model_key)
        return None if cur is None else cur.epoch

    def models(self) -> tuple[ModelKey, ...]:
        return tuple(sorted(self._current))

    def accept(self, plan: PlanLike, *, sender: NodeId | None = None) -> Accepted | Refused:
        """Make ``plan`` current if its epoch is newer; ``sender`` (if given) must be the plan's host."""
        key = plan.model_key
        cur = self._current.get(key)
        cur_epoch = None if cur is None else cur.epoch
        host = getattr(plan, "host", None)
        if sender is not None and host is not None and sender != host:
            return Refused(key, plan.epoch, RefusalReason.NOT_FROM_HOST,
                           f"plan for {key} epoch {plan.epoch} names host {host} but came from {sender}", cur_epoch)
        if cur is not None and plan.epoch <= cur.epoch:
            if plan == cur:
                return Refused(key, plan.epoch, RefusalReason.DUPLICATE, "already current", cur_epoch)
            return Refused(key, plan.epoch, RefusalReason.STALE_EPOCH,
                           f"epoch {plan.epoch} is not newer than current epoch {cur.epoch}", cur_epoch)
        if cur is not None and self._pins.get((key, cur.epoch)):
            self._retained[(key, cur.epoch)] = cur
        self._current[key] = plan
        return Accepted(key, plan.epoch, cur_epoch)

    def plan_for(self, pin: SessionPin) -> PlanLike | None:
        """The plan a pinned session uses (None once it is gone)."""
        cur = self._current.get(pin.model_key)
        if cur is not None and cur.epoch == pin.epoch:
            return cur
        return self._retained.get((pin.model_key, pin.epoch))

    def retained_epochs(self, model_key: ModelKey) -> tuple[int, ...]:
        """Old epochs kept alive by sessions (the current one excluded)."""
        return tuple(sorted(e for (k, e) in self._retained if k == model_key))

    # -- sessions --------------------------------------------------------
    def pin(self, model_key: ModelKey, session_id: str, epoch: int | None = None) -> SessionPin | Refused:
        """Pin a new session to the current plan (``epoch``, if given, must be the current one)."""
        cur = self._current.get(model_key)
        if cur is None or isinstance(cur, WaitingForCapacity):
            return Refused(model_key, epoch, RefusalReason.NO_PLAN,
                           "no plan" if cur is None else cur.reason, None if cur is None else cur.epoch)
        if epoch is not None and epoch != cur.epoch:
            reason = RefusalReason.STALE_EPOCH if epoch < cur.epoch else RefusalReason.UNKNOWN_EPOCH
            return Refused(model_key, epoch, reason,
                           f"new sessions open on the current epoch {cur.epoch}", cur.epoch)
        self._pins.setdefault((model_key, cur.epoch), set()).add(session_id)
        return SessionPin(model_key, cur.epoch, session_id)

    def unpin(self, pin: SessionPin) -> None:
        """End a session; an old plan is dropped when its last session ends. Idempotent."""
        k = (pin.model_key, pin.epoch)
        sessions = self._pins.get(k)
        if sessions is None:
            return
        sessions.discard(pin.session_id)
        if not sessions:
            del self._pins[k]
            self._retained.pop(k, None)

    def sessions(self, model_key: ModelKey, epoch: int) -> frozenset[str]:
        return frozenset(self._pins.get((model_key, epoch), ()))

    def check_epoch(self, model_key: ModelKey, epoch: int) -> Accepted | Refused:
        """Whether a frame stamped with ``epoch`` can be served here: the current plan or a pinned old one."""
        cur = self._current.get(model_key)
        cur_epoch = None if cur is None else cur.epoch
        if cur is not None and epoch == cur.epoch and isinstance(cur, (Plan, ExpertPlan)):
            return Accepted(model_key, epoch, cur_epoch)
        if (model_key, epoch) in self._retained:
            return Accepted(model_key, epoch, cur_epoch)
        if cur is None or epoch > cur.epoch:
            return Refused(model_key, epoch, RefusalReason.UNKNOWN_EPOCH,
                           f"no plan with epoch {epoch} received", cur_epoch)
        if epoch == cur.epoch:  # current, but waiting for capacity
            return Refused(model_key, epoch, RefusalReason.NO_PLAN, getattr(cur, "reason", ""), cur_epoch)
        return Refused(model_key, epoch, RefusalReason.RETIRED_EPOCH,
                       f"epoch {epoch} has no live sessions (current {cur.epoch})", cur_epoch)
