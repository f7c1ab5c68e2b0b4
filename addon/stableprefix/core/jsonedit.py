"""Edit a JSON document at paths and leave every other byte exactly as the client sent it.

`Document.parse` reads a JSON object once and remembers where each top-level member sits in the text.
`Document.edited` splices the edits into the original text: only the replaced values are re-serialised
(compact, non-ASCII kept), deleted members take their separating comma with them, and key order,
whitespace, number spellings and escapes elsewhere stay byte-identical. `apply_edits` makes the same
edits on the parsed value, so callers can fingerprint the result without parsing it again.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from itertools import accumulate
from operator import add
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
        _container_ops(Layout.of(list(self._top)), tree, ops, self._layout_at)
        return _splice(self.text, ops)

    def _layout_at(self, start: int, end: int, value: Any) -> Layout | None:
        text = self.text
        if text[start] not in "{[":
            return None
        found = _members_of(text, start, value)
        return Layout.of(found if found is not None else _members(text, start)[0])


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


class Layout(NamedTuple):
    """Where the members of one container sit: parallel sequences, in document order. `keys` is a range
    for an array; `values` are parsed values or undecoded `msgspec.Raw` views (only their spans count)."""

    keys: Sequence[Key]
    starts: Sequence[int]  # first character of each member (its key, for objects)
    value_starts: Sequence[int]
    ends: Sequence[int]  # one past each value
    values: Sequence[Any]

    @classmethod
    def of(cls, members: list[_Member]) -> Layout:
        keys = [m.key for m in members]
        is_array = bool(members) and isinstance(keys[0], int)
        return cls(
            range(len(keys)) if is_array else keys,
            [m.start for m in members],
            [m.value_start for m in members],
            [m.end for m in members],
            [m.value for m in members],
        )

    def find(self, key: Key) -> int | None:
        """The position of the member `key` names, None when there is none."""
        keys = self.keys
        if isinstance(keys, range):
            return key if type(key) is int and 0 <= key < len(keys) else None
        if type(key) is not str:
            return None
        try:
            return keys.index(key)
        except ValueError:
            return None


#: (start, end, value) -> the layout of the container there, None for a scalar; ValueError: unproven.
type _LayoutAt = Callable[[int, int, Any], Layout | None]


def _container_ops(layout: Layout, tree: dict[Key, Any], ops: list, layout_at: _LayoutAt) -> None:
    """The splice operations (start, end, new text) that make the edits of `tree` in one container."""
    found = [(i, sub) for k, sub in tree.items() if (i := layout.find(k)) is not None]
    deleted = sorted(i for i, sub in found if isinstance(sub, Delete))
    if deleted:
        _delete_ops(layout, deleted, ops)
    for i, sub in found:
        if isinstance(sub, Delete):
            continue
        if isinstance(sub, Replace):
            ops.append((layout.value_starts[i], layout.ends[i], dumps(sub.value)))
            continue
        inner = layout_at(layout.value_starts[i], layout.ends[i], layout.values[i])
        if inner is None:
            raise ValueError(f"path goes through a scalar at {layout.keys[i]!r}")
        _container_ops(inner, sub, ops, layout_at)


def _delete_ops(layout: Layout, deleted: list[int], ops: list) -> None:
    """Remove each run of deleted members together with one separator, keeping the JSON valid."""
    n = len(layout.keys)
    starts, ends = layout.starts, layout.ends
    k = 0
    while k < len(deleted):
        i = j = deleted[k]
        while k + 1 < len(deleted) and deleted[k + 1] == j + 1:
            k += 1
            j += 1
        k += 1
        if j + 1 < n:  # a kept member follows: cut up to its start
            ops.append((starts[i], starts[j + 1], ""))
        elif i > 0:  # the run is the tail: cut from the end of the kept member before it
            ops.append((ends[i - 1], ends[j], ""))
        else:  # everything goes
            ops.append((starts[0], ends[j], ""))


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
    """A copy of the container `value` with the edits of `tree` made (the members not edited are shared)."""
    if isinstance(value, dict):
        out = dict(value)
        for k, sub in tree.items():
            if k in out:
                new = _apply_member(out[k], sub)
                if new is _DELETED:
                    del out[k]
                else:
                    out[k] = new
        return out
    items = list(value)
    gone = set()
    for i, sub in tree.items():
        if isinstance(i, int) and 0 <= i < len(items):
            new = _apply_member(items[i], sub)
            if new is _DELETED:
                gone.add(i)
            else:
                items[i] = new
    return [v for i, v in enumerate(items) if i not in gone] if gone else items


_DELETED = object()


def _apply_member(v: Any, sub: Any) -> Any:
    if sub is None:
        return v
    if isinstance(sub, Delete):
        return _DELETED
    if isinstance(sub, Replace):
        return sub.value
    return _apply(v, sub)


# --- the same on bytes: layouts proven from msgspec's undecoded values (the forwarding path) --------------

try:  # a C extension: without it the bytes-level documents decline and the caller parses with `Document`
    import msgspec
except ImportError:  # pragma: no cover
    msgspec = None  # type: ignore[assignment]

if msgspec is not None:
    _Raw: Any = msgspec.Raw
    #: One level of a container, its values left undecoded (`msgspec.Raw` views of the bytes). Decoding
    #: still validates every byte as JSON (except UTF-8 in what it skips: checked separately).
    _OBJECT: Any = msgspec.json.Decoder(dict[str, _Raw])
    _ARRAY: Any = msgspec.json.Decoder(list[_Raw])
    #: The body two levels deep: arrays of undecoded values, objects of undecoded values, scalars.
    _NESTED: Any = msgspec.json.Decoder(
        dict[str, list[_Raw] | dict[str, _Raw] | str | int | float | bool | None]
    )
    _RAW_ERRORS: tuple[type[Exception], ...] = (msgspec.MsgspecError, RecursionError)
else:  # pragma: no cover
    _Raw = type(None)
    _OBJECT = _ARRAY = _NESTED = None
    _RAW_ERRORS = ()
_PARSE_ERRORS: tuple[type[Exception], ...] = (ValueError, *_RAW_ERRORS)


def undecoded(value: Any) -> bool:
    """Whether `value` is an undecoded JSON value (a `msgspec.Raw`, from a layout's values)."""
    return isinstance(value, _Raw)


def decode(value: Any) -> Any:
    """The Python value of one undecoded JSON value (valid JSON: validated). ValueError where orjson is
    stricter than `json` (an integer beyond 64 bits, a lone surrogate, deep nesting)."""
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


def _ws_bytes(raw: bytes, i: int) -> int:
    while i < len(raw) and raw[i] in b" \t\n\r":
        i += 1
    return i


def layout_at(raw: bytes, start: int, end: int) -> Layout | None:
    """The members of the container that `raw[start:end]` holds (exactly one JSON value, validated), their
    values undecoded; None for a scalar. ValueError when a member's place cannot be proven."""
    first = raw[start]
    if first != 0x7B and first != 0x5B:  # "{", "["
        return None
    try:
        node = (_OBJECT if first == 0x7B else _ARRAY).decode(memoryview(raw)[start:end])
    except _RAW_ERRORS:
        raise ValueError("container not readable") from None
    found = _object_layout(raw, start, end, node) if first == 0x7B else _array_layout(raw, start, end, node)
    if found is None:
        raise ValueError("container spans not proven")
    return found


def _array_layout(raw: bytes, start: int, end: int, items: list[Any]) -> Layout | None:
    """Where the elements of the array at `raw[start:end]` sit. Compact (every element next to its comma),
    the element lengths add up to the span and give every place at C speed; else a walk proves each."""
    if _compact_length(items) == end - start:  # any space or longer spelling would add bytes
        return compact_array(start, items)
    return _walk(raw, start, end, None, items)


def compact_array(start: int, items: list[Any]) -> Layout:
    """The layout of an array at `start` written compact (proven by the caller), from its elements'
    lengths, at C speed."""
    n = len(items)
    lens = list(map(len, items))
    starts = list(map(add, accumulate(lens, initial=0), range(start + 1, start + 1 + n)))
    return Layout(range(n), starts, starts, list(map(add, starts, lens)), items)


def _compact_length(value: Any) -> int:
    """The length of `value` (from `_NESTED`: undecoded values one or two levels down) written compact in
    the shortest spelling; -1 for a float (an exponent may be shorter than orjson's spelling) or a value
    orjson cannot write. A real spelling is never shorter, so equal lengths prove the compact form."""
    kind = type(value)
    if kind is list:
        return sum(map(len, value)) + len(value) + 1 if value else 2
    if kind is dict:
        try:
            keys = sum(len(orjson.dumps(k)) for k in value)
        except TypeError:
            return -1
        return keys + sum(map(len, value.values())) + 2 * len(value) + 1 if value else 2
    if kind is float:
        return -1
    try:
        return len(orjson.dumps(value))
    except TypeError:  # an integer beyond 64 bits
        return -1


def _object_layout(raw: bytes, start: int, end: int, node: dict[str, Any]) -> Layout | None:
    """Where the members of the object at `raw[start:end]` sit: by lengths when compact (orjson's key
    spelling is the shortest there is, so a sum equal to the span proves no space, no other spelling and
    no duplicate key, which would each add bytes); else by a walk."""
    keys = list(node)
    values = list(node.values())
    starts: list[int] = []
    value_starts: list[int] = []
    ends: list[int] = []
    pos = start + 1
    try:
        for key, v in zip(keys, values, strict=True):
            starts.append(pos)
            pos += len(orjson.dumps(key)) + 1
            value_starts.append(pos)
            pos += len(v)
            ends.append(pos)
            pos += 1
    except TypeError:  # orjson.JSONEncodeError: a key with a lone surrogate
        return None
    if pos == end if keys else end - start == 2:
        return Layout(keys, starts, value_starts, ends, values)
    return _walk(raw, start, end, keys, values)


def _walk(raw: bytes, start: int, end: int, keys: list[str] | None, values: list[Any]) -> Layout | None:
    """The layout of a container with spaces in it, proven member by member: each key in orjson's spelling,
    each value's bytes at the place the walk reached, then a separator (so a number is not a prefix of a
    longer one), and the closing bracket last at `end` (so no member is missing: no duplicate key). None
    when anything differs."""
    starts: list[int] = []
    value_starts: list[int] = []
    ends: list[int] = []
    close = 0x7D if keys is not None else 0x5D
    j = _ws_bytes(raw, start + 1)
    try:
        for n, v in enumerate(values):
            if n:
                if raw[j] != 0x2C:  # ","
                    return None
                j = _ws_bytes(raw, j + 1)
            starts.append(j)
            if keys is not None:
                token = orjson.dumps(keys[n])
                if not raw.startswith(token, j):
                    return None
                j = _ws_bytes(raw, j + len(token))
                if raw[j] != 0x3A:  # ":"
                    return None
                j = _ws_bytes(raw, j + 1)
            if not raw.startswith(v, j):
                return None
            value_starts.append(j)
            j += len(v)
            ends.append(j)
            j = _ws_bytes(raw, j)
            if j >= end or raw[j] not in (0x2C, close):
                return None
        if j != end - 1 or raw[j] != close:
            return None
    except (IndexError, TypeError):  # orjson.JSONEncodeError: a key orjson cannot write
        return None
    return Layout(range(len(values)) if keys is None else keys, starts, value_starts, ends, values)


def _edited_bytes(raw: bytes, top: Layout, edits: Iterable[Edit], known: dict[int, Layout]) -> bytes:
    """`raw` with `edits` spliced in, the containers located by `layout_at` (or found in `known`, by their
    start). Same positions and replacement text as `Document.edited`, so the same result."""
    tree = _trie(edits)
    if not tree:
        return raw

    def at(start: int, end: int, value: Any) -> Layout | None:
        return known.get(start) or layout_at(raw, start, end)

    ops: list[tuple[int, int, str]] = []
    _container_ops(top, tree, ops, at)
    ops.sort(key=lambda op: op[0])
    out: list[bytes | memoryview] = []
    view = memoryview(raw)  # slices without copies: the join below copies once
    pos = 0
    for start, end, new in ops:
        if start < pos:
            raise ValueError("overlapping edits")
        out.append(view[pos:start])
        out.append(new.encode("utf-8"))
        pos = end
    out.append(view[pos:])
    return b"".join(out)


def _trimmed(raw: bytes) -> tuple[int, int]:
    """Where the JSON value in `raw` starts and ends (spaces around it allowed)."""
    start, end = _ws_bytes(raw, 0), len(raw)
    while end > start and raw[end - 1] in b" \t\n\r":
        end -= 1
    return start, end


def _top_layout(raw: bytes, node: dict[str, Any]) -> Layout | None:
    """The layout of the top-level object, its values undecoded."""
    start, end = _trimmed(raw)
    if raw[start : start + 1] != b"{":
        return None
    return _object_layout(raw, start, end, node)


@dataclass(frozen=True, slots=True)
class RawDocument:
    """A JSON object parsed with orjson whose top-level members are located exactly in the original bytes.

    `parse` returns None unless orjson reads the body, msgspec validates it and every top-level member is
    proven in place; the caller then uses `Document`. Edits are spliced into the bytes as `Document.edited`
    splices text: same positions, same replacement text, so the same result.
    """

    raw: bytes
    value: dict[str, Any]
    _top: Layout | tuple[()]

    @classmethod
    def parse(cls, raw: bytes) -> RawDocument | None:
        if _OBJECT is None:
            return None
        try:
            value = orjson.loads(raw)
            node = _OBJECT.decode(raw)
        except _PARSE_ERRORS:  # orjson is stricter than `json`: let `Document` decide
            return None
        top = _top_layout(raw, node) if isinstance(value, dict) else None
        return None if top is None else cls(raw, value, top)

    def edited_bytes(self, edits: Iterable[Edit]) -> bytes:
        """The document bytes with `edits` spliced in. Raises ValueError when a container on an edited path
        cannot be located (the caller then edits through `Document`)."""
        assert isinstance(self._top, Layout)
        return _edited_bytes(self.raw, self._top, edits, {})


# --- validate the whole body, decode only what the rules read (the forwarding path's fastest case) ----------


@dataclass(frozen=True, slots=True)
class SparseDocument:
    """A body validated in full (msgspec, UTF-8) whose top-level members are located exactly in the bytes,
    with only some of them decoded to Python values (the others stay undecoded `msgspec.Raw` views).

    `scan` returns None for anything it cannot prove (duplicate top-level keys, a key not in orjson's
    spelling, nesting deeper than the parser allows, invalid JSON or UTF-8): the caller then parses in full
    and gets the exact answer, error included. `edited_bytes` splices like `RawDocument.edited_bytes`, the
    containers on the edited paths located from their bytes (`known`: those located already).
    """

    raw: bytes
    value: dict[str, Any]  # the decoded members; the others undecoded
    _top: Layout
    known: dict[int, Layout] = field(default_factory=dict)  # container start -> its layout

    @staticmethod
    def scan(raw: bytes) -> Layout | None:
        """Validate `raw` and locate each top-level member. Written compact (the usual case: one msgspec
        pass, the members and their arrays' elements located by lengths), a member's value is an array
        of undecoded values, an object of undecoded values, or a scalar; else it is undecoded and its
        place proven by a walk."""
        if _NESTED is None:
            return None
        try:
            node = _NESTED.decode(raw)
        except _RAW_ERRORS:
            return None
        if not utf8_ok(raw):
            return None
        start, end = _trimmed(raw)
        if raw[start] != 0x7B:
            return None
        starts: list[int] = []
        value_starts: list[int] = []
        ends: list[int] = []
        pos = start + 1
        for key, v in node.items():
            n = _compact_length(v)
            if n < 0:
                break
            starts.append(pos)
            pos += len(orjson.dumps(key)) + 1
            value_starts.append(pos)
            pos += n
            ends.append(pos)
            pos += 1
        else:
            if pos == end if node else end - start == 2:
                return Layout(list(node), starts, value_starts, ends, list(node.values()))
        try:  # not compact: the members one by one
            return _top_layout(raw, _OBJECT.decode(raw))
        except _RAW_ERRORS:  # pragma: no cover (validated above)
            return None

    def edited_bytes(self, edits: Iterable[Edit]) -> bytes:
        """The bytes with `edits` spliced in (ValueError: an edit the bytes alone cannot prove)."""
        return _edited_bytes(self.raw, self._top, edits, self.known)
