"""Edit a JSON document at paths and leave every other byte exactly as the client sent it.

`Document.parse` reads a JSON object once and remembers where each top-level member sits in the text.
`Document.edited` splices the edits into the original text: only the replaced values are re-serialised
(compact, non-ASCII kept), deleted members take their separating comma with them, and key order,
whitespace, number spellings and escapes elsewhere stay byte-identical. `apply_edits` makes the same
edits on the parsed value, so callers can fingerprint the result without parsing it again.
"""

from __future__ import annotations

import ctypes
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from typing import NamedTuple

import orjson

type Key = str | int
type JsonPath = tuple[Key, ...]

_DECODER = json.JSONDecoder()
scanstring: Any = getattr(json.decoder, "scanstring")  # noqa: B009 (C speed-up; not in typeshed)
_WS = re.compile(r"[ \t\n\r]*")


class NotAnObject(ValueError):
    """The body is valid JSON but its top level is not an object."""


@dataclass(frozen=True, slots=True)
class Replace:
    """Set the value at `path` (which must exist)."""

    path: JsonPath
    value: Any


@dataclass(frozen=True, slots=True)
class Delete:
    """Remove the object member or array element at `path` (which must exist)."""

    path: JsonPath


type Edit = Replace | Delete


class _Member(NamedTuple):  # a tuple: built for every element of a container, so cheap to make
    key: Key
    start: int  # first character of the member (its key for objects)
    value_start: int
    end: int  # one past the value
    value: Any


def dumps(value: Any) -> str:
    """Compact JSON, non-ASCII kept; falls back to escapes for text UTF-8 cannot carry (lone surrogates)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(value, ensure_ascii=True, separators=(",", ":"))
    return text


def _ws(text: str, i: int) -> int:
    if i < len(text) and text[i] not in " \t\n\r":  # compact JSON: no whitespace, no regex call
        return i
    m = _WS.match(text, i)
    return m.end() if m else i


def _members(text: str, i: int) -> tuple[list[_Member], int]:
    """Members of the object or array whose opening bracket is at `i`, and the end of the container."""
    close = "}" if text[i] == "{" else "]"
    is_object = close == "}"
    members: list[_Member] = []
    j = _ws(text, i + 1)
    if text[j] == close:
        return members, j + 1
    index = 0
    while True:
        start = j
        key: Key
        if is_object:
            if text[j] != '"':
                raise ValueError(f"expected a key at {j}")
            key, j = scanstring(text, j + 1)
            j = _ws(text, j)
            if text[j] != ":":
                raise ValueError(f"expected ':' at {j}")
            j = _ws(text, j + 1)
        else:
            key = index
            index += 1
        value_start = j
        value, j = _DECODER.raw_decode(text, j)
        members.append(_Member(key, start, value_start, j, value))
        j = _ws(text, j)
        if text[j] == ",":
            j = _ws(text, j + 1)
            continue
        if text[j] == close:
            return members, j + 1
        raise ValueError(f"expected ',' or {close!r} at {j}")


@dataclass(frozen=True, slots=True)
class Document:
    """A parsed JSON object and the text it came from."""

    text: str
    value: dict[str, Any]
    _top: tuple[_Member, ...]
    _top_end: int

    @classmethod
    def parse(cls, raw: bytes) -> Document:
        """Parse UTF-8 JSON whose top level is an object. Raises ValueError (incl. NotAnObject)."""
        text = raw.decode("utf-8")
        start = _ws(text, 0)
        if start == len(text):
            raise ValueError("empty body")
        if start >= len(text) or text[start] != "{":
            json.loads(text)  # raises JSONDecodeError for non-JSON
            raise NotAnObject("top level is not an object")
        try:
            members, end = _members(text, start)
        except IndexError:
            raise ValueError("truncated JSON") from None
        if text[_ws(text, end) :]:
            raise ValueError("extra data after the JSON object")
        value: dict[str, Any] = {}
        for m in members:
            assert isinstance(m.key, str)
            if m.key in value:
                raise ValueError(f"duplicate top-level key {m.key!r}")
            value[m.key] = m.value
        return cls(text, value, tuple(members), end)

    def edited(self, edits: Iterable[Edit]) -> str:
        """The document text with `edits` spliced in; everything else unchanged."""
        tree = _trie(edits)
        if not tree:
            return self.text
        ops: list[tuple[int, int, str]] = []
        _container_ops(self.text, list(self._top), tree, ops)
        return _splice(self.text, ops)


def _trie(edits: Iterable[Edit]) -> dict[Key, Any]:
    """Nested dict of path keys; a leaf is the Edit. An edit below a replaced or deleted node is dropped."""
    root: dict[Key, Any] = {}
    for e in sorted(edits, key=lambda e: len(e.path)):
        node: Any = root
        for k in e.path[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                break
        else:
            if e.path and isinstance(node, dict):
                node[e.path[-1]] = e
    return root


def _container_ops(text: str, members: list[_Member], tree: dict[Key, Any], ops: list) -> None:
    keep = [m for m in members if not isinstance(tree.get(m.key), Delete)]
    if len(keep) < len(members):
        _delete_ops(members, {m.key for m in keep}, ops)
    for m in keep:
        sub = tree.get(m.key)
        if sub is None:
            continue
        if isinstance(sub, Replace):
            ops.append((m.value_start, m.end, dumps(sub.value)))
        elif text[m.value_start] in "{[":
            found = _members_of(text, m.value_start, m.value)
            _container_ops(text, found if found is not None else _members(text, m.value_start)[0], sub, ops)
        else:
            raise ValueError(f"path goes through a scalar at {m.key!r}")


def _members_of(text: str, i: int, value: Any) -> list[_Member] | None:
    """The members of the container at `i` whose parsed `value` is known, without parsing it again.

    Each member's text is guessed as orjson writes it (compact, UTF-8: what ``JSON.stringify`` sends) and
    accepted only when the text holds exactly those characters followed by a separator, so every span is
    proven; None as soon as one is not (other spacing or escapes): the caller parses the container instead.
    """
    is_object = text[i] == "{"
    if is_object != isinstance(value, dict) or (not is_object and not isinstance(value, list)):
        return None
    close = "}" if is_object else "]"
    items = value.items() if is_object else enumerate(value)
    members: list[_Member] = []
    j = _ws(text, i + 1)
    try:
        for n, (key, v) in enumerate(items):
            if n:
                if text[j] != ",":
                    return None
                j = _ws(text, j + 1)
            start = j
            if is_object:
                token = orjson.dumps(key).decode()
                if not text.startswith(token, j):
                    return None
                j = _ws(text, j + len(token))
                if text[j] != ":":
                    return None
                j = _ws(text, j + 1)
            guess = orjson.dumps(v).decode()
            if not text.startswith(guess, j):
                return None
            members.append(_Member(key, start, j, j + len(guess), v))
            j = _ws(text, j + len(guess))
        if text[j] != close:  # more members in the text than in the value (duplicate keys), or junk
            return None
    except (TypeError, IndexError):  # orjson.JSONEncodeError: a lone surrogate, a big integer
        return None
    return members


def _delete_ops(members: list[_Member], kept: set[Key], ops: list) -> None:
    """Remove each run of deleted members together with one separator, keeping the JSON valid."""
    n = len(members)
    i = 0
    while i < n:
        if members[i].key in kept:
            i += 1
            continue
        j = i
        while j + 1 < n and members[j + 1].key not in kept:
            j += 1
        if j + 1 < n:  # a kept member follows: cut up to its start
            ops.append((members[i].start, members[j + 1].start, ""))
        elif i > 0:  # the run is the tail: cut from the end of the kept member before it
            ops.append((members[i - 1].end, members[j].end, ""))
        else:  # everything goes
            ops.append((members[0].start, members[j].end, ""))
        i = j + 1


def _splice(text: str, ops: list[tuple[int, int, str]]) -> str:
    ops.sort(key=lambda op: op[0])
    out: list[str] = []
    pos = 0
    for start, end, new in ops:
        if start < pos:
            raise ValueError("overlapping edits")
        out.append(text[pos:start])
        out.append(new)
        pos = end
    out.append(text[pos:])
    return "".join(out)


def apply_edits(value: Any, edits: Iterable[Edit]) -> Any:
    """The same edits as `Document.edited`, on a parsed value. Copies only the containers on edited paths."""
    return _apply(value, _trie(edits))


def _apply(value: Any, tree: dict[Key, Any]) -> Any:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out_v = _apply_member(v, tree.get(k))
            if out_v is not _DELETED:
                out[k] = out_v
        return out
    items = []
    for i, v in enumerate(value):
        out_v = _apply_member(v, tree.get(i))
        if out_v is not _DELETED:
            items.append(out_v)
    return items


_DELETED = object()


def _apply_member(v: Any, sub: Any) -> Any:
    if sub is None:
        return v
    if isinstance(sub, Delete):
        return _DELETED
    if isinstance(sub, Replace):
        return sub.value
    return _apply(v, sub)


# --- the same on bytes, for compact bodies (the forwarding path's fast case) ------------------------------


@dataclass(frozen=True, slots=True)
class RawDocument:
    """A JSON object parsed with orjson whose top-level members are proven in the original bytes.

    `parse` returns None unless every top-level member sits exactly where its compact form (what Node's
    ``JSON.stringify`` writes, and orjson) says, so the spans are exact without a second, slower parse;
    the caller then uses `Document`. Edits are spliced into the bytes as `Document.edited` splices text:
    same positions, same replacement text, so the same result.
    """

    raw: bytes
    value: dict[str, Any]
    _top: tuple[_Member, ...]

    @classmethod
    def parse(cls, raw: bytes) -> RawDocument | None:
        if orjson is None:
            return None
        try:
            value = orjson.loads(raw)
        except (ValueError, RecursionError):  # orjson is stricter than `json`: let `Document` decide
            return None
        if not isinstance(value, dict):
            return None
        start, end = _ws_bytes(raw, 0), len(raw)
        while end > start and raw[end - 1] in b" \t\n\r":
            end -= 1
        if raw[start : start + 1] != b"{" or raw[end - 1 : end] != b"}":
            return None
        members = _members_of_bytes(raw, start, value)
        if members is None or _ws_bytes(raw, members[-1].end if members else start + 1) != end - 1:
            return None
        return cls(raw, value, tuple(members))

    def edited_bytes(self, edits: Iterable[Edit]) -> bytes:
        """The document bytes with `edits` spliced in. Raises ValueError when a nested container is not in
        compact form (the caller then edits through `Document`)."""
        tree = _trie(edits)
        if not tree:
            return self.raw
        ops: list[tuple[int, int, str]] = []
        _container_ops_bytes(self.raw, list(self._top), tree, ops)
        ops.sort(key=lambda op: op[0])
        out: list[bytes | memoryview] = []
        view = memoryview(self.raw)  # slices without copies: the join below copies once
        pos = 0
        for start, end, new in ops:
            if start < pos:
                raise ValueError("overlapping edits")
            out.append(view[pos:start])
            out.append(new.encode("utf-8"))
            pos = end
        out.append(view[pos:])
        return b"".join(out)


def _ws_bytes(raw: bytes, i: int) -> int:
    while i < len(raw) and raw[i] in b" \t\n\r":
        i += 1
    return i


def _container_ops_bytes(raw: bytes, members: list[_Member], tree: dict[Key, Any], ops: list) -> None:
    keep = [m for m in members if not isinstance(tree.get(m.key), Delete)]
    if len(keep) < len(members):
        _delete_ops(members, {m.key for m in keep}, ops)
    for m in keep:
        sub = tree.get(m.key)
        if sub is None:
            continue
        if isinstance(sub, Replace):
            ops.append((m.value_start, m.end, dumps(sub.value)))
        elif raw[m.value_start] in b"{[":
            found = _members_of_bytes(raw, m.value_start, m.value)
            if found is None:
                raise ValueError("container not in compact form")
            _container_ops_bytes(raw, found, sub, ops)
        else:
            raise ValueError(f"path goes through a scalar at {m.key!r}")


def _members_of_bytes(raw: bytes, i: int, value: Any) -> list[_Member] | None:
    """`_members_of` on bytes: members proven by their orjson form; None as soon as one is not."""
    if orjson is None:
        return None
    is_object = raw[i : i + 1] == b"{"
    if is_object != isinstance(value, dict) or (not is_object and not isinstance(value, list)):
        return None
    close = b"}"[0] if is_object else b"]"[0]
    items = value.items() if is_object else enumerate(value)
    members: list[_Member] = []
    j = _ws_bytes(raw, i + 1)
    try:
        for n, (key, v) in enumerate(items):
            if n:
                if raw[j] != 0x2C:  # ","
                    return None
                j = _ws_bytes(raw, j + 1)
            start = j
            if is_object:
                token = orjson.dumps(key)
                if not raw.startswith(token, j):
                    return None
                j = _ws_bytes(raw, j + len(token))
                if raw[j] != 0x3A:  # ":"
                    return None
                j = _ws_bytes(raw, j + 1)
            guess = orjson.dumps(v)
            if not raw.startswith(guess, j):
                return None
            members.append(_Member(key, start, j, j + len(guess), v))
            j = _ws_bytes(raw, j + len(guess))
        if raw[j] != close:  # more members in the bytes than in the value (duplicate keys), or junk
            return None
    except (TypeError, IndexError):  # orjson.JSONEncodeError: a lone surrogate, a big integer
        return None
    return members


# --- validate the whole body, decode only what the rules read (the forwarding path's fastest case) ----------

try:  # a C extension: without it `SparseDocument.parse` declines and the caller parses in full
    import msgspec
except ImportError:  # pragma: no cover
    msgspec = None  # type: ignore[assignment]


class _PyBuffer(ctypes.Structure):  # Py_buffer (C API, stable ABI since 3.11)
    _fields_ = [
        ("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p),
    ]  # fmt: skip


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None


def _address(obj: Any) -> int:
    """Where the bytes of a buffer (bytes, msgspec.Raw) start in memory."""
    view = _PyBuffer()
    if _get_buffer(obj, ctypes.byref(view), 0) != 0:  # pragma: no cover (ctypes raises first)
        raise ValueError("no buffer")
    try:
        return int(view.buf or 0)
    finally:
        _release_buffer(ctypes.byref(view))


if msgspec is not None:
    _Raw: Any = msgspec.Raw
    _Scalar = str | int | float | bool | None
    #: A list element: an object with its values left undecoded (each a `msgspec.Raw` view of the body),
    #: a list of undecoded values, or a scalar.
    _Element = dict[str, _Raw] | list[_Raw] | _Scalar
    #: The body: every top-level member decoded one level deep (lists two: their objects' members stay
    #: undecoded). Every byte is still validated as JSON (except UTF-8: checked separately).
    _TOP_DECODER: Any = msgspec.json.Decoder(dict[str, list[_Element] | dict[str, _Raw] | _Scalar])
    _RAW_ERRORS: tuple[type[Exception], ...] = (msgspec.MsgspecError, RecursionError)
else:  # pragma: no cover
    _Raw = type(None)
    _TOP_DECODER = None
    _RAW_ERRORS = ()


def undecoded(value: Any) -> bool:
    """Whether `value` (from `SparseDocument.scan`) is an undecoded JSON value (a `msgspec.Raw`)."""
    return isinstance(value, _Raw)


def decode(value: Any) -> Any:
    """The Python value of one undecoded JSON value from `SparseDocument.scan` (valid JSON: validated)."""
    return orjson.loads(memoryview(value))


def utf8_ok(raw: bytes) -> bool:
    """Whether `raw` is valid UTF-8, as `bytes.decode` says (ASCII in one fast pass)."""
    if raw.isascii():
        return True
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class SparseDocument:
    """A body validated in full (msgspec, UTF-8) whose top-level members are located exactly in the bytes,
    with only some of them decoded to Python values (the others stay `scan` nodes).

    `scan` returns None for anything it cannot prove (duplicate top-level keys, a top-level scalar not in
    compact form, a top-level list ending in a scalar next to undecoded objects, nesting deeper than the
    parser allows, invalid JSON or UTF-8): the caller then parses in full and gets the exact answer,
    error included. `edited_bytes` splices like `RawDocument.edited_bytes` (same positions, same text), and
    raises ValueError for an edit inside a member that is not decoded in full.
    """

    raw: bytes
    value: dict[str, Any]  # the decoded members; the others as `scan` left them
    _top: tuple[_Member, ...]

    @staticmethod
    def scan(raw: bytes) -> list[_Member] | None:
        """Validate `raw` and locate each top-level member; a member's `value` is its node: a scalar, a
        dict of undecoded values, or a list of elements (objects as dicts of undecoded values)."""
        if _TOP_DECODER is None:
            return None
        try:
            top = _TOP_DECODER.decode(raw)
        except _RAW_ERRORS:
            return None
        if not utf8_ok(raw):
            return None
        base = _address(raw)
        n = len(raw)
        j = _ws_bytes(raw, 0)
        if raw[j : j + 1] != b"{":
            return None
        j = _ws_bytes(raw, j + 1)
        members: list[_Member] = []
        try:
            for k, (key, node) in enumerate(top.items()):
                if k:
                    if raw[j] != 0x2C:  # ","
                        return None
                    j = _ws_bytes(raw, j + 1)
                start = j
                token = orjson.dumps(key)
                if not raw.startswith(token, j):
                    return None
                j = _ws_bytes(raw, j + len(token))
                if raw[j] != 0x3A:  # ":"
                    return None
                j = _ws_bytes(raw, j + 1)
                end = _extent(raw, base, j, node)
                if end < 0:
                    return None
                members.append(_Member(key, start, j, end, node))
                j = _ws_bytes(raw, end)
            if raw[j] != 0x7D or _ws_bytes(raw, j + 1) != n:  # "}" and nothing after it
                return None  # more members in the bytes than in the dict (duplicate keys), or junk
        except (IndexError, TypeError):  # orjson.JSONEncodeError: a key or scalar orjson cannot write
            return None
        return members

    @classmethod
    def build(cls, raw: bytes, members: list[_Member], value: dict[str, Any]) -> SparseDocument:
        """The document of `scan`'s members with `value` (member name -> what the caller decoded)."""
        top = tuple(m._replace(value=value[str(m.key)]) for m in members)
        return cls(raw, value, top)

    def full(self, member: _Member) -> Any:
        """The complete Python value of one top-level member."""
        return orjson.loads(memoryview(self.raw)[member.value_start : member.end])

    def edited_bytes(self, edits: Iterable[Edit]) -> bytes:
        """The bytes with `edits` spliced in (ValueError: an edit the bytes alone cannot prove)."""
        return RawDocument(self.raw, self.value, self._top).edited_bytes(edits)


def _extent(raw: bytes, base: int, j: int, node: Any) -> int:
    """One past the end of the top-level value that starts at `j` and decoded to `node`; -1 if unproven."""
    if isinstance(node, dict):
        return _close(raw, base, j, 0x7B, 0x7D, node.values())
    if isinstance(node, list):
        if not node:
            return _close(raw, base, j, 0x5B, 0x5D, ())
        last = node[-1]
        if isinstance(last, dict) and last:
            end = _close(raw, base, -1, 0x7B, 0x7D, last.values())
            k = _ws_bytes(raw, end) if end >= 0 else -1
            return k + 1 if k >= 0 and raw[j] == 0x5B and raw[k] == 0x5D else -1
        if any(isinstance(e, dict | list) for e in node):
            return -1  # an undecoded object or list, then a scalar at the end: no address to go by
        token = orjson.dumps(node)  # a list of scalars: proven by its compact form
        return j + len(token) if raw.startswith(token, j) else -1
    token = orjson.dumps(node)
    return j + len(token) if raw.startswith(token, j) else -1


def _close(raw: bytes, base: int, j: int, open_: int, close: int, values: Iterable[Any]) -> int:
    """One past the closing bracket of the container whose undecoded member values are `values` (at `j`
    when known, -1: not checked); the last value in the bytes is the one at the highest address."""
    last = max(values, key=_address, default=None)
    if last is None:
        if raw[j] != open_:
            return -1
        k = _ws_bytes(raw, j + 1)
        return k + 1 if raw[k] == close else -1
    if j >= 0 and raw[j] != open_:
        return -1
    at = _address(last) - base
    if not 0 <= at <= len(raw) - len(last) or not raw.startswith(last, at):
        return -1  # not a view of these bytes
    k = _ws_bytes(raw, at + len(last))
    return k + 1 if raw[k] == close else -1
