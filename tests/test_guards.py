"""Rule guards (issue 13): the literals a body must hold for a rule to fire, and the bytes-level scan that
lets a body with none of them go out without a parse. Checked against the parse-everything path."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from stableprefix.core import pipeline
from stableprefix.core import rules as rulelib
from stableprefix.demo import samples

ALL = tuple(rulelib.switch(rulelib.builtin_rules(), rulelib.builtin_names()))


def test_builtin_guards_come_from_the_rule_definitions() -> None:
    guards = {r.name: r.guard for r in ALL}
    assert guards["billing"] == ("x-anthropic-billing-header",)
    assert guards["date"] == ("Today's date",)
    assert guards["env_block"] == ("orking directory: ", "OS Version: ")
    assert guards["resume.last_active"] == ("Last active:",)
    assert guards["cache_control"] == ("cache_control",)
    assert guards["tool_order"] == ("tools",)


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        (r"foo(bar)+|bazz", ("foo", "bazz")),
        (r"(?:hello)?world", ("world",)),
        (r"a.*b", None),  # nothing of 3+ characters is required
        (r"(?i)secret", None),  # case-insensitive: the bytes may differ
        (r"[[:alpha:]]+token", None),  # POSIX class: Python would read it differently from RE2
        (r"\pLabc", None),  # RE2-only syntax
        (r"x(?i:abc)defg", ("defg",)),
        (r"path/to/file", ("path",)),  # JSON may write "/" as "\/": guards stop at it
    ],
)
def test_required_literals(pattern: str, expected: tuple[str, ...] | None) -> None:
    assert rulelib.required_literals(pattern) == expected


def test_a_user_rule_without_a_literal_parses_every_body() -> None:
    rule = rulelib.make_rule({"name": "x", "scope": "system", "action": "drop", "match": r"\d+"})
    assert rule.guard is None
    assert rulelib.guard_hits([rule], b'{"model":"m"}')


def _bodies() -> list[bytes]:
    s = samples.Session()
    plain = s.request(2)
    plain["system"] = plain["system"][1:]  # no billing header
    escaped = json.dumps(s.request(1)).replace(
        "x-anthropic-billing-header", "\\u0078-anthropic-billing-header"
    )
    return [
        json.dumps(s.request(1)).encode(),
        json.dumps(s.request(3), ensure_ascii=False, separators=(",", ":")).encode(),
        json.dumps(plain).encode(),
        escaped.encode(),  # the header spelled with an escape: no literal bytes, still found
        b'{"model":"m","messages":[{"role":"user","content":"hi"}]}',
        b'{"model":"m","messages":[oops',
    ]


@pytest.mark.parametrize("rules", [pipeline.Settings().rules, ALL], ids=["billing", "all"])
@pytest.mark.parametrize("observe", [False, True])
def test_guarded_path_gives_the_same_bytes_and_record_as_parsing_everything(
    rules: tuple[rulelib.Rule, ...], observe: bool
) -> None:
    unguarded = tuple(replace(r, guard=None) for r in rules)
    for r in unguarded:  # guard=None is re-derived: force "always parse" the way a guardless rule has it
        object.__setattr__(r, "guard", None)
    for raw in _bodies():
        out: list[Any] = []
        for rs in (rules, unguarded):
            settings = pipeline.Settings(rules=rs, observe=observe)
            res = pipeline.process("POST", "h", "/v1/messages", raw, settings, {}, rulelib.StickyMemory())
            assert res is not None
            out.append((res.forward, res.record, res.warning))
        assert out[0] == out[1]


def test_no_guard_no_parse_on_the_forwarding_path() -> None:
    s = samples.Session()
    body = s.request(1)
    body["system"] = body["system"][1:]
    fwd = pipeline.forward("POST", "h", "/v1/messages", json.dumps(body).encode(), pipeline.Settings())
    assert fwd is not None and fwd.doc is None and fwd.forward is None  # not parsed; sent as it came
    hit = pipeline.forward(
        "POST", "h", "/v1/messages", json.dumps(s.request(1)).encode(), pipeline.Settings()
    )
    assert hit is not None and hit.doc is not None and hit.forward is not None
    escaped = json.dumps(s.request(1)).replace("x-anthropic", "\\u0078-anthropic").encode()
    esc = pipeline.forward("POST", "h", "/v1/messages", escaped, pipeline.Settings())
    assert esc is not None and esc.forward is not None and b"anthropic-billing" not in esc.forward
