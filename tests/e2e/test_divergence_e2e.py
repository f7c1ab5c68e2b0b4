"""Replay a Claude-Code-shaped session with planted changes through real mitmdump to a real upstream.

Every planted change (git status edited, tool added, date rolled over, thinking block dropped, history
compacted, side request interleaved) must be reported at its exact location with its cause; append-only
turns as such; the server's reuse figures exactly as the upstream reported them (JSON and SSE), and the
miss classified from them.
"""

from __future__ import annotations

import http.client
import json
import os.path
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from stableprefix.core.fingerprint import CLEARED_TOOL_RESULT
from stableprefix.demo import samples
from stableprefix.demo.upstream import Upstream
from stableprefix.demo.upstream import _prompt_text

pytestmark = pytest.mark.e2e

GIT_OLD = "Status:\nM src/app.py\n?? notes.txt"
GIT_NEW = "Status:\nM src/app.py\nM src/cli.py\n?? notes.txt"
JIRA = {
    "name": "mcp__jira__search",
    "description": "Search Jira issues with JQL.",
    "input_schema": {"type": "object", "properties": {"jql": {"type": "string"}}, "required": ["jql"]},
}


def send(port: int, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, json.dumps(body).encode(), {"content-type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@dataclass
class Conversation:
    """A main thread whose state carries the planted changes into every later turn (as a client would)."""

    session: samples.Session = field(default_factory=samples.Session)
    git_edited: bool = False
    extra_tools: list[dict[str, Any]] = field(default_factory=list)
    date: str | None = None
    no_thinking: set[int] = field(default_factory=set)
    cleared: set[int] = field(default_factory=set)

    def request(self, turn: int, stream: bool = False) -> dict[str, Any]:
        b = self.session.request(turn)
        for k, m in enumerate(b["messages"]):
            if m["role"] == "assistant" and k not in self.no_thinking:
                thought = {
                    "type": "thinking",
                    "thinking": f"Turn {k}: read the next file.",
                    "signature": "c2ln",
                }
                m["content"].insert(0, thought)
        if self.git_edited:
            assert GIT_OLD in b["system"][2]["text"]
            b["system"][2]["text"] = b["system"][2]["text"].replace(GIT_OLD, GIT_NEW)
        if self.extra_tools:
            b["tools"] = sorted(
                b["tools"] + self.extra_tools, key=lambda t: (t["name"].startswith("mcp__"), t["name"])
            )
        if self.date:
            first = b["messages"][0]["content"][0]
            first["text"] = first["text"].replace(
                "Today's date is 2026-11-29.", f"Today's date is {self.date}."
            )
        for k in self.cleared:
            b["messages"][k]["content"][0]["content"] = CLEARED_TOOL_RESULT
        b["stream"] = stream
        return b


def side_request(
    conv: Conversation, text: str = "Find why the parser drops the last token and fix it."
) -> dict[str, Any]:
    return {
        "model": "claude-haiku-4-5",
        "max_tokens": 512,
        "system": [
            {"type": "text", "text": samples.billing_line(suffix="a7f", cch="0c1d2")},
            {"type": "text", "text": "Summarize this coding conversation in under 50 characters as a title."},
        ],
        "messages": [{"role": "user", "content": text}],
        "metadata": conv.session.request(1)["metadata"],
        "stream": False,
    }


def subagent_request(conv: Conversation, turn: int) -> dict[str, Any]:
    sub = samples.Session(suffix="e91", task="Search the code base for callers of parse().", tool_count=6)
    body = sub.request(turn)
    body["system"][2]["text"] = "You are an agent for Claude Code. " + samples.instructions(5000, seed=7)
    body["metadata"] = conv.session.request(1)["metadata"]  # the same Claude Code session
    return body


def count_tokens_request(conv: Conversation) -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4-5",
        "messages": [{"role": "user", "content": "foo"}],
        "tools": samples.tools(),
    }


def test_planted_changes_are_located_and_explained(mitm: Any, upstream: Upstream, tmp_path: Path) -> None:
    log = tmp_path / "records.jsonl"
    proxy = mitm("--set", f"stableprefix_log={log}", mode=f"reverse:{upstream.url}")
    conv = Conversation()
    steps: list[tuple[str, str, dict[str, Any]]] = []

    def step(label: str, body: dict[str, Any], path: str = "/v1/messages?beta=true") -> None:
        status, data = send(proxy.port, path, body)
        assert status == 200, data
        steps.append((label, path, body))

    step("T1", conv.request(1))
    step("T2", conv.request(2, stream=True))
    step("S1", subagent_request(conv, 1))
    step("S2", subagent_request(conv, 2))
    step("T3", conv.request(3))
    conv.git_edited = True
    step("T4 git", conv.request(4, stream=True))
    step("T5", conv.request(5))
    step("C1", count_tokens_request(conv), "/v1/messages/count_tokens?beta=true")
    conv.extra_tools = [JIRA]
    step("T6 tool", conv.request(6))
    step("T7", conv.request(7, stream=True))
    step("X1 side", side_request(conv))
    step("T8", conv.request(8))
    step("X2 side", side_request(conv, "Now also add a regression test for it."))
    step("T9", conv.request(9, stream=True))
    conv.date = "2026-11-30"
    step("T10 date", conv.request(10))
    conv.no_thinking = {1}
    step("T11 thinking", conv.request(11, stream=True))
    conv.cleared = {2}
    step("T12 compacted", conv.request(12))
    step("T13", conv.request(13, stream=True))
    assert proxy.stop() == 0
    out = proxy.output()

    recs = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(recs) == len(steps) == len(upstream.received)
    by = {label.split()[0]: r for (label, _, _), r in zip(steps, recs, strict=True)}

    # what the upstream really received, and the cache figures it answered with
    prompts = [_prompt_text(json.loads(r.decoded())) for r in upstream.received]
    forwarded = [json.loads(r.decoded()) for r in upstream.received]
    prev = ""  # the upstream's one slot: count_tokens requests do not replace it
    for i, ((label, path, _), r) in enumerate(zip(steps, recs, strict=True)):
        cached = len(os.path.commonprefix([prev, prompts[i]])) // 4
        total = max(len(prompts[i]) // 4, 1)
        assert r["status"] == 200, label
        if "count_tokens" in path:
            assert (r["cached_tokens"], r["evidence"], r["miss"]) == (None, None, None), label
            continue
        prev = prompts[i]
        assert (r["cached_tokens"], r["prompt_tokens"], r["evidence"]) == (
            cached,
            total,
            "anthropic-usage",
        ), label

    main = by["T1"]["stream"]
    expected: dict[str, tuple[Any, ...]] = {
        # label: class, verdict, diverged_at, cause, common_prefix_messages, interleaved_side, miss
        "T1": ("main", "first", None, None, 0, False, None),
        "T2": ("main", "append-only", None, None, 1, False, None),
        # a first request is compared with the nearest earlier stream (issue 12): the subagent's own system
        # prompt after the identity block, fewer tools
        "S1": ("subagent", "first", "system[1]@0", "system", 0, False, None),
        "S2": ("subagent", "append-only", None, None, 1, False, None),
        "T3": ("main", "append-only", None, None, 3, False, "server"),  # the subagent took the one slot
        "T4": ("main", "changed", "GIT", "git_status", 0, False, "client"),
        "T5": ("main", "append-only", None, None, 7, False, None),
        "C1": ("count_tokens", None, None, None, 0, False, None),
        "T6": ("main", "changed", "tools", "tools", 0, False, "client"),
        "T7": ("main", "append-only", None, None, 11, False, None),
        "X1": ("side", "first", "system[0]@0", "system", 0, False, None),  # against the main thread
        "T8": ("main", "append-only", None, None, 13, True, "server"),
        "X2": ("side", "first", "messages[0].content[0]", "conversation", 0, False, None),  # against X1
        "T9": ("main", "append-only", None, None, 15, True, "server"),
        "T10": ("main", "changed", "messages[0].content[0]", "date", 0, False, "client"),
        "T11": ("main", "changed", "messages[1].content[0]", "thinking_dropped", 1, False, "client"),
        "T12": ("main", "changed", "messages[2].content[0]", "tool_result_cleared", 2, False, "client"),
        "T13": ("main", "append-only", None, None, 23, False, None),
    }
    old_text = forwarded[4]["system"][1]["text"]  # T3, billing block dropped: the big block is system[1]
    new_text = forwarded[5]["system"][1]["text"]  # T4
    offset = len(os.path.commonprefix([old_text, new_text]))
    assert old_text[:offset].endswith("M src/app.py\n") and new_text[offset:].startswith("M src/cli.py")
    for label, (cls, verdict, where, cause, common, interleaved, miss) in expected.items():
        r = by[label]
        where = f"system[1]@{offset}" if where == "GIT" else where
        got = (r["class"], r["verdict"], r["diverged_at"], r["cause"], r["common_prefix_messages"])
        assert got == (cls, verdict, where, cause, common), label
        assert (r["interleaved_side"], r["miss"]) == (interleaved, miss), label
        if cls == "main":
            assert r["stream"] == main, label
    assert by["S1"]["stream"] == by["S2"]["stream"] != main
    assert by["X1"]["stream"] not in (main, by["S1"]["stream"])
    assert by["T6"]["tools_changed"] == {"added": ["mcp__jira__search"], "removed": [], "changed": []}
    # S1 and X1 (first requests) name the tools they lack against the nearest earlier stream, the main one
    assert all("tools_changed" not in r for label, r in by.items() if label not in ("T6", "S1", "X1"))
    assert by["S1"]["tools_changed"]["removed"] and by["S1"]["nearest_stream"] == main
    assert all(r["rewritten"] and r["changed"] == {"billing": 1} for label, r in by.items() if label != "C1")

    # the numbers that make T3/T8/T9 server-side misses: the server reused almost nothing of a stable prefix
    for label in ("T3", "T8", "T9"):
        r = by[label]
        assert r["cached_tokens"] < 100 < r["reusable_tokens_est"], label
    # and an append-only turn after a plain turn reused nearly all
    assert by["T13"]["cached_tokens"] > 0.9 * by["T13"]["prompt_tokens"]

    # one INFO line per request, once the response is in; the interleave warning exactly once
    lines = [
        line
        for line in out.splitlines()
        if "stableprefix: " in line and "stableprefix: side requests" not in line
    ]
    info = [line.split("stableprefix: ", 1)[1] for line in lines if "anthropic-" in line]
    assert len(info) == len(steps)
    p4 = by["T4"]["prefix_hash"][:12]
    assert f"main {p4} changed at system[1]@{offset} (git_status) 0/7 msgs, server reused " in info[5]
    assert info[5].endswith("client-side miss (anthropic-messages, changed billing=1)")
    assert info[9].startswith(
        f"main {by['T7']['prefix_hash'][:12]} append-only 11/13 msgs, server reused "
        f"{by['T7']['cached_tokens']:,}/{by['T7']['prompt_tokens']:,} (anthropic-messages, changed billing=1)"
    )
    assert "changed at tools (tools) [tools added mcp__jira__search] 0/11 msgs" in info[8]
    assert out.count("stableprefix: side requests") == 1
    assert "--parallel" in out and "--cache-ram" in out

    # the summary when mitmdump exits
    summary = out[out.index("stableprefix summary:") :]
    main_line = next(line for line in summary.splitlines() if f"main {main}" in line)
    assert "13 requests, append-only 7/12 (58%)" in main_line
    mains = [r for r in recs if r["class"] == "main"]
    cached, prompt = sum(r["cached_tokens"] for r in mains), sum(r["prompt_tokens"] for r in mains)
    assert f"server reused {cached:,}/{prompt:,} tokens" in main_line
    assert "client misses date=1 git_status=1 thinking_dropped=1 tool_result_cleared=1 tools=1" in main_line
    assert "server misses 3" in main_line and "side requests interleaved 2x" in main_line
    assert "subagent " in summary and "side side:" in summary and "count_tokens count_tokens:" in summary


# --- SSE is passed through as it arrives ---------------------------------------------------------------------


class _SlowSSE(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    pause = 1.0

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("connection", "close")
        self.end_headers()
        usage = {"input_tokens": 30, "cache_read_input_tokens": 1200, "output_tokens": 1}
        start = {"type": "message_start", "message": {"id": "m", "usage": usage}}
        self.wfile.write(f"event: message_start\ndata: {json.dumps(start)}\n\n".encode())
        self.wfile.flush()
        time.sleep(self.pause)
        for e in ("content_block_delta", "message_stop"):
            self.wfile.write(f'event: {e}\ndata: {{"type": "{e}"}}\n\n'.encode())
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def slow_sse() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowSSE)
    server.daemon_threads = True
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_sse_is_not_delayed_and_evidence_is_read(mitm: Any, slow_sse: int, tmp_path: Path) -> None:
    log = tmp_path / "records.jsonl"
    proxy = mitm("--set", f"stableprefix_log={log}", mode=f"reverse:http://127.0.0.1:{slow_sse}")
    body = Conversation().request(1, stream=True)
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    data = json.dumps(body).encode()
    head = f"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    t0 = time.monotonic()
    sock.sendall(head.encode() + data)
    received = b""
    first_event_at = None
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        received += chunk
        if first_event_at is None and b"message_start" in received:
            first_event_at = time.monotonic() - t0
    total = time.monotonic() - t0
    sock.close()
    assert first_event_at is not None and first_event_at < 0.7 < _SlowSSE.pause <= total
    assert b"message_stop" in received
    assert proxy.wait_for("server reused 1,200/1,230")
    proxy.stop()
    (r,) = [json.loads(x) for x in log.read_text().splitlines()]
    assert (r["cached_tokens"], r["prompt_tokens"], r["evidence"], r["verdict"]) == (
        1200,
        1230,
        "anthropic-usage",
        "first",
    )
