"""Concurrent streams against a real node over HTTP: continuous batching as a client sees it.

    .venv/bin/python benchmarks/serve_streams.py [--threads 2] [--tokens 128] [--mode fast]

Starts `mesh402 serve` on the bundled model (a real node process, started by exec) twice: with
`--max-batch 1` (requests take turns) and `--max-batch 16` (continuous batching), and for 1, 2, 4, 8, 16
concurrent streams (each a different prompt, greedy, `max_tokens` = --tokens) sends streamed chat
completions through the official `openai` client. Reports aggregate completion tok/s (the usage the node
returns, over the wall time of the whole wave) and per-stream time to first token p50/p99; batched / one
stream beside it. This is benchmarks/batching.py's serving loop plus HTTP, SSE, the API's own work and the
event loop sharing the node's process. Prints a table and writes benchmarks/results/serve_streams.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

import openai  # noqa: E402

from harness.procs import MESH402, NodeProcess, free_port  # noqa: E402

MODEL = "smollm2-135m-instruct"
TOPICS = ["dragons", "the sea", "Paris", "photosynthesis", "a robot", "the moon", "bread", "volcanoes",
          "a lighthouse", "winter", "bees", "a library", "trains", "the desert", "music", "rain"]


async def _one(client: openai.AsyncOpenAI, topic: str, tokens: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    ttft = None
    used = 0
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"Write a long story about {topic}."}],
        max_tokens=tokens, temperature=0, stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        if chunk.usage is not None:
            used = chunk.usage.completion_tokens
    return used, ttft if ttft is not None else time.perf_counter() - t0


async def _wave(base: str, streams: int, tokens: int) -> dict:
    client = openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0, timeout=600)
    await _one(client, "warm-up", 4)
    t0 = time.perf_counter()
    res = await asyncio.gather(*(_one(client, TOPICS[i % len(TOPICS)], tokens) for i in range(streams)))
    dt = time.perf_counter() - t0
    await client.close()
    ttfts = sorted(r[1] for r in res)
    total = sum(r[0] for r in res)
    return {"tok_s": total / dt, "tokens": total, "ttft_p50_s": statistics.median(ttfts),
            "ttft_p99_s": ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--mode", default="fast", choices=["fast", "exact"])
    ap.add_argument("--streams", default="1,2,4,8,16")
    a = ap.parse_args()
    streams_list = [int(s) for s in a.streams.split(",")]
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    rows: list[dict] = []
    print(f"load average at start {load}; node --threads {a.threads} --mode {a.mode}; {a.tokens} tokens per stream")
    for mb in (1, 16):
        home = Path(tempfile.mkdtemp(prefix="mesh402-streams-"))
        port = free_port()
        node = NodeProcess([*MESH402, "serve", "--port", str(port), "--home", str(home), "--threads", str(a.threads),
                            "--mode", a.mode, "--max-batch", str(mb), "--max-sessions", "32"], home)
        try:
            node.wait_http(f"http://127.0.0.1:{port}/ready", timeout=180)
            for n in streams_list:
                r = asyncio.run(_wave(f"http://127.0.0.1:{port}/v1", n, a.tokens))
                rows.append({"max_batch": mb, "streams": n, **r})
                one = next((x["tok_s"] for x in rows if x["max_batch"] == mb and x["streams"] == 1), r["tok_s"])
                print(f"max_batch={mb:2} streams={n:2}  {r['tok_s']:7.1f} tok/s  ({r['tok_s'] / one:4.2f}x one stream)  "
                      f"TTFT p50 {r['ttft_p50_s'] * 1000:6.0f} ms  p99 {r['ttft_p99_s'] * 1000:6.0f} ms  "
                      f"{r['tokens']} tokens", flush=True)
        finally:
            node.stop()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"threads": a.threads, "mode": a.mode, "tokens": a.tokens, "loadavg_at_start": load, "rows": rows,
           "note": "one real node process over HTTP (openai client, streamed chat completions, greedy)"}
    (RESULTS / "serve_streams.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS / 'serve_streams.json'}")


if __name__ == "__main__":
    main()
