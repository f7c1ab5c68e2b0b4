"""Canonical form, hashes and per-block detail."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stableprefix.core import fingerprint as fpm
from stableprefix.core import shapes
from stableprefix.core.fingerprint import fingerprint
from stableprefix.core.shapes import Api
from stableprefix.demo import samples


def parts(body: dict[str, Any], api: Api = Api.ANTHROPIC) -> shapes.Parts:
    return shapes.parts(api, body)


def canon(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def test_record_fields_and_definitions_unchanged() -> None:
    body = samples.Session().request(3)
    fp = fingerprint(parts(body))
    assert list(fp.as_record()) == [
        "system_hash",
        "tools_hash",
        "tool_names",
        "params_hash",
        "prefix_hash",
        "chain",
        "system_chars",
        "tools_chars",
        "message_chars",
    ]
    sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    system = [b["text"] for b in body["system"]]
    tools = json.loads(json.dumps(body["tools"]))
    assert fp.system_hash == sha(canon(system))
    assert fp.tools_hash == sha(canon(tools))
    params = {"model": body["model"]}
    assert fp.params_hash == sha(canon(params))
    assert fp.prefix_hash == sha((fp.system_hash + fp.tools_hash).encode())
    link = sha((fp.prefix_hash + fp.params_hash).encode())
    for k, m in enumerate(body["messages"]):
        m = json.loads(json.dumps(m))
        for block in m["content"]:
            block.pop("cache_control", None)
        link = sha(link.encode() + canon(m))
        assert fp.chain[k] == link[:16]
        assert fp.message_chars[k] == len(canon(m))
    assert fp.system_chars == sum(len(t) for t in system)
    assert fp.tool_names == [t["name"] for t in body["tools"]]


def test_cache_markers_and_string_content_do_not_change_hashes() -> None:
    a = {
        "model": "m",
        "system": [{"type": "text", "text": "S"}],
        "messages": [{"role": "user", "content": "hi"}],
    }
    b = {
        "model": "m",
        "system": [{"type": "text", "text": "S", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}],
            }
        ],
    }
    fa, fb = fingerprint(parts(a)), fingerprint(parts(b))
    assert (fa.prefix_hash, fa.chain) == (fb.prefix_hash, fb.chain)
    assert fpm.detail(parts(a), a).markers_hash != fpm.detail(parts(b), b).markers_hash
    # message-level markers are not part of markers_hash (they move every turn)
    c = json.loads(json.dumps(b))
    c["messages"][0]["content"][0].pop("cache_control")
    assert fpm.detail(parts(b), b).markers_hash == fpm.detail(parts(c), c).markers_hash


@given(st.text(max_size=60), st.text(max_size=60))
def test_string_content_equals_single_text_block(text: str, sys_text: str) -> None:
    a = {"model": "m", "system": sys_text, "messages": [{"role": "user", "content": text}]}
    b = {"model": "m", "system": [{"type": "text", "text": sys_text}], "messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]}  # fmt: skip
    assert fingerprint(parts(a)) == fingerprint(parts(b))
    assert fpm.detail(parts(a)).messages == fpm.detail(parts(b)).messages


@pytest.mark.parametrize(
    ("text", "causes"),
    [
        ("x-anthropic-billing-header: cc_version=2.1.39.c39; cc_entrypoint=cli; cch=12345;", ["billing"]),
        (
            "<system-reminder>\n# currentDate\nToday's date is 2026-11-29.\n</system-reminder>",
            ["date", "reminder"],
        ),
        ("Env\nToday's date: 2026-11-29\n", ["date"]),
        (
            "intro\n\ngitStatus: This is the git status at the start of the conversation. Status: M a.py",
            ["git_status"],
        ),
        ("Nothing volatile here; gitStatus: maybe, Today's date is unknown.", []),
    ],
)
def test_volatile_masks(text: str, causes: list[str]) -> None:
    assert list(fpm.volatile_masks(text)) == causes


def test_masked_hash_equal_when_only_the_volatile_item_differs() -> None:
    a = "<system-reminder>\nToday's date is 2026-11-29.\n</system-reminder>"
    b = a.replace("29", "30")
    ma, mb = fpm.volatile_masks(a), fpm.volatile_masks(b)
    assert ma["date"] == mb["date"] and ma["reminder"] == mb["reminder"]
    c = fpm.volatile_masks(a.replace("</system-reminder>", "more\n</system-reminder>"))
    assert c["reminder"] == ma["reminder"] and c["date"] != ma["date"]  # another change inside the reminder
    git1 = samples.instructions(2000)
    git2 = git1.replace("M src/app.py", "M src/app.py\nM src/cli.py")
    assert fpm.volatile_masks(git1)["git_status"] == fpm.volatile_masks(git2)["git_status"]
    assert fpm.volatile_masks(git1 + "x").keys() == {"git_status"}


def test_detail_of_a_session_request() -> None:
    body = samples.Session().request(3)
    body["messages"][1]["content"].insert(0, {"type": "thinking", "thinking": "hmm", "signature": "s"})
    p = parts(body)
    d = fpm.detail(p, body)
    assert [b.chars for b in d.system] == [len(b["text"]) for b in body["system"]]
    assert [b.hash for b in d.system] == [
        hashlib.sha256(b["text"].encode()).hexdigest()[:16] for b in body["system"]
    ]
    assert dict(d.system[2].masks).keys() == {"git_status"} and dict(d.system[0].masks).keys() == {"billing"}
    assert [t[0] for t in d.tools] == p.tool_names
    assert d.tools[0][2] == len(canon(body["tools"][0]))
    fp = fingerprint(p)
    assert [m.chars for m in d.messages] == fp.message_chars
    assert [m.role for m in d.messages] == ["user", "assistant", "user", "assistant", "user"]
    assert [b.kind for b in d.messages[1].blocks] == ["thinking", "text", "tool_use"]
    assert [b.kind for b in d.messages[2].blocks] == ["tool_result"]
    first = d.messages[0]
    assert dict(first.blocks[0].masks).keys() == {"date", "reminder"}
    assert first.blocks[1].masks == ()


def test_message_key_survives_date_rollover_not_task_change() -> None:
    m1 = samples.first_user_message("Fix it.", date="2026-11-29")
    m2 = samples.first_user_message("Fix it.", date="2026-11-30")
    m3 = samples.first_user_message("Do something else.", date="2026-11-29")
    d1, d2, d3 = (fpm.message_detail(m) for m in (m1, m2, m3))
    assert d1.hash != d2.hash and d1.key == d2.key
    assert d1.key != d3.key


def test_tool_result_cleared_flag_and_mask() -> None:
    old = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "line 1\nline 2"}
    new = {
        "type": "tool_result",
        "tool_use_id": "toolu_1",
        "content": [{"type": "text", "text": fpm.CLEARED_TOOL_RESULT}],
    }
    other = {"type": "tool_result", "tool_use_id": "toolu_2", "content": fpm.CLEARED_TOOL_RESULT}
    bo, bn, bx = (fpm.message_detail({"role": "user", "content": [b]}).blocks[0] for b in (old, new, other))
    assert (bo.cleared, bn.cleared, bx.cleared) == (False, True, True)
    assert bo.mask("tool_result_cleared") == bn.mask("tool_result_cleared") != bx.mask("tool_result_cleared")


def test_message_detail_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fpm, "_MESSAGE_CACHE_CAP", 3)
    fpm._MESSAGE_CACHE.clear()
    for i in range(5):
        fpm.message_detail({"role": "user", "content": f"m{i}"})
    assert len(fpm._MESSAGE_CACHE) == 3
    again = fpm.message_detail({"role": "user", "content": "m4"})
    assert again is fpm.message_detail({"role": "user", "content": [{"type": "text", "text": "m4"}]})


def test_detail_other_apis() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "You are helpful. Today's date is 2026-11-29."},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "tool_calls": [{"id": "1"}]},
        ],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    }
    d = fpm.detail(parts(body, Api.OPENAI_CHAT), body)
    assert len(d.system) == 1 and dict(d.system[0].masks).keys() == {"date"}
    assert [t[0] for t in d.tools] == ["f"]
    assert [m.role for m in d.messages] == ["user", "assistant"] and d.messages[1].blocks == ()


def test_the_memo_is_bounded_in_bytes_least_recently_used_out() -> None:
    values = [{"role": "user", "content": str(i) * 100} for i in range(4)]
    keys = [orjson.dumps(v) for v in values]
    one = len(keys[0]) + len(fpm.canonical_dump(values[0])) + fpm.MEMO_ENTRY_BYTES  # what an entry counts
    memo = fpm.CanonicalMemo(cap_bytes=3 * one + one // 2)  # room for three
    memo.entries(values[:3])
    assert len(memo) == 3
    memo.entries(values[:1])  # the first is used again: the second is now the oldest
    memo.entries(values[3:])
    assert len(memo) == 3 and memo.size <= memo.cap_bytes
    assert set(memo._items) == {keys[0], keys[2], keys[3]}


def test_values_orjson_refuses_are_computed_not_memoised() -> None:
    memo = fpm.CanonicalMemo()
    big, lone = {"n": 2**70}, {"t": "\ud800"}
    got = memo.entries([big, lone])
    assert [d for d, _ in got] == [
        b'{"n":1180591620717411303424}',
        '{"t":"\ud800"}'.encode("utf-8", "surrogatepass"),
    ]
    assert len(memo) == 0


def test_chain_steps_are_remembered_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A remembered step gives the link hashing would give; past the cap the oldest half goes."""
    monkeypatch.setattr(fpm, "_LINKS", {})
    monkeypatch.setattr(fpm, "LINKS_CAP", 10)
    messages = [{"role": "user", "content": f"turn {i}"} for i in range(8)]
    body = {"system": "s", "messages": messages}
    first = fpm.fingerprint(parts(body))
    assert len(fpm._LINKS) == 8
    again = fpm.fingerprint(parts(body))  # every step from memory
    assert again.chain == first.chain
    link = fpm.sha(f"{first.prefix_hash}{first.params_hash}".encode())
    for data, want in zip(first.message_bytes, first.chain, strict=True):
        link = hashlib.sha256(link.encode() + data).hexdigest()
        assert link[: fpm.CHAIN_HEX] == want
    longer = {
        "system": "s",
        "messages": [*messages, *({"role": "user", "content": f"x{i}"} for i in range(4))],
    }
    fpm.fingerprint(parts(longer))
    assert len(fpm._LINKS) <= 10
