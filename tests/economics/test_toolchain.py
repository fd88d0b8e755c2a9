"""The contract toolchain: solcjs compiles contracts/*.sol (cached by source hash); npm is explained if missing."""

from __future__ import annotations

import time

import pytest

from mesh402.economics import toolchain
from mesh402.economics.contracts import compile_contracts
from tests.support.chain import require_contract_toolchain


def test_contracts_compile_from_source_and_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    require_contract_toolchain()
    arts = compile_contracts()
    tok = arts["MeshUSDC"]
    fns = [f["name"] for f in tok.abi if f["type"] == "function"]
    assert fns.count("transferWithAuthorization") == 2  # (v,r,s) and (bytes signature) overloads
    for name in ("receiveWithAuthorization", "cancelAuthorization", "authorizationState", "version", "DOMAIN_SEPARATOR"):
        assert name in fns
    assert tok.bytecode.startswith("0x") and len(tok.bytecode) > len(tok.runtime) > 1000
    assert "tryAggregate" in [f.get("name") for f in arts["Multicall3Lite"].abi]
    cached = list(toolchain.CACHE_DIR.glob("*.json"))
    assert cached, "artifacts are cached under .cache/contracts"
    t0 = time.perf_counter()
    again = compile_contracts()
    assert time.perf_counter() - t0 < 1.0 and again["MeshUSDC"].bytecode == tok.bytecode


def test_missing_npm_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(toolchain, "tools_ready", lambda: False)
    monkeypatch.setattr(toolchain.shutil, "which", lambda _: None)
    with pytest.raises(toolchain.ToolchainError, match="npm is not installed"):
        toolchain.ensure_tools()
