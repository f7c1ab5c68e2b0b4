"""The real Claude Code CLI with a real translating router (claude-code-router, LiteLLM's proxy) and
stableprefix in both positions, to the built-in upstream.

- behind the router: CLI -> router -> recording mitmdump (no addon: the bytes the router sent) -> mitmdump
  with the addon -> upstream. The records are of the OpenAI shape the router sends; the test checks, from
  the router's own bytes, where it put Claude Code's billing header, and that the upstream got exactly those
  bytes with the header deleted and nothing else.
- in front of the router: CLI -> recording mitmdump -> mitmdump with the addon -> router -> upstream. The
  records are Anthropic Messages; the upstream must see no header at all.

Each test runs conversation A (two turns, ``--continue``) and conversation B with another first prompt:
the CLI gives each conversation its own header suffix, so without the addon the two conversations' system
texts differ at the upstream; with it they must be equal (the cacheable system + tools prefix is shared),
and A's second turn must stay append-only. Routers: scripts/install_translators.sh (CCR_BIN, LITELLM_BIN);
the CLI: scripts/install_claude_code.sh (CLAUDE_BIN). Each test is skipped with the reason when one is
missing.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import http
from mitmproxy import io as mitm_io

from stableprefix.demo.upstream import Upstream
from tests.conftest import MitmFactory
from tests.e2e.test_claude_cli_e2e import CLAUDE_BIN
from tests.e2e.test_claude_cli_e2e import Answers
from tests.support import routers
from tests.support.helpers import assert_only_deleted
from tests.support.helpers import make_repo
from tests.support.helpers import read_records
from tests.support.helpers import wait_until

pytestmark = pytest.mark.e2e

HEADER = "x-anthropic-billing-header: "
PROMPTS = (
    ("Say hello to the project.", False),
    ("Now say goodbye.", True),
    ("What does app.py print?", False),
)
ROUTERS = ("claude-code-router", "litellm", "litellm-chat")


def skip_reason(router: str) -> str | None:
    if not CLAUDE_BIN or not Path(CLAUDE_BIN).is_file():
        return 'CLAUDE_BIN is unset: eval "$(bash scripts/install_claude_code.sh)"; export CLAUDE_BIN'
    found = routers.ccr_bin() if router == "claude-code-router" else routers.litellm_bin()
    if found is None:
        return f'{router} is not installed: eval "$(bash scripts/install_translators.sh)"; export CCR_BIN LITELLM_BIN'
    return None


@dataclass
class Chain:
    router: routers.Router
    upstream: Upstream
    answers: Answers
    log: Path
    flows: Path  # what the recording proxy saw: the router's requests (behind) or the CLI's (in front)
    url: str  # where the CLI sends
    home: Path
    repo: Path

    def claude(self, prompt: str, cont: bool) -> dict[str, Any]:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.home),
            "ANTHROPIC_BASE_URL": self.url,
            "ANTHROPIC_API_KEY": self.router.api_key,
            "DISABLE_AUTOUPDATER": "1",
        }
        args = [CLAUDE_BIN, "-p", prompt, "--output-format", "json", *(["--continue"] if cont else [])]
        proc = subprocess.run(args, cwd=self.repo, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, (
            f"claude exited {proc.returncode}: {proc.stdout[-1500:]} {proc.stderr[-1500:]}\n"
            f"router: {self.router.output()[-3000:]}"
        )
        out: dict[str, Any] = json.loads(proc.stdout)
        assert out["is_error"] is False, out
        return out

    def run(self) -> list[dict[str, Any]]:
        """A1, A2 (--continue), B1; the CLI's answers are the upstream's, through the router."""
        results = [self.claude(prompt, cont) for prompt, cont in PROMPTS]
        assert [r["result"] for r in results] == [f"answer {n} from the upstream" for n in (1, 2, 3)]
        assert wait_until(lambda: len(gens(read_records(self.log))) >= 3, timeout=30)
        recs = gens(read_records(self.log))
        assert len(recs) == 3 == len(self.upstream.received), [r.get("class") for r in recs]
        return recs

    def recorded(self) -> list[http.Request]:
        with self.flows.open("rb") as f:
            flows = [fl for fl in mitm_io.FlowReader(f).stream() if isinstance(fl, http.HTTPFlow)]
        return [fl.request for fl in flows if fl.request.method == "POST"]


def gens(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in recs if r.get("class") in ("main", "subagent", "side")]


def start_router(name: str, target: str, tmp_path: Path, home: Path) -> routers.Router:
    if name == "claude-code-router":
        return routers.start_ccr(target, home)
    return routers.start_litellm(target, tmp_path / "litellm", chat=name == "litellm-chat")


@pytest.fixture
def chain(request: pytest.FixtureRequest, mitm: MitmFactory, tmp_path: Path) -> Iterator[Chain]:
    name, position = request.param
    if reason := skip_reason(name):
        pytest.skip(reason)
    log, flows, home = tmp_path / "log.jsonl", tmp_path / "recorded.mitm", tmp_path / "home"
    home.mkdir()
    repo = make_repo(tmp_path)
    answers = Answers()
    addon_args = ["--set", f"stableprefix_log={log}"]
    with Upstream(replier=answers) as up:
        if position == "behind":
            addon = mitm(*addon_args, mode=f"reverse:{up.url}")
            recorder = mitm("-w", str(flows), mode=f"reverse:{addon.url}", addon=False)
            router = start_router(name, recorder.url, tmp_path, home)
            url = router.url
        else:
            router = start_router(name, up.url, tmp_path, home)
            addon = mitm(*addon_args, mode=f"reverse:{router.url}")
            recorder = mitm("-w", str(flows), mode=f"reverse:{addon.url}", addon=False)
            url = recorder.url
        try:
            yield Chain(router, up, answers, log, flows, url, home, repo)
        finally:
            router.stop()
            recorder.stop()  # flushes the flow file
            addon.stop()


def system_of(router: str, body: dict[str, Any]) -> Any:
    """The part of a router's request that carries the system prompt."""
    return body["instructions"] if router == "litellm" else body["messages"][0]


def header_of(router: str, body: dict[str, Any]) -> str:
    """Where the router put Claude Code's billing header, checked against what was measured: its own text
    part, content[0] of the system message (claude-code-router, LiteLLM chat), or glued to the front of
    the Responses API's `instructions` with a newline (LiteLLM's default)."""
    if router == "litellm":
        instructions: str = body["instructions"]
        assert instructions.startswith(HEADER)
        line, _, rest = instructions.partition("\n")
        assert line.endswith("; cc_entrypoint=sdk-cli;") and rest.startswith("You are a Claude agent")
        return line
    system = body["messages"][0]
    assert system["role"] == "system" and isinstance(system["content"], list)
    first: str = system["content"][0]["text"]
    assert first.startswith(HEADER) and first.endswith("; cc_entrypoint=sdk-cli;")
    assert system["content"][1]["text"].startswith("You are a Claude agent")
    return first


def inline_system(router: str, body: dict[str, Any]) -> str:
    """What the router did with the CLI's inline ``role: "system"`` environment message."""
    items = body["input"] if router == "litellm" else body["messages"][1:]
    roles = [m.get("role") for m in items]
    if "system" in roles:
        return "kept as a system message"
    texts = [json.dumps(m.get("content")) for m in items]
    if any("Operator note" in t and "# Environment" in t for t in texts):
        return "turned into a user message"
    return "dropped" if not any("# Environment" in t for t in texts) else "elsewhere"


#: measured with claude-code-router 2.0.0 and LiteLLM 1.108.7 (CLI 2.1.332)
INLINE_SYSTEM = {
    "claude-code-router": "dropped",
    "litellm": "kept as a system message",
    "litellm-chat": "turned into a user message",
}
API = {"claude-code-router": "openai-chat", "litellm": "openai-responses", "litellm-chat": "openai-chat"}
PATH = {
    "claude-code-router": "/v1/chat/completions",
    "litellm": "/v1/responses",
    "litellm-chat": "/v1/chat/completions",
}


@pytest.mark.parametrize("chain", [(r, "behind") for r in ROUTERS], indirect=True, ids=ROUTERS)
def test_stableprefix_behind_the_router_cuts_the_header_in_the_routers_shape(chain: Chain) -> None:
    name = chain.router.name
    a1, a2, b1 = chain.run()
    sent = [json.loads(r.content or b"") for r in chain.recorded()]
    got = [json.loads(r.body) for r in chain.upstream.received]
    # what the router sent: the header in its shape, a suffix per conversation, the inline system message
    headers = [header_of(name, b) for b in sent]
    assert headers[0] == headers[1] != headers[2]
    assert all(inline_system(name, b) == INLINE_SYSTEM[name] for b in sent)
    assert [r.path for r in chain.recorded()] == [PATH[name]] * 3
    # what the upstream got: the router's bytes with the header deleted and nothing else
    for s, g in zip(chain.recorded(), chain.upstream.received, strict=True):
        deleted = assert_only_deleted(s.content or b"", g.body)
        assert deleted.startswith(HEADER.encode())
    # so the two conversations' system prompts are equal at the upstream, and were not as the router sent
    assert system_of(name, got[0]) == system_of(name, got[2])
    assert system_of(name, sent[0]) != system_of(name, sent[2])
    # the records say the same: the shape, the header cut, the system and tools shared across conversations
    for r in (a1, a2, b1):
        assert r["api"] == API[name] and r["class"] == "main" and r["status"] == 200
        assert r["changed"] == {"billing": 1} and r["billing"]["cc_entrypoint"] == "sdk-cli"
    assert (a1["verdict"], a2["verdict"], b1["verdict"]) == ("first", "append-only", "first")
    assert a1["stream"] == a2["stream"] != b1["stream"]
    assert (a1["system_hash"], a1["tools_hash"]) == (b1["system_hash"], b1["tools_hash"])
    # the upstream's one-slot cache: B1 reused the shared system + tools prefix
    assert b1["cached_tokens"] > 0.5 * b1["prompt_tokens"]


@pytest.mark.parametrize("chain", [(r, "front") for r in ROUTERS], indirect=True, ids=ROUTERS)
def test_stableprefix_in_front_of_the_router_cuts_the_header_before_it(chain: Chain) -> None:
    name = chain.router.name
    a1, a2, b1 = chain.run()
    cli_sent = [json.loads(r.content or b"") for r in chain.recorded()]
    got = [json.loads(r.body) for r in chain.upstream.received]
    # the CLI sent the header, one suffix per conversation; the router passed on none of it
    assert all(b["system"][0]["text"].startswith(HEADER) for b in cli_sent)
    assert cli_sent[0]["system"][0] == cli_sent[1]["system"][0] != cli_sent[2]["system"][0]
    assert all(HEADER.encode() not in r.body for r in chain.upstream.received)
    assert [r.path for r in chain.upstream.received] == [PATH[name]] * 3
    assert system_of(name, got[0]) == system_of(name, got[2])
    for r in (a1, a2, b1):
        assert r["api"] == "anthropic-messages" and r["class"] == "main" and r["status"] == 200
        assert r["changed"] == {"billing": 1} and r["billing"]["cc_entrypoint"] == "sdk-cli"
    assert (a1["verdict"], a2["verdict"], b1["verdict"]) == ("first", "append-only", "first")
    assert (a1["system_hash"], a1["tools_hash"]) == (b1["system_hash"], b1["tools_hash"])
    if name == "claude-code-router":
        # measured: claude-code-router 2.0.0 asks for no usage (no stream_options.include_usage), gets none
        # and answers the CLI input_tokens 0: no figure, and the record says why (see the test below)
        assert (a1["evidence"], a1["prompt_tokens"], b1["prompt_tokens"]) == (None, None, None)
        assert a1["evidence_ignored"]
    else:  # LiteLLM passes the upstream's usage on: B1 reused the shared system + tools prefix
        assert a1["evidence"] == "anthropic-usage"
        assert b1["cached_tokens"] > 0.5 * b1["prompt_tokens"] > 0


@pytest.mark.parametrize(
    "chain", [("claude-code-router", "front")], indirect=True, ids=["claude-code-router"]
)
def test_a_zero_usage_from_a_router_is_no_server_figure(chain: Chain) -> None:
    """claude-code-router 2.0.0 answers input_tokens 0 when the upstream sent no usage: a prompt of 0 tokens
    is no figure, so an append-only turn is miss 'unknown', not a server-side miss."""
    a1, a2, b1 = chain.run()
    assert a2["verdict"] == "append-only"
    assert a2["prompt_tokens"] is None and a2["miss"] == "unknown"
