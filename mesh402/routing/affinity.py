"""Choosing a replica within a model: sticky keys, prefix affinity, least-loaded.

- a sticky key (``user`` or a session key) maps to a replica by rendezvous hashing, so the same
  user lands on the same replica while the replica set is stable;
- otherwise the prefix key (system/developer messages before the first user turn and the tool
  definitions) maps to the replica that served it last (LRU table with a TTL), so a repeat
  prompt meets that replica's warm KV cache;
- otherwise the least-loaded replica (ties: round-robin).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional


def prefix_key(model: str, messages: list[dict[str, Any]], tools: Any = None) -> str:
    """Hash of what repeats across a conversation's requests: the leading system turns and tools."""
    head = []
    for m in messages:
        if m.get("role") not in ("system", "developer"):
            break
        head.append([m.get("role"), m.get("content")])
    if not head and not tools:
        first_user = next((m.get("content") for m in messages if m.get("role") == "user"), None)
        head = [["user", first_user]]
    blob = json.dumps([model, head, tools or None], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def rendezvous(key: str, replicas: list[str]) -> str:
    return max(replicas, key=lambda r: hashlib.sha256(f"{key}\0{r}".encode()).digest())


class AffinityTable:
    """(model, prefix key) -> replica, least recently used evicted first, entries expire."""

    def __init__(self, capacity: int = 4096, ttl_s: float = 1200.0) -> None:
        self.capacity, self.ttl_s = capacity, ttl_s
        self._t: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: str, now: float) -> Optional[str]:
        v = self._t.get(key)
        if v is None or now - v[1] > self.ttl_s:
            if v is not None:
                del self._t[key]
            self.misses += 1
            return None
        self._t.move_to_end(key)
        self.hits += 1
        return v[0]

    def put(self, key: str, replica: str, now: float) -> None:
        self._t[key] = (replica, now)
        self._t.move_to_end(key)
        while len(self._t) > self.capacity:
            self._t.popitem(last=False)

    def forget_replica(self, replica: str) -> None:
        for k in [k for k, v in self._t.items() if v[0] == replica]:
            del self._t[k]

    def __len__(self) -> int:
        return len(self._t)


@dataclass(frozen=True)
class ReplicaChoice:
    replica: str
    reason: str  # "sticky", "affinity", "least-loaded"


class ReplicaPicker:
    def __init__(self, table: Optional[AffinityTable] = None) -> None:
        self.table = table or AffinityTable()
        self._rr = 0

    def order(self, replicas: list[str], load: dict[str, int], *, sticky: str = "", prefix: str = "",
              now: float = 0.0) -> list[ReplicaChoice]:
        """Replicas in the order to try them (the first is the pick, the rest are retries)."""
        reps = sorted(set(replicas))
        if not reps:
            return []
        first: Optional[ReplicaChoice] = None
        if sticky:
            first = ReplicaChoice(rendezvous("sticky\0" + sticky, reps), "sticky")
        elif prefix:
            hit = self.table.get(prefix, now)
            if hit in reps:
                first = ReplicaChoice(hit, "affinity")
        if first is None:
            low = min(load.get(r, 0) for r in reps)
            tied = [r for r in reps if load.get(r, 0) == low]
            self._rr += 1
            first = ReplicaChoice(tied[self._rr % len(tied)], "least-loaded")
        rest = sorted((r for r in reps if r != first.replica), key=lambda r: (load.get(r, 0), r))
        return [first] + [ReplicaChoice(r, "retry") for r in rest]

    def served(self, prefix: str, replica: str, now: float) -> None:
        if prefix:
            self.table.put(prefix, replica, now)
