"""The pure core over request bodies of several Claude Code versions (tests/fixtures/)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from stableprefix.core import pipeline
from stableprefix.core import rules as rulelib
from stableprefix.core.pipeline import Settings
from tests.support.helpers import FIXTURES
from tests.support.helpers import load_fixture

DROP = Settings()
PIN = Settings(rules=tuple(rulelib.builtin_rules("pin")))
OFF = Settings(rules=tuple(rulelib.builtin_rules("off")))
ID = "You are Claude Code, Anthropic's official CLI for Claude."


def run(name: str, settings: Settings = DROP, path: str = "/v1/messages?beta=true", host: str = "127.0.0.1"):
    raw = (FIXTURES / name).read_bytes()
    result = pipeline.process("POST", host, path, raw, settings)
    assert result is not None
    return raw, result


def forwarded(raw: bytes, result: pipeline.Result) -> dict[str, Any]:
    return json.loads(result.forward if result.forward is not None else raw)


def system_texts(body: dict[str, Any]) -> list[str]:
    s = body["system"]
    return [s] if isinstance(s, str) else [b["text"] for b in s]


@pytest.mark.parametrize(
    "name",
    ["cc_2_1_39_cch.json", "cc_2_1_177_sdk_cch.json", "cc_2_1_181_nocch.json", "cc_workload_cron.json"],
)
def test_drop_removes_the_header_block_and_nothing_else(name: str) -> None:
    raw, result = run(name)
    original = json.loads(raw)
    out = forwarded(raw, result)
    assert out["system"] == original["system"][1:]
    assert {k: v for k, v in out.items() if k != "system"} == {
        k: v for k, v in original.items() if k != "system"
    }
    assert result.record["changed"] == {"billing": 1}
    assert result.record["rewritten"] is True


def test_drop_in_string_system_strips_only_the_line() -> None:
    raw, result = run("string_system.json")
    out = forwarded(raw, result)
    assert out["system"].startswith(ID)
    assert out["system"] == json.loads(raw)["system"].split("\n\n", 1)[1]


def test_drop_glued_first_block_keeps_the_block() -> None:
    raw, result = run("glued_first_block.json")
    out = forwarded(raw, result)
    assert system_texts(out)[0] == ID and len(out["system"]) == 2


def test_inline_system_messages_lose_the_header_and_stay_in_place() -> None:
    raw, result = run("inline_system_message.json")
    out = forwarded(raw, result)
    roles = [m["role"] for m in out["messages"]]
    assert roles == ["user", "assistant", "system", "user"]  # header-only system message removed, none moved
    assert out["messages"][2]["content"] == "The user switched to plan mode."
    assert result.record["changed"] == {"billing": 2}


def test_header_text_in_user_assistant_and_tool_content_is_left_alone() -> None:
    raw, result = run("header_in_user_and_tool.json")
    assert result.forward is None  # nothing in system position: byte-identical
    assert result.record["changed"] == {}


def test_duplicate_header_blocks_are_both_dropped() -> None:
    raw, result = run("duplicate_header.json")
    assert system_texts(forwarded(raw, result))[0] == ID
    assert result.record["changed"] == {"billing": 2}


def test_header_block_with_cache_control_is_dropped_whole() -> None:
    raw, result = run("header_cache_control.json")
    out = forwarded(raw, result)
    assert system_texts(out)[0] == ID
    assert "cache_control" not in out["system"][0]


def test_count_tokens_without_system_is_untouched() -> None:
    raw, result = run("count_tokens_no_system.json", path="/v1/messages/count_tokens?beta=true")
    assert result.forward is None
    assert result.record["api"] == "anthropic-count-tokens"


@pytest.mark.parametrize("name", ["cc_2_1_39_cch.json", "cc_2_1_177_sdk_cch.json", "glued_first_block.json"])
def test_pin_fixes_volatile_values_and_keeps_the_line(name: str) -> None:
    raw, result = run(name, PIN)
    first = system_texts(forwarded(raw, result))[0]
    assert first.startswith("x-anthropic-billing-header: cc_version=2.1.")
    assert ".fff; " in first and "cch=fffff;" in first
    again = pipeline.process("POST", "h", "/v1/messages", result.forward or raw, PIN)
    assert again is not None and again.forward is None  # pinned bytes are stable: nothing left to change


def test_pin_without_cch_only_pins_the_suffix() -> None:
    raw, result = run("cc_2_1_181_nocch.json", PIN)
    first = system_texts(forwarded(raw, result))[0]
    assert first == "x-anthropic-billing-header: cc_version=2.1.181.fff; cc_entrypoint=sdk-cli;"


def test_off_forwards_byte_identical() -> None:
    raw, result = run("cc_2_1_39_cch.json", OFF)
    assert result.forward is None and result.record["changed"] == {}


def test_rewrite_keeps_formatting_outside_the_edit() -> None:
    raw, result = run("cc_2_1_39_cch.json")
    assert result.forward is not None
    text, new = raw.decode(), result.forward.decode()
    cut = text.index('{\n   "type": "text",\n   "text": "x-anthropic')
    assert new == text[:cut] + text[text.index("{", cut + 1) :]


def test_passthrough_host_is_hashed_not_rewritten() -> None:
    raw, result = run("cc_2_1_39_cch.json", host="api.anthropic.com")
    assert result.forward is None and result.record["passthrough"] is True
    raw, result = run("cc_2_1_39_cch.json", host="eu.api.anthropic.com")
    assert result.forward is None


def test_observe_reports_what_it_would_remove() -> None:
    raw, result = run("cc_2_1_39_cch.json", Settings(observe=True))
    assert result.forward is None
    assert result.record["would_change"] == {"billing": 1} and result.record["changed"] == {}


def test_prefix_hash_is_stable_across_cch_and_suffix_only_with_the_rule() -> None:
    a = json.loads((FIXTURES / "cc_2_1_39_cch.json").read_bytes())
    b = json.loads(json.dumps(a).replace("cch=56445", "cch=0a1b2").replace(".c39;", ".e91;"))
    hashes = {}
    for label, settings in (("drop", DROP), ("off", OFF)):
        ra = pipeline.process("POST", "h", "/v1/messages", json.dumps(a).encode(), settings)
        rb = pipeline.process("POST", "h", "/v1/messages", json.dumps(b).encode(), settings)
        assert ra and rb
        hashes[label] = (ra.record["prefix_hash"], rb.record["prefix_hash"])
    assert hashes["drop"][0] == hashes["drop"][1]
    assert hashes["off"][0] != hashes["off"][1]


def test_records_carry_no_prompt_text_or_ids() -> None:
    raw, result = run("cc_2_1_39_cch.json")
    text = json.dumps(result.record)
    for secret in ("Claude Code", "56445", "5f0c5a2e", "fix the bug", "c39"):
        assert secret not in text
    assert result.record["billing"] == {
        "cc_version": "2.1.39",
        "cc_entrypoint": "cli",
        "cch": True,
        "cc_workload": None,
    }


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "empty body"),
        (b"not json", "JSONDecodeError"),
        (b'{"messages": [', "JSONDecodeError"),
        (b'{"messages": []', "truncated"),
        (b"[1, 2]", "NotAnObject"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b'{"messages": "x"}', "ShapeError"),
        (b'{"messages": [], "system": 5}', "ShapeError"),
        (b'{"messages": [], "system": ["x"]}', "ShapeError"),
    ],
)
def test_bad_bodies_fail_open_with_a_reason(raw: bytes, reason: str) -> None:
    result = pipeline.process("POST", "h", "/v1/messages", raw, DROP)
    assert result is not None and result.forward is None
    assert result.warning and reason in result.warning
    assert result.record["error"]


def test_unhandled_requests_are_ignored() -> None:
    assert pipeline.process("GET", "h", "/v1/messages", b"{}", DROP) is None
    assert pipeline.process("POST", "h", "/v1/models", b"{}", DROP) is None


def test_session_id_sources() -> None:
    assert pipeline.session_id({"X-Claude-Code-Session-Id": "abc"}, {}) == "abc"
    legacy = {"metadata": {"user_id": "user_" + "a" * 64 + "_account__session_5f0c"}}
    assert pipeline.session_id({}, legacy) == "5f0c"
    modern = {"metadata": {"user_id": json.dumps({"device_id": "d", "session_id": "s-1"})}}
    assert pipeline.session_id({}, modern) == "s-1"
    assert pipeline.session_id({}, {"metadata": "x"}) == ""


def test_fixture_loader_reads_json() -> None:
    assert load_fixture("count_tokens_no_system.json")["model"] == "claude-sonnet-4-5"


def test_an_internal_error_forwards_the_original_with_a_warning() -> None:
    bad = rulelib.Rule(
        "boom", rulelib.parse_scopes(["path:messages"]), "pin", value=object()
    )  # not JSON-serialisable
    raw = (FIXTURES / "cc_2_1_39_cch.json").read_bytes()
    result = pipeline.process("POST", "h", "/v1/messages", raw, Settings(rules=(bad,)))
    assert result is not None and result.forward is None
    assert result.warning and "internal error (TypeError)" in result.warning
