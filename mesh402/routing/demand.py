"""Which models a `--standby` node should start serving because the mesh asks for them."""

from __future__ import annotations

from typing import Iterable, Mapping


def standby_promotions(demand: Mapping[str, Mapping[str, int]], servers: Mapping[str, int],
                       on_disk: Iterable[str], *, min_requests: int = 1, per_server: int = 10) -> list[str]:
    """Models on this node's disk that are in demand and either served by nobody or busy: at
    least ``per_server`` requests (within the demand TTL) for each node serving them. Hottest first."""
    out = []
    for m in on_disk:
        req = int(demand.get(m, {}).get("requests", 0))
        if req < min_requests:
            continue
        n = int(servers.get(m, 0))
        if n == 0 or req >= per_server * n:
            out.append((req, m))
    return [m for _, m in sorted(out, key=lambda x: (-x[0], x[1]))]
