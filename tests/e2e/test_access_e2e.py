"""Safe to open (issue 14): real mitmdump with access control, real HTTP clients on 127.0.0.1.

Without the right credentials (or from outside the allowed networks) a client gets 401/407/403 and nothing
reaches the upstream; with them the request goes through. (The refusal to listen beyond loopback without
access control is decided before mitmdump starts: tests/test_cli.py.)
"""

from __future__ import annotations

import base64
import http.client
import json

import pytest

from stableprefix.demo import samples
from stableprefix.demo.upstream import Upstream
from tests.conftest import MitmFactory
from tests.support.helpers import post

pytestmark = pytest.mark.e2e

BODY = samples.Session().request(1)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def via_proxy(port: int, url: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    """POST `url` through the HTTP proxy on 127.0.0.1:`port` (absolute-form request, as HTTPS_PROXY
    clients send plain-http requests); (status, response headers)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", url, json.dumps(BODY).encode(), {"content-type": "application/json", **headers})
        resp = conn.getresponse()
        resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def test_reverse_mode_proxyauth(mitm: MitmFactory, upstream: Upstream) -> None:
    proxy = mitm("--set", "proxyauth=alice:s3cret", mode=f"reverse:{upstream.url}")
    assert proxy.port
    assert post(proxy.port, "/v1/messages", BODY)[0] == 401
    assert (
        post(proxy.port, "/v1/messages", BODY, headers={"authorization": basic("alice", "wrong")})[0] == 401
    )
    assert post(proxy.port, "/v1/messages", BODY, headers={"authorization": "Bearer s3cret"})[0] == 401
    assert upstream.received == []
    status, _ = post(proxy.port, "/v1/messages", BODY, headers={"authorization": basic("alice", "s3cret")})
    assert status == 200
    (got,) = upstream.received
    assert "authorization" not in got.headers  # the gateway credential stops at the gateway
    assert b"x-anthropic-billing-header" not in got.decoded()  # and the addon did its work


def test_regular_mode_proxyauth(mitm: MitmFactory, upstream: Upstream) -> None:
    proxy = mitm("--set", "proxyauth=alice:s3cret", mode="regular")
    assert proxy.port
    url = f"{upstream.url}/v1/messages"
    status, headers = via_proxy(proxy.port, url, {})
    assert status == 407 and headers["proxy-authenticate"].startswith("Basic")
    assert via_proxy(proxy.port, url, {"proxy-authorization": basic("bob", "s3cret")})[0] == 407
    assert upstream.received == []
    assert via_proxy(proxy.port, url, {"proxy-authorization": basic("alice", "s3cret")})[0] == 200
    (got,) = upstream.received
    assert "proxy-authorization" not in got.headers


@pytest.mark.parametrize("mode", ["reverse", "regular"])
def test_allow_clients(mitm: MitmFactory, upstream: Upstream, mode: str) -> None:
    spec = f"reverse:{upstream.url}" if mode == "reverse" else "regular"
    send = (lambda p: post(p, "/v1/messages", BODY)[0]) if mode == "reverse" else (
        lambda p: via_proxy(p, f"{upstream.url}/v1/messages", {})[0])  # fmt: skip
    outside = mitm("--set", "stableprefix_allow_clients=10.0.0.0/8,192.168.0.0/16", mode=spec)
    assert outside.port
    assert send(outside.port) == 403
    assert upstream.received == []
    assert outside.wait_for("refused client 127.0.0.1: not in stableprefix_allow_clients")
    inside = mitm("--set", "stableprefix_allow_clients=10.0.0.0/8,127.0.0.0/8", mode=spec)
    assert inside.port
    assert send(inside.port) == 200
    assert len(upstream.received) == 1
