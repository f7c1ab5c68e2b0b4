"""`jsonedit.RawDocument` (issue 13): the forwarding path's bytes-level editor gives exactly the bytes
`Document` gives, and declines (None / ValueError) whatever it cannot prove."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from stableprefix.core import pipeline
from stableprefix.core import rules as rulelib
from stableprefix.core import shapes
from stableprefix.core.jsonedit import Delete
from stableprefix.core.jsonedit import Document
from stableprefix.core.jsonedit import Edit
from stableprefix.core.jsonedit import RawDocument
from stableprefix.core.jsonedit import Replace
from stableprefix.core.jsonedit import SparseDocument
from stableprefix.demo import samples

scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)


def paths(value: Any, base: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [base] if base else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += paths(v, (*base, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += paths(v, (*base, i))
    return out


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=6), values, min_size=1, max_size=5), st.data())
def test_same_bytes_as_document(body: dict[str, Any], data: st.DataObject) -> None:
    raw = orjson.dumps(body)  # compact, as JSON.stringify writes
    fast = RawDocument.parse(raw)
    assert fast is not None and fast.value == json.loads(raw)
    candidates = paths(body)
    chosen = data.draw(st.lists(st.sampled_from(candidates), max_size=3, unique=True))
    edits: list[Edit] = [
        Delete(p) if data.draw(st.booleans()) else Replace(p, data.draw(scalars)) for p in chosen
    ]
    try:
        expected = Document.parse(raw).edited(edits).encode("utf-8")
    except ValueError:
        with pytest.raises(ValueError):
            fast.edited_bytes(edits)
        return
    assert fast.edited_bytes(edits) == expected


def test_declines_what_it_cannot_prove() -> None:
    assert RawDocument.parse(b'{"a":1,"a":2}') is None  # duplicate key
    assert RawDocument.parse(b"[1]") is None
    assert (
        RawDocument.parse(b'{"a":"\\ud800"}') is None
    )  # a lone surrogate: orjson refuses, Document reads it
    assert RawDocument.parse(b'{"a\\u0062":1}') is None  # a key not in orjson's spelling


@pytest.mark.parametrize(
    "raw",
    [
        b'{"a": 1}',
        b'{"a":{"b": 1}}',
        b'{"a":1e2,"b":[1]}',
        b'{"a":[1, 2],"b":1}',
        b' {"b" :[ {"c":[3 ]} ]}\n',
    ],
)
def test_any_spacing_and_number_spelling_is_located_and_edited_exactly(raw: bytes) -> None:
    """Spaces and number spellings orjson does not write: the members are still located (by a walk) and the
    edits are the ones `Document` makes."""
    doc = RawDocument.parse(raw)
    assert doc is not None
    for path in paths(json.loads(raw)):
        for edit in (Delete(path), Replace(path, "x")):
            assert doc.edited_bytes([edit]) == Document.parse(raw).edited([edit]).encode()


def test_pipeline_uses_the_fast_editor_for_compact_bodies_and_document_otherwise() -> None:
    body = samples.Session().request(1)
    # with a rule that may change any message and has no literal to find it by, the sparse path
    # (tests/test_sparse.py) does not apply: RawDocument, or Document for what it cannot locate
    rule = rulelib.make_rule({"name": "x", "scope": "messages:user", "match": "[0-9]{9}", "action": "drop"})
    settings = pipeline.Settings(rules=(*pipeline.Settings().rules, rule))
    assert settings.sparse_plans[shapes.Api.ANTHROPIC] is None
    for raw, kind in (
        (orjson.dumps(body), RawDocument),
        (b'{"\\u0078":1,' + orjson.dumps(body)[1:], Document),
    ):
        fwd = pipeline.forward("POST", "h", "/v1/messages", raw, settings)
        assert fwd is not None and type(fwd.doc) is kind and fwd.outcome is not None
        assert fwd.forward == Document.parse(raw).edited(fwd.outcome.edits).encode()
        texts = [b["text"] for b in json.loads(fwd.forward or b"")["system"]]
        assert texts == [b["text"] for b in body["system"][1:]]
    for raw in (orjson.dumps(body), json.dumps(body).encode()):  # billing only: the sparse path, any spacing
        fwd = pipeline.forward("POST", "h", "/v1/messages", raw, pipeline.Settings())
        assert fwd is not None and type(fwd.doc) is SparseDocument and fwd.outcome is not None
        assert fwd.forward == Document.parse(raw).edited(fwd.outcome.edits).encode()
