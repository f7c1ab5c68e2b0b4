"""mitmweb with the addon, checked through mitmweb's own HTTP API: comments, marks, the content view,
``~comment`` filtering, the commands and the event log."""

from __future__ import annotations

import http.client
import json
import os.path
import secrets
import time
from pathlib import Path
from typing import Any

import pytest

from stableprefix.demo import samples
from stableprefix.demo.upstream import Upstream
from tests.support.helpers import free_port

pytestmark = pytest.mark.e2e

GIT_OLD = "Status:\nM src/app.py\n?? notes.txt"
GIT_NEW = "Status:\nM src/app.py\nM src/cli.py\n?? notes.txt"


class Web:
    """A client of mitmweb's REST API: bearer-token auth; an XSRF cookie + header pair for writes."""

    def __init__(self, port: int, token: str) -> None:
        self.port, self.token = port, token
        self.xsrf = secrets.token_hex(16)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=20)
        headers = {"Authorization": f"Bearer {self.token}"}
        data = None
        if method != "GET":
            headers.update(
                {
                    "Cookie": f"_mitmproxy_xsrf={self.xsrf}",
                    "X-XSRFToken": self.xsrf,
                    "Content-Type": "application/json",
                }
            )
            data = json.dumps(body if body is not None else {}).encode()
        try:
            conn.request(method, path, data, headers)
            resp = conn.getresponse()
            raw = resp.read()
            assert resp.status == 200, (method, path, resp.status, raw[:300])
            return json.loads(raw) if raw else None
        finally:
            conn.close()


def send(port: int, body: dict[str, Any]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request(
            "POST", "/v1/messages?beta=true", json.dumps(body).encode(), {"content-type": "application/json"}
        )
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
    finally:
        conn.close()


def test_mitmweb_shows_verdicts_view_and_commands(mitm: Any, upstream: Upstream, tmp_path: Path) -> None:
    web_port, token = free_port(), secrets.token_hex(12)
    proxy = mitm(
        "--set",
        f"web_port={web_port}",
        "--set",
        "web_open_browser=false",
        "--set",
        f"web_password={token}",
        mode=f"reverse:{upstream.url}",
        tool="mitmweb",
    )
    session = samples.Session()
    turns = [session.request(1), session.request(2)]
    edited = session.request(3)
    edited["system"][2]["text"] = edited["system"][2]["text"].replace(GIT_OLD, GIT_NEW)
    turns.append(edited)
    for body in turns:
        send(proxy.port, body)
    assert proxy.wait_for("stableprefix: main")
    deadline = time.monotonic() + 30  # records complete off the forwarding path: wait for all three
    while proxy.output().count("stableprefix: main") < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    web = Web(web_port, token)

    # unauthenticated requests are refused: the API really is the authenticated one
    conn = http.client.HTTPConnection("127.0.0.1", web_port, timeout=10)
    conn.request("GET", "/flows")
    assert conn.getresponse().status == 403
    conn.close()

    flows = web.call("GET", "/flows")
    assert len(flows) == 3
    forwarded = [json.loads(r.decoded()) for r in upstream.received]
    offset = len(os.path.commonprefix([forwarded[1]["system"][1]["text"], forwarded[2]["system"][1]["text"]]))
    assert [f["comment"] for f in flows] == [
        "stableprefix: main first",
        "stableprefix: main append-only",
        f"stableprefix: main changed at system[1]@{offset} (git_status); client-side miss",
    ]
    assert [f["marked"] for f in flows] == ["", "", "⚠"]

    # the content view is picked automatically for our requests, not for the responses
    changed = flows[2]["id"]
    view = web.call("GET", f"/flows/{changed}/request/content/auto.json")
    assert view["view_name"] == "stableprefix" and view["syntax_highlight"] == "yaml"
    lines = view["text"].splitlines()
    for expected in (
        '  verdict: "changed"',
        f'  diverged_at: "system[1]@{offset}"',
        '  cause: "git_status"',
        "  common_prefix_messages: 0  # of 5",
        '  miss: "client"  # client-side miss',
        '  evidence: "anthropic-usage"',
        '  changed: {"billing": 1}',
        "# forwarded body",
    ):
        assert expected in lines, expected
    assert any(line.startswith("    - system[0]: removed (") for line in lines)
    body = json.loads(view["text"].split("# forwarded body\n", 1)[1])
    assert body["system"] == edited["system"][1:]
    explicit = web.call("GET", f"/flows/{changed}/request/content/stableprefix.json")
    assert explicit["text"] == view["text"]
    assert web.call("GET", f"/flows/{changed}/response/content/auto.json")["view_name"] == "JSON"
    assert "stableprefix" in web.call("GET", "/state")["contentViews"]

    # ~comment filters on the verdict
    web.call("PUT", "/options", {"view_filter": "~comment changed"})
    assert [f["id"] for f in web.call("GET", "/flows")] == [changed]
    web.call("PUT", "/options", {"view_filter": "~marked"})
    assert [f["id"] for f in web.call("GET", "/flows")] == [changed]
    web.call("PUT", "/options", {"view_filter": ""})

    # the commands, through the REST route (lowercase letters and dots only)
    summary = web.call("POST", "/commands/stableprefix.summary", {"arguments": []})["value"]
    assert summary.splitlines()[0] == "stableprefix summary: 1 stream(s)"
    assert "3 requests, append-only 1/2 (50%), client misses git_status=1" in summary
    assert web.call("POST", "/commands/stableprefix.reset", {"arguments": []}) == {"value": None}
    after = web.call("POST", "/commands/stableprefix.summary", {"arguments": []})["value"]
    assert after == "stableprefix summary: no requests seen"

    # the INFO lines are in mitmweb's event log
    events = [e["message"] for e in web.call("GET", "/events")]
    assert any("stableprefix active:" in m for m in events)
    assert any(f"changed at system[1]@{offset} (git_status) 0/5 msgs" in m for m in events)
    assert proxy.stop() == 0
