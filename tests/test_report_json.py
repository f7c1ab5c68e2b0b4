"""`stableprefix report --json`: the document's keys are the schema in docs/report-json.md; exact figures."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from stableprefix.cli import main as cli
from stableprefix.report import jsondoc
from stableprefix.report import readers

FIX = Path(__file__).parent / "fixtures"
DOC = Path(__file__).parent.parent / "docs" / "report-json.md"


def documented() -> dict[str, set[str]]:
    """Section name -> keys of its table."""
    out: dict[str, set[str]] = {}
    section = ""
    for line in DOC.read_text().splitlines():
        if line.startswith("### "):
            section = line[4:].strip()
            out[section] = set()
        elif section and (m := re.match(r"\| `([a-z_]+)` \|", line)):
            out[section].add(m.group(1))
    return out


def test_the_document_is_the_documented_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["report", "--json", "--check", str(FIX / "report_session.jsonl")]) == 1
    doc: dict[str, Any] = json.loads(capsys.readouterr().out)
    schema = documented()
    assert set(doc) == schema["document"]
    assert set(doc["totals"]) == schema["totals"]
    assert set(doc["totals"]["rules"]) == schema["rules"]
    assert all(set(s) == schema["stream"] for s in doc["streams"])
    assert all(set(t) == schema["turn"] for s in doc["streams"] for t in s["turns"])
    assert (doc["schema"], doc["version"]) == ("stableprefix-report", jsondoc.VERSION)


def test_figures_are_those_of_the_text_report() -> None:
    """The fixture's figures (tests/test_report.py's docstring works them out by hand)."""
    doc = jsondoc.document(readers.read([FIX / "report_session.jsonl"], progress=False))
    t = doc["totals"]
    assert t["server_reported"] == {"requests": 8, "cached_tokens": 10_620, "prompt_tokens": 23_540}
    assert t["reprocessed_by_cause"]["git_status"]["tokens"] == {"tokens": 2530, "estimated": False}
    assert t["reprocessed_by_cause"]["tools"]["tokens"] == {"tokens": 450, "estimated": True}
    assert t["rules"]["saved"] == {"tokens": 6624, "estimated": True}
    assert t["rules"]["saved_by"] == {"billing": {"tokens": 6624, "estimated": True}}
    assert t["server_side"]["turns"] == 1 and t["server_side"]["tokens"] == {
        "tokens": 3770,
        "estimated": True,
    }
    main = doc["streams"][0]
    assert main["class"] == "main" and [x["verdict"] for x in main["turns"]] == [
        "first", "append-only", "changed", "append-only", "changed", "append-only",
    ]  # fmt: skip
    third = main["turns"][2]
    assert (third["diverged_at"], third["cause"], third["lost"]) == (
        "system[2]@1480", "git_status", {"tokens": 2530, "estimated": False},
    )  # fmt: skip
    assert third["prompt"] == {"tokens": 3550, "estimated": False}
    assert main["turns"][1]["saved"] == {"billing": {"tokens": 3087, "estimated": True}}


def _cross_log(tmp_path: Path, cause: str) -> Path:
    base = {"v": 2, "state": "answered", "class": "main", "status": 200, "host": "h", "system_chars": 8_500,
            "tools_chars": 31_500, "message_chars": [400], "prompt_tokens": 10_000}  # fmt: skip
    rows = [
        {**base, "id": "a", "stream": "s1", "verdict": "first", "cached_tokens": 0},
        {**base, "id": "b", "stream": "s2", "verdict": "first", "cached_tokens": 12, "nearest_stream": "s1",
         "diverged_at": "system[0]@46", "cause": cause, "reusable_chars": 46, "shareable_chars": 40_000},
    ]  # fmt: skip
    log = tmp_path / f"{cause}.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return log


def test_check_cross_fails_on_a_conversation_start_the_rules_could_have_kept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = _cross_log(tmp_path, "billing")
    assert cli.main(["report", "--check", str(log)]) == 0  # --check keeps its meaning
    capsys.readouterr()
    assert cli.main(["report", "--check", "--cross", str(log)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and "diverged at system[0]@46 (cause billing, rule billing)" in out[0]
    assert cli.main(["report", "--json", "--check", "--cross", str(log)]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["check"]["cross"] is True and len(doc["check"]["failed"]) == 1
    assert doc["totals"]["cross_conversation_turns"] == 1
    # another system prompt (a subagent) is by design: no rule could have kept it
    assert cli.main(["report", "--check", "--cross", str(_cross_log(tmp_path, "system"))]) == 0
