"""Test-only entry point: a `mesh402` node process whose stage worker runs tampered engines (a cheating
stage, `$MESH402_TAMPER`, see harness/tamper.py) or, with `$MESH402_TAMPER_HOST`, whose own stage 0 of a split
cheats as an entry, or with `$MESH402_TAMPER_EXPERTS=scale` whose expert shards return wrong outputs. The verification tests start it as
`python -m tests.support.tamper_node serve ...` instead of `python -m mesh402.cli serve ...`; nothing in the
product reads a hook from the environment."""

from __future__ import annotations

import os
from typing import Any

from mesh402.serving import distributed
from harness.tamper import install, tamper_engine

_init = distributed.DistributedRuntime.__init__


def _tampered_init(self: distributed.DistributedRuntime, *args: Any, **kwargs: Any) -> None:
    _init(self, *args, **kwargs)
    install(self.worker)
    host_cheat = os.environ.get("MESH402_TAMPER_HOST", "").strip()
    if host_cheat:  # the host's own stage 0 of a split cheats (its validator and stage worker stay honest)
        load = self._load_engine

        def tampered(entry: Any, layers: tuple[int, int] | None) -> Any:
            engine = load(entry, layers)
            return tamper_engine(engine, host_cheat, 0) if layers is not None else engine
        self._load_engine = tampered  # type: ignore[method-assign]


    if os.environ.get("MESH402_TAMPER_EXPERTS", "").strip() == "scale":  # an expert node returning wrong outputs
        svc = self.expert_service
        load_shard = svc.loader
        svc.loader = lambda *a: _ScaledExperts(load_shard(*a))


class _ScaledExperts:
    """An expert shard whose replies are its experts' outputs times 1.01 (a node skimping on its experts)."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker

    def __getattr__(self, name: str) -> Any:
        return getattr(self.worker, name)

    def handle(self, payload: bytes) -> bytes:
        from mesh402.engine.expert_parallel import decode_reply, encode_reply
        return encode_reply({e: y * 1.01 for e, y in decode_reply(self.worker.handle(payload)).items()})


distributed.DistributedRuntime.__init__ = _tampered_init  # type: ignore[method-assign]

if __name__ == "__main__":
    from mesh402.cli import main

    main()
