from __future__ import annotations

import json

import pytest

from stableprefix.core.jsonedit import Delete
from stableprefix.core.jsonedit import Document
from stableprefix.core.jsonedit import Edit
from stableprefix.core.jsonedit import NotAnObject
from stableprefix.core.jsonedit import Replace
from stableprefix.core.jsonedit import apply_edits
from stableprefix.core.jsonedit import dumps

RAW = '{ "b": 1.50, "a": [ {"x": "\\u00e9"} , {"y": 1E5}, 3 ] ,"s":"keep\\/me", "z": {"k": [1,2]} }'


def edit(raw: str, *edits: Replace | Delete) -> str:
    doc = Document.parse(raw.encode())
    out = doc.edited(edits)
    assert json.loads(out) == apply_edits(doc.value, edits)  # text and value edits agree
    return out


def test_no_edits_is_the_same_text() -> None:
    assert edit(RAW) == RAW


def test_replace_keeps_every_other_byte() -> None:
    out = edit(RAW, Replace(("a", 1, "y"), "é"))
    assert out == RAW.replace("1E5", '"é"')


@pytest.mark.parametrize(
    ("index", "expected"),
    [
        (0, '{ "b": 1.50, "a": [ {"y": 1E5}, 3 ] ,'),
        (1, '{ "b": 1.50, "a": [ {"x": "\\u00e9"} , 3 ] ,'),
        (2, '{ "b": 1.50, "a": [ {"x": "\\u00e9"} , {"y": 1E5} ] ,'),
    ],
)
def test_delete_array_element_takes_one_separator(index: int, expected: str) -> None:
    assert edit(RAW, Delete(("a", index))).startswith(expected)


def test_delete_runs_and_everything() -> None:
    assert edit(RAW, Delete(("a", 1)), Delete(("a", 2))).startswith(
        '{ "b": 1.50, "a": [ {"x": "\\u00e9"} ] ,'
    )
    assert edit(RAW, Delete(("a", 0)), Delete(("a", 1)), Delete(("a", 2))).startswith(
        '{ "b": 1.50, "a": [  ] ,'
    )
    assert edit(RAW, Delete(("a", 0)), Delete(("a", 1))).startswith('{ "b": 1.50, "a": [ 3 ] ,')


def test_delete_top_level_members() -> None:
    assert edit(RAW, Delete(("b",))) == RAW.replace('"b": 1.50, ', "")
    assert (
        edit(RAW, Delete(("z",)))
        == '{ "b": 1.50, "a": [ {"x": "\\u00e9"} , {"y": 1E5}, 3 ] ,"s":"keep\\/me" }'
    )


def test_edit_below_a_deleted_node_is_ignored() -> None:
    assert edit(RAW, Delete(("a", 0)), Replace(("a", 0, "x"), "no")) == edit(RAW, Delete(("a", 0)))


def test_nested_and_sibling_edits() -> None:
    out = edit(RAW, Replace(("z", "k", 1), 9), Delete(("a", 2)), Replace(("s",), "new"))
    assert json.loads(out) == {"b": 1.5, "a": [{"x": "é"}, {"y": 100000.0}], "s": "new", "z": {"k": [1, 9]}}
    assert "1.50" in out and "1E5" in out


def test_lone_surrogate_replacement_stays_valid_utf8() -> None:
    assert dumps("a\ud800b") == '"a\\ud800b"'
    out = edit('{"t": "x"}', Replace(("t",), "\ud800"))
    out.encode("utf-8")


@pytest.mark.parametrize(
    "raw", [b"", b"[1]", b"3", b'"s"', b"{", b'{"a":1', b'{"a":1} x', b"\xff{}", b'{"a":1,"a":2}']
)
def test_bad_documents_raise_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError):
        Document.parse(raw)


def test_not_an_object_is_its_own_error() -> None:
    with pytest.raises(NotAnObject):
        Document.parse(b" [ ] ")


def test_apply_edits_is_what_the_spliced_text_reads() -> None:
    """`apply_edits` on the value and `Document.edited` on the text give the same body, deletions in runs,
    at the ends and nested included; the input value is not changed."""
    value = {"a": [0, 1, 2, 3, 4], "b": {"c": [{"d": 1, "e": 2}], "f": 3}, "g": "h"}
    raw = json.dumps(value, indent=1).encode()
    before = json.dumps(value)
    cases: list[list[Edit]] = [
        [Delete(("a", 0)), Delete(("a", 1)), Delete(("a", 4))],
        [Delete(("a", 2)), Replace(("a", 3), "x"), Delete(("b", "f"))],
        [Delete(("b", "c", 0, "d")), Replace(("g",), [1]), Delete(("a", 9)), Delete(("zz",))],
        [Delete(("a",)), Delete(("b",)), Delete(("g",))],
    ]
    for edits in cases:
        assert apply_edits(value, edits) == json.loads(Document.parse(raw).edited(edits))
    assert json.dumps(value) == before
