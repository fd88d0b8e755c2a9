"""Which models a `--standby` node should start serving because the mesh asks for them."""

from __future__ import annotations

from typing import Iterable, Mapping


def decayed(requests: int, last_active_ms: int, now_ms: int, ttl_s: float = 86400.0) -> float:
    """Demand fades linearly to nothing over the TTL (24 h) since the model was last asked for."""
    age = max(0.0, (now_ms - last_active_ms) / 1000.0)
    return requests * max(0.0, 1.0 - age / ttl_s)


def standby_promotions(demand: Mapping[str, Mapping[str, int]], servers: Mapping[str, int],
                       on_disk: Iterable[str], *, min_requests: float = 1, per_server: int = 10,
                       now_ms: int | None = None, ttl_s: float = 86400.0) -> list[str]:
    """Models on this node's disk that are in demand and either served by nobody or busy: at
    least ``per_server`` (decayed) requests for each node serving them. Hottest first."""
    out = []
    for m in on_disk:
        d = demand.get(m, {})
        req = float(d.get("requests", 0))
        if now_ms is not None and d.get("last_active_ms"):
            req = decayed(int(req), int(d["last_active_ms"]), now_ms, ttl_s)
        if req < min_requests:
            continue
        n = int(servers.get(m, 0))
        if n == 0 or req >= per_server * n:
            out.append((req, m))
    return [m for _, m in sorted(out, key=lambda x: (-x[0], x[1]))]
