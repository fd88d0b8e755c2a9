"""What the trust-boundary checks cost (docs/security.md), side by side with the checks off.

    .venv/bin/python benchmarks/checks.py [--quick]

Prints a table and writes benchmarks/results/checks.json. Every check runs in process on the code the
node runs, on the bundled SmolLM2-135M where a model is needed, timed over many repetitions (median of
5 rounds, per call). "Off" is what the node did before the check (or nothing, where the check is new):

| check | runs | with | off |
|---|---|---|---|
| receipts bound at the entry | per split request | `bound_chain` over 1 + 3 receipts (3 Ed25519 verifies) | stored as returned |
| labels by schema | per routed request | `labels.model_facts` for 20 hosts' `model:*` labels | `json.loads` + `int()` |
| chat tokenized by segment | per chat request | `render_segments` + `encode_chat` | `render` + `encode` |
| x402 payer signature | per retry that hits a stored Idempotency-Key | local EIP-3009 signature recovery | none |
| x402 exposure | per paid request | one SQLite sum over the payer's payments in flight | none |
| x402 staged answer | per paid request | answer stored + payment marked settling, one transaction | payment marked settling |
| credit claim nonce | per claim | one SQLite insert | none |
| console Host/Origin | per console request | `access._origin_refusal` (Host, Origin, Sec-Fetch-Site) | none |
| holding proof | per peer, model and hour | challenge + answer over ~34 KiB (30 layers) of the file | none |
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))  # harness/ (signed test payments)

from harness.timing import per_call  # noqa: E402


def receipts(n: int) -> dict[str, Any]:
    from mesh402.mesh.identity import NodeIdentity
    from mesh402.work.receipts import bound_chain, sign_receipt

    ids = [NodeIdentity.generate() for _ in range(4)]
    rid, model = secrets.token_hex(16), "ab" * 32
    chain, prev, out_hash = [], "", "00" * 32
    bounds = [(0, 8), (8, 16), (16, 24), (24, 30)]
    for k, (ident, (s, e)) in enumerate(zip(ids, bounds)):
        r = sign_receipt(ident, request_id=rid, stage=k, model_hash=model, layer_start=s, layer_end=e, tokens=100,
                         input_hash=out_hash, output_hash=secrets.token_hex(32), prev=prev)
        chain.append(r)
        prev, out_hash = r.digest, r.output_hash
    hops = [(i.node_id_hex, s, e) for i, (s, e) in zip(ids[1:], bounds[1:])]
    kept, why = bound_chain(chain, chain[0], hops)
    assert len(kept) == 4 and not why
    return {"with": per_call(lambda: bound_chain(chain, chain[0], hops), max(10, n // 20)), "off": 0.0}


def labels(n: int) -> dict[str, Any]:
    from mesh402 import labels as L

    raw = [json.dumps({"ctx": 8192, "params": 135_000_000, "tags": ["chat", "small"], "tools": True,
                       "tok_s": 50.0 + i}) for i in range(20)]

    def old() -> None:
        for r in raw:
            d = json.loads(r)
            int(d.get("ctx", 0) or 0), int(d.get("params", 0) or 0), frozenset(str(t) for t in d.get("tags", []))
            bool(d.get("tools", False)), d.get("tok_s")

    def new() -> None:
        for r in raw:
            L.model_facts(r)
    return {"with": per_call(new, n), "off": per_call(old, n)}


def tokenize(n: int) -> dict[str, Any]:
    from mesh402.engine.chat_template import ChatTemplate
    from mesh402.engine.tokenizer import Tokenizer
    from mesh402.models.catalog import bundled_model_path

    tok = Tokenizer.from_gguf(bundled_model_path())
    tmpl = ChatTemplate(tok.chat_template, bos_token=tok.bos_token or "", eos_token=tok.eos_token or "") \
        if getattr(tok, "chat_template", None) else ChatTemplate.default()
    messages = [{"role": "system", "content": "You are a helpful assistant. " * 4},
                {"role": "user", "content": "Explain how a pipeline split works in two sentences. " * 3},
                {"role": "assistant", "content": "Each node runs a range of layers and passes activations on."},
                {"role": "user", "content": "And who gets paid?"}]
    a = tok.encode_chat(tmpl.render_segments(messages, add_generation_prompt=True))
    b = tok.encode(tmpl.render(messages, add_generation_prompt=True), add_special=False)
    assert a == b  # no role marker inside the text: the same tokens either way
    return {"with": per_call(lambda: tok.encode_chat(tmpl.render_segments(messages, add_generation_prompt=True)), n),
            "off": per_call(lambda: tok.encode(tmpl.render(messages, add_generation_prompt=True), add_special=False),
                            n),
            "prompt_tokens": len(a)}


def x402(n: int, tmp: Path) -> dict[str, Any]:
    from eth_account import Account
    from x402.schemas import PaymentPayload

    from harness.x402_payments import sign_payment
    from mesh402.api.x402.gate import PaymentGate
    from mesh402.economics.ledger import Ledger
    from mesh402.settings import PaymentsConfig

    cfg = PaymentsConfig(price_per_request=10_000, pay_to="0x" + "cd" * 20, facilitator_url="http://unused",
                         network="eip155:31337", asset="0x" + "ab" * 20, asset_name="Mesh Test USDC",
                         asset_version="2", ledger_path=tmp / "ledger.sqlite")
    gate = PaymentGate(cfg, tmp, facilitator=object())
    reqs = gate.requirements(10_000, 600)
    required = {"accepts": [reqs.model_dump(by_alias=True, exclude_none=True)], "resource": None}
    header, auth = sign_payment(Account.create().key.hex(), required)
    payload = PaymentPayload.model_validate(json.loads(base64.b64decode(header)))
    sig = per_call(lambda: gate._signed_by_payer(None, reqs, payload, auth), max(5, n // 100))  # type: ignore[arg-type]
    payer = auth["from"]
    for i in range(20):  # some history for this payer
        gate.ledger.claim_payment(f"a{i}", payer=payer, amount=10_000, network="n", asset="a", pay_to="p",
                                  kind="request", request_id=str(i), payload_json="{}", requirements_json="{}")
        gate.ledger.mark_settled(f"a{i}", "0x", "{}")
    exposure = per_call(lambda: gate.ledger.exposure(payer), n)
    ledger = Ledger(tmp / "stage.sqlite")
    body = json.dumps({"choices": [{"message": {"content": "x" * 400}}]}).encode()
    count = iter(range(10**9))

    def rows(m: int) -> list[str]:  # payments verified and their keys reserved, as authorize() leaves them
        ids = [f"p{next(count)}" for _ in range(m)]
        for a in ids:
            ledger.claim_payment(a, payer=payer, amount=1, network="n", asset="a", pay_to="p", kind="request",
                                 request_id=a, payload_json="{}", requirements_json="{}")
            ledger.begin_response([f"auth:{a}"], "fp", payer)
        return ids

    def timed(m: int, fn: Callable[[str], Any]) -> float:
        out = []
        for _ in range(5):
            ids = rows(m)
            t0 = time.perf_counter()
            for a in ids:
                fn(a)
            out.append((time.perf_counter() - t0) / m)
        return statistics.median(out)
    m = max(20, n // 50)
    # the answer staged and the payment marked settling, one transaction; before: the payment marked alone
    staged = timed(m, lambda a: ledger.finish_response([f"auth:{a}"], 200, {"content-type": "application/json"},
                                                       body, state="settling", settling=a))
    marked = timed(m, ledger.mark_settling)
    claims = iter(range(10**9))
    claim = per_call(lambda: ledger.use_claim(payer, f"{next(claims):032x}", 300), max(20, n // 50))
    return {"signature": {"with": sig, "off": 0.0}, "exposure": {"with": exposure, "off": 0.0},
            "staged": {"with": staged, "off": marked}, "claim": {"with": claim, "off": 0.0}}


def console(n: int) -> dict[str, Any]:
    from mesh402.api.management.access import _origin_refusal  # the guard's whole Host/Origin decision

    headers = {"host": "127.0.0.1:3131", "origin": "http://127.0.0.1:3131", "sec-fetch-site": "same-origin"}

    def check() -> None:
        assert _origin_refusal({"path": "/api/status"}, headers) is None
    return {"with": per_call(check, n), "off": 0.0}


def holding(n: int) -> dict[str, Any]:
    from mesh402.models.catalog import bundled_model_path
    from mesh402.models.holding import answer, challenge
    from mesh402.serving.holdings import PROOF_TTL_S

    path = bundled_model_path()
    me = "ab" * 32
    slices = challenge(path, random.Random(1))
    nonce = secrets.token_bytes(16)
    t_challenge = per_call(lambda: challenge(path), max(3, n // 200))
    t_answer = per_call(lambda: answer(path, me, nonce, slices), max(3, n // 200))  # the prover's side
    return {"challenge": t_challenge, "answer": t_answer, "slices": len(slices),
            "bytes": sum(s.length for s in slices), "per_hours": PROOF_TTL_S / 3600}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = ap.parse_args()
    n = 200 if args.quick else 2000
    with tempfile.TemporaryDirectory() as tmp:
        pay = x402(n, Path(tmp))
    out = {"receipts": receipts(n), "labels": labels(n), "tokenize": tokenize(max(20, n // 20)),
           "x402": pay, "console": console(n), "holding": holding(n)}
    rows = [("receipts bound at the entry (1+3 stages)", "split request", out["receipts"]),
            ("labels by schema (20 hosts)", "routed request", out["labels"]),
            (f"chat tokenized by segment ({out['tokenize']['prompt_tokens']} tokens)", "chat request",
             out["tokenize"]),
            ("x402 payer signature (local)", "idempotent retry", pay["signature"]),
            ("x402 exposure sum", "paid request", pay["exposure"]),
            ("x402 answer staged with `settling`", "paid request", pay["staged"]),
            ("credit claim nonce", "claim", pay["claim"]),
            ("console Host/Origin", "console request", out["console"])]
    print(f"{'check':<48} {'per':<16} {'with (µs)':>10} {'off (µs)':>10} {'added (µs)':>11}")
    for name, per, d in rows:
        print(f"{name:<48} {per:<16} {d['with'] * 1e6:>10.1f} {d['off'] * 1e6:>10.1f} "
              f"{(d['with'] - d['off']) * 1e6:>11.1f}")
    h = out["holding"]
    print(f"holding proof: challenge {h['challenge'] * 1e3:.2f} ms + answer {h['answer'] * 1e3:.2f} ms over "
          f"{h['slices']} slices ({h['bytes'] / 1024:.0f} KiB), once per peer, model and "
          f"{h['per_hours']:.0f} h (both sides)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "checks.json").write_text(json.dumps({"repetitions": n, "seconds_per_call": out}, indent=2))
    print(f"wrote {RESULTS / 'checks.json'}")


if __name__ == "__main__":
    asyncio.set_event_loop(asyncio.new_event_loop())
    main()
