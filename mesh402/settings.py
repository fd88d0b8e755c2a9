"""A node's settings: ports, limits, timers, payments, trust and mesh flags, filled from CLI flags and env.

Tests build a NodeConfig directly with short timers; nothing else in the code hard-codes a timeout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from mesh402.home import read_secret_file

DEFAULT_API_PORT = 9337
DEFAULT_CONSOLE_PORT = 3131
DEFAULT_INVITE_EXPIRES = 24 * 3600.0


@dataclass
class MeshSettings:
    join: list[str] = field(default_factory=list)  # invite tokens
    kind: str = "serving"  # "serving" or "client" (API-only, no model)
    relay_url: Optional[str] = None
    bind_ip: str = "0.0.0.0"
    bind_port: int = 0
    console_port: int = DEFAULT_CONSOLE_PORT
    console_port_explicit: bool = False  # a busy default port falls back to an ephemeral one
    console_listen_all: bool = False
    console_token: Optional[str] = None
    policy: str = "secret"  # admission policy when this node creates a mesh: "secret" or "open"
    invite_expires: float = DEFAULT_INVITE_EXPIRES
    name: str = ""
    fast_timers: bool = False  # tests and benchmarks: short heartbeats and timeouts
    # discovery (mesh402.discovery)
    publish: bool = False  # list the mesh on Nostr
    private: bool = False  # a published mesh without a public invite
    auto: bool = False  # join the best listed mesh, or start (and publish) one
    mesh_name: str = ""  # deterministic mesh id; --auto only joins meshes of this name
    region: str = ""
    nostr_relays: list[str] = field(default_factory=list)
    nostr_ttl: float = 120.0  # NIP-40 expiration of a listing
    nostr_refresh: float = 60.0  # republish this often (and when the mesh changes)
    auto_interval: float = 20.0  # --auto: look for a larger mesh to merge into this often
    discover_timeout: float = 5.0  # one relay query
    discover_lan: bool = False  # announce and find meshes on the LAN (mDNS)
    lan_browse_s: float = 2.0  # how long one LAN browse listens
    discover_registry: str = ""  # also find meshes through ERC-8004 registered nodes (mesh402.economics.erc8004)


@dataclass
class Limits:
    max_sessions: int = 16  # concurrent generations per model on this node
    default_max_tokens: int = 512  # when a request gives none (bounded by the context window)
    max_request_bytes: int = 8 * 1024 * 1024
    prefill_chunk: int = 32  # fixed prefill chunk: same tokens always meet the same kernels
    max_batch: int = 8  # decode rows per batched step of a local model or a pipeline stage (1: requests take turns)
    step_tokens: int = 128  # prefill tokens run per batched step, between the running streams' decode rows
    draft_tokens: int = 0  # speculative decoding: prompt-lookup drafts verified per step (0: off)
    max_kv_bytes: int | None = None  # KV of all sessions of one model; beyond it new sessions get 503 (None: no cap)


@dataclass
class Timers:
    retry_after_s: int = 2  # Retry-After sent with 503 while a model loads or the node is full
    shutdown_grace_s: float = 5.0
    # A pipeline step slower than max(floor, 10 x its measured average) triggers a probe of the
    # stages (a ping, answered off the compute thread); only a stage that fails it is replaced.
    stage_step_floor_s: float = 5.0
    stage_probe_s: float = 3.0
    # A stage or expert stream whose upstream stays silent this long mid-session is closed and its KV freed.
    stage_idle_s: float = 120.0


@dataclass
class PaymentsConfig:
    """x402 payments at the API edge (mesh402.economics). Prices are atomic token units (USDC: 1e-6)."""
    price_per_request: int = 0
    price_per_1k_tokens: int = 0  # > 0 turns on metered billing: prepaid credit drawn down per token
    pay_to: str | None = None
    facilitator_url: str | None = None
    network: str | None = None  # CAIP-2, e.g. eip155:84532
    asset: str | None = None  # token address
    asset_name: str | None = None  # EIP-712 domain name of the token
    asset_version: str | None = None
    asset_decimals: int = 6
    credit_topup: int = 0  # metered mode: smallest credit purchase (atomic units)
    # what one payer may have authorized for requests in flight here (atomic units; 0: 4 requests' worth): a
    # stream's tokens go out before its payment settles, so this is what a wallet that cannot pay can take
    max_exposure: int = 0
    rpc_url: str | None = None  # the payment network's RPC: a payer's balance must cover its open authorizations
    window_base_s: int = 30  # authorization validity beyond the estimated generation time
    ledger_path: Path | None = None  # default: <home>/payments.sqlite
    epoch_s: int = 3600  # payout epoch: the stages' work receipts are grouped by this period
    # automatic payouts (node.payouts.EpochCloser): the pay-to wallet's key, from a 0600 file or
    # MESH402_PAYOUT_KEY, never argv; None leaves payouts to `mesh402 payout`
    payout_key: str | None = None
    rewards: str | None = None  # EpochRewards contract address
    payout_grace_s: float | None = None  # after an epoch ends, before paying it; None: min(60 s, epoch_s / 4)
    payout_retry_s: float = 300.0  # a failed payout is tried again after this long (or at the next epoch's end)
    payout_require_validation: bool = True  # pay a stage node only when its spot checks passed on chain
    # escrow vouchers (docs/payments.md): the MeshEscrow address, with payout_key as the wallet's key; an
    # entry pays its stages with vouchers as they work and a worker redeems them every redeem_every_s
    escrow: str | None = None
    escrow_rpc_url: str | None = None
    escrow_chain_id: int = 0
    redeem_every_s: float = 300.0
    escrow_float: int = 0  # an entry keeps each worker's channel this far above what it vouchered (0: by hand)

    @property
    def enabled(self) -> bool:
        return self.price_per_request > 0 or self.price_per_1k_tokens > 0

    @property
    def auto_payout(self) -> bool:
        """Epoch payouts: off when the stages are paid by escrow vouchers (never paid twice)."""
        return self.enabled and bool(self.payout_key) and not self.escrow

    @property
    def grace_s(self) -> float:
        """Lets the epoch's last settlements and receipts land before it is paid."""
        return self.payout_grace_s if self.payout_grace_s is not None else min(60.0, self.epoch_s / 4)


@dataclass
class TrustConfig:
    """ERC-8004 identity and spot-check verification (docs/verification.md)."""
    rpc_url: str | None = None
    registries: dict[str, str] = field(default_factory=dict)  # IdentityRegistry, ReputationRegistry, ValidationRegistry
    owner_key: str | None = None  # the node's EVM owner key: from a 0600 file or MESH402_OWNER_KEY, never argv
    validator: bool = False  # re-execute other nodes' spot checks and answer their validation requests
    audit_rate: float = 0.1  # entry: share of paid split requests whose stages reveal a step (plus each
    #                           node's first request per epoch)
    validator_ids: list[str] = field(default_factory=list)  # entry: the validators it trusts (--validator-id)
    quorum: str | None = None  # SpotCheckQuorum address: spot checks decided by the staked validator quorum
    # --allow-host: the only peers that may host, hold layers of, or serve a model for this node (empty: any
    # peer that proves it holds the model's tensors)
    allow_hosts: list[str] = field(default_factory=list)
    # --min-stake: paid work (layers, experts, routed requests) only for peers whose ERC-8004 agent has at least
    # this much active stake in MeshStaking (atomic units; 0: off), and at least the mesh's on-chain minimum
    min_stake: int = 0
    staking: str | None = None  # MeshStaking address (from --deployment)
    stake_recheck_s: float = 60.0  # --stake-recheck: how often a staked peer's stake is read again

    @property
    def on_chain(self) -> bool:
        return bool(self.rpc_url and self.owner_key and self.registries)


@dataclass
class NodeConfig:
    home: Path
    models: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = DEFAULT_API_PORT
    api_key: str | None = None
    device: str = "cpu"
    mode: Literal["exact", "fast"] = "fast"
    threads: int = 1  # torch threads per node process; several nodes share a machine's cores
    limits: Limits = field(default_factory=Limits)
    timers: Timers = field(default_factory=Timers)
    payments: PaymentsConfig = field(default_factory=PaymentsConfig)
    trust: TrustConfig = field(default_factory=TrustConfig)
    mesh: MeshSettings | None = None  # None: no mesh (API-only process, e.g. in-process tests)
    max_vram_gb: float | None = None  # weight budget in GB (1e9 bytes); how users and tests divide a machine
    max_split_rtt_ms: float = 80.0  # peers farther than this never hold a stage
    wire_dtype: Literal["f32", "f16", "bf16"] = "f32"  # activations between stages; f32 is bit-exact
    standby: bool = False  # serve nothing until mesh demand asks for a model on disk (mesh402.serving.replicas)
    backends: list[str] = field(default_factory=list)  # `--backend URL`: OpenAI-compatible servers (api/backends.py)
    backend_key: str | None = None  # their API key, from --backend-key-file or MESH402_BACKEND_KEY
    auto_backends: bool = False  # `--auto-backends`: model "auto" may pick the mesh's (unverified) backend models


def load_api_key(api_key_file: str | Path | None) -> str | None:
    """The API key comes from a 0600 file or MESH402_API_KEY, never from argv where `ps` shows it."""
    if api_key_file is not None:
        return read_secret_file(api_key_file)
    value = os.environ.get("MESH402_API_KEY", "").strip()
    return value or None
