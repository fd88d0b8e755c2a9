"""Speculative decoding on a 2-stage split with network delay: plain decoding vs `--speculative ngram`.

    .venv/bin/python benchmarks/split_speculative.py [--quick]

Two `mesh402 serve` node processes (fast mode, `--max-vram 0.08`: the model needs both), each in its own
network namespace joined through benchmarks/netdelay.py with 5 or 20 ms each way (10 / 40 ms RTT), and for
comparison on loopback. Per setting the same streaming chat completions (greedy) are timed client-side as
benchmarks/split.py times them: decode tok/s = (completion tokens - 1) / (last chunk - first chunk). With
speculation each step carries the sampled token and up to 4 prompt-lookup drafts through both stages in one
round trip; the host logs each request's accepted / drafted count (read from its log). Three prompts: one whose
answer repeats itself (drafts are right), code that partly copies the prompt, and an open story. Prints a table and writes
benchmarks/results/split_speculative.json. Needs root for the namespaces (the loopback rows run without).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import netdelay  # noqa: E402
import split  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
PROMPTS = {  # an answer that repeats itself (drafts right), code that copies the prompt in part, a story
    "repeat": "Write the word 'hello' twenty times.",
    "code": "Rewrite this Python function with type hints:\ndef add(a, b):\n    total = a + b\n    return total\n",
    "story": split.PROMPT,
}
SPEC = ["--speculative", "ngram", "--draft-tokens", "4"]
DRAFTS = re.compile(r"(\d+) of (\d+) drafts accepted")


def run(delay_ms: float | None, spec: bool, max_tokens: int, reps: int) -> list[dict]:
    root = Path(tempfile.mkdtemp(prefix="split-spec-"))
    names = ["a", "b"]
    extra = SPEC + ["-v"] if spec else []
    rows = []
    net_cm = netdelay.DelayNet(names, delay_ms) if delay_ms else None
    try:
        net = net_cm.__enter__() if net_cm else None
        rtt = statistics.median(netdelay.udp_rtt(net, "a", "b", n=20)) if net else 0.0
        nodes, host, _ = split.start_mesh(2, "fast", root, net=net, names=names, extra=extra)
        try:
            for which, prompt in PROMPTS.items():
                host.http(split.stream_once, host.api_port, 8, prompt)  # warm-up
                runs = [host.http(split.stream_once, host.api_port, max_tokens, prompt) for _ in range(reps)]
                step = statistics.median(r["step_s"] for r in runs)
                rows.append({"rtt_ms": rtt, "delay_one_way_ms": delay_ms or 0.0, "speculative": spec,
                             "prompt": which, "decode_tok_s": 1 / step, "step_ms": step * 1000,
                             "ttft_ms": statistics.median(r["ttft_s"] for r in runs) * 1000,
                             "tokens": [r["tokens"] for r in runs]})
            if spec:  # each request's accepted / drafted, in order: warm-up, reps, per prompt
                counts = [(int(a), int(d)) for a, d in DRAFTS.findall(host.log())]
                per = len(counts) // len(PROMPTS) if counts else 0
                for i, r in enumerate(rows):
                    mine = counts[i * per + 1:(i + 1) * per] if per else []
                    acc, dr = sum(a for a, _ in mine), sum(d for _, d in mine)
                    r["drafts_accepted"], r["drafts_sent"] = acc, dr
        finally:
            for n in nodes:
                n.stop()
    finally:
        if net_cm:
            net_cm.__exit__(None, None, None)
        shutil.rmtree(root, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer tokens and repeats")
    a = ap.parse_args()
    max_tokens, reps = (48, 2) if a.quick else (96, 3)
    delays: list[float | None] = [None]
    why = netdelay.can_create()
    if why:
        print(f"delay rows skipped: {why}")
    else:
        delays += [5.0, 20.0]
    rows = []
    for d in delays:
        for spec in (False, True):
            for r in run(d, spec, max_tokens, reps):
                rows.append(r)
                extra = f"  drafts {r['drafts_accepted']}/{r['drafts_sent']} accepted" if spec else ""
                print(f"RTT {r['rtt_ms']:5.1f} ms  {'ngram' if spec else 'plain':5}  {r['prompt']:6}  "
                      f"{r['decode_tok_s']:6.1f} tok/s  step {r['step_ms']:6.1f} ms  TTFT {r['ttft_ms']:6.0f} ms{extra}",
                      flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "max_tokens": max_tokens, "reps": reps,
           "rows": rows, "skipped": why or None}
    (RESULTS / "split_speculative.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS / 'split_speculative.json'}")


if __name__ == "__main__":
    main()
