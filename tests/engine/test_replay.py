"""Spot-check re-execution (mesh402.engine.replay.replay): honest stages pass, tampered ones are flagged.

A short request (chat prompt of two prefill chunks, then decode steps) runs through layers [0, 10) in exact
mode, a middle stage [10, 16), layers [16, 24) and a last stage [24, 30), as StageWorkers run them; the
validator replays
the revealed inputs of steps 0..i* on a separately loaded engine. Cheats come from harness/tamper.py.
"""

from __future__ import annotations

import random

import pytest

from mesh402.work.evidence import fingerprint_ids
from mesh402.engine import Engine
from mesh402.engine.replay import TOLERANCE, ReplayResult, replay
from mesh402.models.catalog import bundled_model_path
from harness.tamper import CHEATS, stage_outputs, tamper_engine, upstream_inputs

PATH = bundled_model_path()
MID, LAST = (10, 16), (24, 30)  # short stages keep the file fast
FP = fingerprint_ids("test-verify-replay", 49152)
N_DECODE = 5
SAMPLED = [0, 1, 2, 6]  # first prefill chunk, last (partial) prefill chunk, first and last decode step


def load(layers: tuple[int, int], mode: str) -> Engine:
    return Engine.load(PATH, mode=mode, layers=layers, load_tokenizer=False)


def sent_on(engine: Engine, inputs: list[dict], wire: str) -> list[dict]:
    """The records the next stage receives from a middle stage running ``engine``."""
    outs = stage_outputs(engine, inputs, last=False, wire=wire, fp_ids=FP)
    return [dict(r, data=p) for r, p in zip(inputs, outs)]


@pytest.fixture(scope="module")
def request_inputs() -> dict[str, dict[str, list[dict]]]:
    """{wire: {"mid": inputs of MID, "last": inputs of LAST}}; honest exact stages before them."""
    e0 = Engine.load(PATH, mode="exact", layers=(0, MID[0]))
    question = "Name three rivers in Europe and say which is longest."
    text = e0.chat_template.render([{"role": "user", "content": question}])
    prompt = e0.tokenizer.encode(text, add_special=False)
    assert 32 < len(prompt) <= 64, len(prompt)  # two prefill chunks
    tokens = prompt + e0.tokenizer.encode(" The Danube, the Rhine", add_special=False)[:N_DECODE]
    mid, gap = load(MID, "exact"), load((MID[1], LAST[0]), "exact")
    out = {}
    for wire in ("f32", "bf16"):
        mid_in = upstream_inputs(e0, tokens, len(prompt), wire)
        out[wire] = {"mid": mid_in, "last": sent_on(gap, sent_on(mid, mid_in, wire), wire)}
    assert len(out["f32"]["mid"]) == 2 + N_DECODE
    return out


@pytest.fixture(scope="module")
def validators() -> dict[tuple[str, str], Engine]:
    return {(mode, role): load(MID if role == "mid" else LAST, mode) for mode in ("exact", "fast")
            for role in ("mid", "last")}


def audit(validator: Engine, inputs: list[dict], committed: list[bytes], step: int, *, last: bool,
          wire: str) -> ReplayResult:
    return replay(validator, inputs[:step + 1], last=last, expected=committed[step], expected_dtype=wire,
                  fp_ids=FP if last else None)


def commitments(engine: Engine, inputs: list[dict], *, last: bool, wire: str) -> list[bytes]:
    return stage_outputs(engine, inputs, last=last, wire=wire, fp_ids=FP)


@pytest.mark.parametrize("mode", ["exact", "fast"])
@pytest.mark.parametrize("wire", ["f32", "bf16"])
@pytest.mark.parametrize("role", ["mid", "last"])
def test_honest_stage_is_never_flagged(request_inputs, validators, mode: str, wire: str, role: str) -> None:
    inputs = request_inputs[wire][role]
    last = role == "last"
    worker = load(LAST if last else MID, mode)  # the stage's own engine, loaded apart from the validator's
    committed = commitments(worker, inputs, last=last, wire=wire)
    for step in SAMPLED:
        r = audit(validators[(mode, role)], inputs, committed, step, last=last, wire=wire)
        assert r.ok, r.detail
        assert r.rel_err <= r.tolerance == TOLERANCE[mode]


# Cheats a validator on the same kind of CPU flags at every step (benchmarks/verify_tolerance.py)
FLAGGED = [("exact", c) for c in CHEATS] + [("fast", c) for c in CHEATS]


@pytest.mark.parametrize("mode,cheat", FLAGGED)
@pytest.mark.parametrize("role", ["mid", "last"])
def test_cheat_is_flagged_at_every_sampled_step(request_inputs, validators, mode: str, cheat: str, role: str) -> None:
    inputs = request_inputs["f32"][role]
    last = role == "last"
    cheater = tamper_engine(load(LAST if last else MID, mode), cheat, seed=3)
    committed = commitments(cheater, inputs, last=last, wire="f32")
    errs = []
    for step in SAMPLED:
        r = audit(validators[(mode, role)], inputs, committed, step, last=last, wire="f32")
        errs.append(r.rel_err)
        assert not r.ok, f"{cheat} not caught at step {step}: {r.detail}"
    print(f"{mode} {role} {cheat}: rel_err {', '.join(f'{e:.3g}' for e in errs)} (tolerance {TOLERANCE[mode]:g})")


@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_catch_rate(request_inputs, validators, mode: str) -> None:
    """20 audited requests per case (alternating middle and last stage, i* uniform like the entry draws it):
    every cheat always caught, honest never."""
    rng = random.Random(7)
    rates = {}
    for cheat in ("honest", *CHEATS):
        committed = {}
        for role in ("mid", "last"):
            eng = load(LAST if role == "last" else MID, mode)
            if cheat != "honest":
                tamper_engine(eng, cheat, seed=5)
            committed[role] = commitments(eng, request_inputs["f32"][role], last=role == "last", wire="f32")
        flagged = 0
        for k in range(20):
            role = ("mid", "last")[k % 2]
            inputs = request_inputs["f32"][role]
            step = rng.randrange(len(inputs))
            flagged += not audit(validators[(mode, role)], inputs, committed[role], step, last=role == "last",
                                 wire="f32").ok
        rates[cheat] = flagged / 20
    print(f"flagged fraction over 20 audited requests ({mode}):", rates)
    assert rates == {"honest": 0.0, **{c: 1.0 for c in CHEATS}}


def _record(r: dict, **change) -> list[dict]:
    return [dict(r, **change)]


@pytest.mark.parametrize("case,inputs_of,why", [
    ("no steps", lambda r: [], "no step inputs"),
    ("short payload", lambda r: _record(r, data=r["data"][:-4]), "does not match shape"),
    ("wrong hidden size", lambda r: _record(r, shape=[r["shape"][0], 100]), "is not [T, 576]"),
    ("position skips ahead", lambda r: _record(r, pos=5), "out of order"),
    ("beyond the context", lambda r: _record(r, pos=0, shape=[9000, 576]), "beyond the model context"),
    ("n_real too large", lambda r: _record(r, n_real=r["shape"][0] + 1), "n_real"),
    ("unknown dtype", lambda r: _record(r, dtype="f8"), "unknown wire dtype"),
    ("missing field", lambda r: [{k: v for k, v in r.items() if k != "pos"}], "malformed"),
    ("payload not bytes", lambda r: _record(r, data="abc"), "not bytes"),
])
def test_bad_evidence_is_a_clear_failure(request_inputs, validators, case: str, inputs_of, why: str) -> None:
    r0 = request_inputs["f32"]["mid"][0]
    res = replay(validators[("exact", "mid")], inputs_of(r0), last=False, expected=b"\0" * 4)
    assert not res.ok and why in res.detail, res.detail


def test_bad_expected_output_is_a_clear_failure(request_inputs, validators) -> None:
    inputs = request_inputs["f32"]["last"][:1]
    v = validators[("exact", "last")]
    short = replay(v, inputs, last=True, expected=b"\0" * 8, fp_ids=FP)
    assert not short.ok and "fingerprint has 2 values" in short.detail
    bad_ids = replay(v, inputs, last=True, expected=b"\0" * 4, fp_ids=[49152])
    assert not bad_ids.ok and "fingerprint ids" in bad_ids.detail
    missing = replay(v, inputs, last=True, expected=None, fp_ids=FP)
    assert not missing.ok and "not bytes" in missing.detail
    wrong_role = replay(v, inputs, last=False, expected=b"")
    assert not wrong_role.ok and "last=False" in wrong_role.detail
    mid = replay(validators[("exact", "mid")], request_inputs["f32"]["mid"][:1], last=False, expected=b"\0" * 12)
    assert not mid.ok and "expected output" in mid.detail


def test_install_tampers_every_engine_the_worker_loads(monkeypatch) -> None:
    from types import SimpleNamespace

    from harness.tamper import install

    worker = SimpleNamespace(loader=lambda h, a, b: load((a, b), "exact"))
    monkeypatch.delenv("MESH402_TAMPER", raising=False)
    install(worker)
    assert len(worker.loader("h", 24, 30).stages[0].blocks) == 6  # unset: untouched
    monkeypatch.setenv("MESH402_TAMPER", "skip_layer")
    install(worker)
    assert len(worker.loader("h", 24, 30).stages[0].blocks) == 5
    monkeypatch.setenv("MESH402_TAMPER", "nonsense")
    with pytest.raises(ValueError, match="one of"):
        install(worker)
