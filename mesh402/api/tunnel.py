"""HTTP over a mesh stream: any node's API can serve a model hosted on another node.

Entry side: the request (already authenticated, and paid, at the entry node) is sent as
HttpTunnelFrames on an HTTP_TUNNEL stream to the model's host; the response streams back frame by
frame, so SSE stays incremental. Host side: the frames become a request to the host's own loopback
API carrying a per-process tunnel secret and the admitted peer's id; requests with that secret are
not authenticated or charged a second time.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx

from mesh402.mesh.framing import make_frame
from mesh402.mesh.proto import mesh_pb2 as pb

log = logging.getLogger(__name__)

PEER_HEADER = "x-mesh402-peer"
SECRET_HEADER = "x-mesh402-tunnel"
ROUTE_HEADER = "x-mesh402-route"
# Only these request headers cross the mesh; credentials stay at the entry node.
FORWARD_REQUEST = ("content-type", "accept", "x-request-id", "idempotency-key", "user-agent")
DROP_RESPONSE = {"content-length", "transfer-encoding", "connection", "date", "server"}


class TunnelError(Exception):
    pass


class TunnelSecret:
    """Marks requests that arrived through the mesh; never leaves this process."""

    def __init__(self) -> None:
        self.value = secrets.token_hex(16)

    def verify(self, headers: Any) -> str | None:
        """The admitted peer's id if the request came through the tunnel, else None."""
        got = headers.get(SECRET_HEADER)
        if got and hmac.compare_digest(got, self.value):
            return headers.get(PEER_HEADER) or ""
        return None


def _frame(**kw: Any) -> pb.Frame:
    return make_frame(http=pb.HttpTunnelFrame(**kw))


async def forward(open_stream: Callable[[], Awaitable[Any]], method: str, path: str, headers: dict[str, str],
                  body: bytes, request_id: str, first_byte_timeout: float = 300.0
                  ) -> tuple[int, dict[str, str], AsyncIterator[bytes]]:
    """Send a request through the mesh. Returns status, headers and the body stream."""
    fs = await open_stream()
    hdrs = {k: v for k, v in headers.items() if k.lower() in FORWARD_REQUEST}
    await fs.send(_frame(request_id=request_id, method=method, path=path, headers=hdrs, body=body, end=True))
    head = await fs.recv(first_byte_timeout)
    if head is None or head.WhichOneof("body") != "http" or head.http.status == 0:
        await fs.reset(1)
        raise TunnelError("the model's host closed the tunnel before answering")

    async def rest() -> AsyncIterator[bytes]:
        try:
            if head.http.body:
                yield head.http.body
            done = head.http.end
            while not done:
                f = await fs.recv(first_byte_timeout)
                if f is None:  # the stream ended without its closing frame: the host went away
                    raise TunnelError("the model's host stopped answering mid-response")
                if f.http.body:
                    yield f.http.body
                done = f.http.end
        finally:
            try:
                await fs.finish()
            except Exception:
                pass

    return head.http.status, dict(head.http.headers), rest()


def make_handler(api_url: Callable[[], str], secret: TunnelSecret) -> Callable[[bytes, Any], Awaitable[None]]:
    """The host side: replay a tunnelled request against this node's own API and stream the answer back."""

    async def handle(peer_id: bytes, fs: Any) -> None:
        f = await fs.recv(30.0)
        if f is None or f.WhichOneof("body") != "http":
            return
        req = f.http
        body = bytearray(req.body)
        while not req.end:
            nxt = await fs.recv(30.0)
            if nxt is None:
                return
            req = nxt.http
            body += req.body
        hdrs = {**dict(f.http.headers), SECRET_HEADER: secret.value, PEER_HEADER: bytes(peer_id).hex()}
        async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0)) as client:
            try:
                async with client.stream(f.http.method, api_url() + f.http.path, headers=hdrs,
                                         content=bytes(body)) as r:
                    out = {k: v for k, v in r.headers.items() if k.lower() not in DROP_RESPONSE}
                    await fs.send(_frame(request_id=f.http.request_id, status=r.status_code, headers=out))
                    async for chunk in r.aiter_raw():  # no chunk size: forward bytes as they arrive
                        await fs.send(_frame(body=chunk))
                    await fs.send(_frame(end=True))
            except httpx.HTTPError as e:
                log.warning("tunnelled request failed locally: %s", e)
                await fs.send(_frame(status=502, headers={"content-type": "application/json"},
                                     body=b'{"error":{"message":"the host could not run the request","type":"server_error"}}',
                                     end=True))
            except asyncio.CancelledError:
                raise

    return handle
