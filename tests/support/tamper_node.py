"""Test-only entry point: a `mesh402` node process whose stage worker runs tampered engines (a cheating
stage, `$MESH402_TAMPER`, see harness/tamper.py). The verification tests start it as
`python -m tests.support.tamper_node serve ...` instead of `python -m mesh402.cli serve ...`; nothing in the
product reads a hook from the environment."""

from __future__ import annotations

from typing import Any

from mesh402.serving import distributed
from harness.tamper import install

_init = distributed.DistributedRuntime.__init__


def _tampered_init(self: distributed.DistributedRuntime, *args: Any, **kwargs: Any) -> None:
    _init(self, *args, **kwargs)
    install(self.worker)


distributed.DistributedRuntime.__init__ = _tampered_init  # type: ignore[method-assign]

if __name__ == "__main__":
    from mesh402.cli import main

    main()
