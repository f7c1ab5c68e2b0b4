"""Every API shape carrying every built-in volatile item, over a simulated multi-turn session, through mitmdump.

With the rules on, the prompt prefix the upstream receives is the same on every turn; with them off (the
default: billing only), each request reaches the upstream exactly as the billing rule alone leaves it.
A user rule from a TOML file does the same for fields of its own.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from stableprefix.core import fingerprint
from stableprefix.core import pipeline
from stableprefix.core import shapes
from stableprefix.demo import samples
from stableprefix.demo.upstream import Upstream
from tests.conftest import MitmFactory
from tests.support.helpers import assert_only_deleted
from tests.support.helpers import post

pytestmark = pytest.mark.e2e

PRESETS = ["date", "git_status", "env_block", "resume", "tool_order", "user_id", "cache_control"]
USER_RULES = """
[[rule]]
name = "trace-line"
scope = "system"
match = '\\nTrace: [0-9a-f]+'
action = "drop"

[[rule]]
name = "nonce"
scope = "path:request_nonce"
action = "pin"
value = "n"
"""


def volatile_texts(turn: int) -> tuple[str, str]:
    """A system text and a first user text carrying every built-in volatile item, varied by turn."""
    header = samples.billing_line(suffix=f"{turn:03x}", cch=samples.cch_for(turn))
    system = (
        f"{header}\n\nYou are Claude Code.\nPrimary working directory: /home/u{turn}/proj\n"
        f"OS Version: Linux 6.{turn}\nTrace: {turn:08x}\n\ngitStatus: This is the git status at the start of the "
        f"conversation.\nStatus:\nM file{turn}.py"
    )
    user = (
        f"SessionStart:{'resume' if turn % 2 else 'startup'} hook success: ok\n<session-id>{turn}</session-id>"
        f"\nLast active: {turn}h ago\n# currentDate\nToday's date is 2026-11-{20 + turn}.\nPlease fix the bug."
    )
    return system, user


def tool_list(turn: int, openai: bool) -> list[dict[str, Any]]:
    names = ["Read", "Bash", "mcp__gh__issue", "Edit"]
    random.Random(turn).shuffle(names)
    out = []
    for n in names:
        t: dict[str, Any] = {"name": n, "description": f"{n} tool", "parameters": {"type": "object"}}
        if openai:
            t = {"type": "function", "function": t}
        elif n == names[-1]:
            t["cache_control"] = {"type": "ephemeral"}
        out.append(t)
    return out


def request(api: str, turn: int) -> tuple[str, dict[str, Any]]:
    """(path, body) of `turn` (1-based) of a session in the shape of `api`; history grows per turn."""
    system, user = volatile_texts(turn)
    history = [m for t in range(1, turn) for m in ({"role": "assistant", "content": f"a{t}"}, {"role": "user", "content": f"u{t}"})]  # fmt: skip
    extra = {"request_nonce": f"{turn:x}", "metadata": {"user_id": f"user_{turn}_account__session_{turn}"}}
    if api == "anthropic":
        first = {
            "role": "user",
            "content": [{"type": "text", "text": user, "cache_control": {"type": "ephemeral"}}],
        }
        body = {"model": "m", "system": [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
                "messages": [first, *history], "tools": tool_list(turn, False), **extra}  # fmt: skip
        return "/v1/messages?beta=true", body
    if api == "openai-chat":
        msgs = [
            {"role": "system", "content": system},
            {"role": "user", "content": [{"type": "text", "text": user}]},
        ]
        return "/v1/chat/completions", {
            "model": "m",
            "messages": msgs + history,
            "tools": tool_list(turn, True),
            **extra,
        }
    if api == "openai-responses":
        items = [{"role": "user", "content": [{"type": "input_text", "text": user}]}, *history]
        return "/v1/responses", {
            "model": "m",
            "instructions": system,
            "input": items,
            "tools": tool_list(turn, True),
            **extra,
        }
    if api == "ollama-chat":
        msgs = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        return "/api/chat", {
            "model": "m",
            "messages": msgs + history,
            "tools": tool_list(turn, True),
            **extra,
        }
    assert api == "ollama-generate"
    return "/api/generate", {"model": "m", "system": system, "prompt": user, **extra}


APIS = ["anthropic", "openai-chat", "openai-responses", "ollama-chat", "ollama-generate"]


def stable_part(path: str, raw: bytes) -> str:
    """What must not change between turns: system texts, tools, first message, metadata and the nonce."""
    body = json.loads(raw)
    api = shapes.api_for_path(path)
    assert api is not None
    p = shapes.parts(api, body)
    head = fingerprint.canonical(
        [p.system, p.tools, p.messages[:1], body.get("metadata"), body.get("request_nonce")]
    )
    return fingerprint.sha(fingerprint.canonical_bytes(head))


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    f = tmp_path / "rules.toml"
    f.write_text(USER_RULES)
    return f


def test_all_rules_on_make_every_shape_stable(
    mitm: MitmFactory, upstream: Upstream, rules_file: Path
) -> None:
    enable = [a for p in PRESETS for a in ("--set", f"stableprefix_enable={p}")]
    proxy = mitm(*enable, "--set", f"stableprefix_rules={rules_file}", mode=f"reverse:{upstream.url}")
    assert proxy.port
    for api in APIS:
        seen = set()
        for turn in (1, 2, 3):
            path, body = request(api, turn)
            status, _ = post(proxy.port, path, body, {"x-claude-code-session-id": f"session-{api}"})
            assert status == 200
            got = upstream.received[-1]
            seen.add(stable_part(path, got.body))
            text = got.body.decode()
            for gone in ("x-anthropic-billing-header", "gitStatus:", "Trace:", "<session-id>", "Last active:", "cache_control"):  # fmt: skip
                assert gone not in text, (api, turn, gone)
            assert "Today's date is 2026-11-21." in text  # the first date of the conversation, kept (sticky)
        assert len(seen) == 1, api


def test_rules_off_leave_everything_but_billing(mitm: MitmFactory, upstream: Upstream) -> None:
    proxy = mitm(mode=f"reverse:{upstream.url}")
    assert proxy.port
    for api in APIS:
        seen = set()
        for turn in (1, 2, 3):
            path, body = request(api, turn)
            raw = json.dumps(body).encode()
            post(proxy.port, path, raw)
            got = upstream.received[-1]
            expected = pipeline.process("POST", "127.0.0.1", path, raw, pipeline.Settings())
            assert expected is not None and expected.record["changed"] == {"billing": 1}
            assert got.body == expected.forward  # the proxy forwards what the core made ...
            assert_only_deleted(raw, got.body)  # ... which is the client's bytes with the header cut out
            seen.add(stable_part(path, got.body))
        assert len(seen) == 3, api  # the other volatile items still change every turn
