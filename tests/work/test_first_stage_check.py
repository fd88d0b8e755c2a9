"""Issue 14, test (g) in process: the entry's own stage 0, audited from what the first remote stage received.
The entry's signed stage-0 receipt commits to every step's token ids and the payload it sent; the check built
from the received steps is re-executed from the token ids on the validator's own copy of layers [0, k): an
honest stage 0 passes bit-exact, a perturbing one fails, and a reporter that edits the evidence (tokens,
positions, payloads, the expected output) cannot frame an honest entry: its check is skipped, not failed."""

from __future__ import annotations

import base64
import dataclasses

import pytest

from harness.tamper import tamper_engine, upstream_inputs
from mesh402.commitment import activation_hash
from mesh402.engine import Engine
from mesh402.mesh.identity import NodeIdentity
from mesh402.models.catalog import bundled_model_path
from mesh402.serving.spot_checks import run_check
from mesh402.work.evidence import UNVERIFIABLE, first_stage_check, sign_stage0_terms
from mesh402.work.receipts import StageTally, token_step_hash

PATH = bundled_model_path()
SPLIT = 15
TOKENS = [1, 504, 3458, 314, 253, 2795, 30, 1191, 1063, 2795, 30, 1191, 1063, 2795, 30, 1191,
          1063, 2795, 30, 1191, 1063, 2795, 30, 1191, 1063, 2795, 30, 1191, 1063, 2795, 30, 1191,
          1063, 2795, 30, 30, 42, 43]
N_PROMPT = 34  # two prefill chunks (32 + 2 rows), then decode steps


def entry_run(cheat: str | None) -> tuple[dict, dict, list[dict]]:
    """The entry's signed stage-0 receipt and terms, and what its stage 0 sent (as the first remote stage keeps
    it)."""
    e0 = Engine.load(PATH, mode="exact", layers=(0, SPLIT), load_tokenizer=False)
    if cheat:
        e0 = tamper_engine(e0, cheat, 0)
    records = upstream_inputs(e0, TOKENS, N_PROMPT, "f32")
    tally = StageTally("req-1", "ab" * 32, 0, SPLIT)
    for r in records:
        r["tokens"] = TOKENS[r["pos"]:r["pos"] + r["n_real"]]
        tally.step(r["n_real"], token_step_hash(r["tokens"]), activation_hash(r["data"]))
    receipt = tally.receipt(ENTRY, 0)
    return receipt.to_json(), sign_stage0_terms(ENTRY, receipt, mode="exact", dtype="f32"), records


ENTRY = NodeIdentity.generate()


@pytest.fixture(scope="module")
def validator() -> Engine:
    return Engine.load(PATH, mode="exact", layers=(0, SPLIT), load_tokenizer=False)


def check_of(receipt: dict, terms: dict, records: list[dict], step: int):
    return first_stage_check(receipt, terms, records, step, "reporter")


def test_an_honest_stage_0_passes_bit_exact_and_a_perturbing_one_fails(validator: Engine) -> None:
    engine_for = lambda *a: validator  # noqa: E731
    receipt, terms, records = entry_run(None)
    for step in (0, 1, len(records) - 1):  # a prefill chunk, the padded one, a decode step
        r = run_check(check_of(receipt, terms, records, step), engine_for)
        assert r.ok and not r.skipped and r.rel_err == 0.0, r
    receipt, terms, records = entry_run("perturb")
    r = run_check(check_of(receipt, terms, records, len(records) - 1), engine_for)
    assert not r.ok and not r.skipped and r.rel_err > r.tolerance, r


def test_a_reporter_cannot_frame_an_honest_entry(validator: Engine) -> None:
    engine_for = lambda *a: validator  # noqa: E731
    receipt, terms, records = entry_run(None)
    step = len(records) - 1
    good = check_of(receipt, terms, records, step)
    bad_payload = bytearray(records[step]["data"])
    bad_payload[100] ^= 1
    edits = {
        "a token changed": [{**r, "tokens": [7] * len(r["tokens"])} if i == 2 else r for i, r in enumerate(records)],
        "a position moved": [{**r, "pos": r["pos"] + 1} if i == step else r for i, r in enumerate(records)],
        "a payload flipped": [{**r, "data": bytes(bad_payload)} if i == step else r for i, r in enumerate(records)],
        "the wire dtype misstated": [{**r, "dtype": "bf16"} for r in records],
    }
    for what, edited in edits.items():
        r = run_check(check_of(receipt, terms, edited, step), engine_for)
        assert r.ok and r.skipped and r.detail.startswith(UNVERIFIABLE), (what, r)
    # terms the reporter rewrote (another mode, re-signed by itself) or the entry's terms of another request
    mine = NodeIdentity.generate()
    from mesh402.work.receipts import Receipt
    other_receipt = StageTally("req-2", "ab" * 32, 0, SPLIT).receipt(ENTRY, 0)
    for bad_terms in ({**terms, "mode": "fast"}, sign_stage0_terms(mine, Receipt.from_json(receipt), mode="exact",
                                                                   dtype="f32"),
                      sign_stage0_terms(ENTRY, other_receipt, mode="exact", dtype="f32"), {}):
        r = run_check(check_of(receipt, bad_terms, records, step), engine_for)
        assert r.ok and r.skipped, r
    # the expected output swapped for another step's payload, the receipt of another node, a shortened list
    other = dataclasses.replace(good, expected=base64.b64encode(records[0]["data"][:len(records[step]["data"])]).decode())
    forged = dataclasses.replace(good, receipt={**good.receipt, "node_id": NodeIdentity.generate().node_id_hex})
    short = dataclasses.replace(good, out_hashes=good.out_hashes[:-1])
    for c in (other, forged, short):
        r = run_check(c, engine_for)
        assert r.ok and r.skipped, r
    # a normal stage check over layers from 0, or a stage-0 check over other layers, is not judged
    assert run_check(dataclasses.replace(good, first=False), engine_for).skipped
