"""The seller's SQLite ledger: payments by authorization, credit with holds, stored responses, recovery."""

from __future__ import annotations

from pathlib import Path

from mesh402.economics.ledger import Ledger, auth_id_for
from mesh402.economics.networks import Asset

PAYER = "0xAbC0000000000000000000000000000000000001"


def claim(led: Ledger, auth: str, kind: str = "request") -> bool:
    return led.claim_payment(auth, payer=PAYER, amount=10_000, network="eip155:31337", asset="0xT", pay_to="0xN",
                             kind=kind, request_id="r1", payload_json="{}", requirements_json="{}")


def test_an_authorization_is_claimed_once_until_released(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "l.sqlite")
    a = auth_id_for("eip155:31337", "0xT", PAYER, "0x01")
    assert a == auth_id_for("eip155:31337", "0xt", PAYER.lower(), "0x01")
    assert claim(led, a) and not claim(led, a)
    led.mark_released(a, "generation failed")
    assert claim(led, a)  # never broadcast: the same authorization may pay for a retry
    led.mark_settling(a)
    led.mark_settled(a, "0xtx", '{"success": true}')
    assert not claim(led, a)
    s = led.summary()
    assert s["settled_payments"] == 1 and s["revenue"] == 10_000 and s["revenue_per_request"] == 10_000


def test_credit_holds_never_overdraw_and_charge_only_usage(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "l.sqlite")
    assert led.topup(PAYER, 1_000, "t1") == 1_000
    h1 = led.hold(PAYER, 800, "r1", minimum=800)
    assert h1 is not None and led.balance(PAYER) == 200
    assert led.hold(PAYER, 800, "r2", minimum=300) is None  # only 200 left for a concurrent request
    h2 = led.hold(PAYER, 800, "r3", minimum=100)
    assert h2 is not None and h2[1] == 200 and led.balance(PAYER) == 0
    assert led.close_hold(h1[0], 350, "r1") == (350, 450)
    assert led.close_hold(h2[0], 999, "r3") == (200, 450)  # capped at what was held
    assert led.summary()["credit_used"] == 550


def test_topup_into_a_hold(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "l.sqlite")
    hid, held = led.hold(PAYER, 500, "r1", minimum=0) or ("", -1)
    assert held == 0
    led.topup(PAYER, 2_000, "auth", into_hold=hid)
    assert led.balance(PAYER) == 0 and led.held(PAYER) == 2_000
    assert led.close_hold(hid, 700, "r1") == (700, 1_300)


def test_restart_returns_held_credit_and_releases_unfinished_payments(tmp_path: Path) -> None:
    path = tmp_path / "l.sqlite"
    led = Ledger(path)
    led.topup(PAYER, 1_000, "t1")
    token = led.issue_token(PAYER)
    led.hold(PAYER, 600, "r1", minimum=600)
    a, b = (auth_id_for("eip155:31337", "0xT", PAYER, n) for n in ("0x01", "0x02"))
    claim(led, a)
    claim(led, b)
    led.mark_settling(b)
    assert led.begin_response(["idem:x"], "fp", PAYER) is None
    del led  # a crash: no clean shutdown
    led2 = Ledger(path)
    out = led2.recover()
    assert out == {"holds_returned": 1, "responses_dropped": 1, "payments_released": 1}
    assert led2.balance(PAYER) == 1_000 and led2.held(PAYER) == 0
    assert led2.account_for_token(token) == PAYER.lower()
    assert led2.payment(a).state == "released"  # type: ignore[union-attr]
    assert [r.auth_id for r in led2.settling()] == [b]  # the gate re-settles these: the work was delivered


def test_stored_responses_for_retries(tmp_path: Path) -> None:
    led = Ledger(tmp_path / "l.sqlite")
    assert led.begin_response(["idem:k", "auth:a"], "fp1", PAYER) is None
    running = led.begin_response(["auth:a"], "fp1", PAYER)
    assert running is not None and running.state == "running"
    led.finish_response(["idem:k", "auth:a"], 200, {"content-type": "application/json"}, b"{}")
    done = led.response("idem:k")
    assert done is not None and done.state == "done" and done.body == b"{}" and done.fingerprint == "fp1"
    led.begin_response(["idem:z"], "fp2", None)
    led.drop_responses(["idem:z"])
    assert led.response("idem:z") is None


def test_asset_amounts() -> None:
    usdc = Asset("eip155:84532", "0x036CbD53842c5426634e7929541eC2318f3dCF7e", "USDC", "2")
    assert usdc.to_atomic("0.01") == 10_000 and usdc.to_atomic("$1") == 1_000_000
    assert usdc.fmt(1_500) == "0.0015 USDC"
    import pytest
    with pytest.raises(ValueError):
        usdc.to_atomic("0.0000001")
