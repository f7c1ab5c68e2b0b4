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
    assert RawDocument.parse(b'{"a": 1}') is not None  # space between top-level tokens: spans still exact
    assert RawDocument.parse(b'{"a":{"b": 1}}') is None  # space inside a value: not compact
    assert RawDocument.parse(b'{"a":1,"a":2}') is None  # duplicate key
    assert RawDocument.parse(b"[1]") is None
    assert RawDocument.parse(b'{"a":1.0}') is not None
    assert RawDocument.parse(b'{"a":1e2}') is None  # orjson writes 100.0
    assert (
        RawDocument.parse(b'{"a":"\\ud800"}') is None
    )  # a lone surrogate: orjson refuses, Document reads it
    assert RawDocument.parse(b'{"a":[1, 2],"b":1}') is None  # a nested space fails the top-level proof


def test_pipeline_uses_the_fast_editor_for_compact_bodies_and_document_otherwise() -> None:
    body = samples.Session().request(1)
    # with a path rule on, the sparse path (tests/test_sparse.py) does not apply: RawDocument or Document
    settings = pipeline.Settings(rules=tuple(rulelib.switch(rulelib.builtin_rules(), ["cache_control"])))
    for raw, kind in ((orjson.dumps(body), RawDocument), (json.dumps(body).encode(), Document)):
        fwd = pipeline.forward("POST", "h", "/v1/messages", raw, settings)
        assert fwd is not None and type(fwd.doc) is kind and fwd.outcome is not None
        assert fwd.forward == Document.parse(raw).edited(fwd.outcome.edits).encode()
        texts = [b["text"] for b in json.loads(fwd.forward or b"")["system"]]
        assert texts == [b["text"] for b in body["system"][1:]]
    for raw in (orjson.dumps(body), json.dumps(body).encode()):  # billing only: the sparse path, any spacing
        fwd = pipeline.forward("POST", "h", "/v1/messages", raw, pipeline.Settings())
        assert fwd is not None and type(fwd.doc) is SparseDocument and fwd.outcome is not None
        assert fwd.forward == Document.parse(raw).edited(fwd.outcome.edits).encode()
