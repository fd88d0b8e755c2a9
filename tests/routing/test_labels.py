"""Peers' announcement labels parsed by their schemas (mesh402/labels.py): a malformed value is no claim,
never an exception in placement, routing or payment code."""

from __future__ import annotations

import json

from mesh402 import labels as L

ME, OTHER = "ab" * 32, "cd" * 32


def test_capacity_is_a_bounded_decimal_or_nothing() -> None:
    assert L.capacity({"capacity_bytes": "1000"}) == 1000
    assert L.capacity({"capacity_bytes": str(2**62)}) == L.MAX_CAPACITY
    for bad in ("lots", "-1", "1e9", "", " 12", "9" * 40):
        assert L.capacity({"capacity_bytes": bad}) == 0, bad
    assert L.capacity({}) == 0


def test_model_facts_take_an_object_with_typed_fields_only() -> None:
    f = L.model_facts(json.dumps({"ctx": 8192, "params": 135, "tags": ["chat"], "tools": True, "tok_s": 50.0}))
    assert (f.ctx, f.params, f.tags, f.tools, f.tok_s) == (8192, 135, ["chat"], True, 50.0)
    for bad in (json.dumps(["not", "an", "object"]), json.dumps({"ctx": "big"}), json.dumps({"tags": "x"}),
                json.dumps({"tok_s": -1}), "{", "x" * (L.MAX_JSON + 1), None):
        assert L.model_facts(bad) == L.ModelFactsLabel(), bad


def test_a_plan_claim_counts_only_for_the_host_it_names() -> None:
    plan = {"host": ME, "ready": True, "epoch": 7, "stages": [[ME, 0, 30, 1]]}
    c = L.plan_claim(json.dumps(plan), ME)
    assert c is not None and c.ready and c.epoch == 7
    assert L.plan_claim(json.dumps(plan), OTHER) is None  # X's announcement naming host Y: ignored
    for bad in ([1, 2], {"ready": True}, {**plan, "epoch": -1}, {**plan, "epoch": "7"}, {**plan, "stages": "all"}):
        assert L.plan_claim(json.dumps(bad), ME) is None, bad
    labels = {f"plan:m@{'0' * 64}": json.dumps(plan), f"plan:n@{'1' * 64}": json.dumps({**plan, "host": OTHER})}
    assert list(L.plan_claims(labels, ME)) == [f"m@{'0' * 64}"]


def test_vouches_validators_and_node_ids_are_well_formed_or_ignored() -> None:
    h = "ee" * 32
    assert L.verified_holders({f"verified:{h}": json.dumps([ME, "nope", OTHER.upper()])}, h) == frozenset({ME})
    assert L.verified_holders({f"verified:{h}": "{}"}, h) == frozenset()
    assert L.validator_address({"validator": "0x" + "11" * 20}) == "0x" + "11" * 20
    assert L.validator_address({"validator": "not-an-address"}) is None
    assert L.validator_device({"validator_device": "x" * 5000}) == ""
    assert L.node_id_ok(ME) and not L.node_id_ok(ME.upper()) and not L.node_id_ok(ME[:-1])


def test_backend_models_are_unverified_typed_claims_with_bounded_ids() -> None:
    labels = {"model:org/llama-3": L.backend_label(True, 8192), "model:down": L.backend_label(False),
              "model:hosted": json.dumps({"ctx": 2048, "params": 135}),  # a hosted model's facts: not a backend
              "model:liar": json.dumps({"backend": True, "verified": True, "ready": True}),  # not believed
              "model:typed": json.dumps({"backend": True, "ready": "yes"}),
              "model:" + "x" * 200: L.backend_label(True), "model:bad id": L.backend_label(True),
              "plan:x": L.backend_label(True)}
    got = L.backend_models(labels)
    assert set(got) == {"org/llama-3", "down"}
    assert got["org/llama-3"].ready and got["org/llama-3"].ctx == 8192 and not got["down"].ready
    assert json.loads(L.backend_label(True, 8192)) == {"backend": True, "verified": False, "ready": True, "ctx": 8192}
    many = {f"model:m{i}": L.backend_label(True) for i in range(L.MAX_BACKEND_MODELS + 10)}
    assert len(L.backend_models(many)) == L.MAX_BACKEND_MODELS
    assert L.model_facts(L.backend_label(True, 4096)).ctx == 4096  # the router reads the same label's facts
