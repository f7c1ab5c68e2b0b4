"""A burst through real mitmdump (issue 13): 1,000 requests as fast as the upstream answers, 8 keep-alive
clients. The analysis runs off the forwarding path and may queue, but every request gets its record, the
records of each conversation keep its order (verdicts compare with the previous request), and the proxy's
memory stays bounded."""

from __future__ import annotations

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from stableprefix.demo import samples
from stableprefix.demo.upstream import Upstream
from tests.conftest import MitmFactory

pytestmark = pytest.mark.e2e

REQUESTS = 1000
CLIENTS = 8
TURNS = 5  # each client runs conversations of TURNS requests, one after the other
SESSION_HEADER = "X-Claude-Code-Session-Id"


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_1000_requests_1000_records_in_order(mitm: MitmFactory, upstream: Upstream, tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    proxy = mitm("--set", f"stableprefix_log={log}", mode=f"reverse:{upstream.url}")
    assert proxy.port
    session = samples.Session(system_chars=3000, tool_count=8, result_chars=2000)
    turns = [json.dumps(session.request(t)).encode() for t in range(1, TURNS + 1)]
    per_client = REQUESTS // CLIENTS
    sent: list[tuple[str, int]] = []  # (conversation, turn) in the order each client sent them

    def client(c: int) -> list[tuple[str, int]]:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port or 0, timeout=60)
        out = []
        for k in range(per_client):
            conv, turn = f"burst-{c}-{k // TURNS}", k % TURNS
            headers = {"content-type": "application/json", SESSION_HEADER: conv}
            conn.request("POST", "/v1/messages", turns[turn], headers)
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200, resp.status
            out.append((conv, turn))
        conn.close()
        return out

    rss_before = _rss_kb(proxy.pid)
    with ThreadPoolExecutor(CLIENTS) as pool:
        for done in pool.map(client, range(CLIENTS)):
            sent.extend(done)
    assert len(sent) == REQUESTS

    def records() -> list[dict[str, Any]]:
        lines = log.read_text(encoding="utf-8").splitlines() if log.exists() else []
        return [json.loads(line) for line in lines]

    deadline = time.monotonic() + 120
    while len(records()) < REQUESTS and time.monotonic() < deadline:
        time.sleep(0.1)
    recs = records()
    assert len(recs) == REQUESTS
    assert len({r["id"] for r in recs}) == REQUESTS
    assert len(upstream.received) == REQUESTS
    for r in recs:  # complete: analysed, answered, the billing header removed
        assert (r["status"], r["changed"], r["class"]) == (200, {"billing": 1}, "main"), r
    # per conversation: TURNS requests; the first is "first", every later one "append-only" (the analysis
    # compared each with the request before it, so it ran in arrival order)
    by_session: dict[str, list[dict[str, Any]]] = {}
    for r in recs:
        by_session.setdefault(r["session"], []).append(r)
    assert len(by_session) == len({conv for conv, _ in sent})
    for rs in by_session.values():
        rs.sort(key=lambda r: len(r["chain"]))
        assert [r["verdict"] for r in rs] == ["first"] + ["append-only"] * (len(rs) - 1)
    # bounded: a thousand requests later the proxy holds no backlog of bodies
    growth_mb = (_rss_kb(proxy.pid) - rss_before) / 1024
    assert growth_mb < 64, growth_mb
    assert proxy.stop() == 0
