from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from stableprefix.core import rules as rl
from stableprefix.core import shapes
from stableprefix.core.jsonedit import Delete
from stableprefix.core.jsonedit import Replace
from stableprefix.core.jsonedit import apply_edits

H = "x-anthropic-billing-header: cc_version=2.1.39.c39; cc_entrypoint=cli; cch=56445;"
GIT = "\n\ngitStatus: This is the git status at the start of the conversation. Note\nStatus:\nM a.py"


def run(body: dict[str, Any], rules: list[rl.Rule], path: str = "/v1/messages", session: str = "s",
        sticky: rl.StickyMemory | None = None) -> tuple[dict[str, Any], dict[str, int]]:  # fmt: skip
    shape = shapes.detect(path, body)
    assert shape is not None
    out = rl.apply(shape, rules, session, sticky)
    return apply_edits(body, out.edits), dict(out.fired)


def on(*names: str, mode: str = "drop") -> list[rl.Rule]:
    return rl.switch(rl.builtin_rules(mode), on=names)


def test_only_billing_is_on_by_default() -> None:
    assert [r.name for r in rl.builtin_rules() if r.enabled] == ["billing"]
    assert rl.builtin_rules("off")[0].name == "date"
    assert set(rl.builtin_names()) == {
        "billing", "date", "git_status", "env_block", "resume", "tool_order", "user_id", "cache_control",
        "inline_system",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "system", "content": H + "\nYou are"}]},
         {"messages": [{"role": "system", "content": "You are"}]}),
        ("/v1/chat/completions", {"messages": [{"role": "developer", "content": [{"type": "text", "text": H},
                                                                                 {"type": "text", "text": "id"}]}]},
         {"messages": [{"role": "developer", "content": [{"type": "text", "text": "id"}]}]}),
        ("/v1/responses", {"instructions": H + "\n\nYou are a Claude agent"},
         {"instructions": "You are a Claude agent"}),
        ("/v1/responses", {"instructions": "x", "input": [{"role": "system", "content": H}]},
         {"instructions": "x", "input": []}),
        ("/api/chat", {"messages": [{"role": "system", "content": H + "You are"}, {"role": "user", "content": H}]},
         {"messages": [{"role": "system", "content": "You are"}, {"role": "user", "content": H}]}),
        ("/api/generate", {"system": H + "\n\nsys", "prompt": H}, {"system": "sys", "prompt": H}),
    ],
)  # fmt: skip
def test_billing_in_every_shape(path: str, body: dict[str, Any], expected: dict[str, Any]) -> None:
    out, fired = run(body, rl.builtin_rules(), path)
    assert out == expected and sum(fired.values()) >= 1


def test_date_sticky_keeps_the_first_date_per_conversation() -> None:
    memory = rl.StickyMemory()
    day1 = {"messages": [{"role": "user", "content": "x\nToday's date is 2026-11-29.\n"}]}
    day2 = {"messages": [{"role": "user", "content": "x\nToday's date is 2026-11-30.\n"}]}
    assert run(day1, on("date"), sticky=memory)[0] == day1
    out, fired = run(day2, on("date"), sticky=memory)
    assert out == day1 and fired == {"date": 1}
    assert run(day2, on("date"), session="other", sticky=memory)[0] == day2  # another conversation
    assert run(day2, rl.builtin_rules(), sticky=memory)[0] == day2  # off by default


def test_git_status_drop_and_env_block_pin() -> None:
    text = "intro\nPrimary working directory: /home/a/proj\nOS Version: Linux 6.1" + GIT
    body = {"system": [{"type": "text", "text": text}], "messages": []}
    out, fired = run(body, on("git_status", "env_block"))
    assert out["system"][0]["text"] == "intro\nPrimary working directory: /workspace\nOS Version: unknown"
    assert fired == {"git_status": 1, "env_block": 2}
    assert run(out, on("git_status", "env_block"))[1] == {}  # idempotent


def test_git_status_alone_in_a_block_removes_the_block() -> None:
    body = {"system": [{"type": "text", "text": "a"}, {"type": "text", "text": GIT.lstrip()}], "messages": []}
    assert run(body, on("git_status"))[0]["system"] == [{"type": "text", "text": "a"}]


def test_resume_preset_switches_all_its_rules() -> None:
    text = "SessionStart:resume hook success: ok\n<session-id>abc</session-id>\nLast active: yesterday\nrest"
    body = {"messages": [{"role": "user", "content": text}]}
    out, fired = run(body, on("resume"))
    assert out["messages"][0]["content"] == "SessionStart:startup hook success: ok\nrest"
    assert fired == {"resume.hook": 1, "resume.session_id": 1, "resume.last_active": 1}


def test_tool_order_user_id_cache_control() -> None:
    body = {
        "system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "u", "cache_control": {"type": "x"}}]}
        ],
        "tools": [
            {"name": "mcp__a"},
            {"name": "Read"},
            {"name": "Bash", "cache_control": {"type": "ephemeral"}},
        ],
        "metadata": {"user_id": "user_1_session_2"},
    }
    out, fired = run(body, on("tool_order", "user_id", "cache_control"))
    assert [t["name"] for t in out["tools"]] == ["Bash", "Read", "mcp__a"]
    assert out["metadata"]["user_id"] == "stableprefix"
    assert "cache_control" not in json.dumps(out)
    assert fired == {"tool_order": 1, "user_id": 1, "cache_control": 3}
    assert run(out, on("tool_order", "user_id", "cache_control"))[1] == {}


def test_system_rules_never_touch_user_text() -> None:
    body = {"system": "a", "messages": [{"role": "user", "content": H + GIT}]}
    assert run(body, on("git_status"))[0] == body


def test_user_rule_with_groups_and_path_rule() -> None:
    rule = rl.make_rule({"name": "ticket", "scope": ["system", "messages:*"], "match": r"Ticket: (?P<id>[A-Z]+-\d+)",
                         "action": "mask", "value": {"id": "T-0"}})  # fmt: skip
    body = {"system": "Ticket: AB-12 here", "messages": [{"role": "assistant", "content": "Ticket: CD-3"}]}
    out, fired = run(body, [rule])
    assert out == {
        "system": "Ticket: T-0 here",
        "messages": [{"role": "assistant", "content": "Ticket: T-0"}],
    }
    assert fired == {"ticket": 2}
    pin = rl.make_rule({"name": "rid", "scope": "path:metadata.request_id", "action": "pin", "value": "0"})
    assert run({"messages": [], "metadata": {"request_id": "r9"}}, [pin])[0]["metadata"] == {
        "request_id": "0"
    }
    drop = rl.make_rule({"name": "d", "scope": "path:tools[*].strict", "action": "drop"})
    tools = [{"name": "a", "strict": True}, {"name": "b"}]
    assert run({"messages": [], "tools": tools}, [drop])[0]["tools"] == [{"name": "a"}, {"name": "b"}]


def test_edits_are_replace_or_delete_of_slots_only() -> None:
    body = {"system": [{"type": "text", "text": H}, {"type": "text", "text": "a" + GIT}], "messages": []}
    shape = shapes.detect("/v1/messages", body)
    assert shape is not None
    out = rl.apply(shape, on("git_status"))
    assert out.edits == [Delete(("system", 0)), Replace(("system", 1, "text"), "a")]


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ({"name": "x", "scope": "system", "action": "drop"}, "needs 'match'"),
        ({"name": "x", "scope": "system", "match": "(", "action": "drop"}, "bad regex"),
        ({"name": "x", "scope": "system", "match": r"(a)\1", "action": "drop"}, "bad regex"),
        ({"name": "x", "scope": "body", "match": "a", "action": "drop"}, "unknown scope"),
        ({"name": "x", "scope": "messages:robot", "match": "a", "action": "drop"}, "unknown scope"),
        ({"name": "x", "scope": "system", "match": "a", "action": "explode"}, "unknown action"),
        ({"name": "x", "scope": "system", "match": "a", "action": "pin"}, "needs a 'value'"),
        (
            {"name": "x", "scope": "system", "match": "(?P<g>a)", "action": "pin", "value": {"h": "1"}},
            "group",
        ),
        ({"name": "x", "scope": "system", "match": "a", "action": "sort"}, "scope 'tools' only"),
        ({"name": "x", "scope": "tools", "action": "mask"}, "sort or drop"),
        ({"name": "x", "scope": "system", "match": 3, "action": "drop"}, "match must be"),
        ({"name": "x y", "scope": "system", "match": "a", "action": "drop"}, "name must be"),
        ({"name": "x", "scope": [], "match": "a", "action": "drop"}, "scope must be"),
        ({"name": "x", "scope": "path:a..b", "action": "drop"}, "bad path"),
        ({"name": "x", "scope": "system", "match": "a", "action": "drop", "enabled": "yes"}, "enabled"),
        ({"name": "x", "scope": "system", "match": "a", "action": "drop", "colour": 1}, "unknown key"),
    ],
)
def test_make_rule_names_the_problem(spec: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        rl.make_rule(spec)


def test_rules_file_errors_name_file_rule_and_problem(tmp_path: Path) -> None:
    f = tmp_path / "r.toml"
    cases = {
        '[[rule]]\nname = "bad"\nscope = "system"\nmatch = "("\naction = "drop"\n': "rule 'bad': bad regex",
        "[[rule]\n": "not valid TOML",
        "[builtins]\nweather = true\n": "'weather': unknown built-in",
        "[builtins]\ndate = 1\n": "'date': must be true or false",
        "[other]\n": "unknown table",
        '[[rule]]\nname = "billing"\nscope = "system"\nmatch = "a"\naction = "drop"\n': "already used",
        '[[rule]]\nscope = "system"\n': "rule '#1'",
    }
    for text, problem in cases.items():
        f.write_text(text)
        with pytest.raises(rl.RuleError, match=problem) as err:
            rl.load_rules_file(f)
        assert str(f) in str(err.value)
    with pytest.raises(rl.RuleError, match="cannot read"):
        rl.load_rules_file(tmp_path / "missing.toml")


def test_example_rules_file_loads() -> None:
    rs = rl.load_rules_file(Path(__file__).parents[1] / "examples" / "rules.toml")
    assert rs.on == {"date"} and [r.name for r in rs.rules] == [
        "build-id",
        "token-usage-reminder",
        "request-id",
    ]


def test_pathological_regex_is_linear_on_a_megabyte() -> None:
    rule = rl.make_rule({"name": "evil", "scope": "system", "match": r"(a|aa)+$", "action": "drop"})
    body = {"system": "a" * 1_000_000 + "b", "messages": []}
    start = time.perf_counter()
    out, fired = run(body, [rule])
    assert time.perf_counter() - start < 2.0 and fired == {}


def test_path_patterns() -> None:
    assert rl.parse_path_pattern("a.b[*].c[2]") == ("a", "b", None, "c", 2)
    value = {"a": {"b": [{"c": [0, 1, 2]}, {"c": [5]}, {"d": 1}]}}
    assert list(rl.expand_path(value, rl.parse_path_pattern("a.b[*].c[2]"))) == [("a", "b", 0, "c", 2)]
    assert list(rl.expand_path(value, rl.parse_path_pattern("a.b[*].c"))) == [
        ("a", "b", 0, "c"),
        ("a", "b", 1, "c"),
    ]
    for bad in ("", ".a", "a[x]", "a b"):
        with pytest.raises(ValueError):
            rl.parse_path_pattern(bad)


def test_sticky_memory_is_bounded() -> None:
    m = rl.StickyMemory(cap=2)
    assert m.first(("s", "r", "g"), 1) == 1 and m.first(("s", "r", "g"), 2) == 1
    m.first(("t", "r", "g"), 3)
    m.first(("u", "r", "g"), 4)
    assert len(m) == 2 and m.first(("s", "r", "g"), 5) == 5  # evicted, so the new value is first again
    m.clear()
    assert len(m) == 0


def test_path_rules_after_a_deleted_block_hit_the_right_blocks() -> None:
    body = {
        "system": [
            {"type": "text", "text": H},
            {"type": "text", "text": "id", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": "big", "cache_control": {"type": "ephemeral"}},
        ],
        "messages": [],
    }
    out, fired = run(body, on("cache_control"))
    assert out["system"] == [{"type": "text", "text": "id"}, {"type": "text", "text": "big"}]
    assert fired == {"billing": 1, "cache_control": 2}


@pytest.mark.parametrize("sep", ["", "\n", "\n\n"])
def test_stacked_headers_go_in_one_pass(sep: str) -> None:
    body = {"system": H + sep + H + sep + "You are", "messages": []}
    out, fired = run(body, rl.builtin_rules())
    assert out["system"] == "You are" and fired == {"billing": 2}
    pinned, _ = run(body, rl.builtin_rules("pin"))
    assert pinned["system"].count("cch=fffff;") == 2


def test_regex_rules_match_around_lone_surrogates() -> None:
    body = {"system": "a", "messages": [{"role": "user", "content": "\ud800 Today's date is 2026-11-29. x"}]}
    memory = rl.StickyMemory()
    run(body, on("date"), sticky=memory)
    later = {"system": "a", "messages": [{"role": "user", "content": "\ud800 Today's date is 2026-11-30. x"}]}
    assert run(later, on("date"), sticky=memory)[0] == body


def test_slot_scopes_name_what_enabled_text_rules_read() -> None:
    assert rl.slot_scopes(rl.builtin_rules()) == {"system"}
    assert rl.slot_scopes(on("date", "resume")) == {"system", "user"}
    assert rl.slot_scopes(on("tool_order", "user_id", "cache_control")) == {"system"}
    assert rl.slot_scopes(rl.builtin_rules("off")) == set()
    anyrole = rl.make_rule({"name": "x", "scope": "messages:*", "match": "a", "action": "drop"})
    assert rl.slot_scopes([anyrole]) is None


def test_text_guards_are_the_matchers_own_literals() -> None:
    """The literal a message must hold for a text rule to change it comes from the matcher (not from a
    `Rule.guard` set by hand), and a regex without one has none; RE2 is skipped on texts without it."""
    by_name = {r.name: r for r in rl.builtin_rules()}
    assert rl.text_guard(by_name["billing"]) == ("x-anthropic-billing-header",)
    assert rl.text_guard(by_name["date"]) == ("Today's date",)
    assert rl.text_guard(by_name["tool_order"]) is None
    odd = rl.make_rule({"name": "n", "scope": "system", "match": "[0-9]+", "action": "drop"})
    assert rl.text_guard(odd) is None and odd.matcher is not None
    assert odd.matcher.find("a1b22", False) and len(odd.matcher.find("a1b22", False)) == 2
    date = by_name["date"].matcher
    assert date is not None and date.find("no date here", False) == []
    assert [f.targets[0].group for f in date.find("x Today's date is 2025-01-02.", False)] == ["date"]


def test_may_hide_guard_sees_printable_ascii_escapes_only() -> None:
    assert rl.may_hide_guard(b'{"a":"\\u0063ache"}')
    assert rl.may_hide_guard(b'{"a":"\\u007f"}')
    assert not rl.may_hide_guard(b'{"a":"\\u00e9\\u0001\\n"}')
    assert not rl.may_hide_guard(b'{"a":"cache_control"}')
