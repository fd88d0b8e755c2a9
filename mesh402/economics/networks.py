"""Named networks and the payment asset each one uses; local chains are read from a deployment file."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

DEPLOYMENT_FILE = "deployment.json"


@dataclass(frozen=True)
class Asset:
    """An EIP-3009 token as x402 `exact` needs it: the EIP-712 domain name/version must match the contract."""
    network: str  # CAIP-2, e.g. eip155:84532
    address: str
    name: str
    version: str
    decimals: int = 6
    symbol: str = "USDC"

    @property
    def chain_id(self) -> int:
        return int(self.network.split(":", 1)[1])

    def to_atomic(self, amount: str | float) -> int:
        """'0.01' (token units) -> 10000 (atomic units at 6 decimals); exact for decimal strings."""
        from decimal import Decimal, InvalidOperation
        try:
            d = Decimal(str(amount).strip().lstrip("$"))
        except InvalidOperation:
            raise ValueError(f"not a decimal amount: {amount!r}") from None
        if d < 0:
            raise ValueError(f"amount must not be negative: {amount!r}")
        atomic = d * (Decimal(10) ** self.decimals)
        if atomic != atomic.to_integral_value():
            raise ValueError(f"{amount} has more than {self.decimals} decimals")
        return int(atomic)

    def fmt(self, atomic: int) -> str:
        from decimal import Decimal
        return f"{Decimal(atomic) / (Decimal(10) ** self.decimals):f} {self.symbol}"


@dataclass(frozen=True)
class Network:
    key: str
    network: str
    rpc_url: str
    asset: Asset
    explorer: str = ""  # a block explorer's base URL (transactions at <explorer>/tx/<hash>)


NAMED: dict[str, Network] = {
    "base-sepolia": Network("base-sepolia", "eip155:84532", "https://sepolia.base.org",
                            Asset("eip155:84532", "0x036CbD53842c5426634e7929541eC2318f3dCF7e", "USDC", "2"),
                            "https://sepolia.basescan.org"),
    "base": Network("base", "eip155:8453", "https://mainnet.base.org",
                    Asset("eip155:8453", "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913", "USD Coin", "2"),
                    "https://basescan.org"),
}


def explorer_for(network: str | None) -> str:
    """The block explorer of a CAIP-2 network ("" for a local chain or one this table does not name)."""
    return next((n.explorer for n in NAMED.values() if n.network == network), "")
DEFAULT_NETWORK = "base-sepolia"

# ERC-8004 registries at their CREATE2 addresses (the same on every mainnet, and on every testnet).
ERC8004_MAINNET = {"IdentityRegistry": "0x8004A169FB4a3325136EB29fA0ceB6D2e539a432",
                   "ReputationRegistry": "0x8004BAa17C55a88189AE136b182e5fdA19dE9b63",
                   "ValidationRegistry": "0x8004Cc8439f36fd5F9F049D9fF86523Df6dAAB58"}
ERC8004_TESTNET = {"IdentityRegistry": "0x8004A818BFB912233c491871b3d84c89A494BD9e",
                   "ReputationRegistry": "0x8004B663056A597Dffe9eCcC1965A193B7388713",
                   "ValidationRegistry": "0x8004Cb1BF31DAf7788923b405b754f57acEB4272"}
ERC8004_TESTNET_CHAINS = {11155111, 84532, 421614, 11155420, 80002, 43113}  # Sepolia, Base/Arb/OP Sepolia, Amoy, Fuji
ERC8004_MAINNET_CHAINS = {1, 8453, 42161, 10, 137, 43114}


def erc8004_registries(network: str | None, deployment: "Deployment | None" = None) -> dict[str, str]:
    """The ERC-8004 registry addresses for a network: a local deployment's own, else the named defaults."""
    if deployment is not None and network in (None, deployment.network, "local", "dev"):
        found = {k: v for k, v in deployment.contracts.items() if k in ERC8004_MAINNET}
        if len(found) == 3:
            return found
        raise ValueError(f"{deployment.path} has no ERC-8004 registries (redeploy with `mesh402 chain dev`)")
    key = network or DEFAULT_NETWORK
    caip = NAMED[key].network if key in NAMED else key
    if not caip.startswith("eip155:"):
        raise ValueError(f"unknown network {key!r}")
    chain_id = int(caip.split(":", 1)[1])
    if chain_id in ERC8004_MAINNET_CHAINS:
        return dict(ERC8004_MAINNET)
    if chain_id in ERC8004_TESTNET_CHAINS:
        return dict(ERC8004_TESTNET)
    raise ValueError(f"no known ERC-8004 registries on {caip}; pass --identity-registry")


@dataclass
class Deployment:
    """What `mesh402 chain dev` writes: the chain, the token, and the funded test accounts."""
    network: str
    chain_id: int
    rpc_url: str
    asset: Asset
    contracts: dict[str, str]
    accounts: dict[str, dict[str, str]]  # name -> {"address", "keyFile"}
    path: Path | None = None

    def to_json(self) -> dict[str, Any]:
        return {"network": self.network, "chainId": self.chain_id, "rpcUrl": self.rpc_url,
                "asset": asdict(self.asset), "contracts": self.contracts, "accounts": self.accounts}

    @classmethod
    def load(cls, path: str | Path) -> "Deployment":
        p = Path(path).expanduser()
        if p.is_dir():
            p = p / DEPLOYMENT_FILE
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            raise ValueError(f"deployment file not found: {p} (start a chain with `mesh402 chain dev`)") from None
        return cls(data["network"], int(data["chainId"]), data["rpcUrl"], Asset(**data["asset"]),
                   data.get("contracts", {}), data.get("accounts", {}), p)

    def key_file(self, account: str) -> Path:
        if account not in self.accounts:
            raise ValueError(f"no account {account!r} in {self.path}; have: {', '.join(self.accounts)}")
        kf = Path(self.accounts[account]["keyFile"])
        return kf if kf.is_absolute() or self.path is None else self.path.parent / kf

    def address(self, account: str) -> str:
        if account not in self.accounts:
            raise ValueError(f"no account {account!r} in {self.path}; have: {', '.join(self.accounts)}")
        return self.accounts[account]["address"]


def resolve_asset(network: str | None, deployment: Deployment | None, asset_address: str | None = None,
                  asset_name: str | None = None, asset_version: str | None = None,
                  decimals: int | None = None) -> Asset:
    """The token to price in: explicit flags win, then a deployment file, then a named network."""
    if deployment is not None and network in (None, deployment.network, "local", "dev"):
        base = deployment.asset
    else:
        key = network or DEFAULT_NETWORK
        if key in NAMED:
            base = NAMED[key].asset
        elif key.startswith("eip155:"):
            for n in NAMED.values():
                if n.network == key:
                    base = n.asset
                    break
            else:
                if not (asset_address and asset_name and asset_version):
                    raise ValueError(f"network {key} has no default asset: pass --asset, --asset-name and "
                                     "--asset-version (the token's EIP-712 name and version)")
                base = Asset(key, asset_address, asset_name, asset_version, decimals or 6)
        else:
            raise ValueError(f"unknown network {key!r}; use one of {', '.join(NAMED)}, a CAIP-2 id like "
                             "eip155:84532, or --deployment FILE")
    return Asset(base.network, asset_address or base.address, asset_name or base.name,
                 asset_version or base.version, decimals if decimals is not None else base.decimals, base.symbol)
