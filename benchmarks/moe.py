"""MoE expert-parallel benchmark: decode tok/s solo vs experts spread over processes on loopback.

    .venv/bin/python benchmarks/moe.py [--layers 4] [--experts 16] [--hidden 1024] [--decode-tokens 32]
                                       [--delays-ms 0,2,10] [--quant Q8_0] [--mode exact|fast]

Writes a random-weight qwen3moe GGUF (llama.cpp layout), then for each configuration runs greedy
decode: solo (one process holds every expert), and expert parallel with 2 and 3 nodes (the host
holds the trunk and a share of the experts; the others are separate processes serving their experts
over TCP on 127.0.0.1). Reports decode tok/s, bytes on the wire per token, and the same with a
simulated delay added to every host->node request. Every expert-parallel run must produce the same
tokens as solo (checked). Writes benchmarks/results/moe-<mode>.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "benchmarks" / "results"

from harness.tiny_gguf import add_attention_and_stub_vocab, finish_gguf  # noqa: E402  (the tiny-GGUF header the tests use)


def write_model(path: Path, *, layers: int, experts: int, used: int, hidden: int, ffe: int, vocab: int,
                quant: str, seed: int = 0) -> None:
    import gguf

    rng = np.random.default_rng(seed)
    nh, hd = hidden // 64, 64
    nkv = max(1, nh // 4)
    q = gguf.GGMLQuantizationType[quant]
    w = gguf.GGUFWriter(str(path), "qwen3moe")
    w.add_block_count(layers)
    w.add_context_length(1024)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffe)
    w.add_expert_feed_forward_length(ffe)
    w.add_expert_count(experts)
    w.add_expert_used_count(used)
    add_attention_and_stub_vocab(w, n_heads=nh, n_kv_heads=nkv, head_dim=hd, rope_base=1e6, rms_eps=1e-6, vocab=vocab)

    def mat(*shape, scale=None):
        scale = scale or 1.0 / np.sqrt(shape[-1])
        return (rng.standard_normal(shape, dtype=np.float32) * scale).astype(np.float32)

    def add(name, a, quantize=True):
        if quantize and a.ndim >= 2:
            w.add_tensor(name, gguf.quants.quantize(a, q), raw_dtype=q)
        else:
            w.add_tensor(name, a)

    add("token_embd.weight", mat(vocab, hidden, scale=1.0), quantize=False)
    add("output_norm.weight", np.ones(hidden, np.float32), False)
    add("output.weight", mat(vocab, hidden))
    for i in range(layers):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", 1 + 0.1 * mat(hidden, scale=1.0), False)
        add(p + "ffn_norm.weight", 1 + 0.1 * mat(hidden, scale=1.0), False)
        add(p + "attn_q_norm.weight", 1 + 0.1 * mat(hd, scale=1.0), False)
        add(p + "attn_k_norm.weight", 1 + 0.1 * mat(hd, scale=1.0), False)
        add(p + "attn_q.weight", mat(nh * hd, hidden))
        add(p + "attn_k.weight", mat(nkv * hd, hidden))
        add(p + "attn_v.weight", mat(nkv * hd, hidden))
        add(p + "attn_output.weight", mat(hidden, nh * hd))
        add(p + "ffn_gate_inp.weight", mat(experts, hidden), False)
        add(p + "ffn_gate_exps.weight", mat(experts, ffe, hidden))
        add(p + "ffn_up_exps.weight", mat(experts, ffe, hidden))
        add(p + "ffn_down_exps.weight", mat(experts, hidden, ffe))
    finish_gguf(w)


def _shard_main(path: str, experts: list, threads: int, q: "mp.Queue", mode: str = "exact") -> None:
    import torch

    torch.set_num_threads(threads)
    from mesh402.engine.expert_parallel import ExpertShardWorker, serve_expert_shard

    worker = ExpertShardWorker(path, [tuple(e) for e in experts], mode=mode)
    serve_expert_shard(worker, 0, ready=lambda port: q.put((port, worker.weight_bytes)))


MODE = "exact"


def run_decode(path: Path, prompt: list[int], n: int, experts=None) -> tuple[list[int], float, object]:
    from mesh402.engine import Engine

    eng = Engine.load(path, load_tokenizer=False, experts=experts, mode=MODE)
    s = eng.new_session(len(prompt) + n + 1)
    logits = s.prefill(prompt)
    toks, t_first = [], None
    for i in range(n):
        t = int(logits.argmax())
        toks.append(t)
        if i == 1:  # skip the first decode step (warm-up)
            t_first = time.perf_counter()
        logits = s.decode(t)
    dt = time.perf_counter() - t_first
    s.close()
    return toks, (n - 1) / dt, eng


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--used", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffe", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--quant", default="Q8_0")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--delays-ms", default="0,2,10")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--mode", choices=("exact", "fast"), default="exact")
    args = ap.parse_args()
    global MODE
    MODE = args.mode

    import torch

    torch.set_num_threads(args.threads)
    from mesh402.engine.moe import ExpertBank
    from mesh402.engine.weights import open_source
    from mesh402.engine.expert_parallel import RemoteExperts, SocketTransport

    tmp = Path(tempfile.mkdtemp(prefix="moe-bench-"))
    path = tmp / "moe.gguf"
    t0 = time.perf_counter()
    write_model(path, layers=args.layers, experts=args.experts, used=args.used, hidden=args.hidden,
                ffe=args.ffe, vocab=args.vocab, quant=args.quant)
    print(f"model: {path.stat().st_size / 1e6:.1f} MB, {args.layers} layers x {args.experts} experts "
          f"(top-{args.used}), hidden {args.hidden}, {args.quant}; written in {time.perf_counter() - t0:.1f}s")
    prompt = [int(x) for x in np.random.default_rng(1).integers(2, args.vocab, args.prompt_tokens)]
    solo_toks, solo_tps, _ = run_decode(path, prompt, args.decode_tokens)
    rows = [{"config": "solo", "nodes": 1, "delay_ms": 0, "tok_s": solo_tps, "wire_bytes_per_token": 0,
             "same_tokens": True}]
    print(f"solo: {solo_tps:.1f} tok/s")
    src = open_source(path)
    all_experts = [(li, e) for li in range(args.layers) for e in range(args.experts)]
    ctx = mp.get_context("spawn")
    delays = [float(d) for d in args.delays_ms.split(",") if d.strip()]
    for n_nodes in (2, 3):
        # experts dealt round-robin: node 0 is the host (holds the trunk too)
        held = {k: [ex for ex in all_experts if ex[1] % n_nodes == k] for k in range(n_nodes)}
        procs, addrs = [], {}
        for k in range(1, n_nodes):
            q = ctx.Queue()
            p = ctx.Process(target=_shard_main, args=(str(path), held[k], args.threads, q, args.mode), daemon=True)
            p.start()
            port, _ = q.get(timeout=120)
            procs.append(p)
            addrs[f"n{k}"] = ("127.0.0.1", port)
        owners = {ex: (("host",) if ex[1] % n_nodes == 0 else (f"n{ex[1] % n_nodes}",)) for ex in all_experts}
        bank = ExpertBank(src, held[0], mode=args.mode)
        try:
            for d in delays:
                tr = SocketTransport(addrs, delay_s=d / 1000.0)
                runner = RemoteExperts(owners, tr, local=bank, local_node="host")
                toks, tps, _ = run_decode(path, prompt, args.decode_tokens, experts=runner)
                # prefill is included in the counters: measure decode separately
                tr2 = SocketTransport(addrs, delay_s=0)
                r2 = RemoteExperts(owners, tr2, local=bank, local_node="host")
                from mesh402.engine import Engine

                eng = Engine.load(path, load_tokenizer=False, experts=r2, mode=args.mode)
                s = eng.new_session(len(prompt) + 8)
                lg = s.prefill(prompt)
                tr2.reset_counters()
                for _ in range(4):
                    lg = s.decode(int(lg.argmax()))
                per_tok = tr2.wire_bytes / 4
                s.close()
                same = toks == solo_toks
                rows.append({"config": f"expert-parallel x{n_nodes}", "nodes": n_nodes, "delay_ms": d,
                             "tok_s": tps, "wire_bytes_per_token": per_tok, "same_tokens": same})
                print(f"expert parallel, {n_nodes} nodes, +{d:g} ms/request: {tps:.1f} tok/s, "
                      f"{per_tok:.0f} B/token on the wire, same tokens as solo: {same}")
                runner.close()
                r2.close()
        finally:
            for p in procs:
                p.kill()
                p.join()
    act = args.hidden * 4
    one_expert = 3 * args.ffe * args.hidden * (34 / 32 if args.quant == "Q8_0" else 1)
    print(f"reference: activation row {act} B; x top-{args.used} x {args.layers} layers = "
          f"{act * args.used * args.layers} B; one expert's weights ~{one_expert / 1e6:.2f} MB")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"model": {"layers": args.layers, "experts": args.experts, "used": args.used, "hidden": args.hidden,
                     "ffe": args.ffe, "quant": args.quant, "file_mb": path.stat().st_size / 1e6},
           "threads": args.threads, "mode": args.mode, "decode_tokens": args.decode_tokens, "rows": rows,
           "note": "delay is added per host->node request (simulated RTT), nodes are processes on one machine"}
    (RESULTS / f"moe-{args.mode}.json").write_text(json.dumps(out, indent=2))
    path.unlink()


if __name__ == "__main__":
    main()
