"""MoE expert parallel with real node processes on loopback (split forced with --max-vram).

A random-weight qwen2moe GGUF (real tokenizer and chat template, ~20 MB: trunk ~14 MB, experts
~7 MB) is too big for either node's budget (22 and 18 MB); the trunk fits the host, so the experts
are placed across both nodes. The API answers with the same tokens as a single node holding it all, and
`mesh402 status` shows which node holds which experts. The routers prefer one expert; once the host
has seen enough tokens, gate usage re-places the experts with the hot one on both nodes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from harness.mesh_nodes import MeshNodes, wait_until
from harness.reference import greedy_text, ready_plan
from tests.support.moe_mesh import BUDGET, HOT, MESSAGES

MAX_TOKENS = 24


solo_text = greedy_text


plan_of = ready_plan


@pytest.fixture(scope="module")
def mesh2(tmp_path_factory, moe_model) -> Iterator[tuple]:
    nodes = MeshNodes(tmp_path_factory.mktemp("moe2"))
    def extra(name: str) -> list[str]:
        return ["--model", str(moe_model), "--mode", "exact", "--max-vram", str(BUDGET[name])]

    try:
        a = nodes.start("a", no_model=False, extra=extra("a"), timeout=120)
        b = nodes.start("b", join=a.token(), no_model=False, extra=extra("b"), wait=False)
        b.proc.wait_http(f"{b.console}/api/status", timeout=120)
        t = wait_until(lambda: all((plan_of(n) or {}).get("kind") == "experts" for n in (a, b)), timeout=180,
                       what="an expert-parallel plan seen by both nodes")
        print(f"expert plan ready {t:.1f}s after the second node started")
        yield nodes, [a, b]
    finally:
        nodes.stop_all()


def ask(node, model: str) -> str:
    for _ in range(3):  # 503 + Retry-After is the API's answer while a peer looks briefly unreachable
        r = httpx.post(f"http://127.0.0.1:{node.api_port}/v1/chat/completions", timeout=180,
                       json={"model": model, "messages": MESSAGES, "temperature": 0, "max_tokens": MAX_TOKENS})
        if r.status_code != 503:
            break
        time.sleep(float(r.headers.get("retry-after", "1")))
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_expert_parallel_api_equals_solo_and_status_shows_experts(mesh2, moe_model) -> None:
    _, (a, b) = mesh2
    ref = solo_text(moe_model, MESSAGES, MAX_TOKENS)
    model = httpx.get(f"http://127.0.0.1:{a.api_port}/v1/models", timeout=10).json()["data"][0]["id"]
    for n in (a, b):
        assert ask(n, model) == ref
    plan = plan_of(a)
    nodes = {s[0] for s in plan["stages"]}
    assert nodes == {a.node_id, b.node_id}
    held = {(int(la), e) for per in plan["experts"].values() for la, es in per.items() for e in es}
    assert held == {(la, e) for la in range(2) for e in range(8)}  # every expert is held somewhere
    worker = b if plan["host"] == a.node_id else a
    assert worker.status()["node"]["distributed"]["experts"]["requests"] > 0
    budget = {a.node_id: BUDGET["a"] * 1e9, b.node_id: BUDGET["b"] * 1e9}
    assert all(s[3] * 1.1 <= budget[s[0]] for s in plan["stages"])  # every node within its budget
    from typer.testing import CliRunner

    from mesh402.cli import app

    out = CliRunner().invoke(app, ["status", "--home", str(a.home)])
    assert out.exit_code == 0, out.output
    assert "experts" in out.output and "L0:" in out.output, out.output
    print(out.output)


def test_gate_usage_replicates_the_hot_expert(mesh2, moe_model) -> None:
    _, (a, b) = mesh2
    ref = solo_text(moe_model, MESSAGES, MAX_TOKENS)
    model = httpx.get(f"http://127.0.0.1:{a.api_port}/v1/models", timeout=10).json()["data"][0]["id"]

    def replicated() -> bool:
        p = plan_of(a) or {}
        return bool(p.get("replicated"))

    for _ in range(8):  # enough routed tokens for the usage check
        if replicated():
            break
        assert ask(a, model) == ref
        time.sleep(1.0)
    wait_until(replicated, timeout=60, what="a plan with replicated hot experts")
    plan = plan_of(a)
    assert any(e == HOT for _, e in plan["replicated"]), plan["replicated"]
    for la, e in plan["replicated"]:  # a replicated expert is held by both nodes
        assert sum(e in per.get(str(la), []) for per in plan["experts"].values()) == 2
        assert sum(HOT in per.get(str(la), []) for per in plan["experts"].values()) == 2
    for n in (a, b):
        assert ask(n, model) == ref
    # bytes between host and expert node are reported per link (activations only: a few KB per token)
    wait_until(lambda: sum((plan_of(a) or {}).get("links", {}).values()) > 0, timeout=10, what="link bytes")
    from typer.testing import CliRunner

    from mesh402.cli import app

    out = CliRunner().invoke(app, ["status", "--home", str(a.home)])
    assert out.exit_code == 0 and f"{HOT}*" in out.output, out.output


def test_expert_frames_from_a_member_that_is_not_the_host_are_refused(mesh2, moe_model, tmp_path) -> None:
    """An admitted member that is not the model's host can neither make a node load experts nor run the
    experts it holds for the host (both worked for anyone before); the split keeps answering as solo."""
    import asyncio
    import torch

    from mesh402.mesh.framing import StreamType
    from mesh402.models.gguf_meta import file_fingerprint
    from mesh402.engine.expert_parallel import encode_request
    from mesh402.serving.stage_link import K, stage_frame
    from tests.support.hostile import EvilMember

    _, (a, b) = mesh2
    plan = plan_of(a)
    worker = b if plan["host"] == a.node_id else a
    ch = file_fingerprint(moe_model)
    model = httpx.get(f"http://127.0.0.1:{a.api_port}/v1/models", timeout=10).json()["data"][0]["id"]
    served = worker.status()["node"]["distributed"]["experts"]["requests"]

    async def attack() -> tuple[str, str]:
        async with EvilMember(tmp_path / "evil", a.token()) as evil:
            await evil.wait_connected(worker.node_id)
            fs = await evil.open(worker.node_id, StreamType.EXPERT)
            await fs.send(stage_frame(K.STAGE_KIND_EXPERT_ASSIGN, model_id=model, content_hash=ch,
                                      plan_epoch=plan["epoch"] + 1, params={"experts": "[[0, 0], [1, 1]]"}))
            assign = (await fs.recv(30)).stage.params.get("code", "")
            await fs.send(stage_frame(K.STAGE_KIND_EXPERT_RUN, content_hash=ch, plan_epoch=plan["epoch"],
                                      activations=encode_request(0, torch.randn(2, 128), {HOT: [0, 1]})))
            run = (await fs.recv(30)).stage.params.get("code", "")
            await fs.finish()
            return assign, run

    assign, run = asyncio.run(attack())
    assert (assign, run) == ("not_host", "not_host")
    status = worker.status()["node"]["distributed"]["experts"]
    assert status["refused"] >= 2 and status["requests"] == served  # nothing ran for the member
    assert ask(a, model) == solo_text(moe_model, MESSAGES, MAX_TOKENS)
