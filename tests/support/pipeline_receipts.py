"""Receipts over the in-process pipeline split (tests/support/pipeline.py): a run whose stages sign receipts
the entry collects, tampered stages, a slow receipt sink, and the `prompt` fixture these tests share
(registered by tests/serving/conftest.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mesh402.mesh.identity import NodeIdentity
from tests.support.pipeline import build, run_gen

N = 8


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    from mesh402.engine import Engine
    from mesh402.models.catalog import bundled_model_path
    e = Engine.load(bundled_model_path(), mode="exact", layers=(0, 1))
    text = e.chat_template.render([{"role": "user", "content": "Name a colour."}])
    return e.tokenizer.encode(text, add_special=False)


async def run_with_receipts(executor: Any, prompt: list[int], splits: list[int], *, kill: str | None = None,
                            standbys: tuple[str, ...] = (), also: Any = None, auditor: Any = None,
                            tamper: dict[str, Any] | None = None, constraints: Any = None
                            ) -> tuple[list[Any], dict[str, NodeIdentity], Any]:
    """`auditor`: the entry's audit policy (economics.verification.Auditor); `tamper`: worker name -> a function
    applied to every engine that worker loads (a cheating stage); `constraints`: the request's grammar."""
    model, mesh, _ = await build(executor, splits, standbys=list(standbys))
    model.auditor = auditor
    for name, fn in (tamper or {}).items():
        for eng in mesh.workers[name].engines.values():
            fn(eng)  # in place: the layers it already holds
        load = mesh.workers[name].loader
        mesh.workers[name].loader = lambda h, a, b, load=load, fn=fn: fn(load(h, a, b))
    ids = {"entry": model.signer, **{name: NodeIdentity.generate() for name in mesh.workers}}
    for name, w in mesh.workers.items():
        w.signer = ids[name]
    got: list[list[Any]] = []
    def sink(rs: list[Any], evidence: Any = None) -> None:
        got.append(rs)
        if also is not None:
            also(rs, evidence)
    model.signer, model.receipt_sink = ids["entry"], sink
    extra = {"constraints": constraints} if constraints is not None else {}
    if kill:
        await run_gen(model, prompt, N, kill_after=3, on_kill=lambda: mesh.kill(kill), **extra)
    else:
        await run_gen(model, prompt, N, **extra)
    for _ in range(200):
        if got:
            break
        await asyncio.sleep(0.02)
    assert got, "the entry received no receipts"
    return got[0], ids, model


class SlowSink:
    """A receipt sink whose write takes `delay_s` to commit (the future it returns, like EntryReceipts)."""

    def __init__(self, delay_s: float = 0.3) -> None:
        self.delay_s = delay_s
        self.writes: list[asyncio.Future] = []

    def __call__(self, receipts: list[Any], evidence: Any = None) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        loop.call_later(self.delay_s, fut.set_result, None)
        self.writes.append(fut)
        return fut

    def committed(self) -> bool:
        return bool(self.writes) and all(f.done() for f in self.writes)
