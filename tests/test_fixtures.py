"""The expected forwarded bodies in tests/fixtures/forwarded/, checked by means independent of the code
under test: the JSON is the client's with the billing header cut as written out here by hand, and the bytes
differ from the client's only by deletions (every other byte as sent)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.support.helpers import FIXTURES
from tests.support.helpers import assert_only_deleted

HEADER_LINE = re.compile(r"\Ax-anthropic-billing-header:[^\n]*\n*")


def cut_cc_2_1_39(body: dict[str, Any]) -> dict[str, Any]:
    del body["system"][0]  # the header is a block of its own
    return body


def cut_string_system(body: dict[str, Any]) -> dict[str, Any]:
    body["system"] = HEADER_LINE.sub("", body["system"])  # glued to the text after it with "\n\n"
    return body


def cut_inline(body: dict[str, Any]) -> dict[str, Any]:
    body["messages"][2]["content"] = HEADER_LINE.sub("", body["messages"][2]["content"])
    del body["messages"][3]  # a system message holding only the header goes
    return body


CASES = {
    "cc_2_1_39_cch.json": cut_cc_2_1_39,
    "string_system.json": cut_string_system,
    "inline_system_message.json": cut_inline,
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_forwarded_fixture_is_the_client_body_with_the_header_cut(name: str) -> None:
    sent = (FIXTURES / name).read_bytes()
    forwarded = (FIXTURES / "forwarded" / name).read_bytes()
    assert json.loads(forwarded) == CASES[name](json.loads(sent))
    assert b"cch=" in assert_only_deleted(sent, forwarded)
