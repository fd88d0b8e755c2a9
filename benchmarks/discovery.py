"""Discovery and routing benchmark: discovery-to-join time through a local Nostr relay, time to
first token with and without a warm KV prefix (single node), router decision cost.

    .venv/bin/python benchmarks/discovery.py [--rounds N]

Everything runs on loopback (nostr-sdk LocalRelay in this process, node processes with fast
mesh timers). Prints a table and writes benchmarks/results/discovery.json.

- join: node A `serve --no-model --publish`; node B `serve --no-model --auto`. Measured from B's
  process start until both see each other alive (includes Python start-up and imports), and
  B's own fetch (relay query), fetch+probe+dial and probe (joining A's invite with a throwaway
  identity to count its members) times from its /api/status.
- ttft: the bundled model in-process (fast mode, one thread): a ~300-token system prompt with a
  new user question each round; cold = prefix cache off, warm = prefix cache on and filled.
- router: classify + score 2 and 8 candidate models, microseconds per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def bench_join(rounds: int) -> dict:
    from harness.mesh_nodes import MeshNodes, wait_until
    from harness.nostr_relay import RelayThread

    wall, fetch, dial, probe = [], [], [], []
    for _ in range(rounds):
        relay = RelayThread().start()
        with tempfile.TemporaryDirectory() as d:
            nodes = MeshNodes(Path(d))
            try:
                a = nodes.start("a", extra=["--nostr-relay", relay.url, "--publish", "--nostr-refresh", "1"])
                wait_until(lambda: a.status()["node"].get("discovery", {}).get("publishing"), 10)
                time.sleep(0.3)
                t0 = time.monotonic()
                b = nodes.start("b", extra=["--nostr-relay", relay.url, "--auto"], wait=False)
                b.proc.wait_http(f"{b.console}/api/status", timeout=60)
                nodes.wait_full_mesh([a, b], timeout=30)
                wall.append(time.monotonic() - t0)
                disc = b.status()["node"]["discovery"]
                fetch.append(disc["fetch_s"] * 1000)
                dial.append(disc["join_s"] * 1000)
                probe.append((disc.get("probe_s") or 0.0) * 1000)
            finally:
                nodes.stop_all()
                relay.stop()
    return {"process_start_to_full_mesh_s": statistics.median(wall), "relay_fetch_ms": statistics.median(fetch),
            "fetch_plus_dial_ms": statistics.median(dial), "probe_ms": statistics.median(probe), "rounds": rounds}


def bench_ttft(rounds: int) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from mesh402.engine import Engine
    from mesh402.engine.runtime_env import configure_torch
    from mesh402.engine.sampling import SamplingParams
    from mesh402.models.catalog import bundled_model_path
    from mesh402.serving.generation import Finished, GenerationRequest, LocalModel, generate

    configure_torch(1)
    eng = Engine.load(bundled_model_path(), mode="fast")
    system = "You are a precise assistant for a hardware store. Answer with part numbers when you can. " * 15
    ex = ThreadPoolExecutor(1)

    def ids(q: str) -> list[int]:
        return eng.tokenizer.encode(eng.chat_template.render(
            [{"role": "system", "content": system}, {"role": "user", "content": q}]), add_special=False)

    async def one(lm: LocalModel, p: list[int]) -> Finished:
        params = SamplingParams(temperature=0, seed=0)
        st = await lm.open(len(p) + 2, params)
        fin = None
        async for ev in generate(GenerationRequest(p, 1, params), st, lm.tokenizer, lm.eos_ids):
            if isinstance(ev, Finished):
                fin = ev
        await asyncio.sleep(0.01)
        return fin

    cold_lm, warm_lm = LocalModel(eng, ex, prefix_cache=None), LocalModel(eng, ex)
    asyncio.run(one(warm_lm, ids("warm-up question?")))
    cold, warm, cached, n_prompt = [], [], [], 0
    for i in range(rounds):
        p = ids(f"Which screws fit a {i + 3} mm drill hole?")
        n_prompt = len(p)
        fc = asyncio.run(one(cold_lm, p))
        fw = asyncio.run(one(warm_lm, p[:-3] + ids(f"Which bolts fit a {i + 4} mm hole?")[-3:]))
        cold.append(fc.ttft_s * 1000)
        warm.append(fw.ttft_s * 1000)
        cached.append(fw.cached_tokens)
    return {"prompt_tokens": n_prompt, "cold_ttft_ms": statistics.median(cold), "warm_ttft_ms": statistics.median(warm),
            "cached_tokens": statistics.median(cached), "rounds": rounds}


def bench_router() -> dict:
    from mesh402.api.router import Router
    from mesh402.routing.models import Candidate, ModelFacts

    out = {}
    msgs = [{"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "Refactor this python function and explain the bug: def f(x): return x+1 " * 5}]
    for n in (2, 8):
        cands = [Candidate(ModelFacts(f"m{i}", 8192, 10**8 * (i + 1), frozenset({"code"} if i % 2 else set()),
                                      bool(i % 3)), f"n{i}", tok_s=20.0 + i, inflight=i % 3) for i in range(n)]
        r = Router()
        for _ in range(200):
            r.decide(msgs, None, cands)
        k = 5000
        t0 = time.perf_counter()
        for _ in range(k):
            r.decide(msgs, None, cands)
        out[f"decide_us_{n}_models"] = (time.perf_counter() - t0) / k * 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    res = {"machine": platform.platform(), "python": platform.python_version(),
           "join": bench_join(args.rounds), "ttft": bench_ttft(max(args.rounds, 5)), "router": bench_router()}
    out = ROOT / "benchmarks" / "results" / "discovery.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    j, t, r = res["join"], res["ttft"], res["router"]
    print(f"discovery-to-join (B process start -> full mesh): {j['process_start_to_full_mesh_s']:.2f} s "
          f"(relay fetch {j['relay_fetch_ms']:.0f} ms, fetch+probe+dial {j['fetch_plus_dial_ms']:.0f} ms, "
          f"of which the probe {j['probe_ms']:.0f} ms), median of {j['rounds']}")
    print(f"TTFT, {t['prompt_tokens']}-token prompt: cold {t['cold_ttft_ms']:.0f} ms, warm prefix {t['warm_ttft_ms']:.0f} ms "
          f"({t['cached_tokens']:.0f} cached tokens), median of {t['rounds']}")
    print(f"router decision: {r['decide_us_2_models']:.0f} us (2 models), {r['decide_us_8_models']:.0f} us (8 models)")


if __name__ == "__main__":
    main()
