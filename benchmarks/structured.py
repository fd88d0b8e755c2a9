"""Structured output end to end: what a schema, a required tool call or logprobs cost a served request.

    .venv/bin/python benchmarks/structured.py [--rounds 3] [--max-tokens 128] [--split]

Starts `mesh402 serve` on the bundled model (fast mode, one thread; with --split, two nodes holding a
2-stage pipeline split in exact mode, asked at the host) and times streamed chat completions through the
official `openai` client, greedy, same prompt: plain text, `response_format` json_schema, a required tool
call, and logprobs with top_logprobs 5. Reports time to first token, decode tok/s ((tokens - 1) / time
from the first to the last token) and the completion tokens, median of the rounds. The per-token mask cost
inside the engine is benchmarks/grammar.py's. Prints a table, writes benchmarks/results/structured.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import openai  # noqa: E402

from harness.mesh_nodes import MeshNodes, wait_until  # noqa: E402
from harness.procs import MESH402, NodeProcess, free_port  # noqa: E402
from harness.reference import ready_plan  # noqa: E402

MODEL = "smollm2-135m-instruct"
PERSON = {"type": "object", "additionalProperties": False,
          "required": ["name", "born", "fields", "summary"],
          "properties": {"name": {"type": "string", "maxLength": 40}, "born": {"type": "integer"},
                         "fields": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 4},
                         "summary": {"type": "string", "maxLength": 400}}}
TOOL = {"type": "function", "function": {
    "name": "search_people", "description": "Search a people database.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["query", "limit", "filters"],
                   "properties": {"query": {"type": "string", "maxLength": 200},
                                  "limit": {"type": "integer", "minimum": 1, "maximum": 50},
                                  "filters": {"type": "array", "items": {"type": "string", "maxLength": 40},
                                              "maxItems": 5}}}}}
ASK = [{"role": "user", "content": "Tell me about Ada Lovelace in detail."}]
CASES: dict[str, dict[str, Any]] = {
    "plain text": {},
    "json_schema": {"response_format": {"type": "json_schema",
                                        "json_schema": {"name": "person", "strict": True, "schema": PERSON}}},
    "tool_choice required": {"tools": [TOOL], "tool_choice": "required"},
    "logprobs top 5": {"logprobs": True, "top_logprobs": 5},
}


def timed(c: openai.OpenAI, max_tokens: int, extra: dict[str, Any]) -> dict[str, float]:
    t0 = time.perf_counter()
    first = last = 0.0
    tokens = 0
    for chunk in c.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=max_tokens,
                                           stream=True, stream_options={"include_usage": True}, **extra):
        now = time.perf_counter()
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
        for ch in chunk.choices:
            if ch.delta.content or ch.delta.tool_calls:
                first = first or now
                last = now
    return {"ttft_ms": (first - t0) * 1e3, "tok_s": (tokens - 1) / (last - first) if last > first else 0.0,
            "tokens": tokens}


def run(c: openai.OpenAI, rounds: int, max_tokens: int) -> dict[str, Any]:
    timed(c, 8, {})  # warm-up: first-request setup not counted
    out = {}
    for label, extra in CASES.items():
        timed(c, 8, extra)  # the grammar compiler and this schema's first compile
        rows = [timed(c, max_tokens, extra) for _ in range(rounds)]
        out[label] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        print(f"done {label}", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--split", action="store_true", help="a 2-node pipeline split instead of one node")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-structured-"))
    procs: list[NodeProcess] = []
    nodes = MeshNodes(tmp / "nodes")
    try:
        if args.split:
            split = ["--mode", "exact", "--max-vram", "0.08"]
            a = nodes.start("a", no_model=False, extra=split)
            b = nodes.start("b", join=a.token(), no_model=False, extra=split)
            wait_until(lambda: all(ready_plan(n) is not None for n in (a, b)), timeout=300, what="a ready split")
            base = f"http://127.0.0.1:{a.api_port}/v1"
        else:
            port = free_port()
            proc = NodeProcess([*MESH402, "serve", "--port", str(port), "--home", str(tmp / "home")], tmp / "home")
            procs.append(proc)
            proc.wait_http(f"http://127.0.0.1:{port}/ready", timeout=300)
            base = f"http://127.0.0.1:{port}/v1"
        c = openai.OpenAI(base_url=base, api_key="x", max_retries=0, timeout=600)
        result = {"setup": "2-node split, exact mode" if args.split else "one node, fast mode",
                  "rounds": args.rounds, "max_tokens": args.max_tokens, "cores": os.cpu_count(),
                  "cases": run(c, args.rounds, args.max_tokens)}
    finally:
        nodes.stop_all()
        for p in procs:
            p.stop()
    print(f"\nStreamed chat completions, {result['setup']}, greedy, max_tokens {args.max_tokens}, "
          f"median of {args.rounds}")
    print(f"{'request':<24}{'TTFT ms':>9}{'decode tok/s':>14}{'tokens':>8}")
    for label, r in result["cases"].items():
        print(f"{label:<24}{r['ttft_ms']:>9.0f}{r['tok_s']:>14.1f}{r['tokens']:>8.0f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = "structured-split.json" if args.split else "structured.json"
    (RESULTS / name).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {RESULTS / name}")


if __name__ == "__main__":
    main()
