"""32 concurrent SSE conversations through one mitmdump: each gets its own complete stream, the upstream
gets each request rewritten, and each request gets one JSONL record whose fingerprint matches the one
computed offline from the bytes the client sent."""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from stableprefix.demo import samples
from stableprefix.demo.upstream import Upstream
from tests.conftest import MitmFactory

pytestmark = pytest.mark.e2e

#: scripts/stress_concurrency.py runs this test with more conversations (and repeatedly, under load)
CONVERSATIONS = int(os.environ.get("STABLEPREFIX_CONVERSATIONS", "32"))
TURNS = 3
SESSION_HEADER = "X-Claude-Code-Session-Id"


def conversation(i: int) -> list[bytes]:
    """The requests of conversation `i`: its own task text and billing suffix, history growing per turn."""
    s = samples.Session(
        suffix=f"{i:03x}", task=f"Task {i}: find why test {i} fails and fix it.", result_chars=300
    )
    out = []
    for turn in range(1, TURNS + 1):
        body = s.request(turn, cch_seed=i)
        body["stream"] = True
        out.append(json.dumps(body).encode())
    return out


def sse_events(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line[5:]) for line in data.decode().splitlines() if line.startswith("data:")]


def test_32_concurrent_sse_conversations(mitm: MitmFactory, upstream: Upstream, tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    proxy = mitm("--set", f"stableprefix_log={log}", mode=f"reverse:{upstream.url}")
    assert proxy.port
    bodies = {i: conversation(i) for i in range(CONVERSATIONS)}
    streams: dict[tuple[int, int], bytes] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(CONVERSATIONS)

    def talk(i: int) -> None:
        try:
            start.wait(30)
            for turn, raw in enumerate(bodies[i], start=1):
                conn = http.client.HTTPConnection("127.0.0.1", proxy.port or 0, timeout=60)
                headers = {"content-type": "application/json", SESSION_HEADER: f"conv-{i}"}
                conn.request("POST", "/v1/messages?beta=true", raw, headers)
                resp = conn.getresponse()
                if resp.status != 200:  # name what answered, and why (mitmproxy's error page says)
                    raise AssertionError(
                        f"conversation {i} turn {turn}: HTTP {resp.status}: {resp.read()[:300]!r}"
                    )
                assert resp.getheader("content-type", "").startswith("text/event-stream")
                streams[(i, turn)] = resp.read()
                conn.close()
        except BaseException as e:  # reported below, with the conversation
            errors.append(e)

    threads = [threading.Thread(target=talk, args=(i,)) for i in range(CONVERSATIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors[:3]

    # every conversation got its own, complete stream
    assert len(streams) == CONVERSATIONS * TURNS
    for key, data in streams.items():
        events = sse_events(data)
        assert [e["type"] for e in events][0] == "message_start", key
        assert events[-1]["type"] == "message_stop", key
        text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
        assert text == "ok done", key

    # the upstream got every request with the billing block cut out and nothing else touched: the
    # client's json.dumps text minus the first system element equals json.dumps of the body without it
    got = {
        r.headers[SESSION_HEADER.lower()] + "|" + str(r.body.count(b'"role"')): r.body
        for r in upstream.received
    }
    assert len(upstream.received) == CONVERSATIONS * TURNS
    for i, raws in bodies.items():
        for raw in raws:
            body = json.loads(raw)
            assert body["system"][0]["text"].startswith("x-anthropic-billing-header:")
            del body["system"][0]
            assert got[f"conv-{i}|{raw.count(b'"role"')}"] == json.dumps(body).encode()

    # one record per request, each with the fingerprint computed offline
    def records() -> list[dict[str, Any]]:
        return (
            [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
            if log.exists()
            else []
        )

    deadline = time.monotonic() + 60
    while len(records()) < CONVERSATIONS * TURNS and time.monotonic() < deadline:
        time.sleep(0.05)
    recs = records()
    assert len(recs) == CONVERSATIONS * TURNS
    assert len({r["id"] for r in recs}) == len(recs)
    for r in recs:
        assert r["status"] == 200
        assert r["changed"] == {"billing": 1}
        assert r["verdict"] == ("first" if len(r["chain"]) == 1 else "append-only"), r
    # the conversations stay apart: one stream per session, TURNS requests each
    by_stream: dict[str, list[int]] = {}
    for r in recs:
        by_stream.setdefault(str(r.get("stream", r["session"])), []).append(len(r["chain"]))
    assert len(by_stream) == CONVERSATIONS
    assert all(sorted(v) == [1, 3, 5] for v in by_stream.values())
    # the requests of one conversation share a system/tools prefix hash; the conversations' differ only
    # by their task text, which is in the messages, so all share one system+tools prefix
    assert len({(r["system_hash"], r["tools_hash"]) for r in recs}) == 1
    assert proxy.stop() == 0
