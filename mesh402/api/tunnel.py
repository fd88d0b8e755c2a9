"""HTTP over a mesh stream: any node's API can serve a model hosted on another node.

Entry side (`forward`): the request is sent as HttpTunnelFrames on an HTTP_TUNNEL stream to the model's
host; the response streams back frame by frame, so SSE stays incremental. What comes back is untrusted:
the status must be a real HTTP status and only an allow-list of response headers is passed on.

Host side (`make_handler`): the peer is any admitted member and may be hostile. Only the host's own
OpenAI routes are served (`TUNNEL_ROUTES`: an absolute path from the allow-list, GET or POST, no
authority, scheme, query or dot segments), the body is capped while its frames arrive, and the request
is dispatched to the host's ASGI app in-process: no socket, no URL and no shared secret is involved, so
the peer cannot make the host call any other server. The app learns the peer's id from the ASGI scope
(`PEER_SCOPE_KEY`), which no HTTP client can set. A tunnelled request is authenticated by mesh
membership instead of the API key, and is charged like any client's on a node that sells inference.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import posixpath
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from mesh402.mesh.framing import make_frame
from mesh402.mesh.proto import mesh_pb2 as pb

log = logging.getLogger(__name__)

ROUTE_HEADER = "x-mesh402-route"
PEER_SCOPE_KEY = "mesh402.peer"  # ASGI scope key: the admitted peer a tunnelled request came from
# The host's own OpenAI routes, and nothing else, may be reached through the tunnel. `{id}` matches one
# model id of MODEL_ID's strict charset (no slash, no dot segment, no escapes).
TUNNEL_ROUTES: frozenset[tuple[str, str]] = frozenset({
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/responses"),
    ("POST", "/v1/embeddings"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{id}"),
})
MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
MAX_PATH = 256
# Only these request headers cross the mesh (credentials for the entry node stay there; payment headers
# travel so that a buyer can pay a host that charges).
FORWARD_REQUEST = ("content-type", "accept", "x-request-id", "idempotency-key", "user-agent",
                   "payment-signature", "x-payment", "x-mesh402-credit", "x-mesh402-voucher")
MAX_HEADER_VALUE = 8192
# Response headers an entry passes on from a host; anything else (cookies, hop-by-hop headers, a hostile
# host's inventions) is dropped.
PASS_RESPONSE = frozenset({
    "content-type", "cache-control", "retry-after", "x-request-id", "payment-required", "payment-response",
    "x-mesh402-credit-token", "x-mesh402-credit-balance", "x-mesh402-credit-charged", "x-mesh402-replayed",
    "x-mesh402-billing", "server-timing", "x-mesh402-voucher-earned",
})
MAX_RESPONSE_HEADERS = 32
CHUNK = 256 * 1024  # body bytes per frame, both ways (tunnel frames are capped at 1 MiB)


class TunnelError(Exception):
    pass


@dataclass(frozen=True)
class TunnelLimits:
    max_body_bytes: int = 8 * 1024 * 1024
    recv_timeout_s: float = 30.0  # between the frames of a request body


def tunnel_route(method: str, path: str) -> str | None:
    """The normalised path if (method, path) is one of the host's OpenAI routes, else None.

    Refuses anything that could name another server or another resource: an authority (`//host`,
    `@host`), a scheme, a query or fragment, percent-escapes, backslashes, dot segments."""
    if not isinstance(path, str) or not path or len(path) > MAX_PATH or not path.isprintable():
        return None
    if not path.startswith("/") or path.startswith("//") or any(c in path for c in "\\%@?#;"):
        return None
    parts = urlsplit(path)
    if parts.scheme or parts.netloc or parts.query or parts.fragment:
        return None
    if posixpath.normpath(path) != path:  # "/v1/../x", "/v1/./models", trailing slashes
        return None
    head, _, last = path.rpartition("/")
    templated = f"{head}/{{id}}" if MODEL_ID.match(last) and not set(last) <= {"."} else None
    if (method.upper(), path) in TUNNEL_ROUTES or (templated and (method.upper(), templated) in TUNNEL_ROUTES):
        return path
    return None


def _clean_request_headers(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    out = []
    for k, v in headers.items():
        k = str(k).lower()
        if k in FORWARD_REQUEST and isinstance(v, str) and len(v) <= MAX_HEADER_VALUE and v.isprintable():
            with contextlib.suppress(UnicodeEncodeError):
                out.append((k.encode("latin-1"), v.encode("latin-1")))
    return out


def response_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The host's response headers an entry may pass on to its client (untrusted input, bounded)."""
    out: dict[str, str] = {}
    for k, v in list(headers.items())[: MAX_RESPONSE_HEADERS * 4]:
        k = str(k).lower()
        if k in PASS_RESPONSE and isinstance(v, str) and len(v) <= MAX_HEADER_VALUE and v.isprintable():
            out[k] = v
        if len(out) >= MAX_RESPONSE_HEADERS:
            break
    return out


def _frame(**kw: Any) -> pb.Frame:
    return make_frame(http=pb.HttpTunnelFrame(**kw))


def _error_frame(status: int, message: str, code: str, kind: str = "invalid_request_error") -> pb.Frame:
    body = json.dumps({"error": {"message": message, "type": kind, "code": code, "param": None}}).encode()
    return _frame(status=status, headers={"content-type": "application/json"}, body=body, end=True)


async def forward(open_stream: Callable[[], Awaitable[Any]], method: str, path: str, headers: Mapping[str, str],
                  body: bytes, request_id: str, first_byte_timeout: float = 300.0
                  ) -> tuple[int, dict[str, str], AsyncIterator[bytes]]:
    """Send a request through the mesh. Returns status, (filtered) headers and the body stream."""
    fs = await open_stream()
    hdrs = {k.decode(): v.decode("latin-1") for k, v in _clean_request_headers(headers)}
    pieces = [body[i:i + CHUNK] for i in range(0, len(body), CHUNK)] or [b""]
    try:
        for i, piece in enumerate(pieces):
            first = i == 0
            await fs.send(_frame(request_id=request_id if first else "", method=method if first else "",
                                 path=path if first else "", headers=hdrs if first else {}, body=piece,
                                 end=i == len(pieces) - 1))
    except Exception as e:  # the host stopped reading (e.g. a body over its cap): its answer may be waiting
        log.info("tunnel: the host stopped reading the request body: %s", e)
    head = await fs.recv(first_byte_timeout)
    if head is None or head.WhichOneof("body") != "http" or not 100 <= head.http.status <= 599:
        with contextlib.suppress(Exception):
            await fs.reset(1)
        raise TunnelError("the model's host closed the tunnel before answering")

    async def rest() -> AsyncIterator[bytes]:
        try:
            if head.http.body:
                yield head.http.body
            done = head.http.end
            while not done:
                f = await fs.recv(first_byte_timeout)
                if f is None or f.WhichOneof("body") != "http":  # the host went away or broke the protocol
                    raise TunnelError("the model's host stopped answering mid-response")
                if f.http.body:
                    yield f.http.body
                done = f.http.end
        finally:
            with contextlib.suppress(Exception):
                await fs.finish()

    return head.http.status, response_headers(dict(head.http.headers)), rest()


async def _read_request(fs: Any, limits: TunnelLimits) -> tuple[pb.HttpTunnelFrame, bytes] | pb.Frame | None:
    """The request's first frame and whole body, or an error frame to answer with (None: the peer left)."""
    f = await fs.recv(limits.recv_timeout_s)
    if f is None or f.WhichOneof("body") != "http":
        return None
    first = f.http
    body = bytearray(first.body)
    req = first
    while not req.end:
        if len(body) > limits.max_body_bytes:
            break
        nxt = await fs.recv(limits.recv_timeout_s)
        if nxt is None or nxt.WhichOneof("body") != "http":
            return None
        req = nxt.http
        body += req.body
    if len(body) > limits.max_body_bytes:
        return _error_frame(413, f"request body is larger than {limits.max_body_bytes} bytes", "body_too_large")
    return first, bytes(body)


async def dispatch(app: Any, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes,
                   peer: str) -> AsyncIterator[dict[str, Any]]:
    """Run one request through an ASGI app in this process; yields the app's `http.response.*` messages
    as it sends them (streaming preserved). Closing the iterator tells the app the client went away."""
    out: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    gone = asyncio.Event()
    sent_body = False

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if gone.is_set():
            raise OSError("the tunnel peer went away")
        await out.put(message)

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
             "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "headers": [*headers, (b"host", b"mesh402-tunnel")], "client": None,
             "server": None, "state": {}, PEER_SCOPE_KEY: peer}

    async def run() -> None:
        try:
            await app(scope, receive, send)
        finally:
            await out.put(None)

    task = asyncio.create_task(run())
    try:
        while True:
            msg = await out.get()
            if msg is None:
                break
            yield msg
        await task  # re-raise what the app raised after its last message
    finally:
        gone.set()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


def make_handler(app: Any, limits: TunnelLimits) -> Callable[[bytes, Any], Awaitable[None]]:
    """The host side: serve a tunnelled request with this node's own OpenAI app and stream the answer back."""

    async def handle(peer_id: bytes, fs: Any) -> None:
        got = await _read_request(fs, limits)
        if got is None:
            return
        if isinstance(got, pb.Frame):
            await fs.send(got)
            return
        first, body = got
        method = first.method.upper()
        path = tunnel_route(method, first.path)
        if path is None:
            log.info("tunnel: refused %s %r from %s", method[:8], first.path[:80], bytes(peer_id).hex()[:12])
            await fs.send(_error_frame(404, "only the node's OpenAI routes can be reached through the mesh",
                                       "route_not_allowed"))
            return
        started = False
        try:
            async for msg in dispatch(app, method, path, _clean_request_headers(dict(first.headers)), body,
                                      bytes(peer_id).hex()):
                if msg["type"] == "http.response.start":
                    hdrs = {k.decode("latin-1"): v.decode("latin-1") for k, v in msg.get("headers", [])}
                    await fs.send(_frame(request_id=first.request_id, status=int(msg["status"]),
                                         headers=response_headers(hdrs)))
                    started = True
                elif msg["type"] == "http.response.body":
                    data = bytes(msg.get("body", b""))
                    for i in range(0, len(data), CHUNK):  # bytes as they arrive, never more than a chunk a frame
                        await fs.send(_frame(body=data[i:i + CHUNK]))
                    if not msg.get("more_body", False):
                        break
            if started:
                await fs.send(_frame(end=True))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.warning("tunnelled request from %s failed: %s", bytes(peer_id).hex()[:12], e)
            if not started:
                with contextlib.suppress(Exception):
                    await fs.send(_error_frame(500, "the host could not run the request", "server_error",
                                               "server_error"))

    return handle
