"""core.affinity: the per-conversation routing key and its rule for side/count_tokens requests."""

from __future__ import annotations

import hashlib
import re
from typing import Any

import pytest

from stableprefix.core import affinity
from stableprefix.core.affinity import affinity_value
from stableprefix.core.affinity import header_problem

HEX16 = re.compile(r"[0-9a-f]{16}")


def rec(cls: str | None, session: str | None = None, stream: str | None = "a1b2c3d4") -> dict[str, Any]:
    r: dict[str, Any] = {"host": "127.0.0.1", "path": "/v1/messages", "api": "anthropic-messages"}
    if cls is not None:
        r["class"] = cls
    if session is not None:
        r["session"] = session
    if stream is not None:
        r["stream"] = stream
    return r


def test_known_value_is_a_hash_of_the_session_hash() -> None:
    # The documented derivation, computed here independently: instances behind one load balancer agree.
    want = hashlib.sha256(b"stableprefix-affinity\x00session:0123456789ab").hexdigest()[:16]
    assert affinity_value(rec("main", session="0123456789ab")) == want
    want_side = hashlib.sha256(b"stableprefix-affinity\x00session:0123456789ab\x00side").hexdigest()[:16]
    assert affinity_value(rec("side", session="0123456789ab"), "separate") == want_side


def test_one_conversation_one_key_across_streams_of_its_session() -> None:
    main = affinity_value(rec("main", session="s1", stream="aaaa0001"))
    later = affinity_value(rec("main", session="s1", stream="aaaa0002"))
    sub = affinity_value(rec("subagent", session="s1", stream="bbbb0001"))
    assert main is not None and HEX16.fullmatch(main)
    assert main == later == sub  # the session decides, not the stream
    assert affinity_value(rec("main", session="s2", stream="aaaa0001")) != main


def test_without_a_session_the_stream_decides() -> None:
    a = affinity_value(rec("main", stream="aaaa0001"))
    b = affinity_value(rec("main", stream="aaaa0002"))
    assert a is not None and b is not None and a != b
    assert affinity_value(rec("main", stream="aaaa0001")) == a
    # A session hash equal to a stream id still gives a different key (the two namespaces are apart).
    assert affinity_value(rec("main", session="aaaa0001", stream="zzzz")) != a


@pytest.mark.parametrize("cls", ["side", "count_tokens"])
def test_side_modes(cls: str) -> None:
    main = affinity_value(rec("main", session="s1"))
    same = affinity_value(rec(cls, session="s1"), "same")
    separate = affinity_value(rec(cls, session="s1"), "separate")
    assert same == main
    assert separate is not None and HEX16.fullmatch(separate) and separate != main
    assert affinity_value(rec(cls, session="s1"), "none") is None
    # separate is per class and per conversation
    other = "count_tokens" if cls == "side" else "side"
    assert affinity_value(rec(other, session="s1"), "separate") != separate
    assert affinity_value(rec(cls, session="s2"), "separate") != separate


def test_side_modes_do_not_touch_conversation_turns() -> None:
    keys = {affinity_value(rec("main", session="s1"), m) for m in affinity.SIDE_MODES}
    assert len(keys) == 1 and None not in keys


def test_unanalysed_record_gets_no_key() -> None:
    assert affinity_value(rec(None, stream=None)) is None  # a body the addon left alone
    assert affinity_value(rec(None, session="s1")) is None  # no class: not analysed
    assert affinity_value(rec("main", stream=None)) is None


def test_value_never_carries_record_text() -> None:
    secret = "sk-ant-api03-SECRET"
    r = rec("main", session=secret, stream="prompt text here")
    r["system"] = "You are Claude Code"
    v = affinity_value(r)
    assert v is not None and HEX16.fullmatch(v)
    assert "SECRET" not in v and "sk" not in v


def test_bad_side_mode_raises() -> None:
    with pytest.raises(ValueError, match="'sometimes' is not one of same, none, separate"):
        affinity_value(rec("side"), "sometimes")


@pytest.mark.parametrize("name", ["x-session-id", "X-SMG-Routing-Key", "x_route", "Routing.Key~1"])
def test_header_names_accepted(name: str) -> None:
    assert header_problem(name) is None


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "not an HTTP header name"),
        ("x session", "not an HTTP header name"),
        ("x-key:", "not an HTTP header name"),
        ("x-é", "not an HTTP header name"),
        ("Authorization", "must not overwrite"),
        ("x-api-key", "must not overwrite"),
        ("Content-Length", "must not overwrite"),
        ("host", "must not overwrite"),
        ("transfer-encoding", "must not overwrite"),
    ],
)
def test_header_names_refused(name: str, why: str) -> None:
    problem = header_problem(name)
    assert problem is not None and why in problem
