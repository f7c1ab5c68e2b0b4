"""Flow files written with the addon loaded (``mitmdump -w``): a streamed response's body is not stored, but
the addon's record is, in the flow's metadata; the report reads the server's figures from there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mitmproxy import http
from mitmproxy import io as mio

from stableprefix.demo import samples
from stableprefix.demo.upstream import Upstream
from stableprefix.report import readers
from tests.conftest import MitmFactory
from tests.support.helpers import post

pytestmark = pytest.mark.e2e


def test_streamed_responses_keep_their_evidence_in_the_flow_file(
    mitm: MitmFactory, upstream: Upstream, tmp_path: Path
) -> None:
    log, flows = tmp_path / "log.jsonl", tmp_path / "flows.mitm"
    proxy = mitm("--set", f"stableprefix_log={log}", "-w", str(flows), mode=f"reverse:{upstream.url}")
    assert proxy.port
    s = samples.Session()
    for t in (1, 2, 3):
        status, body = post(proxy.port, "/v1/messages", {**s.request(t), "stream": True})
        assert status == 200 and b"message_start" in body
    assert proxy.wait_for("append-only 3/5 msgs")
    assert proxy.stop() == 0
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["cached_tokens"] is not None for r in logged] == [True, True, True]
    assert logged[2]["cached_tokens"] > 0
    with flows.open("rb") as fo:
        saved = [f for f in mio.FlowReader(fo).stream() if isinstance(f, http.HTTPFlow)]
    assert [f.response.raw_content if f.response else b"-" for f in saved] == [None] * 3  # "content missing"
    turns = list(readers.read([flows], progress=False).turns())
    assert [(t.server_cached, t.server_prompt) for t in turns] == [
        (r["cached_tokens"], r["prompt_tokens"]) for r in logged
    ]
    assert [t.rec["changed"] for t in turns] == [{"billing": 1}] * 3  # what the rules did, from the record
    assert [t.rec.get("evidence_from") for t in turns] == ["flow-metadata"] * 3
    assert [t.verdict for t in turns] == ["first", "append-only", "append-only"]
