"""Test-only entry point: a `mesh402` node process whose stage worker runs tampered engines (a cheating
stage, `$MESH402_TAMPER`, see harness/tamper.py) or, with `$MESH402_TAMPER_HOST`, whose own stage 0 of a split
cheats as an entry. The verification tests start it as
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


distributed.DistributedRuntime.__init__ = _tampered_init  # type: ignore[method-assign]

if __name__ == "__main__":
    from mesh402.cli import main

    main()
