"""One `mesh402 serve` process on the bundled model for the whole session, shared by every test file that asks
for `api_node` (node processes are expensive to start)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.procs import MESH402, NodeProcess, free_port

API_KEY = "test-key-7f3a"


@dataclass
class ApiNode:
    proc: NodeProcess
    port: int
    api_key: str

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}


@pytest.fixture(scope="session")
def api_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiNode]:
    """One `mesh402 serve` process on the bundled model, with an API key from the environment."""
    home: Path = tmp_path_factory.mktemp("api-node")
    port = free_port()
    proc = NodeProcess([*MESH402, "serve", "--port", str(port), "--home", str(home)], home,
                       env={"MESH402_API_KEY": API_KEY})
    try:
        waited = proc.wait_http(f"http://127.0.0.1:{port}/ready", timeout=180)
        print(f"api node ready in {waited:.1f}s")
        yield ApiNode(proc, port, API_KEY)
    finally:
        proc.stop()
