"""Fixtures that start processes and threads for one test and stop them after it: a mesh of node processes
(harness/mesh_nodes.py) and a Nostr relay on loopback (harness/nostr_relay.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.mesh_nodes import MeshNodes
from harness.nostr_relay import RelayThread


@pytest.fixture
def mesh_nodes(tmp_path: Path) -> Iterator[MeshNodes]:
    nodes = MeshNodes(tmp_path)
    try:
        yield nodes
    finally:
        nodes.stop_all()


@pytest.fixture
def nostr_relay() -> Iterator[RelayThread]:
    r = RelayThread().start()
    try:
        yield r
    finally:
        r.stop()
