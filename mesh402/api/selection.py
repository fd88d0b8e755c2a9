"""Which model and which node serve a request at the edge: a named model or `auto` (the router),
a replica among the nodes serving it (sticky key, prefix affinity, load), else a route to its host.
The choice is a `Selection` handed on to forwarding and the answer, and told in `x-mesh402-route`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

from fastapi import Request

from mesh402.api.context import EdgeContext
from mesh402.api.errors import APIError, unavailable
from mesh402.api.router import MODEL_LABEL, RouteDecision
from mesh402.api.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from mesh402.api.tunnel import ROUTE_HEADER
from mesh402.models.profile import model_profile
from mesh402.serving.registry import ModelEntry
from mesh402.serving.replicas import replica_routes

if TYPE_CHECKING:
    from mesh402.serving.distributed import Route

Target = Union[ModelEntry, "Route"]  # served here, or by the node a route names


@dataclass
class Selection:
    """How the edge chose where a request runs: the router's decision (model "auto"), the replicas in the
    order to try them (the rest are retries), the prompt-prefix key for affinity, and why the first pick."""

    route: RouteDecision | None = None
    replicas: list[tuple[str, Target, str]] = field(default_factory=list)  # (node, target, reason)
    prefix: str | None = None
    pick: str | None = None

    def local_replica(self) -> ModelEntry:
        """The local replica among those kept for retries (the remote ones did not answer)."""
        return next(r for _, r, _ in self.replicas if isinstance(r, ModelEntry))


def request_messages(req: SamplingFields) -> list[dict[str, Any]]:
    """The request as chat messages, for classification and prefix affinity."""
    if isinstance(req, ChatCompletionRequest):
        messages = []
        for m in req.messages:
            try:
                messages.append({"role": m.role, "content": m.text()})
            except ValueError:
                messages.append({"role": m.role, "content": ""})
        return messages
    prompt = req.prompt if isinstance(req, CompletionRequest) and isinstance(req.prompt, str) else ""
    return [{"role": "user", "content": prompt}]


def model_label(ctx: EdgeContext, host: str, model_id: str) -> str | None:
    """The metadata `host` announces for `model_id` (MODEL_LABEL), if gossip has it."""
    dist = ctx.distributed
    if dist is None or dist.mesh.gossip is None:
        return None
    ann = dist.mesh.self_announcement() if host == dist.mesh.node_id.hex() else dist.mesh.gossip.get(bytes.fromhex(host))
    return ann.labels.get(MODEL_LABEL + model_id) if ann is not None else None


def tools_of(req: SamplingFields) -> list[dict[str, Any]] | None:
    return req.tools if isinstance(req, ChatCompletionRequest) else None


def choose_replica(ctx: EdgeContext, sel: Selection, request: Request, req: SamplingFields | None,
                   model_id: str) -> Target | None:
    """Several nodes serve `model_id`: sticky key, then prefix affinity, then least loaded.
    The rest of the order is kept for retries (sel.replicas)."""
    dist = ctx.distributed
    if dist is None or req is None or ctx.mesh_peer(request) is not None:
        return None

    router = ctx.router
    me = dist.mesh.node_id.hex()
    reps: dict[str, Target] = {r.host: r for r in replica_routes(dist).get(model_id, []) if r.host != me}
    local = ctx.registry.get(model_id)
    if local is not None and local.state == "ready" and local.local is not None:
        reps[me] = local
    if not reps:
        return None
    sticky = req.user or request.headers.get("x-session-id") or req.sticky_key
    prefix = router.prefix(model_id, request_messages(req), tools_of(req))
    load = {h: (r.local.engine.n_sessions if isinstance(r, ModelEntry) and r.local is not None
                else router.inflight[(model_id, h)]) for h, r in reps.items()}
    order = router.picker.order(list(reps), load, sticky=sticky, prefix=prefix, now=time.monotonic())
    sel.replicas = [(c.replica, reps[c.replica], c.reason) for c in order]
    sel.prefix = prefix
    sel.pick = order[0].reason
    return reps[order[0].replica]


AUTO_BACKENDS_HEADER = "x-mesh402-auto-backends"  # a client's opt-in: "true" lets model "auto" pick backend models


def backends_allowed(ctx: EdgeContext, request: Request) -> bool:
    """Whether model "auto" may pick other nodes' (unverified) backend models for this request: the operator
    opted in (`serve --auto-backends`) or the client did (`x-mesh402-auto-backends: true`)."""
    return ctx.config.auto_backends or request.headers.get(AUTO_BACKENDS_HEADER, "").strip().lower() == "true"


OWN_BACKEND = "backend"  # the host of a Route to one of this node's own `--backend` models (api/backends.py)


def route_auto(ctx: EdgeContext, sel: Selection, req: SamplingFields, backends: bool = False,
               own_backends: list[dict[str, Any]] | None = None) -> Target | None:
    """model "auto": classify the request and score the mesh's models (x-mesh402-route says why).
    `backends`: other nodes' backend models are candidates; `own_backends`: this node's own ready backend
    models (BackendPool.ready_models, a chat completion only), picked as a Route whose host is OWN_BACKEND."""

    local = []
    for e in ctx.registry.all():
        if e.state == "ready" and e.local is not None:
            try:
                local.append((e.model_id, model_profile(str(e.source.path), e.source.format)))
            except Exception:
                local.append((e.model_id, {}))
    table = {k: r for k, r in ctx.routes().items() if r.ready and (backends or not r.backend)}
    remote = [(k, r.host, model_label(ctx, r.host, k)) for k, r in sorted(table.items())]
    if own_backends:
        from mesh402.serving.distributed import Route  # lazy: kept off this module's import path

        dist = ctx.distributed
        me = dist.mesh.node_id.hex() if dist is not None else ""
        for m in own_backends:
            if m["id"] not in table:  # a model hosted elsewhere wins over this node's backend (as in listings)
                table[m["id"]] = Route(m["id"], m["id"], OWN_BACKEND, 0, True, backend=True,
                                       context_length=int(m.get("context_length") or 0))
                remote.append((m["id"], OWN_BACKEND, model_label(ctx, me, m["id"]) if me else None))
    messages = request_messages(req)
    router = ctx.router
    d = router.decide(messages, tools_of(req), router.candidates(local, remote))
    if d is None:
        return None
    sel.route = d
    if d.node == "local":
        return ctx.registry.get(d.model_id)
    return table[d.model_id]


def pick_model(ctx: EdgeContext, sel: Selection, name: str | None, request: Request,
               req: SamplingFields | None = None) -> Target:
    """A local ModelEntry that can serve now, or a Route to the node that hosts the model."""
    auto = name in (None, "", "auto")
    dist = ctx.distributed
    tunnelled = ctx.mesh_peer(request) is not None
    if not tunnelled and dist is not None:
        if name is not None and not auto:
            dist.mesh.note_request(name)  # demand, counted where the request enters the mesh
    if auto and req is not None and not tunnelled:
        earlier = getattr(request.state, "auto_pick", None)  # decided already (BackendPool.answer)
        if earlier is not None:
            sel.route, picked = earlier[0].route, earlier[1]
        else:
            picked = route_auto(ctx, sel, req, backends_allowed(ctx, request))
        if picked is not None:
            if dist is not None:
                dist.mesh.note_request(picked.model_id)
            return choose_replica(ctx, sel, request, req, picked.model_id) or picked
    if name is not None and not auto:
        replica = choose_replica(ctx, sel, request, req, name)
        if replica is not None:
            return replica
    entry = ctx.registry.default() if auto or name is None else ctx.registry.get(name)
    if entry is not None and entry.state == "ready" and entry.local is not None:
        return entry
    if not tunnelled:  # never bounce a tunnelled request onwards
        table = ctx.routes()
        route = table.get(entry.model_id if entry else name or "") if not auto or entry else None
        if route is None and auto:
            allowed = backends_allowed(ctx, request)
            route = next((r for r in table.values() if r.ready and (allowed or not r.backend)), None)
        if route is not None and route.ready:
            return route
        if route is not None and route.backend:  # its node is up but its backend is not: unavailable, not unknown
            raise unavailable(f"the backend serving {route.model_id} on node {route.host[:16]} is unavailable",
                              ctx.retry_after, code="backend_unavailable")
    raise not_servable(ctx, name, entry, auto=auto, tunnelled=tunnelled)


def not_servable(ctx: EdgeContext, name: str | None, entry: ModelEntry | None, *, auto: bool,
                 tunnelled: bool) -> APIError:
    """Why no node can serve the model now: 503 (with Retry-After) while it may come, else 404."""
    if entry is None and auto:
        return unavailable("no model is served in this mesh yet", ctx.retry_after, code="no_model")
    dist = ctx.distributed
    if entry is None and dist is not None and not tunnelled:
        from mesh402.serving.replicas import on_disk_somewhere  # lazy: kept off this module's import path

        if on_disk_somewhere(dist, name or ""):  # a standby node has it: demand will start it
            return unavailable(f"model {name} is on standby in the mesh; a node will start serving it",
                               ctx.retry_after, code="model_standby")
    if entry is None:
        return APIError(404, f"model {name!r} is not served in this mesh; see GET /v1/models",
                        type="not_found_error", code="model_not_found", param="model")
    if entry.state in ("loading", "standby"):
        return unavailable(f"model {entry.model_id} is {entry.state}", ctx.retry_after)
    if entry.state == "waiting":
        return unavailable(f"model {entry.model_id} is waiting for capacity: {entry.error}",
                           ctx.retry_after, code="waiting_for_capacity")
    return unavailable(f"model {entry.model_id} failed to load: {entry.error}", 30)


def route_header(sel: Selection, model_id: str, node: str, via: str) -> dict[str, str]:
    """`x-mesh402-route`: the model and node that served, and why they were chosen."""
    why = f"; {sel.route.header()}" if sel.route is not None else ""
    if sel.pick:
        why = f"; replica={sel.pick}" + why
    return {ROUTE_HEADER: f"model={model_id}; node={node[:16]}; via={via}{why}"}


def local_route(ctx: EdgeContext, sel: Selection, entry: ModelEntry) -> dict[str, str]:
    """The route header for a request served here, when a choice was made (auto or a replica)."""
    if sel.route is None and sel.pick is None:
        return {}
    dist = ctx.distributed
    me = dist.mesh.node_id.hex() if dist is not None else "local"
    if sel.prefix:
        ctx.router.picker.served(sel.prefix, me, time.monotonic())
    return route_header(sel, entry.model_id, me, "local")
