"""Who may use the console (management port): checked on every request before any route runs.

- **Host** (DNS rebinding): a page on a hostile site can make its own name resolve to 127.0.0.1 and then
  read a loopback console as same-origin. The console answers only when the Host header names
  ``localhost`` or an IP address (a rebinding attack needs a DNS name of its own); anything else is 403.
- **Origin**: a request that carries an Origin (browsers send one on every POST and every cross-origin
  fetch) must come from the console's own origin; a browser that says the request is cross-site or
  same-site (``Sec-Fetch-Site``) cannot read or change anything under ``/api/``. Tools such as the CLI send
  neither header and pass.
- **Console token** (always: the node generates one into ``<home>/console.token``, 0600, when the operator
  gives none): ``Authorization: Bearer <token>`` (the CLI reads it from the home), or the
  ``mesh402_console`` cookie the page gets from ``POST /api/login`` after the operator types the token.
  The cookie is HttpOnly and SameSite=Strict and holds an HMAC of the token, never the token, and never
  travels in a URL (EventSource cannot send headers; cookies it does send). Without it only the page's
  own files, ``/api/session``, ``/api/login``, ``/api/logout`` and the ``OPEN_READS`` answer, the latter
  to loopback clients only and with no secret in them (the app redacts them: ``authenticated(request)``
  is false). Any other route, including every route added later, needs the token: closed by default.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import ipaddress
import json
import time
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

COOKIE = "mesh402_console"
PUBLIC = ("/", "/favicon.ico", "/api/session", "/api/login", "/api/logout")  # no token needed (no data)
PUBLIC_PREFIX = "/static/"
# Read-only views open without the token to a client on this machine; their handlers drop every secret
# (the invite token) unless authenticated(). Nothing that mints, revokes, pays, posts or acts as the node.
MCP_PATH = "/mcp"  # the MCP server (streamable HTTP), a console route like the others

OPEN_READS = frozenset({("GET", "/api/status")})
AUTH_STATE = "console_authenticated"  # set in the ASGI scope's state for the handlers
LOGIN_FAILURES = 10  # wrong tokens allowed per LOGIN_WINDOW_S before logins are refused for a while
LOGIN_WINDOW_S = 60.0
MAX_LOGIN_BYTES = 4096
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer"), (b"cross-origin-resource-policy", b"same-origin")]


def host_name(host: str) -> str:
    """The name part of a Host header value: ``[::1]:3131`` -> ``::1``, ``localhost:3131`` -> ``localhost``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else ""
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def host_allowed(host: str) -> bool:
    name = host_name(host)
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def session_value(token: str) -> str:
    """What the cookie holds: an HMAC of the token (a stolen cookie is not the token the CLI takes)."""
    return hmac.new(token.encode(), b"mesh402 console session v1", hashlib.sha256).hexdigest()


def loopback_client(scope: Scope) -> bool:
    client = scope.get("client")
    if not client:
        return False
    try:
        return ipaddress.ip_address(str(client[0])).is_loopback
    except ValueError:
        return False


def authenticated(request: object) -> bool:
    """Whether the guard saw the console token (or the page's session) on this request."""
    return bool(getattr(getattr(request, "state", None), AUTH_STATE, False))


@dataclass
class ConsoleAccess:
    token: str
    failures: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=LOGIN_FAILURES))

    @property
    def required(self) -> bool:
        return True  # kept in /api/session for the page: a console always has a token

    def authenticated(self, headers: dict[str, str]) -> bool:
        got = headers.get("authorization", "")
        if hmac.compare_digest(got.encode(), f"Bearer {self.token}".encode()):
            return True
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(headers.get("cookie", ""))
        except Exception:  # a malformed Cookie header is no session
            return False
        morsel = jar.get(COOKIE)
        return morsel is not None and hmac.compare_digest(morsel.value.encode(), session_value(self.token).encode())

    def login(self, offered: str, now: float) -> tuple[int, dict[str, object], list[tuple[bytes, bytes]]]:
        """(status, body, extra headers) for a login attempt."""
        if len(self.failures) == LOGIN_FAILURES and now - self.failures[0] < LOGIN_WINDOW_S:
            return 429, {"error": "too many wrong tokens; wait a minute"}, [(b"retry-after", b"60")]
        if not hmac.compare_digest(offered.strip().encode(), self.token.encode()):
            self.failures.append(now)
            return 401, {"error": "wrong console token"}, []
        cookie = f"{COOKIE}={session_value(self.token)}; HttpOnly; SameSite=Strict; Path=/"
        return 200, {"authenticated": True, "auth_required": True}, [(b"set-cookie", cookie.encode())]


def _origin_refusal(scope: Scope, headers: dict[str, str]) -> str | None:
    host = headers.get("host", "")
    if not host_allowed(host):
        return f"host {host_name(host)!r} not allowed: open the console as http://localhost:PORT or by IP address"
    origin = headers.get("origin")
    if origin is not None and (origin == "null" or urlsplit(origin).netloc.lower() != host.strip().lower()):
        return "cross-origin request refused"
    site = headers.get("sec-fetch-site")
    if scope["path"].startswith("/api/") and site is not None and site not in ("same-origin", "none"):
        return f"{site} request refused"
    return None


async def _answer(send: Send, status: int, body: dict[str, object],
                  extra: list[tuple[bytes, bytes]] | tuple[()] = ()) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"cache-control", b"no-store"), *SECURITY_HEADERS, *extra]})
    await send({"type": "http.response.body", "body": data})


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        body += message.get("body", b"")
        if len(body) > limit:
            return None
        if not message.get("more_body", False):
            return bytes(body)


class AccessGuard:
    """ASGI middleware in front of the whole management app; also answers the session endpoints."""

    def __init__(self, app: ASGIApp, access: ConsoleAccess) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        refusal = _origin_refusal(scope, headers)
        if refusal is not None:
            await _answer(send, 403, {"error": refusal})
            return
        path, method = scope["path"], scope["method"]
        access = self.access
        if path == "/api/session":
            await _answer(send, 200, {"auth_required": access.required, "authenticated": access.authenticated(headers)})
            return
        if path == "/api/login" and method == "POST":
            raw = await _read_body(receive, MAX_LOGIN_BYTES)
            try:
                offered = json.loads(raw) if raw else None
            except ValueError:
                offered = None
            if not isinstance(offered, dict) or not isinstance(offered.get("token"), str):
                await _answer(send, 400, {"error": 'body must be {"token": "..."}'})
                return
            await _answer(send, *access.login(offered["token"], time.monotonic()))
            return
        if path == "/api/logout" and method == "POST":
            await _answer(send, 200, {"authenticated": False},
                          [(b"set-cookie", f"{COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0".encode())])
            return
        public = path in PUBLIC or path.startswith(PUBLIC_PREFIX)
        authed = access.authenticated(headers)
        if not public and not authed and not ((method, path) in OPEN_READS and loopback_client(scope)):
            await _answer(send, 401, {"error": "console token required (Authorization: Bearer ..., or log in on "
                                               "the page; the token is in the node's home: console.token)"})
            return
        scope = {**scope, "state": {**scope.get("state", {}), AUTH_STATE: authed}}

        async def secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, secured)
