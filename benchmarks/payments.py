"""Payments benchmark: what x402 adds to a request, and the gas one settlement costs.

    .venv/bin/python benchmarks/payments.py [--rounds 10] [--max-tokens 16]

Starts a local chain (`mesh402 chain dev`), a facilitator, and two nodes on the bundled model: one free,
one priced at 0.01 USDC per request. Requests alternate between the two (same prompt, temperature 0)
and are timed from the client:
  - non-streaming total, free vs paid with the official x402 client (402 round trip, signing, verify,
    generation, settlement), and paid with a pre-signed authorization (no 402 round trip);
  - streaming time to first token and total, free vs paid (verify before the first token; settlement
    after the last, reported in-band before [DONE]).
Gas per settlement comes from the settlement receipts. Prints a table, writes benchmarks/results/payments.json.
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
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

from harness.dev_chain import start_chain, start_facilitator, start_paid_node  # noqa: E402
from harness.procs import MESH402, NodeProcess, free_port  # noqa: E402
from harness.sse import json_events  # noqa: E402
from harness.x402_payments import decode_b64json, get_402, sign_payment, x402_client  # noqa: E402

CHAT = "/v1/chat/completions"


def body(max_tokens: int, stream: bool = False) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "Describe the sea in one sentence."}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}


def timed_stream(base: str, req: dict[str, Any], headers: dict[str, str]) -> tuple[float, float, dict[str, Any]]:
    t0 = time.perf_counter()
    first = None
    last: dict[str, Any] = {}
    with httpx.stream("POST", base + CHAT, json=req, headers=headers, timeout=300) as r:
        assert r.status_code == 200, r.read()
        for obj in json_events(r):
            if first is None and obj.get("choices") and obj["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - t0
            if "x402" in obj:
                last = obj["x402"]
    return first or 0.0, time.perf_counter() - t0, last


def ms(xs: list[float]) -> dict[str, float]:
    return {"median_ms": round(statistics.median(xs) * 1000, 1), "min_ms": round(min(xs) * 1000, 1),
            "max_ms": round(max(xs) * 1000, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="mesh402-paybench-"))
    procs: list[NodeProcess] = []
    try:
        chain = start_chain(tmp, buyers=2)
        procs.append(chain.proc)
        fac, fac_url = start_facilitator(tmp, chain)
        procs.append(fac)
        fport = free_port()
        free = NodeProcess([*MESH402, "serve", "--port", str(fport), "--home", str(tmp / "free")], tmp / "free")
        procs.append(free)
        paid, paid_url = start_paid_node(tmp / "paid", chain, fac_url, "--price", "0.01", "--pay-to", "node-0")
        procs.append(paid)
        free_url = f"http://127.0.0.1:{fport}"
        free.wait_http(free_url + "/ready", timeout=180)
        key = chain.key("buyer-0")
        n = args.max_tokens
        # warm both nodes
        for base in (free_url, paid_url):
            httpx.post(base + CHAT, json=body(n), timeout=300)
        timing: dict[str, list[float]] = {k: [] for k in (
            "free_total", "paid_x402_client_total", "paid_presigned_total",
            "free_stream_ttft", "paid_stream_ttft", "free_stream_total", "paid_stream_total",
            "x402_verify_server", "x402_settle_server")}
        txs: list[str] = []

        required = get_402(paid_url, CHAT, body(n))
        required_s = get_402(paid_url, CHAT, body(n, True))

        async def one_round(http: Any) -> None:
            """Each round runs every variant once, back to back, so load noise hits them alike."""
            t0 = time.perf_counter()
            r = await http.post(free_url + CHAT, json=body(n))
            timing["free_total"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            r = await http.post(paid_url + CHAT, json=body(n))
            timing["paid_x402_client_total"].append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
            txs.append(decode_b64json(r.headers["PAYMENT-RESPONSE"])["transaction"])
            header, _ = sign_payment(key, required)
            t0 = time.perf_counter()
            r = await http.post(paid_url + CHAT, json=body(n), headers={"PAYMENT-SIGNATURE": header})
            timing["paid_presigned_total"].append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
            for part in r.headers.get("Server-Timing", "").split(","):
                name, _, dur = part.strip().partition(";dur=")
                if name in ("x402-verify", "x402-settle"):
                    timing[name.replace("-", "_") + "_server"].append(float(dur) / 1000)
            ft, tt, _ = timed_stream(free_url, body(n, True), {})
            timing["free_stream_ttft"].append(ft)
            timing["free_stream_total"].append(tt)
            header, _ = sign_payment(key, required_s)
            ft, tt, rec = timed_stream(paid_url, body(n, True), {"PAYMENT-SIGNATURE": header})
            assert rec["settlement"]["success"], rec
            txs.append(rec["settlement"]["transaction"])
            timing["paid_stream_ttft"].append(ft)
            timing["paid_stream_total"].append(tt)

        async def run() -> None:
            from x402.http.clients import x402HttpxClient
            async with x402HttpxClient(x402_client(key, chain.dep), timeout=300) as http:
                for _ in range(args.rounds):
                    await one_round(http)
        asyncio.run(run())
        w3 = chain.w3()
        gas = [int(w3.eth.get_transaction_receipt(tx)["gasUsed"]) for tx in txs]
        out: dict[str, Any] = {k: ms(v) for k, v in timing.items()}
        med = {k: statistics.median(v) for k, v in timing.items()}
        out["added_ms"] = {
            "x402_client_total": round((med["paid_x402_client_total"] - med["free_total"]) * 1000, 1),
            "presigned_total": round((med["paid_presigned_total"] - med["free_total"]) * 1000, 1),
            "stream_ttft": round((med["paid_stream_ttft"] - med["free_stream_ttft"]) * 1000, 1),
            "stream_total": round((med["paid_stream_total"] - med["free_stream_total"]) * 1000, 1),
        }
        out["gas_per_settlement"] = {"median": int(statistics.median(gas)), "min": min(gas), "max": max(gas),
                                     "n": len(gas)}
        out["config"] = {"rounds": args.rounds, "max_tokens": n, "chain": "anvil (local, automine)",
                         "facilitator": "mesh402 facilitator (x402 SDK exact EVM)"}
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "payments.json").write_text(json.dumps(out, indent=2))
        print(f"{'metric':28s} {'median ms':>10s} {'min':>8s} {'max':>8s}")
        for k in timing:
            v = out[k]
            print(f"{k:28s} {v['median_ms']:10.1f} {v['min_ms']:8.1f} {v['max_ms']:8.1f}")
        print("added by payment (median ms):", json.dumps(out["added_ms"]))
        print("gas per settlement:", json.dumps(out["gas_per_settlement"]))
    finally:
        for p in reversed(procs):
            p.stop()


if __name__ == "__main__":
    main()
