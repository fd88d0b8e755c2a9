"""`mesh402 serve` payment flags -> PaymentsConfig."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mesh402.cli.payment_flags import payments_config

FAC = "http://127.0.0.1:4021"


def test_free_when_no_price() -> None:
    cfg = payments_config(price=None, price_per_1k=None, pay_to=None, facilitator=None, network=None, deployment=None)
    assert not cfg.enabled
    with pytest.raises(ValueError, match="without --price"):
        payments_config(price=None, price_per_1k=None, pay_to="0x" + "1" * 40, facilitator=None, network=None,
                        deployment=None)


def test_base_sepolia_usdc_is_the_named_default() -> None:
    cfg = payments_config(price="0.01", price_per_1k=None, pay_to="0x" + "1" * 40, facilitator=FAC, network=None,
                          deployment=None)
    assert cfg.network == "eip155:84532" and cfg.asset == "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
    assert (cfg.asset_name, cfg.asset_version, cfg.price_per_request) == ("USDC", "2", 10_000)
    base = payments_config(price=None, price_per_1k="0.5", pay_to="0x" + "1" * 40, facilitator=FAC, network="base",
                           deployment=None)
    assert base.network == "eip155:8453" and base.asset_name == "USD Coin" and base.price_per_1k_tokens == 500_000


def test_deployment_file_gives_token_and_named_payee(tmp_path: Path) -> None:
    (tmp_path / "deployment.json").write_text(json.dumps({
        "network": "eip155:31337", "chainId": 31337, "rpcUrl": "http://127.0.0.1:8545",
        "asset": {"network": "eip155:31337", "address": "0x" + "a" * 40, "name": "Mesh Test USDC", "version": "2",
                  "decimals": 6, "symbol": "USDC"},
        "contracts": {}, "accounts": {"node-0": {"address": "0x" + "b" * 40, "keyFile": "keys/node-0.key"}}}))
    cfg = payments_config(price="0.01", price_per_1k=None, pay_to="node-0", facilitator=FAC, network=None,
                          deployment=tmp_path)
    assert cfg.pay_to == "0x" + "b" * 40 and cfg.asset == "0x" + "a" * 40 and cfg.network == "eip155:31337"


@pytest.mark.parametrize("kw,msg", [
    ({"pay_to": None}, "--pay-to"),
    ({"facilitator": None}, "--facilitator"),
    ({"pay_to": "0x12"}, "0x address"),
    ({"network": "eip155:1"}, "no default asset"),
    ({"price": "abc"}, "not a decimal"),
])
def test_bad_flags_are_explained(kw: dict, msg: str) -> None:
    args = dict(price="0.01", price_per_1k=None, pay_to="0x" + "1" * 40, facilitator=FAC, network=None,
                deployment=None)
    with pytest.raises(ValueError, match=msg):
        payments_config(**{**args, **kw})


def _escrow_deployment(tmp: Path, key: str, address: str, escrow: bool = True) -> Path:
    (tmp / "keys").mkdir(exist_ok=True)
    kf = tmp / "keys" / "node-0.key"
    kf.write_text(key)
    kf.chmod(0o600)
    (tmp / "deployment.json").write_text(json.dumps({
        "network": "eip155:31337", "chainId": 31337, "rpcUrl": "http://127.0.0.1:8545",
        "asset": {"network": "eip155:31337", "address": "0x" + "a" * 40, "name": "Mesh Test USDC", "version": "2",
                  "decimals": 6, "symbol": "USDC"},
        "contracts": {"MeshEscrow": "0x" + "e" * 40} if escrow else {},
        "accounts": {"node-0": {"address": address, "keyFile": "keys/node-0.key"}}}))
    return kf


def test_escrow_flags_bind_the_wallet_its_key_and_the_deployments_escrow(tmp_path: Path) -> None:
    from eth_account import Account

    from mesh402.cli.payment_flags import escrow_config
    from mesh402.settings import PaymentsConfig
    acct, other = Account.create(), Account.create()
    kf = _escrow_deployment(tmp_path, acct.key.hex(), acct.address)
    cfg = escrow_config(PaymentsConfig(), pay_to="node-0", payout_key_file=kf, deployment=tmp_path, redeem_every_s=5)
    assert (cfg.pay_to, cfg.escrow, cfg.escrow_chain_id, cfg.redeem_every_s) == (acct.address, "0x" + "e" * 40,
                                                                                 31337, 5)
    cfg.price_per_request, cfg.payout_key = 1, acct.key.hex()
    assert not cfg.auto_payout  # voucher-paid work is never paid again by the epoch payout
    for kw, msg in (({"deployment": None}, "--deployment"), ({"pay_to": None}, "--pay-to"),
                    ({"pay_to": other.address}, "not of --pay-to"), ({"redeem_every_s": 0}, "--redeem-every")):
        args = dict(pay_to="node-0", payout_key_file=kf, deployment=tmp_path, redeem_every_s=5.0)
        with pytest.raises(ValueError, match=msg):
            escrow_config(PaymentsConfig(), **{**args, **kw})  # type: ignore[arg-type]
    _escrow_deployment(tmp_path, acct.key.hex(), acct.address, escrow=False)
    with pytest.raises(ValueError, match="no MeshEscrow"):
        escrow_config(PaymentsConfig(), pay_to="node-0", payout_key_file=kf, deployment=tmp_path, redeem_every_s=5)


def test_quorum_flag_takes_the_deployments_quorum_and_needs_an_owner_key(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from eth_account import Account

    from mesh402.cli.payment_flags import trust_config
    acct = Account.create()
    kf = _escrow_deployment(tmp_path, acct.key.hex(), acct.address)
    dep = json.loads((tmp_path / "deployment.json").read_text())
    registries = {n: "0x" + c * 40 for n, c in (("IdentityRegistry", "1"), ("ReputationRegistry", "2"),
                                                ("ValidationRegistry", "3"))}
    dep["contracts"] = {**registries, "SpotCheckQuorum": "0x" + "4" * 40}
    (tmp_path / "deployment.json").write_text(json.dumps(dep))
    monkeypatch.delenv("MESH402_OWNER_KEY", raising=False)
    args = dict(network=None, deployment=tmp_path, owner_key_file=kf, validator=True, audit_rate=0.1)
    assert trust_config(**args, quorum=True).quorum == "0x" + "4" * 40  # type: ignore[arg-type]
    assert trust_config(**args).quorum is None  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="--quorum needs"):
        trust_config(**{**args, "owner_key_file": None, "validator": False}, quorum=True)  # type: ignore[arg-type]
    dep["contracts"] = registries
    (tmp_path / "deployment.json").write_text(json.dumps(dep))
    with pytest.raises(ValueError, match="SpotCheckQuorum"):
        trust_config(**args, quorum=True)  # type: ignore[arg-type]
