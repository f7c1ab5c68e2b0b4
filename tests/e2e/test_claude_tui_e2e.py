"""The real Claude Code CLI's interactive TUI (CLAUDE_BIN) under a pseudo-terminal, through mitmdump with the
addon, with non-essential traffic on: two prompts typed in, its side requests classed ``side``.

Chain: the TUI -> a recording mitmdump without the addon (the bytes the CLI sent) -> mitmdump with the addon
(reverse mode) -> the built-in upstream (one-slot prefix cache simulation, numbered answers).

What the TUI of 2.1.332 needs to start straight at its prompt in a fresh HOME (found by running it): a
``~/.claude.json`` with ``hasCompletedOnboarding: true`` (else the onboarding checks api.anthropic.com and
stops at "Unable to connect"), ``customApiKeyResponses.approved`` holding the last 20 characters of
``ANTHROPIC_API_KEY`` (else "Detected a custom API key ... Do you want to use this API key?", default No),
and ``projects[<repo>].hasTrustDialogAccepted: true`` (the folder trust dialog). No theme dialog comes once
onboarding is marked done. ``CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC`` stays unset, so the CLI sends its
side requests (one-message queries with the small/fast model, e.g. the session title) around the turns.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy import io as mitm_io

from stableprefix.cli import process
from stableprefix.demo.upstream import Reply
from stableprefix.demo.upstream import Upstream
from tests.conftest import MitmFactory
from tests.e2e.test_claude_cli_e2e import CLAUDE_BIN
from tests.e2e.test_claude_cli_e2e import requires_cli
from tests.e2e.test_claude_cli_e2e import without_header
from tests.support.helpers import make_repo
from tests.support.helpers import read_records
from tests.support.helpers import wait_until
from tests.support.tui import Terminal

pytestmark = pytest.mark.e2e

API_KEY = "dummy-key-for-the-tui-test"
PROMPTS = ("Say hello to the project.", "Now say goodbye.")
EVICTION_NOTICE = "side requests (session titles, command checks and other short queries) ran between"


@dataclass
class Numbered:
    """The upstream's replier: answers request n with "reply n from the upstream" and keeps each body, so
    the test can tell which answer went to which request without the addon's code."""

    bodies: dict[str, Any] = field(default_factory=dict)  # reply text -> request body
    _n: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, path: str, body: Any) -> Reply | None:
        if "count_tokens" in path:
            return None
        with self._lock:
            reply = f"reply {next(self._n)} from the upstream"
            self.bodies[reply] = body
        return reply

    def reply_to(self, prompt: str) -> str | None:
        """The answer to the first main request with `prompt` as a user text block (a main request carries
        the tools; side requests carry none)."""
        with self._lock:
            for reply, body in self.bodies.items():  # in the order they came
                if isinstance(body, dict) and body.get("tools") and prompt in user_texts(body):
                    return reply
        return None


def user_texts(body: dict[str, Any]) -> list[str]:
    out = []
    for m in body.get("messages", []):
        if m.get("role") == "user":
            content = m["content"]
            out += [content] if isinstance(content, str) else [b.get("text") for b in content]
    return out


@dataclass
class Tui:
    replier: Numbered
    upstream: Upstream
    addon: process.Proxy
    log: Path
    flows: Path
    url: str
    home: Path
    repo: Path

    def terminal(self) -> Terminal:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "TERM": "xterm-256color",
            "LANG": "C.UTF-8",
            "ANTHROPIC_BASE_URL": self.url,
            "ANTHROPIC_API_KEY": API_KEY,
            "DISABLE_AUTOUPDATER": "1",
        }
        return Terminal([CLAUDE_BIN], cwd=self.repo, env=env)

    def client_requests(self) -> list[http.Request]:
        with self.flows.open("rb") as f:
            flows = [fl for fl in mitm_io.FlowReader(f).stream() if isinstance(fl, http.HTTPFlow)]
        return [fl.request for fl in flows if fl.request.method == "POST"]


def write_settings(home: Path, repo: Path) -> None:
    """The ~/.claude.json that lets the TUI start at its prompt (see the module docstring)."""
    config = {
        "hasCompletedOnboarding": True,
        "customApiKeyResponses": {"approved": [API_KEY[-20:]], "rejected": []},
        "projects": {str(repo): {"hasTrustDialogAccepted": True}},
    }
    (home / ".claude.json").write_text(json.dumps(config))


@pytest.fixture
def tui(mitm: MitmFactory, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Tui]:
    log, flows = tmp_path / "log.jsonl", tmp_path / "client.mitm"
    home = tmp_path / "home"
    home.mkdir()
    repo = make_repo(tmp_path).resolve()
    write_settings(home, repo)
    replier = Numbered()
    with Upstream(replier=replier) as up:
        addon = mitm("--set", f"stableprefix_log={log}", mode=f"reverse:{up.url}")
        recorder = mitm("-w", str(flows), mode=f"reverse:{addon.url}", addon=False)
        yield Tui(replier, up, addon, log, flows, recorder.url, home, repo)
        recorder.stop()  # flushes the flow file
        addon.stop()
    name = getattr(request.function, "record_as", None)
    if (dest := os.environ.get("STABLEPREFIX_RECORD_DIR")) and name:
        Path(dest).mkdir(parents=True, exist_ok=True)
        shutil.copy(flows, Path(dest) / f"{name}.mitm")


def messages_as_rendered(messages: list[dict[str, Any]]) -> list[Any]:
    """Messages as a chat template sees them: a string content as one text block, no cache markers."""

    def unmark(value: Any) -> Any:
        if isinstance(value, list):
            return [unmark(v) for v in value]
        if isinstance(value, dict):
            return {k: unmark(v) for k, v in value.items() if k != "cache_control"}
        return value

    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        out.append({**m, "content": unmark(content)})
    return out


@requires_cli
def test_tui_two_prompts_side_requests_are_side_and_main_turns_append_only(tui: Tui) -> None:
    term = tui.terminal()
    try:
        assert term.wait_for("shift+tab to cycle", timeout=90), f"no prompt: {term.text()[-3000:]}"
        assert not term.shows("Do you want to use this API key") and not term.shows("trust")
        for prompt in PROMPTS:
            mark = len(term.raw)
            term.type(prompt)
            assert wait_until(partial(tui.replier.reply_to, prompt), timeout=120), (
                f"no main request for {prompt!r}: {term.text(mark)[-3000:]}"
            )
            reply = tui.replier.reply_to(prompt)
            assert reply is not None
            assert term.wait_for(reply, timeout=60, since=mark), f"{reply!r} not shown: {term.text(mark)}"
        # the side requests run around the turns; all of them answered and recorded
        assert wait_until(
            lambda: (
                len(tui.upstream.received) >= 3 and len(read_records(tui.log)) == len(tui.upstream.received)
            ),
            timeout=60,
        )
    finally:
        code = term.stop()
    assert code is not None

    received = [json.loads(r.body) for r in tui.upstream.received]
    recs = read_records(tui.log)
    assert len(recs) == len(received)
    # independently of the addon: main turns carry the tools, side queries are one message and no tools
    mains = [b for b in received if b.get("tools")]
    sides = [b for b in received if not b.get("tools")]
    assert len(mains) == 2 and sides, f"{len(mains)} main, {len(sides)} side requests"
    assert all(len(b["messages"]) == 1 for b in sides)
    main_recs = [r for r in recs if r["class"] == "main"]
    side_recs = [r for r in recs if r["class"] == "side"]
    assert len(main_recs) == 2 and len(side_recs) == len(sides)
    assert len(recs) == len(main_recs) + len(side_recs)
    # every request had its billing block cut (the interactive entrypoint is `cli`), nothing else touched
    for r in recs:
        assert r["api"] == "anthropic-messages" and r["status"] == 200
        assert r["changed"] == {"billing": 1} and r["rewritten"] is True
        assert r["billing"]["cc_entrypoint"] == "cli" and r["billing"]["cch"] is False
    sent = tui.client_requests()
    assert sorted(without_header(s.content or b"") for s in sent) == sorted(
        r.body for r in tui.upstream.received
    )
    # the two main turns: one stream, the second append-only, with side requests between them
    m1, m2 = main_recs
    assert (m1["verdict"], m2["verdict"]) == ("first", "append-only")
    assert m1["stream"] == m2["stream"] and all(s["stream"] != m1["stream"] for s in side_recs)
    assert m2["interleaved_side"]
    b1, b2 = mains
    assert (b1["system"], b1["tools"]) == (b2["system"], b2["tools"])
    n = len(b1["messages"])
    assert messages_as_rendered(b2["messages"][:n]) == messages_as_rendered(b1["messages"])
    # The TUI sends side requests concurrently with the turns: whether one reached the one-slot upstream
    # between the two main turns is read from the upstream's own order of arrival, not from the addon.
    order = ["main" if b.get("tools") else "side" for b in received]
    first, second = [i for i, kind in enumerate(order) if kind == "main"]
    if "side" in order[first + 1 : second]:  # the slot was lost: the addon says why, with remedies
        assert m2["cached_tokens"] < 0.5 * m1["prompt_tokens"] and m2["miss"] == "server"
        assert tui.addon.wait_for(EVICTION_NOTICE, timeout=10), tui.addon.output()[-2000:]
    else:  # the side request came after the second turn reached the upstream: the prefix was reused
        assert m2["cached_tokens"] >= 0.5 * m1["prompt_tokens"] and m2["miss"] is None


@requires_cli
def test_tui_context_sends_count_tokens_that_never_break_the_conversation(tui: Tui) -> None:
    """``/context`` between two prompts: the TUI counts the tokens of its system prompt, tools and messages
    with ``/v1/messages/count_tokens`` requests (2.1.332 sends them nowhere else here). They are classed
    ``count_tokens`` with no verdict, pass byte-identical (they carry no billing block), and the second
    turn still extends the first."""
    term = tui.terminal()
    try:
        assert term.wait_for("shift+tab to cycle", timeout=90), f"no prompt: {term.text()[-3000:]}"
        first, second = PROMPTS
        term.type(first)
        assert wait_until(partial(tui.replier.reply_to, first), timeout=120), term.text()[-3000:]
        time.sleep(2)  # the turn's side requests
        term.type("/context")
        assert wait_until(lambda: any("count_tokens" in r.path for r in tui.upstream.received), timeout=60)
        time.sleep(5)  # the rest of them
        term.type(second)
        assert wait_until(partial(tui.replier.reply_to, second), timeout=120), term.text()[-3000:]
        assert wait_until(lambda: len(read_records(tui.log)) == len(tui.upstream.received), timeout=60)
    finally:
        term.stop()

    counted = [r for r in tui.upstream.received if "/v1/messages/count_tokens" in r.path]
    assert counted, "no count_tokens request reached the upstream"
    sent = [r for r in tui.client_requests() if "/v1/messages/count_tokens" in r.path]
    assert sorted(r.content or b"" for r in sent) == sorted(r.body for r in counted)  # byte-identical
    assert not any(b"x-anthropic-billing-header" in r.body for r in counted)
    recs = read_records(tui.log)
    ct = [r for r in recs if r["path"].startswith("/v1/messages/count_tokens")]
    assert len(ct) == len(counted)
    assert all(r["class"] == "count_tokens" and r["verdict"] is None and r["changed"] == {} for r in ct)
    assert all(r["api"] == "anthropic-count-tokens" and r["miss"] is None for r in ct)
    main = [r for r in recs if r["class"] == "main"]
    assert [r["verdict"] for r in main] == ["first", "append-only"] and main[0]["stream"] == main[1]["stream"]
    bodies = [json.loads(r.body) for r in tui.upstream.received if r.path.startswith("/v1/messages?")]
    b1, b2 = [b for b in bodies if b.get("tools")]
    n = len(b1["messages"])  # independently of the addon: the second turn extends the first
    assert len(b2["messages"]) > n and messages_as_rendered(b2["messages"][:n]) == messages_as_rendered(
        b1["messages"]
    )
    assert main[1]["common_prefix_messages"] == n  # compared with the first turn, not with a count


test_tui_context_sends_count_tokens_that_never_break_the_conversation.record_as = "cc_2_1_332_context"  # type: ignore[attr-defined]
