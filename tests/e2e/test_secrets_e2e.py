"""Credentials and prompt text never leave the proxy through its own outputs.

Canary strings are planted in ``x-api-key``, ``Authorization``, ``Cookie``, the session header and the prompt
(system text, user text, a tool result, a tool description, ``metadata.user_id``, a field inside the billing
header that the billing rule removes, a malformed body, a body whose Content-Encoding lies). Then every
output is searched: mitmdump's log lines (default verbosity), the JSONL log (with the masked context
option on), ``stableprefix report`` over the log and over the saved flow file (text and HTML page), and the
content view's text (its header entirely; the forwarded body for credentials and removed text).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy import io as mitmio

from stableprefix.cli import process
from stableprefix.core.record import BEFORE_KEY
from stableprefix.core.record import META_KEY
from stableprefix.demo import samples
from stableprefix.demo.upstream import Upstream
from stableprefix.mitm import contentview
from tests.conftest import MitmFactory
from tests.support.helpers import post

pytestmark = pytest.mark.e2e

CREDENTIALS = {
    "x-api-key": "sk-ant-api03-CANARYKEY7f3a9c",
    "authorization": "Bearer CANARYAUTH5d1e02",
    "cookie": "sessionKey=CANARYCOOKIE88b4c1; other=1",
    "x-claude-code-session-id": "CANARYSESSION0c7d21",
}
PROMPT = {
    "system": "CANARYSYSTEM4b9e10",
    "user": "CANARYUSER2a6f55",
    "tool_result": "CANARYTOOLRESULT93ce07",
    "tool_description": "CANARYTOOLDESC61d0f4",
    "user_id": "CANARYUSERID0e5b77",
    "billing": "CANARYBILLING7c2d90",  # inside the header line the billing rule drops
    "bad_body": "CANARYBADBODY3f81a6",
    "lying_body": "CANARYLYINGBODY5e0c3b",
}
SECRETS = [*CREDENTIALS.values(), *PROMPT.values()]
CANARY_WORDS = [re.search(r"CANARY[A-Z]+[0-9a-f]+", s).group(0) for s in SECRETS]  # type: ignore[union-attr]


def planted(turn: int) -> dict[str, Any]:
    body = samples.Session(system_chars=1500).request(turn)
    system = body["system"]
    system[0]["text"] = system[0]["text"] + f" note={PROMPT['billing']};"
    # turn 3 changes the system text right after the canary: a divergence whose (masked) context is logged
    mode = "strict" if turn == 3 else "normal"
    system[2]["text"] += (
        f"\nProject secret: {PROMPT['system']} mode {mode}\nToday's date is 2026-11-{27 + turn}."
    )
    body["messages"][0]["content"][1]["text"] = f"Use the token {PROMPT['user']} to log in."
    if turn > 1:
        body["messages"][2]["content"][0]["content"] = f"file says {PROMPT['tool_result']}"
    body["tools"][0]["description"] += f" Key: {PROMPT['tool_description']}"
    body["metadata"] = {"user_id": f"user_{PROMPT['user_id']}_account__session_{PROMPT['user_id']}"}
    return body


def leaks(text: str) -> list[str]:
    return [w for w in CANARY_WORDS if w in text]


def test_no_canary_in_any_output(upstream: Upstream, tmp_path: Path) -> None:
    log, flows = tmp_path / "log.jsonl", tmp_path / "flows.mitm"
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text("[builtins]\ndate = true\nenv_block = true\nuser_id = true\n", encoding="utf-8")
    args = process.command(
        mode=f"reverse:{upstream.url}",
        confdir=tmp_path / "conf",
        extra=[
            "--set", f"stableprefix_log={log}",
            "--set", "stableprefix_log_context=true",
            "--set", f"stableprefix_rules={rules_file}",
            "-w", str(flows),
        ],  # mitmdump's default verbosity (flow_detail=1): one line per flow
    )  # fmt: skip
    proxy = process.Proxy(args)
    try:
        _exercise(proxy, upstream)
    finally:
        assert proxy.stop() == 0
    _search(proxy, log, flows, tmp_path)


def _exercise(proxy: process.Proxy, upstream: Upstream) -> None:
    assert proxy.port
    for turn in (1, 2, 3):
        status, _ = post(proxy.port, "/v1/messages?beta=true", planted(turn), headers=CREDENTIALS)
        assert status == 200
    sent = upstream.received[-1].body
    assert PROMPT["user"].encode() in sent and PROMPT["billing"].encode() not in sent  # rules ran
    bad = b'{"model":"m","messages":[{"role":"user","content":"' + PROMPT["bad_body"].encode() + b'"}'
    post(proxy.port, "/v1/messages", bad, headers=CREDENTIALS)
    lying = b'{"model":"m","messages":[{"role":"user","content":"' + PROMPT["lying_body"].encode() + b'"}]}'
    post(proxy.port, "/v1/messages", lying, headers={**CREDENTIALS, "content-encoding": "gzip"})
    assert proxy.wait_for("cannot decode body")
    time.sleep(0.3)


def _search(proxy: process.Proxy, log: Path, flows: Path, tmp_path: Path) -> None:
    output = proxy.output()
    assert "stableprefix" in output and "left /v1/messages unchanged" in output
    assert leaks(output) == [], "mitmdump output"

    text = log.read_text(encoding="utf-8")
    records = [json.loads(line) for line in text.splitlines()]
    assert len(records) >= 4 and any(r.get("context") for r in records)  # the masked context was logged
    assert leaks(text) == [], "JSONL log"

    html = tmp_path / "report.html"
    for source in (log, flows):
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "stableprefix.cli",
                "report",
                str(source),
                "--html",
                str(html),
                "--no-progress",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode in (0, 2), res.stderr
        assert "stream" in res.stdout.lower()
        assert leaks(res.stdout + res.stderr) == [], f"report of {source.name}"
        assert leaks(html.read_text(encoding="utf-8")) == [], f"HTML report of {source.name}"

    with flows.open("rb") as f:
        saved = [fl for fl in mitmio.FlowReader(f).stream()]
    shown = 0
    for flow in saved:
        if not isinstance(flow, http.HTTPFlow) or not contentview.handled(flow):
            continue
        view = contentview.render(
            flow.metadata[META_KEY], flow.metadata.get(BEFORE_KEY) or {}, flow.request.content or b""
        )
        header, _, body = view.partition("# forwarded body")
        assert leaks(header) == [], "content view header"
        removed = [CREDENTIALS[k] for k in CREDENTIALS] + [PROMPT["billing"]]
        assert [s for s in removed if s in body] == [], "content view body"
        shown += 1
    assert shown == 3


def test_undecodable_body_warning_quotes_no_body_bytes(mitm: MitmFactory, upstream: Upstream) -> None:
    proxy = mitm(mode=f"reverse:{upstream.url}")
    assert proxy.port
    post(proxy.port, "/v1/messages", b"CANARYSTARTS the body", headers={"content-encoding": "gzip"})
    assert proxy.wait_for("cannot decode body")
    line = next(x for x in proxy.output().splitlines() if "cannot decode body" in x)
    assert "CANARY" not in line
