"""`serve --backend URL` with another mesh402 node standing alone (its API behind its API key, the key
from a 0600 file) and with llama-cpp-python's server as the backend: the front node lists the backend's
model unverified, answers it (plain and streamed, re-framed by its own edge, usage counted), reports the
backend's health in its status, and once the backend is killed shows the model unavailable and answers
503s. A backend that sends no usage (tests/support/usage_stripper.py, a process in front of a real node) is
counted by the front node itself, free and paid per 1k tokens, plain and streamed."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.mesh_nodes import MeshNodes, wait_until

MODEL = "smollm2-135m-instruct"
NOUSAGE = "smollm2-no-usage"  # the same model behind tests/support/usage_stripper.py: answers without usage
KEY = "backend-key-3e1f"
ASK = {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
       "max_tokens": 6, "temperature": 0}

pytestmark = pytest.mark.timeout(300)


def models(port: int) -> dict[str, dict]:
    return {m["id"]: m for m in httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10).json()["data"]}


def stream_chat(port: int, ask: dict) -> tuple[str, list[dict]]:
    """A streamed chat completion: its text and its chunks (the stream must end with [DONE])."""
    with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120,
                      json={**ask, "stream": True}) as s:
        assert s.status_code == 200
        events = [ln[6:] for ln in s.iter_lines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    return "".join((c["choices"][0].get("delta") or {}).get("content") or "" for c in chunks if c.get("choices")), chunks


def buy_plain_and_streamed(chain: Any, port: int, ask: dict) -> None:
    """Buy `ask` plain, then streamed, with the SDK's client; each settles 0.01 USDC from buyer-0 to node-0."""
    from harness.x402_payments import buy_chat

    buyer, seller = chain.dep.address("buyer-0"), chain.dep.address("node-0")
    b0, s0 = chain.balance(buyer), chain.balance(seller)
    assert buy_chat(chain, port, ask) == 200
    wait_until(lambda: chain.balance(seller) == s0 + 10_000, 30, what="the seller paid")
    assert chain.balance(buyer) == b0 - 10_000
    assert buy_chat(chain, port, {**ask, "stream": True}) == 200
    wait_until(lambda: chain.balance(seller) == s0 + 20_000, 30, what="the streamed answer paid")


def test_a_node_in_front_of_a_backend(tmp_path: Path) -> None:
    key_file = tmp_path / "backend.key"
    key_file.write_text(KEY + "\n")
    os.chmod(key_file, 0o600)
    nodes = MeshNodes(tmp_path / "nodes")
    try:
        back = nodes.start("back", no_model=False, env={"MESH402_API_KEY": KEY})
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{back.api_port}/ready", timeout=5).status_code == 200, 180,
                   what="the backend node's model")
        front = nodes.start("front", extra=["--backend", f"http://127.0.0.1:{back.api_port}/v1",
                                            "--backend-key-file", str(key_file)])
        m = models(front.api_port)[MODEL]
        assert m["owned_by"] == "backend" and m["verified"] is False and m["state"] == "ready" and m["context_length"]

        direct = httpx.post(f"http://127.0.0.1:{back.api_port}/v1/chat/completions", json=ASK, timeout=120,
                            headers={"Authorization": f"Bearer {KEY}"}).json()
        r = httpx.post(f"http://127.0.0.1:{front.api_port}/v1/chat/completions", json=ASK, timeout=120)
        assert r.status_code == 200, r.text
        assert "via=backend" in r.headers["x-mesh402-route"]
        text = r.json()["choices"][0]["message"]["content"]
        assert text == direct["choices"][0]["message"]["content"] and r.json()["usage"]["completion_tokens"] > 0

        streamed, chunks = stream_chat(front.api_port, {**ASK, "stream_options": {"include_usage": True}})
        assert streamed == text and chunks[-1]["usage"]["completion_tokens"] > 0

        status = front.status()["node"]["backends"]
        assert status[0]["healthy"] and status[0]["models"] == [MODEL]

        nodes.kill9(back)
        wait_until(lambda: models(front.api_port)[MODEL]["state"] == "unavailable", 30, what="the model unavailable")
        dead = httpx.post(f"http://127.0.0.1:{front.api_port}/v1/chat/completions", json=ASK, timeout=30)
        assert dead.status_code == 503 and dead.json()["error"]["code"] == "backend_unavailable"
        assert "Retry-After" in dead.headers
        assert not front.status()["node"]["backends"][0]["healthy"]
    finally:
        nodes.stop_all()


def test_a_backend_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    key_file = tmp_path / "open.key"
    key_file.write_text(KEY)
    os.chmod(key_file, 0o644)
    nodes = MeshNodes(tmp_path / "nodes")
    node = nodes.start("x", wait=False, extra=["--backend", "http://127.0.0.1:9/v1", "--backend-key-file", str(key_file)])
    assert node.proc.proc.wait(60) == 2 and "readable by others" in node.proc.log()


def need_llama_server() -> None:
    """llama-cpp-python (a ~4 minute build of llama.cpp) is a benchmark dependency (scripts/bench-deps.sh), not
    part of `setup.sh --dev`: where it is missing these two tests skip, saying so. The same backend paths run in
    every set-up against a standalone mesh402 node as the backend (the tests around these)."""
    try:
        import llama_cpp.server.app  # noqa: F401
        import starlette_context  # noqa: F401
    except ImportError as e:
        pytest.skip(f"llama-cpp-python's server is not installed ({e}): bash scripts/bench-deps.sh")


def test_a_node_in_front_of_llama_cpp_server(tmp_path: Path) -> None:
    need_llama_server()
    from harness.llama_server import start_llama_server
    from mesh402.models.catalog import bundled_model_path

    key_file = tmp_path / "backend.key"
    key_file.write_text(KEY)
    os.chmod(key_file, 0o600)
    llama, base = start_llama_server(tmp_path / "llama", bundled_model_path(), alias="smollm2-llamacpp", api_key=KEY)
    nodes = MeshNodes(tmp_path / "nodes")
    try:
        front = nodes.start("front", extra=["--backend", base, "--backend-key-file", str(key_file)])
        m = models(front.api_port)["smollm2-llamacpp"]
        assert m["owned_by"] == "backend" and m["verified"] is False and m["state"] == "ready"
        ask = {**ASK, "model": "smollm2-llamacpp"}
        r = httpx.post(f"http://127.0.0.1:{front.api_port}/v1/chat/completions", json=ask, timeout=120)
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["message"]["content"]
        assert text and r.json()["model"] == "smollm2-llamacpp" and r.json()["usage"]["completion_tokens"] == 6
        with httpx.stream("POST", f"http://127.0.0.1:{front.api_port}/v1/chat/completions", timeout=120,
                          json={**ask, "stream": True}) as s:
            assert s.status_code == 200
            events = [ln[6:] for ln in s.iter_lines() if ln.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert all(c["model"] == "smollm2-llamacpp" and "usage" not in c for c in chunks)  # not asked for
        assert "".join((c["choices"][0].get("delta") or {}).get("content") or "" for c in chunks if c.get("choices")) == text
        llama.stop()
        wait_until(lambda: models(front.api_port)["smollm2-llamacpp"]["state"] == "unavailable", 30,
                   what="the model unavailable")
        assert httpx.post(f"http://127.0.0.1:{front.api_port}/v1/chat/completions", json=ask, timeout=30).status_code == 503
    finally:
        nodes.stop_all()
        llama.stop()


def test_a_paid_node_sells_a_backend_model(tmp_path: Path) -> None:
    """x402 like any model: 402 first, then paid with the SDK's client and settled on chain after the answer."""
    from harness.dev_chain import paid_mesh_env
    from harness.llama_server import start_llama_server
    from mesh402.models.catalog import bundled_model_path
    from tests.support.chain import require_contract_toolchain

    require_contract_toolchain()
    need_llama_server()
    llama, base = start_llama_server(tmp_path / "llama", bundled_model_path(), alias="smollm2-llamacpp")
    try:
        with paid_mesh_env(tmp_path / "chain", buyers=1, nodes=1) as (chain, fac_url, nodes):
            front = nodes.start("front", extra=["--backend", base, "--price", "0.01", "--pay-to", "node-0",
                                                "--deployment", str(chain.dir), "--facilitator", fac_url])
            ask = {**ASK, "model": "smollm2-llamacpp"}
            unpaid = httpx.post(f"http://127.0.0.1:{front.api_port}/v1/chat/completions", json=ask, timeout=60)
            assert unpaid.status_code == 402
            listed = httpx.get(f"http://127.0.0.1:{front.api_port}/.well-known/x402", timeout=10).json()
            [row] = [m for m in listed["items"][0]["metadata"]["models"] if m["id"] == "smollm2-llamacpp"]
            assert row["verified"] is False and row["pricePerRequest"] == "10000"  # sold, unverified
            buy_plain_and_streamed(chain, front.api_port, ask)
    finally:
        llama.stop()


def same_counts(usage: dict, direct: dict) -> None:
    """The node's own count of an answer without usage: the backend node's exact count (the front node counts
    with the bundled SmolLM2 tokenizer and chat template, the model behind the backend), marked estimated."""
    assert usage["estimated"] is True and usage["tokenizer"] == MODEL
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (direct["prompt_tokens"], direct["completion_tokens"])


def test_another_node_answers_a_backend_model_through_the_mesh(tmp_path: Path) -> None:
    """Node A fronts a backend and announces its model (`model:<id>` with `backend: true`); node B, which joined
    A's mesh and serves nothing, lists it unverified and answers it through the tunnel, plain and streamed.
    `model: auto` on B leaves it alone unless the client opts in (x-mesh402-auto-backends: true) or B's operator
    does (--auto-backends, node C); on A itself `auto` picks A's own backend models only with the opt-in too.
    A second backend of A sends no usage (tests/support/usage_stripper.py): A counts the tokens itself, plain
    and streamed, and says so. Once the backend dies, B lists the model unavailable and answers a clean 503."""
    from tests.support.usage_stripper import start_usage_stripper

    nodes = MeshNodes(tmp_path / "nodes")
    stripper = None
    try:
        back = nodes.start("back", no_model=False)
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{back.api_port}/ready", timeout=5).status_code == 200, 180,
                   what="the backend node's model")
        stripper, stripped = start_usage_stripper(tmp_path / "stripper", f"http://127.0.0.1:{back.api_port}/v1", NOUSAGE)
        front = nodes.start("front", extra=["--backend", f"http://127.0.0.1:{back.api_port}/v1", "--backend", stripped])
        peer = nodes.start("peer", join=front.token())
        wait_until(lambda: models(peer.api_port).get(MODEL, {}).get("state") == "ready", 60,
                   what="the backend model listed on the peer")
        m = models(peer.api_port)[MODEL]
        assert m["owned_by"] == "backend" and m["verified"] is False and m["host"] == front.node_id
        assert m["context_length"]

        direct = httpx.post(f"http://127.0.0.1:{back.api_port}/v1/chat/completions", json=ASK, timeout=120).json()
        r = httpx.post(f"http://127.0.0.1:{peer.api_port}/v1/chat/completions", json=ASK, timeout=120)
        assert r.status_code == 200, r.text
        assert f"node={front.node_id[:16]}; via=mesh; backend; verified=false" in r.headers["x-mesh402-route"]
        text = r.json()["choices"][0]["message"]["content"]
        assert text == direct["choices"][0]["message"]["content"] and r.json()["model"] == MODEL
        assert r.json()["usage"]["completion_tokens"] > 0

        streamed, chunks = stream_chat(peer.api_port, {**ASK, "stream_options": {"include_usage": True}})
        assert streamed == text and chunks[-1]["usage"]["completion_tokens"] > 0

        # a backend that sends no usage: the front node counts prompt and completion itself, and says so
        bare = {**ASK, "model": NOUSAGE}
        r = httpx.post(f"http://127.0.0.1:{front.api_port}/v1/chat/completions", json=bare, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == text and r.json()["model"] == NOUSAGE
        same_counts(r.json()["usage"], direct["usage"])
        assert r.headers["x-mesh402-usage"] == f"estimated; tokenizer={MODEL}"
        streamed, chunks = stream_chat(front.api_port, {**bare, "stream_options": {"include_usage": True}})
        assert streamed == text and chunks[-1]["choices"] == []
        same_counts(chunks[-1]["usage"], direct["usage"])
        streamed, chunks = stream_chat(front.api_port, bare)  # not asked for: no usage chunk
        assert streamed == text and all("usage" not in c for c in chunks)
        wait_until(lambda: models(peer.api_port).get(NOUSAGE, {}).get("state") == "ready", 60,
                   what="the usage-less backend model listed on the peer")
        streamed, chunks = stream_chat(peer.api_port, {**bare, "stream_options": {"include_usage": True}})
        assert streamed == text  # through the mesh: the front node's count reaches the peer's client
        same_counts(chunks[-1]["usage"], direct["usage"])
        [counted] = [b for b in front.status()["node"]["backends"] if b["models"] == [NOUSAGE]]
        assert counted["usage_estimated"] == 3 and counted["answers"] == 4

        auto = {**ASK, "model": "auto"}  # unverified models are not picked for a client who named none...
        assert httpx.post(f"http://127.0.0.1:{peer.api_port}/v1/chat/completions", json=auto, timeout=60).status_code == 503
        asked = httpx.post(f"http://127.0.0.1:{peer.api_port}/v1/chat/completions", json=auto, timeout=120,
                           headers={"x-mesh402-auto-backends": "true"})  # ...unless the client opts in...
        assert asked.status_code == 200 and asked.json()["choices"][0]["message"]["content"] == text, asked.text
        # ...also on the node that fronts them: its own backend models, only with the opt-in
        own = httpx.post(f"http://127.0.0.1:{front.api_port}/v1/chat/completions", json=auto, timeout=60)
        assert own.status_code == 503 and own.json()["error"]["code"] == "no_model", own.text
        own = httpx.post(f"http://127.0.0.1:{front.api_port}/v1/chat/completions", json=auto, timeout=120,
                         headers={"x-mesh402-auto-backends": "true"})
        assert own.status_code == 200, own.text
        assert own.json()["model"] in (MODEL, NOUSAGE) and own.json()["choices"][0]["message"]["content"] == text
        route = own.headers["x-mesh402-route"]
        assert f"model={own.json()['model']}; via=backend; verified=false" in route and "class=" in route, route
        opted = nodes.start("opted", join=front.token(), extra=["--auto-backends"])  # ...or its operator does
        wait_until(lambda: models(opted.api_port).get(MODEL, {}).get("state") == "ready", 60,
                   what="the backend model listed on the opted-in node")
        picked = httpx.post(f"http://127.0.0.1:{opted.api_port}/v1/chat/completions", json=auto, timeout=120)
        assert picked.status_code == 200, picked.text
        assert picked.json()["choices"][0]["message"]["content"] == text

        nodes.kill9(back)
        wait_until(lambda: models(peer.api_port)[MODEL]["state"] == "unavailable", 30, what="the model unavailable")
        dead = httpx.post(f"http://127.0.0.1:{peer.api_port}/v1/chat/completions", json=ASK, timeout=30)
        assert dead.status_code == 503 and dead.json()["error"]["code"] == "backend_unavailable"
        assert "Retry-After" in dead.headers
    finally:
        nodes.stop_all()
        if stripper is not None:
            stripper.stop()


@dataclass
class PaidBackend:
    chain: Any
    fac_url: str
    nodes: MeshNodes
    back: Any  # a mesh402 node serving MODEL: the backend
    stripped: str  # the same model without usage (tests/support/usage_stripper.py), its base URL


@pytest.fixture(scope="module")
def paid_backend(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PaidBackend]:
    """A dev chain, its facilitator, a backend node and the usage stripper in front of it, shared by the paid
    tests below (each starts its own selling nodes)."""
    from harness.dev_chain import paid_mesh_env
    from tests.support.chain import require_contract_toolchain
    from tests.support.usage_stripper import start_usage_stripper

    require_contract_toolchain()
    tmp = tmp_path_factory.mktemp("paid-backend")
    with paid_mesh_env(tmp / "chain", buyers=2, nodes=2) as (chain, fac_url, nodes):
        back = nodes.start("back", no_model=False)
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{back.api_port}/ready", timeout=5).status_code == 200, 180,
                   what="the backend node's model")
        stripper, stripped = start_usage_stripper(tmp / "stripper", f"http://127.0.0.1:{back.api_port}/v1", NOUSAGE)
        try:
            yield PaidBackend(chain, fac_url, nodes, back, stripped)
        finally:
            stripper.stop()


def test_a_paid_entry_sells_another_nodes_backend_model(paid_backend: PaidBackend) -> None:
    """x402 at the edge for a backend model fronted by another node: B charges the client (402, then paid
    with the SDK's client and settled on chain) and answers through A's backend over the mesh."""
    chain, fac_url, nodes, back = paid_backend.chain, paid_backend.fac_url, paid_backend.nodes, paid_backend.back
    front = nodes.start("front", extra=["--backend", f"http://127.0.0.1:{back.api_port}/v1"])
    entry = nodes.start("entry", join=front.token(), extra=["--price", "0.01", "--pay-to", "node-0",
                                                            "--deployment", str(chain.dir), "--facilitator", fac_url])
    wait_until(lambda: models(entry.api_port).get(MODEL, {}).get("state") == "ready", 60,
               what="the backend model listed on the paid entry")
    unpaid = httpx.post(f"http://127.0.0.1:{entry.api_port}/v1/chat/completions", json=ASK, timeout=60)
    assert unpaid.status_code == 402
    buy_plain_and_streamed(chain, entry.api_port, ASK)


def test_a_metered_node_charges_its_own_count_when_the_backend_sends_no_usage(paid_backend: PaidBackend) -> None:
    """A node sells a backend that sends no usage per 1k tokens: it charges the buyer's credit on its own
    count (the bundled tokenizer's, equal to the backend node's exact count here), plain and streamed, and the
    ledger's balance shows exactly that."""
    import asyncio
    import math

    from mesh402.economics.client import PayingClient

    chain, nodes, back = paid_backend.chain, paid_backend.nodes, paid_backend.back
    rate, topup = 20_000, 2_000  # --price-per-1k 0.02, --credit-topup 0.002 (atomic units, 6 decimals)
    front = nodes.start("metered", extra=["--backend", paid_backend.stripped, "--price-per-1k", "0.02",
                                          "--credit-topup", "0.002", "--pay-to", "node-1", "--deployment",
                                          str(chain.dir), "--facilitator", paid_backend.fac_url])
    base = f"http://127.0.0.1:{front.api_port}"
    direct = httpx.post(f"http://127.0.0.1:{back.api_port}/v1/chat/completions", json=ASK, timeout=120).json()
    cost = math.ceil(direct["usage"]["total_tokens"] * rate / 1000)
    seller = chain.balance(chain.dep.address("node-1"))

    async def buy() -> tuple[dict, int, dict, int]:
        async with PayingClient(base, chain.key("buyer-1"), max_per_request=50_000) as c:
            def balance() -> int:
                return int(httpx.get(base + "/v1/x402/credit", timeout=30,
                                     headers={"X-Mesh402-Credit": c.credit_token or ""}).json()["balance"])
            plain = await c.chat(ASK["messages"], model=NOUSAGE, max_tokens=6, temperature=0)
            after_plain = balance()
            streamed = await c.chat(ASK["messages"], model=NOUSAGE, max_tokens=6, temperature=0, stream=True)
            return plain, after_plain, streamed, balance()

    plain, after_plain, streamed, after_stream = asyncio.run(buy())
    same_counts(plain["usage"], direct["usage"])
    assert after_plain == topup - cost
    credit = streamed["x402"]["credit"]
    assert credit["usage"] == {k: direct["usage"][k] for k in ("prompt_tokens", "completion_tokens")}
    assert int(credit["charged"]) == cost and after_stream == topup - 2 * cost
    wait_until(lambda: chain.balance(chain.dep.address("node-1")) == seller + topup, 30, what="the top-up paid")
