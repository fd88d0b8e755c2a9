"""The tunnel's boundary checks as pure functions: which paths a member may reach on a host, which
request headers cross, and which of a host's response headers an entry passes on."""

from __future__ import annotations

import pytest

from mesh402.api.tunnel import _clean_request_headers, response_headers, tunnel_route


@pytest.mark.parametrize("method,path", [("POST", "/v1/chat/completions"), ("post", "/v1/completions"),
                                         ("GET", "/v1/models"), ("POST", "/v1/responses"),
                                         ("POST", "/v1/embeddings"), ("GET", "/v1/models/smollm2-135m-instruct"),
                                         ("GET", "/v1/models/org:model-v1.2_q4-K")])
def test_the_hosts_openai_routes_are_reachable(method: str, path: str) -> None:
    assert tunnel_route(method, path) == path


@pytest.mark.parametrize("method,path", [
    ("GET", "@127.0.0.1:8080/latest/meta-data"), ("GET", "//169.254.169.254/latest"),
    ("GET", "http://127.0.0.1/v1/models"), ("GET", "/v1/models?x=1"), ("GET", "/v1/models#f"),
    ("GET", "/v1/models/"), ("GET", "/v1/./models"), ("GET", "/v1/models/../models"), ("GET", "/v1/%6dodels"),
    ("GET", "/v1\\models"), ("GET", "/v1/models;x"), ("GET", "v1/models"), ("GET", ""), ("GET", "/v1/models\n"),
    ("DELETE", "/v1/models"), ("GET", "/v1/chat/completions"), ("POST", "/api/status"), ("GET", "/" + "a" * 300),
    ("GET", "/v1/models/.."), ("GET", "/v1/models/a/b"), ("GET", "/v1/models/%2e%2e"), ("GET", "/v1/models/-x"),
    ("GET", "/v1/models/" + "m" * 129), ("POST", "/v1/models/x"), ("GET", "/v1/responses"),
    ("GET", "/v1/embeddings"), ("GET", "/v1/models/a b"),
])
def test_anything_else_is_refused(method: str, path: str) -> None:
    assert tunnel_route(method, path) is None


def test_only_allow_listed_request_headers_cross() -> None:
    got = dict(_clean_request_headers({"Authorization": "Bearer k", "Content-Type": "application/json",
                                       "PAYMENT-SIGNATURE": "abc", "Cookie": "s=1", "Host": "evil",
                                       "x-request-id": "bad\r\nvalue", "accept": "x" * 10_000}))
    assert got == {b"content-type": b"application/json", b"payment-signature": b"abc"}


def test_an_entry_passes_on_only_safe_response_headers() -> None:
    got = response_headers({"Content-Type": "text/event-stream", "Set-Cookie": "a=b", "Location": "http://x",
                            "PAYMENT-REQUIRED": "e30=", "X-Evil": "1", "retry-after": "2", "x-request-id": "a\nb"})
    assert got == {"content-type": "text/event-stream", "payment-required": "e30=", "retry-after": "2"}
    many = {f"x-{i}": "v" for i in range(10_000)} | {"content-type": "a/b"}
    assert len(response_headers(many)) <= 1
