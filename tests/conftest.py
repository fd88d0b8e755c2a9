"""Shared fixtures. Node processes are started once per session and reused across test files."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.procs import MESH402, NodeProcess, free_port

# Every node process and in-process engine uses one torch thread: the CI machine has 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

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


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The bundled SmolLM2 tokenizer (our own, from the GGUF)."""
    from mesh402.engine.tokenizer import Tokenizer
    from mesh402.models.catalog import bundled_model_path

    return Tokenizer.from_gguf(bundled_model_path())


@pytest.fixture(scope="session")
def smol_grammars(smol_tokenizer):
    """One GrammarCompiler for the bundled vocabulary (building llguidance's tokenizer takes ~0.3 s)."""
    from mesh402.engine.grammar import GrammarCompiler

    return GrammarCompiler(smol_tokenizer)
