"""A member that joined an open mesh with a valid token and turned hostile, against real node processes.

It tries the tunnel as an SSRF (other servers, other paths), sends ASSIGN/OPEN to a split's stage without
being the host (an epoch of 2^64-1 among them), and, where it is the elected host, opens a session and
goes silent. Each is refused or timed out, and honest requests keep working during and after.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

from mesh402.mesh.proto import mesh_pb2 as pb
from mesh402.models.catalog import bundled_model_path
from mesh402.serving.stage_link import K, Hop
from harness.mesh_nodes import MeshNode, MeshNodes, wait_until
from harness.reference import ready_plan
from tests.support.hostile import EvilMember, assign_frame, open_frame

MODEL = "smollm2-135m-instruct"
SPLIT_ARGS = ["--mode", "exact", "--max-vram", "0.08"]  # the ~98 MB model needs both nodes
MESSAGES = [{"role": "user", "content": "Name the capital of Italy."}]

pytestmark = pytest.mark.timeout(300)


def content_hash() -> str:
    from mesh402.models.gguf_meta import file_fingerprint

    return file_fingerprint(bundled_model_path())


def ask(node: MeshNode) -> str:
    r = httpx.post(f"http://127.0.0.1:{node.api_port}/v1/chat/completions", timeout=120,
                   json={"model": MODEL, "messages": MESSAGES, "temperature": 0, "max_tokens": 8})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def holding_proofs(node: MeshNode) -> dict:
    r = httpx.get(f"{node.console}/api/status", timeout=5)
    return r.json()["node"]["distributed"]["holdings"]


def stage_status(node: MeshNode) -> dict:
    r = httpx.get(f"{node.console}/api/status", timeout=5)
    return r.json()["node"]["distributed"]["stage"]


@pytest.fixture(scope="module")
def split2(tmp_path_factory) -> Iterator[tuple[MeshNode, MeshNode, str]]:
    """Two node processes holding one split of the bundled model: (host, stage, reference answer)."""
    nodes = MeshNodes(tmp_path_factory.mktemp("hostile-split"))
    try:
        a = nodes.start("a", no_model=False, extra=SPLIT_ARGS)
        b = nodes.start("b", join=a.token(), no_model=False, extra=SPLIT_ARGS)
        wait_until(lambda: ready_plan(a) is not None and ready_plan(b) is not None, timeout=180,
                   what="a ready split plan")
        plan = ready_plan(a)
        host, stage = (a, b) if plan["host"] == a.node_id else (b, a)
        yield host, stage, ask(host)
    finally:
        nodes.stop_all()


class MetadataServer:
    """A loopback HTTP server standing in for a cloud instance's metadata service: records every hit."""

    def __init__(self) -> None:
        hits = self.hits = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                hits.append((self.path, dict(self.headers)))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"instance-credentials-SECRET")

            do_POST = do_GET

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


def test_tunnel_reaches_nothing_but_the_hosts_openai_routes(split2, tmp_path: Path) -> None:
    host, _, reference = split2
    meta = MetadataServer()
    p = meta.port
    attacks = [("GET", f"@127.0.0.1:{p}/latest/meta-data"), ("GET", f"//127.0.0.1:{p}/latest/meta-data"),
               ("GET", f"http://127.0.0.1:{p}/latest/meta-data"), ("POST", f"/v1/chat/completions@127.0.0.1:{p}/x"),
               ("GET", "/v1/models/../../latest/meta-data"), ("GET", "/v1/models?next=@127.0.0.1"),
               ("GET", "/v1/%2e%2e/latest"), ("GET", "/api/status"), ("DELETE", "/v1/models"),
               ("GET", "/v1\\models"), ("GET", "")]

    async def attack() -> list[tuple[int, bytes]]:
        async with EvilMember(tmp_path / "evil", host.token()) as evil:
            await evil.wait_connected(host.node_id)
            out = [(s, b) for s, _, b in [await evil.tunnel(host.node_id, m, path) for m, path in attacks]]
            # the host's own OpenAI routes still answer a member (a free node: no payment needed)
            status, _, models = await evil.tunnel(host.node_id, "GET", "/v1/models")
            out.append((status, models))
            status, _, chat = await evil.tunnel(host.node_id, "POST", "/v1/chat/completions", json.dumps(
                {"model": MODEL, "messages": MESSAGES, "temperature": 0, "max_tokens": 8}).encode())
            out.append((status, chat))
            big = b'{"model":"' + b"x" * (9 * 1024 * 1024) + b'"}'  # over the 8 MiB request cap, in chunks
            status, _, too_big = await evil.tunnel(host.node_id, "POST", "/v1/chat/completions", big)
            out.append((status, too_big))
            return out

    try:
        got = asyncio.run(attack())
    finally:
        meta.close()
    assert meta.hits == [], f"the host called another server for a member: {meta.hits}"
    for (method, path), (status, body) in zip(attacks, got):
        assert status == 404 and b"route_not_allowed" in body, (method, path, status, body[:200])
        assert b"SECRET" not in body
    (ms, models), (cs, chat), (bs, big) = got[len(attacks):]
    assert ms == 200 and MODEL in models.decode()
    assert cs == 200 and json.loads(chat)["choices"][0]["message"]["content"] == reference
    assert bs == 413 and b"body_too_large" in big
    assert ask(host) == reference


def test_assign_and_open_from_a_member_that_is_not_the_host_are_refused(split2, tmp_path: Path) -> None:
    host, stage, reference = split2
    ch = content_hash()
    plan = ready_plan(host)
    _, s_start, s_end, _ = next(s for s in plan["stages"] if s[0] == stage.node_id)
    held = stage_status(stage)["held"]
    before = stage_status(stage)

    async def attack() -> dict[str, str]:
        codes: dict[str, str] = {}
        async with EvilMember(tmp_path / "evil", host.token()) as evil:
            await evil.wait_connected(stage.node_id)
            honest = asyncio.create_task(asyncio.to_thread(ask, host))  # served while the attack runs
            for name, epoch in (("poison", 2**64 - 1), ("next", plan["epoch"] + 1)):
                r = await evil.stage(stage.node_id, assign_frame(MODEL, ch, epoch, 0, 30))
                codes[f"assign_{name}"] = r.params["code"] if r is not None and r.kind == K.STAGE_KIND_ERROR else "accepted"
            r = await evil.stage(host.node_id, assign_frame(MODEL, ch, plan["epoch"] + 1, 0, 15))
            codes["assign_host"] = r.params["code"] if r is not None and r.kind == K.STAGE_KIND_ERROR else "accepted"
            # OPEN without a grant, and with a grant the member signed itself
            r = await evil.stage(stage.node_id, open_frame(MODEL, ch, plan["epoch"], s_start, s_end,
                                                           {"max_len": "64", "sampling": "{}", "chain": "[]"}))
            codes["open_unsigned"] = r.params["code"] if r is not None and r.kind == K.STAGE_KIND_ERROR else "accepted"
            grant = evil.grant(ch, plan["epoch"], [Hop(stage.node_id, s_start, s_end)])
            r = await evil.stage(stage.node_id, open_frame(MODEL, ch, plan["epoch"], s_start, s_end, grant))
            codes["open_self_signed"] = r.params["code"] if r is not None and r.kind == K.STAGE_KIND_ERROR else "accepted"
            codes["honest"] = await honest
        return codes

    codes = asyncio.run(attack())
    assert codes["assign_poison"] == codes["assign_next"] == codes["assign_host"] == "not_host", codes
    assert codes["open_unsigned"] == "bad_grant" and codes["open_self_signed"] == "not_host", codes
    assert codes["honest"] == reference
    after = stage_status(stage)
    assert after["held"] == held  # nothing was loaded for the member
    assert after["assigns_refused"] >= before["assigns_refused"] + 2
    assert after["opens_refused"] >= before["opens_refused"] + 2
    assert ask(host) == reference  # the epoch was not poisoned: the real plan's sessions still open


@pytest.fixture(scope="module")
def lone(tmp_path_factory) -> Iterator[MeshNode]:
    """A node whose budget cannot hold the model alone (so it hosts nothing), one session per stage engine,
    and an 8 s session deadline (long enough for the checks made while the silent session must still be open,
    two stream round trips and a status read, on a loaded machine)."""
    nodes = MeshNodes(tmp_path_factory.mktemp("hostile-lone"))
    try:
        yield nodes.start("v", no_model=False, extra=["--mode", "exact", "--max-vram", "0.08", "--max-sessions", "1",
                                                      "--session-idle-timeout", "8"])
    finally:
        nodes.stop_all()


def test_a_silent_session_is_closed_at_the_deadline_and_its_slot_comes_back(lone, tmp_path: Path) -> None:
    """Here the member *is* the elected host (it claims more capacity and the model, proves it holds the
    model's tensors, and there is no incumbent): it may assign layers within the node's budget and open sessions, but a session it then
    leaves silent is closed after the deadline, and an epoch far ahead or a range over budget is refused."""
    v = lone
    ch = content_hash()

    async def attack() -> dict[str, object]:
        out: dict[str, object] = {}
        async with EvilMember(tmp_path / "evil", v.token()) as evil:
            await evil.wait_connected(v.node_id)
            evil.answer_holding_proofs(bundled_model_path())  # it must prove it holds the tensors (it can)
            evil.svc.update_local(models=[pb.ModelEntry(model_id=MODEL, content_hash=ch)],
                                  labels={"capacity_bytes": str(2**40)})
            code = ""
            for _ in range(150):  # until the node serves stage streams and has heard the member's claim
                try:
                    r = await evil.stage(v.node_id, assign_frame(MODEL, ch, 1, 15, 30))
                    code = r.params.get("code", "") if r is not None and r.kind == K.STAGE_KIND_ERROR else "ready"
                except Exception as e:  # no stage handler yet: the node is still starting its runtime
                    code = type(e).__name__
                if code == "ready" or code not in ("not_host", "not_held", "IrohError"):
                    break
                await asyncio.sleep(0.2)
            out["assign"] = code
            r = await evil.stage(v.node_id, assign_frame(MODEL, ch, 1, 0, 30))
            out["over_budget"] = r.params.get("code") if r is not None else None
            r = await evil.stage(v.node_id, assign_frame(MODEL, ch, 10**6, 15, 30))
            out["far_epoch"] = r.params.get("code") if r is not None else None

            hops = [Hop(v.node_id, 15, 30)]
            first = evil.grant(ch, 1, hops)
            silent = await evil.open(v.node_id)
            await silent.send(open_frame(MODEL, ch, 1, 15, 30, first))
            r = await silent.recv(15)
            out["open"] = r.stage.kind == K.STAGE_KIND_RESULT
            r = await evil.stage(v.node_id, open_frame(MODEL, ch, 1, 15, 30, evil.grant(ch, 1, hops)))
            out["while_held"] = r.params.get("code") if r is not None else None
            r = await evil.stage(v.node_id, open_frame(MODEL, ch, 1, 15, 30, first))
            out["replay"] = r.params.get("code") if r is not None else None
            out["open_during"] = (await asyncio.to_thread(stage_status, v))["sessions_open"]
            await asyncio.to_thread(wait_until, lambda: stage_status(v)["sessions_idle_closed"] >= 1, 30, 0.2,
                                    "the silent session closed")
            out["open_after"] = (await asyncio.to_thread(stage_status, v))["sessions_open"]
            r = await evil.stage(v.node_id, open_frame(MODEL, ch, 1, 15, 30, evil.grant(ch, 1, hops)))
            out["slot_back"] = r is not None and r.kind == K.STAGE_KIND_RESULT
            await silent.finish()
        return out

    out = asyncio.run(attack())
    assert out["assign"] == "ready", out
    assert out["over_budget"] == "over_budget" and out["far_epoch"] == "bad_epoch", out
    assert out["open"] and out["open_during"] == 1, out
    assert out["while_held"] == "stage_full" and out["replay"] == "duplicate_session", out
    assert out["open_after"] == 0 and out["slot_back"], out
    assert httpx.get(f"http://127.0.0.1:{v.api_port}/health", timeout=5).status_code == 200


def test_a_member_claiming_huge_capacity_and_a_ready_plan_takes_over_nothing(split2, tmp_path: Path) -> None:
    """A fresh member announces the model, capacity_bytes = 2^62 and a ready plan of its own at a far epoch
    (and a plan label naming the real host): it cannot prove it holds the tensors, so neither node makes
    it host, gives it layers or routes a prompt to it; once it does prove it (it has the file), its claim
    still does not displace the incumbent host, whose plan keeps its epoch. Honest requests keep working."""
    host, stage, reference = split2
    ch = content_hash()
    plan = ready_plan(host)
    key = f"{MODEL}@{ch}"

    async def attack() -> dict[str, object]:
        out: dict[str, object] = {}
        async with EvilMember(tmp_path / "evil", host.token()) as evil:
            for n in (host, stage):
                await evil.wait_connected(n.node_id)
            evil.count_prompts()
            evil.answer_holding_proofs(bundled_model_path(), honest=False)
            forged = {**plan, "epoch": plan["epoch"] + 1, "stages": [[evil.node_id, 0, 30, 1]]}
            evil.claim(MODEL, ch, **{f"plan:{MODEL}@{'0' * 64}": json.dumps(forged)})
            await asyncio.to_thread(wait_until, lambda: evil.challenges >= 2, 30, 0.2, "both nodes challenged it")
            out["answers"] = [await asyncio.to_thread(ask, n) for n in (host, stage, stage, host)]
            out["plan"] = await asyncio.to_thread(ready_plan, host)
            out["stage_plan"] = await asyncio.to_thread(ready_plan, stage)
            out["prompts"] = evil.prompts
            # now it proves it holds the model (it does): still no displacement of the incumbent
            evil.answer_holding_proofs(bundled_model_path(), honest=True)
            await asyncio.to_thread(wait_until, lambda: holding_proofs(host)["passed"] >= 1, 90, 0.5,
                                    "the host saw the member prove it holds the model")
            await asyncio.sleep(2)  # a few reconcile rounds with the member believed
            out["after"] = [await asyncio.to_thread(ask, host)]
            out["plan_after"] = await asyncio.to_thread(ready_plan, host)
        return out

    out = asyncio.run(attack())
    assert out["answers"] == [reference] * 4 and out["after"] == [reference], out
    assert out["prompts"] == 0, out
    for p in (out["plan"], out["stage_plan"], out["plan_after"]):
        assert p["host"] == host.node_id and p["epoch"] == plan["epoch"], p
        assert {s[0] for s in p["stages"]} == {host.node_id, stage.node_id}, p
    st = httpx.get(f"{host.console}/api/status", timeout=5).json()["node"]["distributed"]
    assert st["plans"][key]["host"] == host.node_id


@pytest.fixture(scope="module")
def solo_and_client(tmp_path_factory) -> Iterator[tuple[MeshNode, MeshNode, str]]:
    """A node serving the bundled model whole and an API-only client that joined it: (host, client, answer)."""
    nodes = MeshNodes(tmp_path_factory.mktemp("hostile-claims"))
    try:
        a = nodes.start("a", no_model=False, extra=["--mode", "exact"])
        c = nodes.start("c", join=a.token(), kind="client")
        wait_until(lambda: ready_plan(c) is not None, timeout=120, what="the client sees the host's plan")
        yield a, c, ask(a)
    finally:
        nodes.stop_all()


MALFORMED = {"capacity_bytes": "lots", f"model:{MODEL}": json.dumps(["not", "an", "object"]),
             "validator": "not-an-address", "validator_device": "x" * 5000, "erc8004": "eip155:1:0xzz/-1",
             "x402": json.dumps({"network": [], "per_request": "free"})}


def test_malformed_labels_and_a_fake_ready_plan_reach_no_one(solo_and_client, tmp_path: Path) -> None:
    """A member announces labels that are not what their schemas say (capacity "lots", a model:* label that
    is a JSON list, plan labels that are lists or name another host, garbage validator and x402 labels):
    nothing breaks. Then it claims the model with capacity 2^62 and a ready plan it cannot back (it does not
    prove it holds the tensors): the host does not believe it and the client, which cannot check a proof
    itself, believes only hosts it already routes to or that one of them vouches for. No prompt reaches the
    member; every honest request is answered by the host."""
    a, c, reference = solo_and_client
    ch = content_hash()

    async def attack() -> dict[str, object]:
        out: dict[str, object] = {}
        async with EvilMember(tmp_path / "evil", a.token()) as evil:
            await evil.wait_connected(a.node_id)
            evil.count_prompts()
            evil.answer_holding_proofs(bundled_model_path(), honest=False)
            evil.claim(MODEL, ch, plan=["not", "a", "plan"], **MALFORMED,  # type: ignore[arg-type]
                       **{f"plan:{MODEL}@{'1' * 64}": json.dumps({"host": a.node_id, "ready": True})})
            await asyncio.sleep(3)  # several reconcile rounds on the malformed labels
            out["during_malformed"] = [await asyncio.to_thread(ask, n) for n in (a, c)]
            evil.claim(MODEL, ch)  # capacity 2^62 and a ready plan of its own at epoch 10^6
            await asyncio.to_thread(wait_until, lambda: evil.challenges >= 1, 30, 0.2, "the host challenged it")
            await asyncio.sleep(2)
            answers = []
            for i in range(6):  # different users: sticky keys spread over every replica the client believes
                r = await asyncio.to_thread(httpx.post, f"http://127.0.0.1:{c.api_port}/v1/chat/completions",
                                            json={"model": MODEL, "messages": MESSAGES, "temperature": 0,
                                                  "max_tokens": 8, "user": f"u{i}"}, timeout=120)
                answers.append((r.status_code, r.json()["choices"][0]["message"]["content"],
                                r.headers.get("x-mesh402-route", "")))
            out["answers"] = answers
            out["models"] = (await asyncio.to_thread(httpx.get, f"http://127.0.0.1:{c.api_port}/v1/models",
                                                     timeout=10)).json()["data"]
            out["prompts"] = evil.prompts
        return out

    out = asyncio.run(attack())
    assert out["during_malformed"] == [reference, reference], out
    assert all(s == 200 and text == reference for s, text, _ in out["answers"]), out["answers"]
    assert out["prompts"] == 0, out
    (m,) = [m for m in out["models"] if m["id"] == MODEL]
    assert m["host"] == a.node_id, m
    for n in (a, c):
        assert "reconcile failed" not in n.log() and "Traceback" not in n.log(), n.log()[-3000:]


def test_a_members_backend_claims_hijack_nothing_and_are_capped(solo_and_client, tmp_path: Path) -> None:
    """A member announces `model:<id>` backend claims (serve --backend on its side): one for the model the
    mesh hosts (a plan wins: every request still goes to the host), one that calls itself verified (not
    believed), one with a ready that is not a bool, and a flood of 50 more (at most 16 are listed). The
    client lists the rest unverified, and `model: auto` (not opted in) never routes to them."""
    from mesh402 import labels as L

    a, c, reference = solo_and_client

    async def attack() -> dict[str, object]:
        out: dict[str, object] = {}
        async with EvilMember(tmp_path / "evil-backend", a.token()) as evil:
            await evil.wait_connected(a.node_id)
            evil.count_prompts()
            flood = {f"model:evil-{i}": L.backend_label(True, 2**20) for i in range(50)}
            evil.svc.update_local(labels={f"model:{MODEL}": L.backend_label(True), **flood,
                                          "model:liar": json.dumps({"backend": True, "verified": True, "ready": True}),
                                          "model:typed": json.dumps({"backend": True, "ready": "yes"})})
            models_url = f"http://127.0.0.1:{c.api_port}/v1/models"

            def listed() -> list[dict]:
                return httpx.get(models_url, timeout=10).json()["data"]

            await asyncio.to_thread(wait_until, lambda: any(m["id"].startswith("evil-") for m in listed()), 30, 0.2,
                                    "the member's backend models listed")
            out["models"] = await asyncio.to_thread(listed)
            out["named"] = [await asyncio.to_thread(ask, n) for n in (a, c)]
            auto = await asyncio.to_thread(httpx.post, f"http://127.0.0.1:{c.api_port}/v1/chat/completions",
                                           json={"model": "auto", "messages": MESSAGES, "temperature": 0,
                                                 "max_tokens": 8}, timeout=120)
            out["auto"] = (auto.status_code, auto.json()["choices"][0]["message"]["content"])
            out["prompts"] = evil.prompts
        return out

    out = asyncio.run(attack())
    assert out["named"] == [reference, reference] and out["auto"] == (200, reference), out
    assert out["prompts"] == 0, out
    models = {m["id"]: m for m in out["models"]}  # type: ignore[attr-defined]
    assert models[MODEL]["host"] == a.node_id and models[MODEL]["owned_by"] == "mesh402", models[MODEL]
    evil = [m for i, m in models.items() if i.startswith("evil-")]
    assert 0 < len(evil) <= L.MAX_BACKEND_MODELS
    assert all(m["owned_by"] == "backend" and m["verified"] is False for m in evil)
    assert "liar" not in models and "typed" not in models
    for n in (a, c):
        assert "Traceback" not in n.log(), n.log()[-3000:]


def test_allow_host_routes_only_to_the_nodes_it_names(solo_and_client, tmp_path: Path) -> None:
    """A client started with --allow-host sends its prompts only to the nodes it names: naming the host, it is
    answered; naming some other node, the host (which serves the model) is never used for it."""
    a, _, reference = solo_and_client
    nodes = MeshNodes(tmp_path / "allow")
    try:
        ok = nodes.start("ok", join=a.token(), kind="client", extra=["--allow-host", a.node_id])
        shut = nodes.start("shut", join=a.token(), kind="client", extra=["--allow-host", "0" * 64])
        wait_until(lambda: ready_plan(ok) is not None, timeout=120, what="the allow-listed host's plan")
        assert ask(ok) == reference
        time.sleep(2)  # the same gossip reached the other client
        assert ready_plan(shut) is None
        r = httpx.post(f"http://127.0.0.1:{shut.api_port}/v1/chat/completions",
                       json={"model": MODEL, "messages": MESSAGES, "max_tokens": 4}, timeout=60)
        assert r.status_code >= 400, r.text
        assert "x-mesh402-route" not in r.headers or a.node_id[:12] not in r.headers["x-mesh402-route"]
    finally:
        nodes.stop_all()


def test_malformed_speculative_draft_steps_are_refused_and_a_valid_one_is_served(lone, tmp_path: Path) -> None:
    """Where the member is the elected host it may send speculative draft steps (the token and its drafts as
    adjacent rows): one of more rows than a draft step may have (17), one at a position its session is not
    at and one running past the session's max_len are refused with a protocol error that ends only that
    session; a well-formed one is answered with 1..n
    tokens; the node keeps serving."""
    import numpy as np

    from mesh402.serving.stage_link import stage_frame

    v = lone
    ch = content_hash()
    hidden = 576

    def step(kind: int, pos: int, tokens: list[int], draft: bool) -> pb.Frame:
        x = (np.random.default_rng(pos).standard_normal((len(tokens), hidden)) * 0.5).astype("<f4")
        params = {"n_real": str(len(tokens)), "sample": "1", **({"draft": "1"} if draft else {})}
        return stage_frame(kind, request_id="r", plan_epoch=1, position=pos, tokens=tokens, dtype="f32",
                           shape=[len(tokens), hidden], activations=x.tobytes(), params=params)

    async def attack() -> dict[str, object]:
        out: dict[str, object] = {}
        async with EvilMember(tmp_path / "evil", v.token()) as evil:
            await evil.wait_connected(v.node_id)
            evil.answer_holding_proofs(bundled_model_path())
            evil.svc.update_local(models=[pb.ModelEntry(model_id=MODEL, content_hash=ch)],
                                  labels={"capacity_bytes": str(2**41)})
            code = ""
            for _ in range(150):
                try:
                    r = await evil.stage(v.node_id, assign_frame(MODEL, ch, 1, 15, 30))
                    code = r.params.get("code", "") if r is not None and r.kind == K.STAGE_KIND_ERROR else "ready"
                except Exception as e:  # noqa: BLE001 - the node is still starting its runtime
                    code = type(e).__name__
                if code == "ready" or code not in ("not_host", "not_held", "IrohError"):
                    break
                await asyncio.sleep(0.2)
            out["assign"] = code
            hops = [Hop(v.node_id, 15, 30)]

            async def session(draft_pos: int, rows: int, prompt: int = 4) -> pb.StageFrame:
                for _ in range(50):  # one session slot: the previous session may still be closing
                    link = await evil.open(v.node_id)
                    await link.send(open_frame(MODEL, ch, 1, 15, 30, evil.grant(ch, 1, hops)))
                    r = await link.recv(15)
                    if r.stage.kind == K.STAGE_KIND_RESULT:
                        break
                    await link.finish()
                    await asyncio.sleep(0.2)
                await link.send(step(K.STAGE_KIND_PREFILL, 0, list(range(1, prompt + 1)), False))
                first = await link.recv(30)
                assert first.stage.kind == K.STAGE_KIND_RESULT and len(first.stage.tokens) == 1
                await link.send(step(K.STAGE_KIND_DECODE, draft_pos, [5 + i for i in range(rows)], True))
                r = await link.recv(30)
                await link.finish()
                return r.stage

            r = await session(4, 20)
            out["oversized"] = r.params.get("code") if r.kind == K.STAGE_KIND_ERROR else list(r.tokens)
            r = await session(7, 3)
            out["misplaced"] = r.params.get("code") if r.kind == K.STAGE_KIND_ERROR else list(r.tokens)
            r = await session(56, 17, prompt=56)  # past the session's max_len (64)
            out["past_max_len"] = r.params.get("code") if r.kind == K.STAGE_KIND_ERROR else list(r.tokens)
            r = await session(4, 3)
            out["valid"] = list(r.tokens) if r.kind == K.STAGE_KIND_RESULT else r.params.get("code")
        return out

    out = asyncio.run(attack())
    assert out["assign"] == "ready", out
    assert out["oversized"] == "protocol" and out["misplaced"] == "protocol", out
    assert out["past_max_len"] == "protocol", out
    assert isinstance(out["valid"], list) and 1 <= len(out["valid"]) <= 3, out
    assert httpx.get(f"http://127.0.0.1:{v.api_port}/health", timeout=5).status_code == 200
