"""The "stableprefix" content view: selection and text."""

from __future__ import annotations

import json
from typing import Any

from mitmproxy import contentviews
from mitmproxy import http
from mitmproxy.test import taddons
from mitmproxy.test import tflow

from stableprefix.core.record import META_KEY
from stableprefix.demo import samples
from stableprefix.mitm import contentview
from stableprefix.mitm.addon import StablePrefix

SESSION = samples.Session()


def flow(body: bytes | dict[str, Any], url: str = "http://127.0.0.1:8080/v1/messages") -> http.HTTPFlow:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return tflow.tflow(req=http.Request.make("POST", url, raw, http.Headers(content_type="application/json")))


def respond(f: http.HTTPFlow, cached: int, fresh: int) -> None:
    usage = {"input_tokens": fresh, "cache_read_input_tokens": cached}
    f.response = http.Response.make(
        200, json.dumps({"usage": usage}).encode(), {"content-type": "application/json"}
    )


def test_view_is_auto_selected_for_handled_requests_only() -> None:
    a = StablePrefix()
    with taddons.context(a):
        f = flow(SESSION.request(1))
        a.request(f)
        a.drain()  # the analysis (which the view shows) runs off the forwarding path
        assert contentviews.prettify_message(f.request, f).view_name == "stableprefix"
        respond(f, 0, 100)
        a.response(f)
        assert f.response is not None
        assert contentviews.prettify_message(f.response, f).view_name == "JSON"
        g = flow(b"{not json")  # left alone: no view of ours
        a.request(g)
        a.drain()
        assert META_KEY in g.metadata
        assert contentviews.prettify_message(g.request, g).view_name != "stableprefix"
        h = flow(SESSION.request(1), url="http://127.0.0.1/other")
        a.request(h)
        assert contentviews.prettify_message(h.request, h).view_name == "JSON"


def test_text_shows_rules_divergence_and_server() -> None:
    a = StablePrefix()
    with taddons.context(a):
        first = flow(SESSION.request(2))
        a.request(first)
        respond(first, 0, 9000)
        a.response(first)
        body = SESSION.request(3)
        body["system"][2]["text"] = body["system"][2]["text"].replace(
            "M src/app.py", "M src/app.py\nM src/cli.py"
        )
        body["tools"].append({"name": "mcp__jira__search", "description": "Search.", "input_schema": {}})
        f = flow(body)
        a.request(f)
        respond(f, 2100, 7000)
        a.response(f)
        a.drain()
        rec = f.metadata[META_KEY]
        text = contentviews.prettify_message(f.request, f).text
    lines = text.splitlines()
    assert lines[0] == "# stableprefix: this request against the previous one of its conversation"
    for expected in (
        '  class: "main"',
        '  verdict: "changed"',
        f'  diverged_at: "{rec["diverged_at"]}"',
        '  cause: "git_status"',
        "  common_prefix_messages: 0  # of 5",
        f"  reusable: {rec['reusable_chars']:,} chars  # ~{rec['reusable_tokens_est']:,} tokens",
        '  tools_changed: {"added": ["mcp__jira__search"], "removed": [], "changed": []}',
        "  status: 200",
        "  cached_tokens: 2100",
        "  prompt_tokens: 9100",
        '  evidence: "anthropic-usage"',
        '  miss: "client"  # client-side miss',
        '  changed: {"billing": 1}',
        "    - system[0]: removed ("
        + f"{len(json.dumps(body['system'][0], sort_keys=True, separators=(',', ':'))):,} chars)",
        f"  prefix_hash: {rec['prefix_hash'][:12]}",
        "# forwarded body",
    ):
        assert expected in lines, expected
    assert rec["diverged_at"].startswith("system[1]@")
    body_text = text.split("# forwarded body\n", 1)[1]
    assert json.loads(body_text)["system"] == body["system"][1:]


def test_render_before_response_observe_and_long_body() -> None:
    record = {
        "class": "side",
        "stream": "abcd1234",
        "verdict": "first",
        "chain": ["c1"],
        "prefix_hash": "f" * 64,
        "changed": {},
        "would_change": {"billing": 1},
        "passthrough": True,
        "reusable_chars": 0,
        "reusable_tokens_est": 0,
        "interleaved_side": False,
    }
    big = json.dumps({"text": "x" * (contentview.BODY_CHARS + 10)}).encode()
    text = contentview.render(record, {}, big)
    assert "  status: null  # no response yet" in text
    assert '  would_change: {"billing": 1}  # observe mode: nothing rewritten' in text
    assert "  passthrough: true  # this host is never rewritten" in text
    assert "client_sent" not in text and "changes:" not in text
    assert text.endswith("more characters")
    assert contentview.render(record, {}, b"\xffnot json").endswith("\ufffdnot json")


def test_handled() -> None:
    f = flow(b"{}")
    assert not contentview.handled(f)
    f.metadata[META_KEY] = {"error": "x"}
    assert not contentview.handled(f)
    f.metadata[META_KEY] = {"prefix_hash": "x"}
    assert contentview.handled(f)
    assert not contentview.handled(None)
