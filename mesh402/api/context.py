"""What the edge's request handlers share: the node's config, its models, the router, how it takes payment
and (once the node is in a mesh) its distributed runtime, in one typed object passed to each piece
instead of closed over."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Request

from mesh402.api.errors import APIError
from mesh402.api.payment_policy import FreePolicy, PaymentPolicy
from mesh402.api.router import Router
from mesh402.api.tunnel import PEER_SCOPE_KEY
from mesh402.economics.upstream import UpstreamBuyer
from mesh402.serving.registry import ModelRegistry
from mesh402.settings import NodeConfig

if TYPE_CHECKING:  # the runtime pulls in the engine (torch): loaded only once the node is in a mesh
    from mesh402.api.backends import BackendPool
    from mesh402.serving.distributed import DistributedRuntime, Route


@dataclass
class EdgeContext:
    config: NodeConfig
    registry: ModelRegistry
    router: Router  # model: "auto" -> a model and node (mesh402.routing)
    payments: PaymentPolicy  # free, or x402 per request / metered
    buyer: UpstreamBuyer | None = None  # a paid entry's wallet, paying hosts that charge
    distributed: DistributedRuntime | None = None  # set by the node once it is in a mesh
    backends: BackendPool | None = None  # `serve --backend URL`: the operator's own OpenAI-compatible servers

    @classmethod
    def free(cls, config: NodeConfig, registry: ModelRegistry) -> "EdgeContext":
        return cls(config, registry, Router(), FreePolicy())

    @property
    def retry_after(self) -> int:
        return self.config.timers.retry_after_s

    def routes(self) -> dict[str, Route]:
        """Models hosted elsewhere in the mesh: model id -> Route."""
        dist = self.distributed
        return dist.routes() if dist is not None else {}

    @staticmethod
    def mesh_peer(request: Request) -> str | None:
        """The admitted peer a request came from through the mesh tunnel, or None for a direct client.
        Only the in-process tunnel dispatch sets this scope key; no HTTP client can."""
        peer = request.scope.get(PEER_SCOPE_KEY)
        return peer if isinstance(peer, str) else None

    def check_auth(self, request: Request) -> None:
        # Mesh membership authenticates tunnelled requests (the API key is for direct clients); they are
        # still charged like any client's on a node that sells inference.
        if self.mesh_peer(request) is not None or self.config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.config.api_key.encode()):
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer KEY)",
                           type="authentication_error", code="invalid_api_key")
