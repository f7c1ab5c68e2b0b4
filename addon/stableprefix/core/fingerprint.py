"""Canonical form and hashes of a (normalised) request, so equal prompts get equal hashes.

Canonical form: ``cache_control`` markers are removed everywhere, a message whose ``content`` is a string
equals one with a single ``{"type": "text", "text": ...}`` block, and JSON is written with sorted keys,
no whitespace and UTF-8 text. Hashes are SHA-256 (hex):

- ``system_hash``: the system-position texts, in order (JSON list of strings);
- ``tools_hash``: the tools list (``tool_names`` keeps their order);
- ``params_hash``: render-affecting parameters (model, thinking, tool_choice, output settings);
- ``prefix_hash``: system + tools, the static prefix requests of one kind share;
- ``chain``: one cumulative hash per message, ``chain[k] = H(chain[k-1] + canon(messages[k]))`` starting
  from ``H(prefix_hash + params_hash)``; two requests share a prompt prefix up to the last equal entry.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from typing import Any

import orjson

from stableprefix.core import volatile
from stableprefix.core.shapes import Parts

CHAIN_HEX = 16  # chain entries are truncated; full digests for the single hashes


def canonical(value: Any) -> Any:
    """`value` without cache markers, with string message content as one text block."""
    if isinstance(value, dict):
        out = {k: canonical(v) for k, v in value.items() if k != "cache_control"}
        if isinstance(out.get("content"), str) and "role" in out:
            out["content"] = [{"type": "text", "text": out["content"]}]
        return out
    if isinstance(value, list):
        return [canonical(v) for v in value]
    return value


def canonical_bytes(value: Any) -> bytes:
    """Deterministic bytes of an already canonical value."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8", "surrogatepass")


def _walk(value: Any, floats: list[float]) -> Any:
    """`canonical(value)` in one pass that also collects the floats it meets."""
    if type(value) is dict:
        out: dict[str, Any] = {}
        for k, v in value.items():
            if k == "cache_control":
                continue
            t = type(v)
            if t is dict or t is list:
                v = _walk(v, floats)
            elif t is float:
                floats.append(v)
            out[k] = v
        if "role" in out and type(out.get("content")) is str:
            out["content"] = [{"type": "text", "text": out["content"]}]
        return out
    if type(value) is list:
        items = []
        for v in value:
            t = type(v)
            if t is dict or t is list:
                v = _walk(v, floats)
            elif t is float:
                floats.append(v)
            items.append(v)
        return items
    if type(value) is float:
        floats.append(value)
    return value


def canonical_dump(value: Any) -> bytes:
    """``canonical_bytes(canonical(value))``, computed (`memoised` for the values that recur).

    orjson writes the same bytes as ``json.dumps(sort_keys=True, ensure_ascii=False, separators=(",", ":"))``
    except for floats below 1e-4 (``1e-05`` vs ``0.00001``), integers beyond 64 bits and lone surrogates
    (orjson refuses the last two): values holding a float or refused by orjson take the json path.
    """
    return _canonical_dump(value)


def memoised(value: Any) -> bytes:
    """`canonical_dump` through the memo: the messages, tools and system of a conversation recur on every
    turn."""
    return _MEMO.entries([value])[0][0]


def _canonical_dump(value: Any) -> bytes:
    floats: list[float] = []
    canon = _walk(value, floats)
    if not floats:
        try:
            return orjson.dumps(canon, option=orjson.OPT_SORT_KEYS)
        except TypeError:  # orjson.JSONEncodeError: big integer, lone surrogate
            pass
    return canonical_bytes(canon)


#: Bytes the memo keeps at most (least recently used out first), counting `MEMO_ENTRY_BYTES` per entry.
MEMO_CAP_BYTES = 64 * 1024 * 1024
MEMO_ENTRY_BYTES = 256  # key, tuple, hash text and dict slot of one entry, roughly


class CanonicalMemo:
    """(canonical bytes, SHA-256 hex) of JSON values keyed by their plain orjson bytes: equal plain bytes are
    an equal value, so an equal canonical form. Bounded in bytes (keys included); safe across threads."""

    def __init__(self, cap_bytes: int = MEMO_CAP_BYTES) -> None:
        self.cap_bytes = cap_bytes
        self._items: OrderedDict[bytes, tuple[bytes, str]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def entries(
        self, values: list[Any], known: Mapping[int, tuple[bytes, str]] | None = None
    ) -> list[tuple[bytes, str]]:
        """(canonical bytes, `sha` of them) of each value; `known`: entries by ``id()`` of values
        the caller holds alive (the same message objects before and after the rules)."""
        keys: list[bytes | None] = []
        out: list[tuple[bytes, str] | None] = [None] * len(values)
        for i, v in enumerate(values):
            if known and (entry := known.get(id(v))) is not None:
                out[i] = entry
                keys.append(None)
                continue
            try:
                keys.append(orjson.dumps(v))
            except TypeError:  # a big integer, a lone surrogate: no key, computed each time
                keys.append(None)
        items = self._items
        with self._lock:
            for i, k in enumerate(keys):
                if k is not None and (hit := items.get(k)) is not None:
                    items.move_to_end(k)
                    out[i] = hit
        missed: list[tuple[bytes, tuple[bytes, str]]] = []
        for i, v in enumerate(values):
            if out[i] is None:
                data = _canonical_dump(v)
                out[i] = entry = (data, sha(data))
                if (k := keys[i]) is not None and len(k) + len(data) <= self.cap_bytes // 4:
                    # copies: orjson's bytes keep their over-allocated buffer (4 KB for a short value)
                    missed.append((bytes(memoryview(k)), (bytes(memoryview(data)), entry[1])))
        if missed:
            with self._lock:
                for k, entry in missed:
                    if k not in items:
                        items[k] = entry
                        self._bytes += len(k) + len(entry[0]) + MEMO_ENTRY_BYTES
                while self._bytes > self.cap_bytes:
                    k, entry = items.popitem(last=False)
                    self._bytes -= len(k) + len(entry[0]) + MEMO_ENTRY_BYTES
        return out  # type: ignore[return-value]  # every slot is filled

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def size(self) -> int:
        """Canonical bytes held."""
        return self._bytes


_MEMO = CanonicalMemo()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class Fingerprint:
    system_hash: str
    tools_hash: str
    tool_names: list[str]
    params_hash: str
    prefix_hash: str
    chain: list[str]
    system_chars: int  # sizes, for estimating how much of the prompt a server can reuse
    tools_chars: int
    message_chars: list[int]
    #: canonical bytes of each message, for `detail` to reuse; not part of the record
    message_bytes: list[bytes] = field(default_factory=list, repr=False, compare=False)
    #: `sha` of each message's canonical bytes (`Message.hash` is its head); not part of the record
    message_hashes: list[str] = field(default_factory=list, repr=False, compare=False)

    def as_record(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in RECORD_FIELDS}


RECORD_FIELDS = (
    "system_hash",
    "tools_hash",
    "tool_names",
    "params_hash",
    "prefix_hash",
    "chain",
    "system_chars",
    "tools_chars",
    "message_chars",
)


def prefix_hashes(parts: Parts) -> tuple[str, str, str]:
    """(system_hash, tools_hash, prefix_hash) of a request's parts, without the message chain."""
    return _prefix(parts)[:3]


def _prefix(parts: Parts) -> tuple[str, str, str, int]:
    tools = memoised(parts.tools)
    system_hash, tools_hash = sha(memoised(parts.system)), sha(tools)
    return system_hash, tools_hash, sha(f"{system_hash}{tools_hash}".encode()), len(tools)


#: `chain` steps already computed: (previous link, `sha` of the message's canonical bytes) -> next link.
#: A conversation's earlier messages recur on every turn with the same links: one lookup instead of
#: hashing their bytes again. Oldest entries out first, past `LINKS_CAP`.
_LINKS: dict[tuple[str, str], str] = {}
LINKS_CAP = 32_768  # ~400 bytes each: ~13 MB at most
_LINKS_LOCK = threading.Lock()


def _trim(links: dict[tuple[str, str], str]) -> None:
    with _LINKS_LOCK:
        for key in list(itertools.islice(links, max(0, len(links) - LINKS_CAP // 2))):
            links.pop(key, None)


def fingerprint(parts: Parts, like: tuple[Parts, Fingerprint] | None = None) -> Fingerprint:
    """Hashes of a request's parts (see the module docstring for the canonical form); `like`: another
    request's parts and fingerprint whose message objects these parts may share (the body before and
    after the rules): a shared message is not serialised again."""
    system_hash, tools_hash, prefix_hash, tools_chars = _prefix(parts)
    params_hash = sha(canonical_dump(parts.params))
    link = sha(f"{prefix_hash}{params_hash}".encode())
    chain: list[str] = []
    known = None
    if like is not None and len(like[1].message_hashes) == len(like[0].messages):
        other, fp = like
        known = {
            id(m): e
            for m, e in zip(
                other.messages, zip(fp.message_bytes, fp.message_hashes, strict=True), strict=True
            )
        }
    entries = _MEMO.entries(parts.messages, known)
    data_list = [e[0] for e in entries]
    links = _LINKS
    for data, digest in entries:
        key = (link, digest)
        step = links.get(key)
        if step is None:
            h = hashlib.sha256(link.encode())
            h.update(data)
            links[key] = step = h.hexdigest()
        link = step
        chain.append(link[:CHAIN_HEX])
    if len(links) > LINKS_CAP:
        _trim(links)
    return Fingerprint(
        system_hash,
        tools_hash,
        list(parts.tool_names),
        params_hash,
        prefix_hash,
        chain,
        sum(len(t) for t in parts.system),
        tools_chars,
        [len(d) for d in data_list],
        data_list,
        [e[1] for e in entries],
    )


# --- per-block detail, for naming where two requests diverge and why -----------------------------------
#
# The record keeps only the hashes above. `detail` adds what the stream tracker compares between two
# requests of one conversation: a hash and size per system text, per tool and per message content block,
# plus "masked" hashes of the same texts with one known volatile item replaced by a placeholder. When two
# blocks differ but their masked hashes for a cause agree, that volatile item is what changed.

BLOCK_HEX = 16
CLEARED_TOOL_RESULT = "[Old tool result content cleared]"

MASK = "\x00"  # what a volatile item is replaced with before hashing (never in real prompt text)
# The known volatile items come from `volatile.detectors()`: (cause, guard, pattern), most specific first.
# The guard is a literal every match contains: a fast `in` test skips the regex (the date pattern starts
# with a lookbehind, so `re` scans it position by position: ~45 ms per MB of text).


def short_sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:BLOCK_HEX]


def volatile_masks(text: str) -> dict[str, str]:
    """Per known volatile item found in `text`: the hash of `text` with that item masked."""
    out: dict[str, str] = {}
    for cause, guard, pattern in volatile.detectors():
        if guard not in text:
            continue
        masked, n = pattern.subn(MASK, text)
        if n:
            out[cause] = short_sha(masked.encode("utf-8", "surrogatepass"))
    return out


def mask_all(text: str) -> str:
    """`text` with every known volatile item masked (keys that survive a date rollover or a new cch)."""
    for _, guard, pattern in volatile.detectors():
        if guard in text:
            text = pattern.sub(MASK, text)
    return text


@dataclass(frozen=True, slots=True)
class Block:
    """One system text, or one content block of a message (canonical form)."""

    kind: str  # the block's "type" ("text", "tool_use", "tool_result", "thinking", ...); "text" for system
    hash: str
    chars: int  # canonical JSON size (system: text length)
    masks: tuple[tuple[str, str], ...] = ()  # (cause, hash with that volatile item masked)
    cleared: bool = False  # a tool result whose content is Claude Code's micro-compact placeholder

    def mask(self, cause: str) -> str | None:
        for c, h in self.masks:
            if c == cause:
                return h
        return None


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    hash: str  # of the canonical message (role, content and any other keys)
    blocks: tuple[Block, ...]  # empty when content is neither a string nor a list
    chars: int
    key: str  # hash of role + every text with volatile items masked: the same conversation's first message


@dataclass(frozen=True, slots=True)
class Detail:
    """Per-block hashes of one request (see `detail`)."""

    system: tuple[Block, ...]
    tools: tuple[tuple[str, str, int], ...]  # (name, hash, canonical chars) in order
    messages: tuple[Message, ...]
    system_key: str  # hash of the system texts with volatile items masked
    markers_hash: str  # hash of the cache_control markers in system position and tools


def _block_texts(block: Any) -> list[str]:
    """The prompt texts a content block carries (text, thinking, tool_result content)."""
    if not isinstance(block, dict):
        return []
    out = []
    for k in ("text", "thinking"):
        if isinstance(block.get(k), str):
            out.append(block[k])
    content = block.get("content")
    if isinstance(content, str):
        out.append(content)
    elif isinstance(content, list):
        for b in content:
            out.extend(_block_texts(b))
    return out


def _block(value: Any) -> Block:
    data = canonical_dump(value)
    kind = str(value.get("type", "")) if isinstance(value, dict) else ""
    masks: dict[str, str] = {}
    texts = _block_texts(value)
    detectors = volatile.detectors()
    if any(g in t and p.search(t) for t in texts for _, g, p in detectors):
        masked = _mask_value(value)
        for cause, _, _ in detectors:
            m = masked.get(cause)
            if m is not None:
                masks[cause] = m
    cleared = False
    if kind == "tool_result":
        content = value.get("content")
        cleared = _block_texts({"content": content}) == [CLEARED_TOOL_RESULT]
        rest = {k: v for k, v in value.items() if k != "content"}
        masks["tool_result_cleared"] = short_sha(canonical_dump(rest))
    return Block(kind, short_sha(data), len(data), tuple(masks.items()), cleared)


def _mask_value(value: Any) -> dict[str, str]:
    """Per cause found anywhere in `value`'s texts: the hash of `value` with that item masked."""
    out: dict[str, str] = {}
    # the guards hold no character JSON escapes: absent from the JSON text, absent from every string
    blob = canonical_dump(value)
    for cause, guard, pattern in volatile.detectors():
        if guard.encode() not in blob:
            continue
        found = False

        def sub(v: Any, pattern: re.Pattern[str] = pattern) -> Any:
            nonlocal found
            if isinstance(v, str):
                new, n = pattern.subn(MASK, v)
                found = found or n > 0
                return new
            if isinstance(v, dict):
                return {k: sub(x) if k in ("text", "thinking", "content") else x for k, x in v.items()}
            if isinstance(v, list):
                return [sub(x) for x in v]
            return v

        masked = sub(value)
        if found:
            out[cause] = short_sha(canonical_dump(masked))
    return out


_MESSAGE_CACHE: OrderedDict[str, Message] = OrderedDict()
_MESSAGE_CACHE_CAP = 8192  # messages recur every turn: their detail is computed once (LRU)
_CACHE_LOCK = threading.Lock()


def message_detail(message: Any, data: bytes | None = None) -> Message:
    """Role, hash, per-block detail and conversation key of one message (`data`: its canonical bytes)."""
    if data is None:
        data = canonical_dump(message)
    return message_details([message], [(data, sha(data))])[0]


def message_details(messages: list[Any], entries: list[tuple[bytes, str]]) -> list[Message]:
    """`message_detail` of each message, given their (canonical bytes, `sha`) (`CanonicalMemo.entries`);
    a message seen before comes from the cache."""
    out: list[Message | None] = [None] * len(messages)
    hashes = [h[:BLOCK_HEX] for _, h in entries]
    with _CACHE_LOCK:
        for i, h in enumerate(hashes):
            if (hit := _MESSAGE_CACHE.get(h)) is not None:
                _MESSAGE_CACHE.move_to_end(h)
                out[i] = hit
    new: list[Message] = []
    for i, message in enumerate(messages):
        if out[i] is None:
            out[i] = m = _message_detail(message, entries[i][0], hashes[i])
            new.append(m)
    if new:
        with _CACHE_LOCK:
            for m in new:
                _MESSAGE_CACHE[m.hash] = m
            while len(_MESSAGE_CACHE) > _MESSAGE_CACHE_CAP:
                _MESSAGE_CACHE.popitem(last=False)
    return out  # type: ignore[return-value]  # every slot is filled


def _message_detail(message: Any, data: bytes, h: str) -> Message:
    canon = canonical(message)
    role = str(canon.get("role", canon.get("type", ""))) if isinstance(canon, dict) else ""
    content = canon.get("content") if isinstance(canon, dict) else None
    blocks = tuple(_block(b) for b in content) if isinstance(content, list) else ()
    texts = [mask_all(t) for b in (content if isinstance(content, list) else []) for t in _block_texts(b)]
    key = short_sha(canonical_dump([role, texts]))
    return Message(role, h, blocks, len(data), key)


def _markers(value: Any, path: str, out: list[Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "cache_control":
                out.append([path, v])
            else:
                _markers(v, f"{path}.{k}", out)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _markers(v, f"{path}[{i}]", out)


def detail(parts: Parts, body: Any = None, fp: Fingerprint | None = None) -> Detail:
    """Per-block hashes of a request's parts; `body` (the normalised body) adds system cache markers;
    `fp`, the parts' fingerprint when the caller has it, gives the messages' canonical bytes and hashes."""
    system = tuple(
        Block("text", short_sha(t.encode("utf-8", "surrogatepass")), len(t), tuple(volatile_masks(t).items()))
        for t in parts.system
    )
    tool_entries = _MEMO.entries(parts.tools)
    tools = tuple(
        (name, h[:BLOCK_HEX], len(data))
        for name, (data, h) in zip(parts.tool_names, tool_entries, strict=True)
    )
    if fp is not None and len(fp.message_hashes) == len(parts.messages):
        entries = list(zip(fp.message_bytes, fp.message_hashes, strict=True))
    else:
        entries = _MEMO.entries(parts.messages)
    messages = tuple(message_details(parts.messages, entries))
    system_key = short_sha(canonical_dump([mask_all(t) for t in parts.system]))
    markers: list[Any] = []
    if isinstance(body, dict) and isinstance(body.get("system"), list):
        _markers(body["system"], "system", markers)
    if _may_hold_marker(parts.tools):
        _markers(parts.tools, "tools", markers)
    return Detail(system, tools, messages, system_key, short_sha(canonical_bytes(markers)))


def _may_hold_marker(value: Any) -> bool:
    """False when `value` has no ``cache_control`` key: the key's JSON spelling is absent (never escaped)."""
    try:
        return b'"cache_control"' in orjson.dumps(value)
    except TypeError:
        return True
