"""Turn `mesh402 serve` payment flags into a PaymentsConfig (prices in token units -> atomic units)."""

from __future__ import annotations

from pathlib import Path

from mesh402.config import PaymentsConfig
from mesh402.economics.networks import Deployment, resolve_asset

DEFAULT_TOPUP = "0.10"  # metered mode: smallest credit purchase, in token units


def payments_config(*, price: str | None, price_per_1k: str | None, pay_to: str | None,
                    facilitator: str | None, network: str | None, deployment: Path | None,
                    asset: str | None = None, asset_name: str | None = None, asset_version: str | None = None,
                    credit_topup: str | None = None) -> PaymentsConfig:
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
    if not facilitator:
        raise ValueError("a priced node needs --facilitator URL (e.g. a `mesh402 facilitator` or https://x402.org/facilitator)")
    cfg.facilitator_url = facilitator
    return cfg
