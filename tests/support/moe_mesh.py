"""The tiny chat MoE that expert-parallel scenarios serve on real nodes: too big for either node's budget,
so its experts are spread over both; the `moe_model` fixture is registered by tests/scenarios/conftest.py."""

from __future__ import annotations

import pytest

from tests.support.engine import smollm2_gguf
from tests.support.moe_models import write_chat_moe_gguf

MESSAGES = [{"role": "user", "content": "Name three rivers in Europe."}]
BUDGET = {"a": 0.022, "b": 0.018}  # GB; the model needs 20.4 MB x 1.1 = 22.4 MB: fits neither
HOT = 5  # every router prefers expert 5: skewed gate usage


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    p = tmp_path_factory.mktemp("moe-model") / "tiny-moe.gguf"
    write_chat_moe_gguf(p, smollm2_gguf(), hot=HOT)
    return p
