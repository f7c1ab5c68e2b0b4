"""The volatile-field table: one new entry is removed, tagged and explained with no other edit."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from stableprefix.core import pipeline
from stableprefix.core import rules
from stableprefix.core import volatile
from stableprefix.core.analyzer import Analyzer
from stableprefix.report import readers
from stableprefix.report import text as report_text

TICKET = volatile.Field(
    "ticket",
    "the ticket id changed: pin it with --set stableprefix_enable=ticket",
    scopes=("system",),
    guard="TICKET-",
    detect=r"TICKET-\d+",
    pattern=r"TICKET-(?P<n>\d+)",
    action="pin",
    value={"n": "0"},
    enabled=True,
)


def body(ticket: str) -> bytes:
    system = [{"type": "text", "text": f"You are a helpful agent. Working on TICKET-{ticket} today."}]
    tools = [{"name": f"t{i}", "description": "x" * 50, "input_schema": {"type": "object"}} for i in range(4)]
    messages = [{"role": "user", "content": "Fix the parser so that the last token is kept."}]
    return json.dumps({"model": "m", "system": system, "tools": tools, "messages": messages}).encode()


@pytest.fixture
def with_ticket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(volatile, "FIELDS", (*volatile.FIELDS, TICKET))


def test_the_table_is_the_built_in_rule_list() -> None:
    names = [f.name for f in volatile.FIELDS if f.action is not None]
    assert [r.name for r in rules.builtin_rules()] == names
    assert rules.builtin_names()[:3] == ("billing", "date", "git_status")
    assert [r.name for r in rules.builtin_rules() if r.enabled] == ["billing"]
    assert volatile.text_causes() == ("billing", "date", "git_status", "reminder")


def test_a_new_field_is_removed(with_ticket: None) -> None:
    assert "ticket" in rules.builtin_names()
    raw = body("4711")
    result = pipeline.process(
        "POST", "h", "/v1/messages", raw, pipeline.Settings(tuple(rules.builtin_rules()))
    )
    assert result is not None and result.forward is not None
    assert result.forward == raw.replace(b"TICKET-4711", b"TICKET-0")
    assert result.record["changed"] == {"ticket": 1}


def test_a_new_field_is_tagged_and_explained(with_ticket: None, tmp_path: Path) -> None:
    analyzer = Analyzer(pipeline.Settings(tuple(rules.builtin_rules()), observe=True))
    records = []
    for n, ticket in enumerate(("4711", "4712")):
        result = analyzer.request(
            "POST", "h", "/v1/messages", body(ticket), {"x-claude-code-session-id": "s"}
        )
        assert result is not None
        records.append(analyzer.response({**result.record, "ts": n, "id": str(n)}, 200, {}, b"{}"))
    assert records[1]["verdict"] == "changed"
    assert records[1]["cause"] == "ticket"
    assert records[1]["diverged_at"].startswith("system[0]@")
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    text = report_text.render_text(readers.read([log]))
    assert "the ticket id changed: pin it with --set stableprefix_enable=ticket" in text


def test_fields_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        TICKET.name = "other"  # type: ignore[misc]
