"""Escrow-voucher benchmark: what paying a stage with vouchers costs a node, off chain.

    .venv/bin/python benchmarks/vouchers.py [--rounds 200]

No chain is needed: the entry's VoucherIssuer signs and stores cumulative vouchers (EIP-712 signature +
an fsync'd SQLite write, economics/vouchers.py), and a worker's WorkerLedger checks and keeps them (signature
recovery + write) over a stand-in for the escrow's coverage view. Both run on the event loop's thread once per
stage every VOUCHER_EVERY steps, so the per-token cost is the per-voucher cost / VOUCHER_EVERY. Prints a table,
writes benchmarks/results/vouchers.json.
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

from mesh402.economics.vouchers import EscrowRef, VoucherBook, VoucherIssuer, VoucherWallet, WorkerLedger  # noqa: E402
from mesh402.serving.work_pay import VOUCHER_EVERY  # noqa: E402


class Coverage:
    def coverage(self, entry: str, worker: str) -> int:
        return 10**18


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args()
    from eth_account import Account

    ref = EscrowRef(31337, "0x" + "e5" * 20)
    entry, worker = Account.create(), Account.create()
    with tempfile.TemporaryDirectory() as tmp:
        issuer = VoucherIssuer(VoucherBook(Path(tmp) / "entry"), "0x" + entry.key.hex().removeprefix("0x"), ref)
        ledger = WorkerLedger(VoucherWallet(VoucherBook(Path(tmp) / "worker"), worker.address, ref), Coverage(),
                              coverage_ttl_s=3600)
        sign_ms, accept_ms = [], []

        async def run() -> None:
            for i in range(args.rounds):
                t0 = time.perf_counter()
                v = issuer.pay_to_total(worker.address, "req", (i + 1) * 1_000_000)
                t1 = time.perf_counter()
                why = await ledger.accept(issuer.address, v.to_json())
                t2 = time.perf_counter()
                assert why is None, why
                sign_ms.append((t1 - t0) * 1000)
                accept_ms.append((t2 - t1) * 1000)
        asyncio.run(run())
    rows = {"entry: sign + store a voucher": sign_ms, "worker: check + keep a voucher": accept_ms}
    out = {}
    print(f"{'operation':34} {'median ms':>10} {'p90 ms':>8} {'per token ms':>13}")
    for name, xs in rows.items():
        med, p90 = statistics.median(xs), sorted(xs)[int(0.9 * (len(xs) - 1))]
        out[name] = {"median_ms": round(med, 3), "p90_ms": round(p90, 3),
                     "per_token_ms": round(med / VOUCHER_EVERY, 4), "rounds": len(xs)}
        print(f"{name:34} {med:10.2f} {p90:8.2f} {med / VOUCHER_EVERY:13.3f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "vouchers.json").write_text(json.dumps({"voucher_every": VOUCHER_EVERY, **out}, indent=1))
    print(f"wrote {RESULTS / 'vouchers.json'}")


if __name__ == "__main__":
    main()
