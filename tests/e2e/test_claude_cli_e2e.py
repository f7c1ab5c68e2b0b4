"""The real Claude Code CLI (scripts/install_claude_code.sh, CLAUDE_BIN) through mitmdump with the addon.

Chain: claude -p -> a recording mitmdump without the addon (``-w``: the bytes the CLI sent) -> mitmdump with
the addon in reverse mode (as ``stableprefix run --upstream``) -> the built-in upstream, which answers each
generation with its own text. Each test runs the CLI in a temp HOME and a small temp git repo with
``ANTHROPIC_API_KEY=dummy``; it asserts on the CLI's exit status and answer, on the addon's JSONL records and
on the bytes the upstream received, derived from what the CLI sent without the addon's code.

With STABLEPREFIX_RECORD_DIR set, the recording proxy's flow files of the addon-mode runs are copied there
(how tests/fixtures/real/ was made, see its README.md).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy import io as mitm_io

from stableprefix.demo.upstream import Reply
from stableprefix.demo.upstream import Upstream
from tests.conftest import MitmFactory
from tests.support.helpers import make_repo

pytestmark = pytest.mark.e2e

CLAUDE_BIN = os.environ.get("CLAUDE_BIN", "")
requires_cli = pytest.mark.skipif(
    not CLAUDE_BIN or not Path(CLAUDE_BIN).is_file(),
    reason='CLAUDE_BIN is unset: run `eval "$(bash scripts/install_claude_code.sh)"; export CLAUDE_BIN` '
    "(the pinned real Claude Code CLI from npm)",
)
HEADER_START = "x-anthropic-billing-header: "
AGENT_CALL = {
    "type": "tool_use",
    "name": "Agent",
    "input": {
        "description": "List the files",
        "prompt": "List the files in the repository and report their names.",
        "subagent_type": "general-purpose",
        "run_in_background": False,
    },
}


@dataclass
class Answers:
    """The upstream's replier: numbered texts ("answer 1", ...), or a script of replies in order."""

    script: list[Reply] = field(default_factory=list)
    sent: list[Reply] = field(default_factory=list)
    _n: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, path: str, body: Any) -> Reply | None:
        if "count_tokens" in path:
            return None
        with self._lock:
            n = next(self._n)
            reply = self.script[n - 1] if n <= len(self.script) else f"answer {n} from the upstream"
            self.sent.append(reply)
        return reply


@dataclass
class Setup:
    answers: Answers
    upstream: Upstream
    log: Path
    flows: Path
    url: str
    home: Path
    repo: Path

    def claude(self, prompt: str, *extra: str) -> dict[str, Any]:
        """`claude -p PROMPT --output-format json`; its JSON result (the test fails on a non-zero exit)."""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "ANTHROPIC_BASE_URL": self.url,
            "ANTHROPIC_API_KEY": "dummy",
            "DISABLE_AUTOUPDATER": "1",
        }
        args = [CLAUDE_BIN, "-p", prompt, "--output-format", "json", *extra]
        proc = subprocess.run(args, cwd=self.repo, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, (
            f"claude exited {proc.returncode}: {proc.stdout[-2000:]} {proc.stderr[-2000:]}"
        )
        out: dict[str, Any] = json.loads(proc.stdout)
        assert out["is_error"] is False and out["subtype"] == "success", out
        return out

    def records(self, n: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """The addon's JSONL records, once at least `n` are written."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.log.read_text().splitlines() if self.log.exists() else []
            if len(lines) >= n or time.monotonic() > deadline:
                return [json.loads(line) for line in lines]
            time.sleep(0.05)

    def client_requests(self) -> list[http.Request]:
        """The POSTs the CLI sent, as the recording proxy (no addon) saved them (it also sends HEAD /api/hello
        before each run, which the upstream answers 200)."""
        with self.flows.open("rb") as f:
            flows = [fl for fl in mitm_io.FlowReader(f).stream() if isinstance(fl, http.HTTPFlow)]
        return [fl.request for fl in flows if fl.request.method == "POST"]


def start(
    mitm: MitmFactory, tmp_path: Path, answers: Answers, observe: bool = False, name: str | None = None
) -> Iterator[Setup]:
    log, flows = tmp_path / "log.jsonl", tmp_path / "client.mitm"
    home = tmp_path / "home"
    home.mkdir()
    with Upstream(replier=answers) as up:
        extra = ["--set", f"stableprefix_log={log}"]
        if observe:
            extra += ["--set", "stableprefix_observe=true"]
        addon = mitm(*extra, mode=f"reverse:{up.url}")
        recorder = mitm("-w", str(flows), mode=f"reverse:{addon.url}", addon=False)
        yield Setup(answers, up, log, flows, recorder.url, home, make_repo(tmp_path))
        recorder.stop()  # flushes the flow file
        addon.stop()
    if (dest := os.environ.get("STABLEPREFIX_RECORD_DIR")) and name:
        Path(dest).mkdir(parents=True, exist_ok=True)
        shutil.copy(flows, Path(dest) / f"{name}.mitm")


@pytest.fixture
def cli(mitm: MitmFactory, tmp_path: Path) -> Iterator[Setup]:
    yield from start(mitm, tmp_path, Answers(), name="cc_2_1_332_two_conversations")


@pytest.fixture
def cli_observe(mitm: MitmFactory, tmp_path: Path) -> Iterator[Setup]:
    yield from start(mitm, tmp_path, Answers(), observe=True)


@pytest.fixture
def cli_agent(mitm: MitmFactory, tmp_path: Path) -> Iterator[Setup]:
    yield from start(mitm, tmp_path, Answers(script=[[AGENT_CALL]]), name="cc_2_1_332_subagent")


def without_header(raw: bytes) -> bytes:
    """The CLI's body with its billing block `system[0]` cut out, derived with json alone: the CLI writes
    compact JSON (JSON.stringify), which json.dumps reproduces byte for byte (checked)."""
    body = json.loads(raw)
    assert json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode() == raw, "not compact JSON"
    assert body["system"][0]["text"].startswith(HEADER_START)
    del body["system"][0]
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def header_of(raw: bytes) -> str:
    text: str = json.loads(raw)["system"][0]["text"]
    assert text.startswith(HEADER_START)
    return text


def generations(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in recs if r.get("class") in ("main", "subagent")]


def run_two_conversations(s: Setup) -> tuple[list[dict[str, Any]], list[str]]:
    """Conversation A (two turns, `--continue`), then conversation B with another first prompt."""
    results = [
        s.claude("Say hello to the project."),
        s.claude("Now say goodbye.", "--continue"),
        s.claude("What does app.py print?"),
    ]
    assert (
        [r["result"] for r in results]
        == s.answers.sent
        == [f"answer {n} from the upstream" for n in (1, 2, 3)]
    )
    assert results[0]["session_id"] == results[1]["session_id"] != results[2]["session_id"]
    recs = s.records(3)
    assert len(generations(recs)) == 3 == len(s.upstream.received)
    return generations(recs), [header_of(r.content or b"") for r in s.client_requests()]


@requires_cli
def test_two_turns_and_a_new_conversation_share_the_system_and_tools_prefix(cli: Setup) -> None:
    recs, headers = run_two_conversations(cli)
    a1, a2, b1 = recs
    for r in recs:
        assert r["class"] == "main" and r["api"] == "anthropic-messages" and r["status"] == 200
        assert r["changed"] == {"billing": 1} and r["rewritten"] is True
        assert r["billing"]["cc_entrypoint"] == "sdk-cli" and r["billing"]["cch"] is False
        assert (
            r["billing"]["cc_version"]
            == headers[0].split("cc_version=")[1][: len(r["billing"]["cc_version"])]
        )
    # what the CLI sent: no cch, one suffix per conversation (same on --continue, another for B)
    assert all("cch=" not in h and h.endswith("; cc_entrypoint=sdk-cli;") for h in headers)
    assert headers[0] == headers[1] != headers[2]
    # between turns the inline environment message goes from a marked one-block list to a plain string:
    # the same text as a server renders it, so the second turn is still append-only
    env1, env2 = (json.loads(r.content or b"")["messages"][1] for r in cli.client_requests()[:2])
    assert env1["role"] == env2["role"] == "system" and isinstance(env2["content"], str)
    assert env1["content"] == [
        {"type": "text", "text": env2["content"], "cache_control": env1["content"][0]["cache_control"]}
    ]
    assert (a1["verdict"], a2["verdict"], b1["verdict"]) == ("first", "append-only", "first")
    assert a1["stream"] == a2["stream"] != b1["stream"]
    # with the header gone both conversations share system and tools
    assert (a1["system_hash"], a1["tools_hash"]) == (b1["system_hash"], b1["tools_hash"])
    # the upstream got the CLI's bytes minus the header block, nothing else touched
    for sent, got in zip(cli.client_requests(), cli.upstream.received, strict=True):
        assert got.body == without_header(sent.content or b"")
        assert got.path == sent.path == "/v1/messages?beta=true"
    # the server evidence is what the upstream answered: within A the one slot held A's prefix
    assert a2["cached_tokens"] > 0.9 * a1["prompt_tokens"]
    assert a1["evidence"] == a2["evidence"] == b1["evidence"] == "anthropic-usage"


@requires_cli
def test_observe_mode_shows_the_header_splitting_the_conversations(cli_observe: Setup) -> None:
    recs, headers = run_two_conversations(cli_observe)
    a1, a2, b1 = recs
    assert all(r["rewritten"] is False for r in recs)
    assert a1["system_hash"] == a2["system_hash"] != b1["system_hash"]
    assert (a1["system_hash"], a1["tools_hash"]) != (b1["system_hash"], b1["tools_hash"])
    assert a2["verdict"] == "append-only"
    # nothing was changed: the upstream got the CLI's bytes
    for sent, got in zip(cli_observe.client_requests(), cli_observe.upstream.received, strict=True):
        assert got.body == sent.content


@requires_cli
def test_subagent_flow_main_subagent_main(cli_agent: Setup) -> None:
    out = cli_agent.claude("Look around the repository.", "--allowedTools", "Agent")
    assert cli_agent.answers.sent[0] == [AGENT_CALL]
    assert out["result"] == cli_agent.answers.sent[-1] == "answer 3 from the upstream"
    recs = generations(cli_agent.records(3))
    assert [r["class"] for r in recs] == ["main", "subagent", "main"]
    main1, sub, main2 = recs
    assert main2["verdict"] == "append-only" and main2["stream"] == main1["stream"] != sub["stream"]
    assert all(r["changed"] == {"billing": 1} for r in recs)
    sent = cli_agent.client_requests()
    headers = [header_of(r.content or b"") for r in sent]
    assert headers[1].endswith("; cc_entrypoint=sdk-cli; cc_is_subagent=true;")
    assert headers[0] == headers[2] != headers[1]
    assert len(main1["tool_names"]) > len(sub["tool_names"]) and "Agent" in main1["tool_names"]
    for s, got in zip(sent, cli_agent.upstream.received, strict=True):
        assert got.body == without_header(s.content or b"")
    # the main thread continued with the subagent's result as a tool_result of the Agent call
    last = json.loads(cli_agent.upstream.received[2].body)["messages"]
    tool_use = last[-2]["content"][-1]
    assert tool_use["type"] == "tool_use" and tool_use["name"] == "Agent"
    assert any(
        b.get("type") == "tool_result" and b["tool_use_id"] == tool_use["id"] for b in last[-1]["content"]
    )
