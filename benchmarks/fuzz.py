"""Fuzz benchmark: hypothesis-built control frames from an admitted member at a live node process.

    .venv/bin/python benchmarks/fuzz.py [--cases 10000]

One `serve --no-model` node process on loopback; a member in this process joins with a token and
sends every case on a fresh stream (harness/fuzz.py: every Frame body with random fields, signed
announcements with random labels, mangled encodings, wrong stream types). Afterwards the node must be
alive with no task error, and a second, honest member must still get its echo. Prints a table and
writes benchmarks/results/fuzz.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.fuzz import generate, send_all  # noqa: E402
from harness.mesh_nodes import MeshNodes  # noqa: E402
from mesh402.mesh.config import MeshConfig, MeshTimers  # noqa: E402
from mesh402.mesh.framing import StreamType, make_frame  # noqa: E402
from mesh402.mesh.proto import mesh_pb2 as pb  # noqa: E402
from mesh402.mesh.service import MeshService  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


async def attack(root: Path, token: str, honest_token: str, target: bytes, cases: list) -> dict:
    fuzzer = MeshService(MeshConfig(home=root / "fuzzer", bind_ip="127.0.0.1", timers=MeshTimers.fast()))
    honest = MeshService(MeshConfig(home=root / "honest", bind_ip="127.0.0.1", timers=MeshTimers.fast()))
    await fuzzer.start(join=token)
    await honest.start(join=honest_token)
    try:
        st = await send_all(fuzzer, target, cases)
        reply = await honest.request(target, StreamType.ECHO, make_frame(echo=pb.Echo(payload=b"ok")), timeout=10)
        return {"sent": st.sent, "send_s": round(st.seconds, 2), "replies": st.replies,
                "open_failures": st.open_failures, "honest_served_after": bool(reply and reply.echo.payload == b"ok")}
    finally:
        await asyncio.gather(fuzzer.stop(), honest.stop())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=10_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        nodes = MeshNodes(root)
        try:
            a = nodes.start("a", wait=False)
            t0 = time.monotonic()
            cases = generate(args.cases)
            gen_s = time.monotonic() - t0
            a.proc.wait_http(f"{a.console}/api/status", timeout=120)
            # not asyncio.run: its shutdown waits for executor threads, and the measurement is done by then
            res = asyncio.new_event_loop().run_until_complete(
                attack(root, a.token(), a.token(), bytes.fromhex(a.node_id), cases))
            counters = a.counters()
            res.update(cases=len(cases), generate_s=round(gen_s, 2), node_alive=a.alive(),
                       task_errors=counters.get("internal.task_error", 0),
                       refused={k: v for k, v in counters.items()
                                if k.startswith(("frame.", "gossip.o", "gossip.m", "gossip.s", "stream.", "quota."))})
        finally:
            nodes.stop_all()
    crashes = int(not res["node_alive"]) + res["task_errors"]
    res["crashes"] = crashes
    print(f"{'cases':>8} {'generate s':>11} {'send s':>7} {'sent':>6} {'crashes':>8} {'honest served after':>20}")
    print(f"{res['cases']:>8} {res['generate_s']:>11.1f} {res['send_s']:>7.1f} {res['sent']:>6} {crashes:>8} "
          f"{str(res['honest_served_after']):>20}")
    print("counted: " + ", ".join(f"{k}={v}" for k, v in sorted(res["refused"].items())))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fuzz.json").write_text(json.dumps(res, indent=1))
    print(f"\nwrote {RESULTS / 'fuzz.json'}")
    sys.exit(1 if crashes or not res["honest_served_after"] else 0)


if __name__ == "__main__":
    main()
