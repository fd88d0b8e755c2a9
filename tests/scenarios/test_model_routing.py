"""The done-when scenario with real nodes and a local Nostr relay: A `serve --publish`, B
`serve --auto` (no token copied) form one mesh; `model: "auto"` requests are answered and the
`x-mesh402-route` header names the model, the node and why. A serves the bundled model (no
capability tags); B serves the same weights with `general.tags = [code, programming]` and a
tool-aware template, under a neutral name: a code request must go to B's model."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from harness.mesh_nodes import MeshNode, MeshNodes, wait_until
from harness.nostr_relay import RelayThread
from tests.support.model_variants import make_variant

BUNDLED = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def mesh2(tmp_path_factory) -> Iterator[tuple[MeshNode, MeshNode, str]]:
    root = tmp_path_factory.mktemp("router")
    variant = make_variant(root / "model-b.gguf", ["code", "programming"])
    relay = RelayThread().start()
    nodes = MeshNodes(root)
    try:
        a = nodes.start("a", no_model=False, extra=["--nostr-relay", relay.url, "--publish", "--nostr-refresh", "1"])
        t0 = time.monotonic()
        b = nodes.start("b", no_model=False, extra=["-m", str(variant), "--nostr-relay", relay.url, "--auto"])
        nodes.wait_full_mesh([a, b], timeout=30)
        print(f"\n--auto join (B start -> full mesh): {time.monotonic() - t0:.2f}s")

        def both_ready() -> bool:
            models = httpx.get(f"http://127.0.0.1:{a.api_port}/v1/models", timeout=5).json()["data"]
            return {m["id"] for m in models if m["state"] == "ready"} >= {BUNDLED, "model-b"}

        wait_until(both_ready, 90, step=0.3, what="both models ready")
        yield a, b, relay.url
    finally:
        nodes.stop_all()
        relay.stop()


def chat(node: MeshNode, text: str, **extra) -> httpx.Response:
    body = {"model": "auto", "messages": [{"role": "user", "content": text}], "max_tokens": 8, "temperature": 0, **extra}
    return httpx.post(f"http://127.0.0.1:{node.api_port}/v1/chat/completions", json=body, timeout=120)


def route(r: httpx.Response) -> dict[str, str]:
    h = r.headers["x-mesh402-route"]
    return {k.strip(): v.strip() for k, _, v in (p.partition("=") for p in h.split(";"))}


def test_streamed_answers_count_toward_observed_speed(mesh2) -> None:
    """First in the module: nothing has been served yet. B answers one streamed request for its model and
    then announces the speed it observed, which A reads from B's signed announcement."""
    import json

    a, b, _ = mesh2

    def b_label() -> dict:
        raw = a.peers()[b.node_id]["announcement"]["labels"].get("model:model-b")
        return json.loads(raw) if raw else {}

    assert "tok_s" not in b_label()
    body = {"model": "model-b", "messages": [{"role": "user", "content": "Count to five."}], "max_tokens": 8,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", f"http://127.0.0.1:{b.api_port}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        assert r.read().rstrip().endswith(b"data: [DONE]")
    wait_until(lambda: b_label().get("tok_s", 0) > 0, 20, step=0.2, what="B's observed speed announced")
    print(f"\nobserved from one streamed answer: {b_label()['tok_s']} tok/s")


def test_one_mesh_without_token(mesh2) -> None:
    a, b, _ = mesh2
    assert a.status()["mesh_id"] == b.status()["mesh_id"]
    assert "--join" not in b.args


def test_code_request_routes_to_code_model_over_the_mesh(mesh2) -> None:
    a, b, _ = mesh2
    r = chat(a, "Write a python function that reverses a list, with a unit test.")
    assert r.status_code == 200, r.text
    rt = route(r)
    assert rt["model"] == "model-b" and rt["via"] == "mesh" and rt["class"].startswith("code/")
    assert "tags fit code" in rt["why"], rt
    assert rt["node"] == b.node_id[:16]
    assert r.json()["model"] == "model-b" and r.json()["choices"][0]["message"]["content"] is not None


def test_info_request_stays_on_general_model(mesh2) -> None:
    a, b, _ = mesh2
    r = chat(a, "What is the capital of France?")
    assert r.status_code == 200, r.text
    rt = route(r)
    assert rt["model"] == BUNDLED and rt["via"] == "local" and rt["class"] == "info/quick", rt
    # from B the same request crosses the mesh to A
    r = chat(b, "What is the capital of France?")
    assert r.status_code == 200 and route(r)["model"] == BUNDLED and route(r)["via"] == "mesh"


def test_tool_call_needs_tool_template_and_no_model_is_a_404_not_a_fallback(mesh2) -> None:
    a, _, _ = mesh2
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    r = chat(a, "Look up the weather in Paris", tools=tools)
    assert r.status_code == 200, r.text
    assert route(r)["model"] == "model-b"  # only its chat template renders tools
    r = httpx.post(f"http://127.0.0.1:{a.api_port}/v1/chat/completions",
                   json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}, timeout=30)
    assert r.status_code == 404


def test_router_decision_cost_and_demand(mesh2) -> None:
    a, _, _ = mesh2
    from mesh402.api.router import Router
    from mesh402.routing.models import Candidate, ModelFacts

    router = Router()
    cands = [Candidate(ModelFacts(f"m{i}", 8192, 10**8 * (i + 1), frozenset({"code"} if i % 2 else set()), bool(i % 3)),
                       f"n{i}") for i in range(8)]
    msgs = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Refactor this function " * 20}]
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        router.decide(msgs, None, cands)
    us = (time.perf_counter() - t0) / n * 1e6
    print(f"\nrouter decision (classify + score 8 models): {us:.1f} us/request")
    assert us < 2000
    demand = wait_until(lambda: "model-b" in a.status()["demand"], 10, what="demand for model-b") is not None
    assert demand
