"""Turn `mesh402 serve` payment flags into a PaymentsConfig (prices in token units -> atomic units)."""

from __future__ import annotations

from pathlib import Path

from mesh402.economics.evm import account_of
from mesh402.economics.networks import (
    NAMED,
    Deployment,
    erc8004_registries,
    resolve_asset,
)
from mesh402.home import read_secret_file
from mesh402.settings import PaymentsConfig, TrustConfig

DEFAULT_TOPUP = "0.10"  # metered mode: smallest credit purchase, in token units


def payments_config(*, price: str | None, price_per_1k: str | None, pay_to: str | None,
                    facilitator: str | None, network: str | None, deployment: Path | None,
                    asset: str | None = None, asset_name: str | None = None, asset_version: str | None = None,
                    credit_topup: str | None = None, max_exposure: str | None = None) -> PaymentsConfig:
    """Free when no price is set. `pay_to` may name an account in the deployment file (e.g. node-0)."""
    if not price and not price_per_1k:
        if pay_to or facilitator:
            raise ValueError("--pay-to/--facilitator given without --price or --price-per-1k")
        return PaymentsConfig()
    dep = Deployment.load(deployment) if deployment else None
    a = resolve_asset(network, dep, asset, asset_name, asset_version)
    cfg = PaymentsConfig(
        price_per_request=a.to_atomic(price) if price else 0,
        price_per_1k_tokens=a.to_atomic(price_per_1k) if price_per_1k else 0,
        network=a.network, asset=a.address, asset_name=a.name, asset_version=a.version, asset_decimals=a.decimals,
        credit_topup=a.to_atomic(credit_topup or DEFAULT_TOPUP),
        max_exposure=a.to_atomic(max_exposure) if max_exposure else 0,
    )
    if not cfg.enabled:
        return PaymentsConfig()
    if not pay_to:
        raise ValueError("a priced node needs --pay-to ADDRESS (or an account name from --deployment)")
    if dep is not None and not pay_to.startswith("0x"):
        pay_to = dep.address(pay_to)
    if not (pay_to.startswith("0x") and len(pay_to) == 42):
        raise ValueError(f"--pay-to must be a 0x address (40 hex digits), got {pay_to!r}")
    cfg.pay_to = pay_to
    # where a payer's balance is read when it has several authorizations in flight here
    cfg.rpc_url = dep.rpc_url if dep is not None else (NAMED[network].rpc_url if network in NAMED else None)
    if not facilitator:
        raise ValueError("a priced node needs --facilitator URL (e.g. a `mesh402 facilitator` or https://x402.org/facilitator)")
    cfg.facilitator_url = facilitator
    return cfg


def trust_config(*, network: str | None, deployment: Path | None, owner_key_file: Path | None, validator: bool,
                 audit_rate: float, quorum: bool = False, min_stake: str | None = None) -> TrustConfig:
    """The chain a node acts on for ERC-8004 (its deployment's or the network's registries) and its owner key.
    Without --deployment/--network and a key, the node takes no part on chain (it can still be audited)."""
    import os

    if not 0.0 <= audit_rate <= 1.0:
        raise ValueError("--audit-rate must be between 0 and 1")
    key = read_secret_file(owner_key_file) if owner_key_file else (os.environ.get("MESH402_OWNER_KEY", "").strip() or None)
    cfg = TrustConfig(owner_key=key, validator=validator, audit_rate=audit_rate)
    dep = Deployment.load(deployment) if deployment else None
    if dep is not None:
        cfg.rpc_url = dep.rpc_url
    elif network in NAMED:
        cfg.rpc_url = NAMED[network].rpc_url
    if cfg.rpc_url and (dep is not None or network):
        cfg.registries = erc8004_registries(network if dep is None else None, dep)
    if validator and not (key and cfg.rpc_url):
        raise ValueError("--validator needs an owner key (--owner-key-file or MESH402_OWNER_KEY) and --deployment or --network")
    if quorum:
        cfg.quorum = dep.contracts.get("SpotCheckQuorum") if dep is not None else None
        if not (cfg.quorum and key):
            raise ValueError("--quorum needs --deployment with a SpotCheckQuorum (redeploy with `mesh402 chain dev`) "
                             "and an owner key (--owner-key-file or MESH402_OWNER_KEY)")
    if min_stake is not None:
        staking = dep.contracts.get("MeshStaking") if dep is not None else None
        if dep is None or not staking or not cfg.registries.get("IdentityRegistry"):
            raise ValueError("--min-stake needs --deployment with MeshStaking and an IdentityRegistry "
                             "(redeploy with `mesh402 chain dev`)")
        cfg.min_stake, cfg.staking = dep.asset.to_atomic(min_stake), staking
        if cfg.min_stake <= 0:
            raise ValueError("--min-stake must be a positive amount of USDC")
    return cfg


def escrow_config(payments: PaymentsConfig, *, pay_to: str | None, payout_key_file: Path | None,
                  deployment: Path | None, redeem_every_s: float, escrow_float: str | None = None) -> PaymentsConfig:
    """`--escrow`: this node's wallet (--pay-to, its key from --payout-key-file or MESH402_PAYOUT_KEY) pays
    the stages it uses with escrow vouchers (an entry) and is paid by them (a worker), on the chain and
    MeshEscrow of --deployment. Epoch payouts stay off: nothing is paid twice."""
    import os

    if deployment is None:
        raise ValueError("--escrow needs --deployment (the chain and its MeshEscrow)")
    dep = Deployment.load(deployment)
    escrow = dep.contracts.get("MeshEscrow")
    if not escrow:
        raise ValueError(f"{deployment} has no MeshEscrow: redeploy with `mesh402 chain dev`")
    if not pay_to:
        raise ValueError("--escrow needs --pay-to (the wallet vouchers pay and are signed by)")
    if not pay_to.startswith("0x"):
        pay_to = dep.address(pay_to)
    key = read_secret_file(payout_key_file) if payout_key_file else (os.environ.get("MESH402_PAYOUT_KEY", "").strip() or None)
    if not key:
        raise ValueError("--escrow needs --payout-key-file (the --pay-to wallet's key: it signs vouchers and redeems)")
    try:
        addr = account_of(key).address
    except Exception:
        raise ValueError("the payout key is not an EVM private key (64 hex digits)") from None
    if addr.lower() != pay_to.lower():
        raise ValueError(f"the payout key is the key of {addr}, not of --pay-to {pay_to}")
    if redeem_every_s <= 0:
        raise ValueError("--redeem-every must be a positive number of seconds")
    payments.pay_to, payments.payout_key = addr, key
    payments.escrow, payments.escrow_rpc_url, payments.escrow_chain_id = escrow, dep.rpc_url, dep.chain_id
    payments.redeem_every_s = redeem_every_s
    payments.escrow_float = dep.asset.to_atomic(escrow_float) if escrow_float else 0
    return payments


def auto_payout_config(payments: PaymentsConfig, trust: TrustConfig, *, payout_key_file: Path | None,
                       rewards: str | None, deployment: Path | None) -> PaymentsConfig:
    """Turn on automatic epoch payouts (node.payouts) when the pay-to wallet's key is given: from a 0600
    file or MESH402_PAYOUT_KEY. Paying needs the chain and registries (trust) and the EpochRewards contract."""
    import os

    key = read_secret_file(payout_key_file) if payout_key_file else (os.environ.get("MESH402_PAYOUT_KEY", "").strip() or None)
    if key is None or (payout_key_file is None and not payments.enabled):
        return payments  # the env var alone does not complain on a free node
    if not payments.enabled:
        raise ValueError("--payout-key-file needs a priced node (--price or --price-per-1k)")
    try:
        addr = account_of(key).address
    except Exception:
        raise ValueError("the payout key is not an EVM private key (64 hex digits)") from None
    if (payments.pay_to or "").lower() != addr.lower():
        raise ValueError(f"the payout key is the key of {addr}, not of --pay-to {payments.pay_to}: "
                         "payouts are paid from the wallet that receives the revenue")
    if not (trust.rpc_url and trust.registries):
        raise ValueError("automatic payouts need --deployment or --network (the chain and its ERC-8004 registries)")
    dep = Deployment.load(deployment) if deployment else None
    payments.rewards = rewards or (dep.contracts.get("EpochRewards") if dep else None)
    if not payments.rewards:
        raise ValueError("automatic payouts need --rewards ADDRESS (the EpochRewards contract)")
    payments.payout_key = key
    return payments
