"""Test helpers for the escrow, staking and quorum contracts: a contract call that must revert, and a dev
chain with the work contracts bound (the environment itself is harness/work_contracts.py, which the gas
benchmark shares)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from harness.dev_chain import start_chain
from harness.work_contracts import STAGE_STAKE, USDC, VALIDATOR_STAKE, Actor, QuorumEnv, WorkEnv  # noqa: F401
from tests.support.chain import require_contract_toolchain


def reverts(error: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a wrapper call that must be refused with the contract's custom error `error`; the ChainCallError."""
    from mesh402.economics.contractcall import ChainCallError
    with pytest.raises(ChainCallError) as ei:
        call(*args, **kwargs)
    assert ei.value.error == error, str(ei.value)
    return ei.value


@contextmanager
def work_env(tmp: Path) -> Iterator[WorkEnv]:
    """A dev chain from `mesh402 chain dev` with the work contracts bound; prints the gas it recorded."""
    require_contract_toolchain()
    chain = start_chain(tmp, buyers=1)
    env = WorkEnv(chain)
    try:
        yield env
    finally:
        chain.proc.stop()
        if env.gas:
            print("\ngas used:", ", ".join(f"{k}={v}" for k, v in sorted(env.gas.items())))
