"""The `escrow` label an escrow node announces (node/escrow_pay.py): gossip is untrusted, so only a small,
typed label naming the same escrow contract and chain makes an entry pay a hop."""

from __future__ import annotations

import json

from mesh402.node.escrow_pay import LABEL_LIMIT, EscrowLabel

W, E = "0x" + "1" * 40, "0x" + "e" * 40


def test_label_round_trips_and_matches_only_the_same_escrow_and_chain() -> None:
    mine = EscrowLabel(W, E, 31337)
    assert EscrowLabel.parse(mine.to_label()) == mine
    assert mine.same_escrow(EscrowLabel("0x" + "2" * 40, E.upper().replace("0X", "0x"), 31337))
    assert not mine.same_escrow(EscrowLabel(W, "0x" + "f" * 40, 31337))
    assert not mine.same_escrow(EscrowLabel(W, E, 1))


def test_hostile_labels_are_ignored() -> None:
    for raw in (None, 7, "", "not json", "[]", json.dumps({"wallet": W, "escrow": E}),
                json.dumps({"wallet": "0x12", "escrow": E, "chain": 1}),
                json.dumps({"wallet": W, "escrow": E, "chain": "1"}),
                json.dumps({"wallet": W, "escrow": E, "chain": True}),
                json.dumps({"wallet": W, "escrow": E, "chain": 0}),
                json.dumps({"wallet": W, "escrow": E, "chain": 1 << 70}),
                json.dumps({"wallet": W, "escrow": E, "chain": 1, "pad": "x" * LABEL_LIMIT})):
        assert EscrowLabel.parse(raw) is None, raw
