"""Fixtures for constrained decoding: the bundled model's tokenizer and one grammar compiler for it."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def smol_tokenizer() -> Any:
    """The bundled SmolLM2 tokenizer (our own, from the GGUF)."""
    from mesh402.engine.tokenizer import Tokenizer
    from mesh402.models.catalog import bundled_model_path

    return Tokenizer.from_gguf(bundled_model_path())


@pytest.fixture(scope="session")
def smol_grammars(smol_tokenizer: Any) -> Any:
    """One GrammarCompiler for the bundled vocabulary (building llguidance's tokenizer takes ~0.3 s)."""
    from mesh402.engine.grammar import GrammarCompiler

    return GrammarCompiler(smol_tokenizer)
