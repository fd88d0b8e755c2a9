"""`mesh402 status` on an escrow node: its escrow balance, vouchers held per entry against the work behind
them, redemptions and what it vouchered to its stages, from the node's /api/status."""

from __future__ import annotations

from mesh402.cli.status import escrow_status_lines


def test_escrow_lines_show_balance_vouchers_and_redemptions() -> None:
    e = {"wallet": "0xW", "escrow": "0xE", "chain": 31337, "escrow_free": 2_500_000,
         "held": {"0xentry": {"owed": 7_000, "vouchered": 5_000}}, "issued": {"0xworker": 12_000},
         "redeemer": {"total": 5_000, "last_tx": "0xabc", "last_error": ""},
         "worker": {"paused": 1, "last_refusal": "entry 0xentry fell 2000 behind on vouchers: paused"}}
    lines = escrow_status_lines({"node": {"distributed": {"escrow": e}}})
    text = "\n".join(lines)
    assert "free balance 2.500000 USDC" in text and "redeemed 0.005000 USDC" in text and "0xabc" in text
    assert "vouchers held from 0xentry: 0.005000 USDC for 0.007000 of work" in text
    assert "vouchered to 0xworker: 0.012000 USDC" in text and "paused entries 1" in text
    assert escrow_status_lines({"node": {"distributed": {}}}) == []
    assert "free balance ?" in escrow_status_lines({"node": {"distributed": {"escrow": {"escrow_free": None}}}})[0]
