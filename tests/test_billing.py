from __future__ import annotations

import pytest

from stableprefix.core import billing

FORMS = [
    "x-anthropic-billing-header: cc_version=2.1.39.c39; cc_entrypoint=cli; cch=56445;",
    "x-anthropic-billing-header: cc_version=2.1.181.73f; cc_entrypoint=sdk-cli;",
    "x-anthropic-billing-header: cc_version=2.1.220.134; cc_entrypoint=cli; cc_workload=cron;",
    "x-anthropic-billing-header: cc_version=2.1.39.c39; cc_entrypoint=cli; cch=56445; cc_new=x-y_z; other=;",
    "x-anthropic-billing-header: cc_version=2.1.39; cc_entrypoint=unknown;",
]


@pytest.mark.parametrize("line", FORMS)
def test_whole_header_forms(line: str) -> None:
    assert billing.is_whole(line)
    h = billing.find(line)
    assert h is not None and h.end == len(line)
    assert h.fields["cc_entrypoint"] in ("cli", "sdk-cli", "unknown")


@pytest.mark.parametrize("sep", ["", "\n", "\n\n", "\r\n"])
def test_glued_header_ends_before_the_text(sep: str) -> None:
    text = FORMS[0] + sep + "You are Claude Code."
    h = billing.find(text)
    assert h is not None
    assert text[h.end :] == "You are Claude Code."
    assert not billing.is_whole(text)


def test_anchored_at_start_only() -> None:
    assert billing.find("hello " + FORMS[0]) is None
    assert billing.find("x-anthropic-billing-header") is None  # no colon
    assert billing.find("  " + FORMS[0]) is not None  # leading blanks tolerated


def test_fields_and_volatile_spans() -> None:
    line = FORMS[0]
    h = billing.find(line)
    assert h is not None
    assert h.fields == {"cc_version": "2.1.39.c39", "cc_entrypoint": "cli", "cch": "56445"}
    spans = {line[s:e]: c for s, e, c in h.volatile}
    assert spans == {"56445": billing.PINNED_CCH, "c39": billing.PINNED_SUFFIX}


def test_no_suffix_no_cch_means_nothing_volatile() -> None:
    h = billing.find(FORMS[4])
    assert h is not None and h.volatile == ()


def test_header_without_pairs_or_trailing_semicolon() -> None:
    assert billing.is_whole("x-anthropic-billing-header:")
    # an unterminated pair is not part of the header: the header ends before it
    h = billing.find("x-anthropic-billing-header: cc_version=2.1.39.c39; cch=1")
    assert h is not None and h.fields == {"cc_version": "2.1.39.c39"}


def test_find_all_stacked_headers_with_their_own_fields() -> None:
    second = FORMS[1]
    text = FORMS[0] + "\n" + second + "\n\nrest"
    found = billing.find_all(text)
    assert [h.fields["cc_version"] for h in found] == ["2.1.39.c39", "2.1.181.73f"]
    assert text[found[-1].end :] == "rest"
    assert [text[s:e] for s, e, _ in found[1].volatile] == ["73f"]
    assert billing.is_whole(FORMS[0] + FORMS[1]) and billing.find_all("no header") == []
