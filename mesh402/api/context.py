"""What the edge's request handlers share: the node's config, its models, the router and the payment
gate, in one object passed to each piece instead of closed over."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from mesh402.api.errors import APIError
from mesh402.api.router import Router
from mesh402.api.tunnel import PEER_SCOPE_KEY
from mesh402.settings import NodeConfig
from mesh402.serving.registry import ModelRegistry


@dataclass
class EdgeContext:
    config: NodeConfig
    registry: ModelRegistry
    state: Any  # the app's state: the Node sets `distributed` on it after the app is built
    router: Router  # model: "auto" -> a model and node (mesh402.routing)
    gate: Any = None  # x402 payments (mesh402.economics); None on a free node
    buyer: Any = None  # economics.upstream.UpstreamBuyer: a paid entry's wallet, paying hosts that charge

    @property
    def distributed(self) -> Any:
        """The node's DistributedRuntime, or None on a node outside a mesh."""
        return getattr(self.state, "distributed", None)

    @property
    def retry_after(self) -> int:
        return self.config.timers.retry_after_s

    def routes(self) -> dict[str, Any]:
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
