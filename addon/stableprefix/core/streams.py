"""Conversations ("streams"), request classes and where a request diverged from the previous one.

A request belongs to a stream: the requests of one conversation thread, in order. Streams are grouped by the
client's session id (``X-Claude-Code-Session-Id`` or ``metadata.user_id``; behind a router that drops both,
the per-conversation ``prompt_cache_key`` LiteLLM sends, see `adopt_session`; without any, all requests
share one pool) and, inside a session, by content:

- ``count_tokens`` requests are recorded but never compared and never become a baseline;
- ``side`` requests (title generation, command-prefix checks and other short side queries: at most two
  tools and a small system prompt or a small ``max_tokens``) get streams of their own, apart from the
  main thread and the subagents;
- a request that holds only its first user turn (no assistant message yet) never joins a stream whose last
  request is longer: it is a new conversation that starts like an earlier one (the same first prompt), not
  that conversation rewound;
- every other request joins the stream whose last request shares the longest prefix with it (its chain),
  or failing that the same first message, or the same first message once volatile items (date, reminders)
  are masked; otherwise it starts a new stream. The first such stream of a session is ``main``; a later
  new stream is ``main`` too when its system prompt (volatile items masked) is the main one's, else
  ``subagent``.

Against the previous request of its stream a request is ``first``, ``append-only`` (the whole previous
prompt is a prefix of this one, in canonical form) or ``changed``, with the first differing location:
``system[i]@offset``, ``tools``, ``params`` or ``messages[k]`` / ``messages[k].content[j]``, and a cause when
a known volatile item explains it.

State is bounded: at most `STREAM_CAP` streams (least recently used dropped first), `TEXT_CAP` system texts
kept to name character offsets, and `STATS_CAP` summary rows. One lock guards it all, so concurrent
flows (and a report reading many files) can share a `Tracker`.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from typing import Any

from stableprefix.core import volatile
from stableprefix.core.fingerprint import Block
from stableprefix.core.fingerprint import Detail
from stableprefix.core.fingerprint import Message
from stableprefix.core.shapes import Parts

STREAM_CAP = 256  # streams remembered (each keeps one request's hashes; a long conversation ~100 KB)
TEXT_CAP = 512  # distinct system texts kept to name the character offset of a system change
STATS_CAP = 4096  # summary rows
SIDE_MAX_TOOLS = 2
SIDE_MAX_SYSTEM_CHARS = 4000
SIDE_MAX_TOKENS = 1024
RECENT_CAP = 64  # stream heads kept per upstream host, to compare a stream's first request with
RECENT_HOSTS = 64  # upstream hosts with recent heads kept
HEAD_MESSAGES = 4  # messages of a head kept (a new conversation shares at most its first few)
CONTEXT_CHARS = 40  # each side of the divergence, in the opt-in masked snippet
THINKING = frozenset({"thinking", "redacted_thinking"})


#: body keys that name a conversation when no session header arrives (LiteLLM: one per conversation)
SESSION_KEYS = ("prompt_cache_key",)
#: message roles (or item types) that show a conversation already had a model turn
CONTINUED = frozenset({"assistant", "model", "tool", "function", "function_call", "function_call_output"})


def adopt_session(record: dict[str, Any], body: Any) -> None:
    """Set ``record["session"]`` from what the body itself carries when the client sent no session id."""
    if record.get("session") or not isinstance(body, dict):
        return
    for key in SESSION_KEYS:
        value = body.get(key)
        if isinstance(value, str) and value:
            record["session"] = hashlib.sha256(f"{key}:{value}".encode()).hexdigest()[:12]
            return


def request_class(api: str, tool_count: int, system_chars: int, max_tokens: Any) -> str | None:
    """``count_tokens``, ``side``, or None for a conversation turn (main or subagent: the tracker decides)."""
    if api == "anthropic-count-tokens":
        return "count_tokens"
    small_out = (
        isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens <= SIDE_MAX_TOKENS
    )
    if tool_count <= SIDE_MAX_TOOLS and (system_chars < SIDE_MAX_SYSTEM_CHARS or small_out):
        return "side"
    return None


def common_prefix_len(a: str, b: str) -> int:
    """Length of the common prefix of two strings (binary search on slices: C speed on long texts)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def mask_snippet(text: str) -> str:
    """A snippet's shape without its words: letters become a/A, digits 0; spaces and punctuation stay."""
    out = []
    for c in text:
        if c.isdigit():
            out.append("0")
        elif c.isalpha():
            out.append("A" if c.isupper() else "a")
        else:
            out.append(c)
    return "".join(out)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a request leaves behind for the next request of its stream to be compared with."""

    system_hash: str
    tools_hash: str
    params_hash: str
    chain: tuple[str, ...]
    detail: Detail
    system_chars: int
    tools_chars: int
    message_chars: tuple[int, ...]
    side_seq: int  # side requests seen on this host before this request

    @classmethod
    def of(cls, record: dict[str, Any], detail: Detail, side_seq: int = 0) -> Snapshot:
        return cls(
            record["system_hash"],
            record["tools_hash"],
            record["params_hash"],
            tuple(record["chain"]),
            detail,
            int(record.get("system_chars", 0)),
            int(record.get("tools_chars", 0)),
            tuple(record.get("message_chars", ())),
            side_seq,
        )

    @property
    def head_equal_key(self) -> tuple[str, str, str]:
        return (self.system_hash, self.tools_hash, self.params_hash)

    @property
    def first(self) -> Message | None:
        return self.detail.messages[0] if self.detail.messages else None

    def total_chars(self) -> int:
        return self.system_chars + self.tools_chars + sum(self.message_chars)

    def head(self) -> Snapshot:
        """This snapshot cut to its first `HEAD_MESSAGES` messages: what a later stream may share with it."""
        n = HEAD_MESSAGES
        if len(self.chain) <= n:
            return self
        d = self.detail
        cut = Detail(d.system, d.tools, d.messages[:n], d.system_key, d.markers_hash)
        return Snapshot(self.system_hash, self.tools_hash, self.params_hash, self.chain[:n], cut,
                        self.system_chars, self.tools_chars, self.message_chars[:n], self.side_seq)  # fmt: skip

    @property
    def fresh(self) -> bool:
        """Only the first user turn: no assistant message (or tool round) yet."""
        return not any(m.role in CONTINUED for m in self.detail.messages)


@dataclass
class Divergence:
    verdict: str  # first | append-only | changed
    common_prefix_messages: int = 0
    diverged_at: str | None = None
    cause: str | None = None
    tools_changed: dict[str, list[str]] | None = None
    reusable_chars: int = 0
    context: dict[str, str] | None = None


@dataclass(frozen=True)
class Counterpart:
    """The same request on the other side of the rules: before the rewrite when the tracker was given the
    forwarded request (active mode), after it when given what the client sent (observe mode)."""

    record: dict[str, Any]  # the fingerprint fields (system_hash, tools_hash, params_hash, chain, sizes)
    detail: Detail
    system_texts: list[str]
    is_before: bool
    fired: tuple[str, ...] = ()  # the rules that changed (or would change) the request


@dataclass
class Heads:
    """A stream's recent prefix, as analysed and on the other side of the rules (same object when equal)."""

    stream: str
    cls: str
    head: Snapshot
    other: Snapshot


def stable_chars(old: Snapshot, new: Snapshot) -> int:
    """Characters of `new`'s prefix it would share with `old` if the known volatile items were equal."""
    a, b = old.detail.system, new.detail.system
    chars = 0
    for x, y in zip(a, b, strict=False):
        if x.hash != y.hash and not any(
            (m := x.mask(c)) is not None and m == y.mask(c) for c in volatile.text_causes()
        ):
            return chars
        chars += y.chars
    if len(a) != len(b):
        return chars
    if old.tools_hash != new.tools_hash:
        i = 0
        while (
            i < min(len(old.detail.tools), len(new.detail.tools))
            and old.detail.tools[i] == new.detail.tools[i]
        ):
            i += 1
        return chars + sum(c for _, _, c in new.detail.tools[:i])
    chars += new.tools_chars
    if old.params_hash != new.params_hash:
        return chars
    for om, nm in zip(old.detail.messages, new.detail.messages, strict=False):
        if om.hash != nm.hash and om.key != nm.key:
            break
        chars += nm.chars
    return chars


def _nearest_head(
    heads: Mapping[str, Heads],
    own: str,
    new: Snapshot,
    side: Callable[[Heads], Snapshot],
    texts: TextStore | None = None,
    new_texts: list[str] | None = None,
) -> Heads | None:
    """The head sharing the longest prefix with `new` (the most recent on ties). A head with `new`'s system,
    tools and parameters beats any other (it shares all of them), and among those the most messages win;
    otherwise only the most recent head of each distinct system/tools/parameters is compared."""
    same: tuple[int, Heads] | None = None
    others: dict[tuple[str, str, str], Heads] = {}
    key = new.head_equal_key
    for h in reversed(list(heads.values())):
        if h.stream == own:
            continue
        snap = side(h)
        if snap.head_equal_key == key:
            k = 0
            while k < min(len(snap.chain), len(new.chain)) and snap.chain[k] == new.chain[k]:
                k += 1
            if same is None or k > same[0]:
                same = (k, h)
        elif same is None:
            others.setdefault(snap.head_equal_key, h)
    if same is not None:
        return same[1]
    best: tuple[int, Heads] | None = None
    for h in others.values():
        chars = diverge(side(h), new, texts, new_texts).reusable_chars
        if best is None or chars > best[0]:
            best = (chars, h)
    return best[1] if best is not None else None


class TextStore:
    """System texts by hash (bounded LRU), shared by all streams: the same prompt is stored once."""

    def __init__(self, cap: int = TEXT_CAP) -> None:
        self.cap = cap
        self._texts: OrderedDict[str, str] = OrderedDict()

    def put(self, h: str, text: str) -> None:
        if h in self._texts:
            self._texts.move_to_end(h)
            return
        self._texts[h] = text
        while len(self._texts) > self.cap:
            self._texts.popitem(last=False)

    def get(self, h: str) -> str | None:
        return self._texts.get(h)

    def clear(self) -> None:
        self._texts.clear()

    def __len__(self) -> int:
        return len(self._texts)


def _mask_cause(old: Block, new: Block) -> str | None:
    for cause in volatile.text_causes():
        a, b = old.mask(cause), new.mask(cause)
        if a is not None and a == b:
            return cause
    return None


def tools_diff(old: Detail, new: Detail) -> dict[str, list[str]]:
    """Tool names added, removed, and changed (definition changed, or moved in the order)."""
    old_by = {name: (i, h) for i, (name, h, _) in reversed(list(enumerate(old.tools)))}
    new_by = {name: (i, h) for i, (name, h, _) in reversed(list(enumerate(new.tools)))}
    added = [n for n in new_by if n not in old_by]
    removed = [n for n in old_by if n not in new_by]
    changed = [n for n in new_by if n in old_by and old_by[n][1] != new_by[n][1]]
    if not (added or removed or changed):  # same definitions, other order
        old_order = [n for n, _, _ in old.tools]
        new_order = [n for n, _, _ in new.tools]
        changed = [n for i, n in enumerate(new_order) if i >= len(old_order) or old_order[i] != n]
    return {"added": added, "removed": removed, "changed": changed}


def diverge(
    old: Snapshot | None,
    new: Snapshot,
    texts: TextStore | None = None,
    new_system_texts: list[str] | None = None,
    new_parts: Parts | None = None,
    context: bool = False,
) -> Divergence:
    """Compare a request with the previous request of its stream (None: the stream's first request)."""
    if old is None:
        return Divergence("first")
    out = Divergence("changed")
    if old.tools_hash != new.tools_hash:
        out.tools_changed = tools_diff(old.detail, new.detail)
    if old.system_hash != new.system_hash:
        _system_divergence(old, new, texts, new_system_texts, context, out)
    elif old.tools_hash != new.tools_hash:
        out.diverged_at, out.cause = "tools", "tools"
        i = 0
        while (
            i < min(len(old.detail.tools), len(new.detail.tools))
            and old.detail.tools[i] == new.detail.tools[i]
        ):
            i += 1
        out.reusable_chars = new.system_chars + sum(c for _, _, c in new.detail.tools[:i])
    elif old.params_hash != new.params_hash:
        out.diverged_at, out.cause = "params", "params"  # model/thinking: assume nothing is reusable
    else:
        _message_divergence(old, new, new_parts, context, out)
    return out


def _system_divergence(
    old: Snapshot,
    new: Snapshot,
    texts: TextStore | None,
    new_texts: list[str] | None,
    context: bool,
    out: Divergence,
) -> None:
    a, b = old.detail.system, new.detail.system
    i = 0
    while i < min(len(a), len(b)) and a[i].hash == b[i].hash:
        i += 1
    offset = 0
    old_text = texts.get(a[i].hash) if texts is not None and i < len(a) else None
    new_text = new_texts[i] if new_texts is not None and i < len(new_texts) else None
    if i < len(a) and i < len(b):
        if old_text is not None and new_text is not None:
            offset = common_prefix_len(old_text, new_text)
        out.cause = _mask_cause(a[i], b[i]) or "unknown"
    else:
        out.cause = "unknown"  # a system text was added or removed
    out.diverged_at = f"system[{i}]@{offset}"
    out.reusable_chars = sum(x.chars for x in b[:i]) + offset
    if context and (old_text is not None or new_text is not None):
        out.context = {}
        if old_text is not None:
            out.context["old"] = _snippet(old_text, offset)
        if new_text is not None:
            out.context["new"] = _snippet(new_text, offset)


def _snippet(text: str, at: int) -> str:
    left = text[max(0, at - CONTEXT_CHARS) : at]
    right = text[at : at + CONTEXT_CHARS]
    return mask_snippet(left) + "|" + mask_snippet(right)


def _message_divergence(
    old: Snapshot, new: Snapshot, new_parts: Parts | None, context: bool, out: Divergence
) -> None:
    k = 0
    while k < min(len(old.chain), len(new.chain)) and old.chain[k] == new.chain[k]:
        k += 1
    out.common_prefix_messages = k
    head = new.system_chars + new.tools_chars
    out.reusable_chars = head + sum(new.message_chars[:k])
    if k == len(old.chain):
        out.verdict = "append-only"
        if old.detail.markers_hash != new.detail.markers_hash:
            out.cause = "cache_markers_only"
        return
    if k >= len(new.chain) or k >= len(new.detail.messages) or k >= len(old.detail.messages):
        out.diverged_at, out.cause = f"messages[{k}]", "unknown"  # history shortened
        return
    om, nm = old.detail.messages[k], new.detail.messages[k]
    if om.role != nm.role or not (om.blocks and nm.blocks):
        out.diverged_at, out.cause = f"messages[{k}]", "unknown"
        return
    j = 0
    while j < min(len(om.blocks), len(nm.blocks)) and om.blocks[j].hash == nm.blocks[j].hash:
        j += 1
    out.diverged_at = f"messages[{k}].content[{j}]"
    out.reusable_chars += sum(b.chars for b in nm.blocks[:j])
    kept = [b.hash for b in om.blocks if b.kind not in THINKING]
    if len(kept) < len(om.blocks) and kept == [b.hash for b in nm.blocks]:
        out.cause = "thinking_dropped"
    elif j < len(om.blocks) and j < len(nm.blocks):
        ob, nb = om.blocks[j], nm.blocks[j]
        if (
            nb.cleared
            and not ob.cleared
            and ob.mask("tool_result_cleared") == nb.mask("tool_result_cleared") is not None
        ):
            out.cause = "tool_result_cleared"
        else:
            out.cause = _mask_cause(ob, nb) or "unknown"
    else:
        out.cause = "unknown"
    if context and new_parts is not None and k < len(new_parts.messages):
        content = new_parts.messages[k].get("content") if isinstance(new_parts.messages[k], dict) else None
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if isinstance(content, list) and j < len(content) and isinstance(content[j], dict):
            text = content[j].get("text") or content[j].get("thinking") or content[j].get("content")
            if isinstance(text, str):
                out.context = {"new": _snippet(text, 0)}


@dataclass
class Stream:
    id: str
    session: str
    cls: str
    last: Snapshot
    requests: int = 1
    other: Snapshot | None = None  # the last request on the other side of the rules (None: same as last)
    host_seq: int = 0  # the host's thread-request count after this stream's last request


@dataclass
class Stats:
    """One summary row: a main/subagent stream, or all side (count_tokens) requests of a session."""

    key: str
    cls: str
    session: str
    streams: set[str] = field(default_factory=set)
    requests: int = 0
    first: int = 0
    append_only: int = 0
    changed: int = 0
    causes: dict[str, int] = field(default_factory=dict)  # client-side changes by cause
    server_misses: int = 0
    unknown: int = 0  # the server reported no cache figures
    cached_tokens: int = 0
    prompt_tokens: int = 0
    interleaved_side: int = 0

    def as_dict(self) -> dict[str, Any]:
        judged = self.append_only + self.changed
        return {
            "stream": self.key,
            "class": self.cls,
            "session": self.session or None,
            "streams": len(self.streams),
            "requests": self.requests,
            "first": self.first,
            "append_only": self.append_only,
            "changed": self.changed,
            "append_only_share": round(self.append_only / judged, 3) if judged else None,
            "misses_by_cause": dict(sorted(self.causes.items())),
            "server_misses": self.server_misses,
            "unknown": self.unknown,
            "cached_tokens": self.cached_tokens,
            "prompt_tokens": self.prompt_tokens,
            "interleaved_side": self.interleaved_side,
        }


def _sid(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:8]


class Tracker:
    """Streams, their last request, and per-stream statistics; bounded and thread-safe."""

    def __init__(self, cap: int = STREAM_CAP, text_cap: int = TEXT_CAP, stats_cap: int = STATS_CAP) -> None:
        self.cap = cap
        self.stats_cap = stats_cap
        self._lock = threading.Lock()
        self._streams: OrderedDict[str, Stream] = OrderedDict()
        self._by_session: dict[str, list[str]] = {}
        self._main_keys: OrderedDict[str, set[str]] = OrderedDict()  # session -> main system keys
        self._side_seq: dict[str, int] = {}  # host -> side requests seen
        self._thread_seq: dict[str, int] = {}  # host -> main/subagent requests seen
        self._stats: OrderedDict[str, Stats] = OrderedDict()
        self._recent: OrderedDict[str, OrderedDict[str, Heads]] = OrderedDict()  # host -> stream -> heads
        self.recent_cap = RECENT_CAP
        self.texts = TextStore(text_cap)

    # --- request side -----------------------------------------------------------------------------------

    def observe(
        self,
        record: dict[str, Any],
        detail: Detail,
        parts: Parts,
        max_tokens: Any = None,
        context: bool = False,
        counterpart: Counterpart | None = None,
    ) -> dict[str, Any]:
        """Assign the request to a stream, compare it with the stream's previous request, remember it.

        Returns the record fields: stream, class, verdict, common_prefix_messages, diverged_at,
        tools_changed (only when the tools differ), cause, reusable_chars, reusable_tokens_est,
        interleaved_side (and context when asked). A stream's first request is compared with the nearest
        earlier stream on the same upstream instead: nearest_stream, shareable_chars, and diverged_at, cause,
        tools_changed, reusable_chars against it. With a `counterpart` (the request on the other side of
        the rules) also saved_chars and saved_by: the prefix shared after the rewrite that would not have been
        shared before it (see `savings`).
        """
        session = str(record.get("session") or "")
        host = str(record.get("host") or "")
        cls = request_class(
            str(record.get("api")), len(detail.tools), int(record.get("system_chars", 0)), max_tokens
        )
        with self._lock:
            if cls == "count_tokens":
                stream_id = _sid(session, "count_tokens")
                self._count(f"count_tokens:{session}", "count_tokens", session, stream_id, None, False)
                return {
                    "stream": stream_id,
                    "class": cls,
                    "verdict": None,
                    "common_prefix_messages": 0,
                    "diverged_at": None,
                    "cause": None,
                    "reusable_chars": 0,
                    "reusable_tokens_est": 0,
                    "interleaved_side": False,
                    "interleaved_other": False,
                }
            if cls == "side":
                self._side_seq[host] = self._side_seq.get(host, 0) + 1
            seq = self._side_seq.get(host, 0)
            new = Snapshot.of(record, detail, seq)
            family = "side" if cls == "side" else "thread"
            stream = self._match(session, family, new)
            if stream is None:
                if cls is None:
                    cls = self._thread_class(session, detail.system_key)
                stream = self._new_stream(session, cls, new)
                prev = None
            else:
                prev = stream.last
                cls = stream.cls
                if cls == "main":
                    self._remember_main(session, detail.system_key)
            other = self._other(new, counterpart, seq)
            nearest: Heads | None = None
            shareable = 0
            if prev is None:
                nearest, div = self._nearest(host, stream.id, new, parts.system, parts, context)
                if nearest is not None:
                    shareable = max(div.reusable_chars, stable_chars(nearest.head, new))
            else:
                div = diverge(prev, new, self.texts, parts.system, parts, context)
            saved = self._saved(host, stream, prev, new, other, div, counterpart)
            for b, t in zip(detail.system, parts.system, strict=True):
                self.texts.put(b.hash, t)
            if counterpart is not None and other is not new:
                for b, t in zip(counterpart.detail.system, counterpart.system_texts, strict=False):
                    self.texts.put(b.hash, t)
            stream.last = new
            stream.other = None if other is new else other
            self._remember_head(host, stream, new, other)
            stream.requests += 0 if prev is None else 1
            self._streams.move_to_end(stream.id)
            interleaved = cls in ("main", "subagent") and prev is not None and seq > prev.side_seq
            other_between = False
            if cls in ("main", "subagent"):
                before = self._thread_seq.get(host, 0)
                other_between = prev is not None and before > stream.host_seq
                self._thread_seq[host] = before + 1
                stream.host_seq = before + 1
                if len(self._thread_seq) > RECENT_HOSTS * 4:
                    self._thread_seq.pop(next(iter(self._thread_seq)))
            key = stream.id if cls in ("main", "subagent") else f"side:{session}"
            self._count(key, cls, session, stream.id, div.verdict, interleaved)
        fields: dict[str, Any] = {
            "stream": stream.id,
            "class": cls,
            "verdict": div.verdict,
            "common_prefix_messages": div.common_prefix_messages,
            "diverged_at": div.diverged_at,
        }
        if div.tools_changed is not None:
            fields["tools_changed"] = div.tools_changed
        fields.update(
            cause=div.cause,
            reusable_chars=div.reusable_chars,
            reusable_tokens_est=div.reusable_chars // 4,
            interleaved_side=interleaved,
            interleaved_other=other_between,
        )
        if div.context is not None:
            fields["context"] = div.context
        if div.verdict == "first":
            fields["nearest_stream"] = nearest.stream if nearest is not None else None
            fields["shareable_chars"] = shareable
        if saved is not None:
            fields["saved_chars"] = sum(saved.values())
            fields["saved_by"] = saved
        return fields

    # --- first requests: the nearest earlier stream; savings: before vs. after the rules ------------------

    def _other(self, new: Snapshot, counterpart: Counterpart | None, seq: int) -> Snapshot:
        if (
            counterpart is None
            or counterpart.record.get("chain") == list(new.chain)
            and (counterpart.record.get("system_hash") == new.system_hash)
        ):
            return new
        return Snapshot.of(counterpart.record, counterpart.detail, seq)

    def _nearest(
        self, host: str, own: str, new: Snapshot, texts: list[str] | None, parts: Parts | None, context: bool
    ) -> tuple[Heads | None, Divergence]:
        """The earlier stream on `host` whose head shares the longest prefix with `new` (most recent first
        on ties), and the divergence from it (verdict ``first``)."""
        best = _nearest_head(self._recent.get(host, {}), own, new, lambda h: h.head, self.texts, texts)
        if best is None:
            return None, Divergence("first")
        best_div = diverge(best.head, new, self.texts, texts, parts, context)
        if best_div.diverged_at == f"messages[{len(new.chain)}]":  # all of `new` is that stream's start
            best_div.diverged_at, best_div.cause = None, None
        elif best_div.cause == "unknown" and best_div.diverged_at:  # another stream: name the part
            best_div.cause = "system" if best_div.diverged_at.startswith("system") else "conversation"
        best_div.verdict = "first"
        if best_div.diverged_at is None and best_div.cause == "cache_markers_only":
            best_div.cause = None
        return best, best_div

    def _shared_other(
        self, host: str, own: str, other: Snapshot, texts: list[str] | None
    ) -> Divergence | None:
        """The longest prefix `other` shares with an earlier stream's head on the other side of the rules."""
        best = _nearest_head(self._recent.get(host, {}), own, other, lambda h: h.other, self.texts, texts)
        return diverge(best.other, other, self.texts, texts) if best is not None else None

    def _saved(
        self,
        host: str,
        stream: Stream,
        prev: Snapshot | None,
        new: Snapshot,
        other: Snapshot,
        div: Divergence,
        counterpart: Counterpart | None,
    ) -> dict[str, int] | None:
        """Savings of the rules on this request (None without a counterpart to compare with).

        A rule's saving is the prefix shared after the rewrite that would not have been shared before it:
        the request before the rules against the previous request of its stream before the rules (for a
        stream's first request: the nearest earlier stream), and the same after the rules; credited to the
        rule that fired on this request, or jointly to the rules that did ("billing+inline_system": which of
        them bought how much is not measured), else to the rule for the before-divergence's cause."""
        if counterpart is None:
            return None
        if other is new and (prev is None or stream.other is None):
            return {}  # the rules changed neither this request nor the previous one: nothing to compare
        texts = counterpart.system_texts if other is not new else None
        if prev is None:
            d = self._shared_other(host, stream.id, other, texts)
        else:
            d = diverge(stream.other if stream.other is not None else prev, other, self.texts, texts)
        shared_other = d.reusable_chars if d is not None else 0
        if counterpart.is_before:  # `new` is after the rules, `other` before
            after, before, before_cause = div.reusable_chars, shared_other, d.cause if d is not None else None
        else:
            after, before, before_cause = shared_other, div.reusable_chars, div.cause
        gain = max(0, after - before)
        if gain == 0:
            return {}
        fired = sorted({f.split(".")[0] for f in counterpart.fired})
        if fired:  # one rule: its saving; several: theirs together (edits carry no rule, so no split)
            return {"+".join(fired): gain}
        return {volatile.rule_for_cause(before_cause or "") or "rules": gain}

    def _remember_head(self, host: str, stream: Stream, new: Snapshot, other: Snapshot) -> None:
        heads = self._recent.get(host)
        if heads is None:
            heads = self._recent[host] = OrderedDict()
            while len(self._recent) > RECENT_HOSTS:
                self._recent.popitem(last=False)
        self._recent.move_to_end(host)
        h = new.head()
        heads[stream.id] = Heads(stream.id, stream.cls, h, h if other is new else other.head())
        heads.move_to_end(stream.id)
        while len(heads) > self.recent_cap:
            heads.popitem(last=False)

    def recent_heads(self) -> int:
        """Stream heads kept for first-request comparisons, over all hosts (bounded)."""
        with self._lock:
            return sum(len(h) for h in self._recent.values())

    def _match(self, session: str, family: str, new: Snapshot) -> Stream | None:
        best: Stream | None = None
        best_score = (0, 0)
        nf = new.first
        fresh = new.fresh
        for sid in self._by_session.get(session, []):
            s = self._streams[sid]
            if ("side" if s.cls == "side" else "thread") != family:
                continue
            old = s.last
            if fresh and len(old.chain) > len(new.chain) and not old.fresh:
                continue  # a new conversation starting like this one, not this one rewound
            k = 0
            while k < min(len(old.chain), len(new.chain)) and old.chain[k] == new.chain[k]:
                k += 1
            of = old.first
            if k > 0 or (not old.chain and not new.chain and old.head_equal_key == new.head_equal_key):
                score = (3, k)
            elif of is not None and nf is not None and of.hash == nf.hash:
                score = (2, 0)
            elif of is not None and nf is not None and of.key == nf.key:
                score = (1, 0)
            else:
                continue
            if score > best_score or (
                score == best_score and best is not None and self._more_recent(s, best)
            ):
                best, best_score = s, score
        return best

    def _more_recent(self, a: Stream, b: Stream) -> bool:
        order = list(self._streams)
        return order.index(a.id) > order.index(b.id)

    def _thread_class(self, session: str, system_key: str) -> str:
        keys = self._main_keys.get(session)
        if keys is None or system_key in keys:
            self._remember_main(session, system_key)
            return "main"
        return "subagent"

    def _remember_main(self, session: str, system_key: str) -> None:
        keys = self._main_keys.setdefault(session, set())
        keys.add(system_key)
        self._main_keys.move_to_end(session)
        while len(self._main_keys) > self.cap * 4:
            self._main_keys.popitem(last=False)

    def _new_stream(self, session: str, cls: str, snap: Snapshot) -> Stream:
        first = snap.first.hash if snap.first else ""
        sid = _sid(session, cls, first, snap.system_hash)
        n = 0
        while sid in self._streams:
            n += 1
            sid = _sid(session, cls, first, snap.system_hash, str(n))
        stream = Stream(sid, session, cls, snap, 1)
        self._streams[sid] = stream
        self._by_session.setdefault(session, []).append(sid)
        while len(self._streams) > self.cap:
            old_id, old = self._streams.popitem(last=False)
            ids = self._by_session.get(old.session, [])
            if old_id in ids:
                ids.remove(old_id)
            if not ids:
                self._by_session.pop(old.session, None)
        return stream

    # --- statistics -------------------------------------------------------------------------------------

    def _stats_row(self, key: str, cls: str, session: str) -> Stats:
        row = self._stats.get(key)
        if row is None:
            row = self._stats[key] = Stats(key, cls, session)
            while len(self._stats) > self.stats_cap:
                self._stats.popitem(last=False)
        self._stats.move_to_end(key)
        return row

    def _count(
        self, key: str, cls: str, session: str, stream_id: str, verdict: str | None, interleaved: bool
    ) -> None:
        row = self._stats_row(key, cls, session)
        row.streams.add(stream_id)
        row.requests += 1
        if verdict == "first":
            row.first += 1
        elif verdict == "append-only":
            row.append_only += 1
        elif verdict == "changed":
            row.changed += 1
        row.interleaved_side += int(interleaved)

    def outcome(self, record: dict[str, Any]) -> None:
        """Add a completed request's server figures and miss class to its summary row."""
        cls = record.get("class")
        if cls is None:
            return
        session = record.get("session") or ""
        key = record["stream"] if cls in ("main", "subagent") else f"{cls}:{session}"
        with self._lock:
            row = self._stats_row(key, cls, session)
            miss = record.get("miss")
            if miss == "client":
                cause = record.get("cause") or "unknown"
                row.causes[cause] = row.causes.get(cause, 0) + 1
            elif miss == "server":
                row.server_misses += 1
            elif miss == "unknown":
                row.unknown += 1
            row.cached_tokens += int(record.get("cached_tokens") or 0)
            row.prompt_tokens += int(record.get("prompt_tokens") or 0)

    def summary(self) -> list[dict[str, Any]]:
        order = {"main": 0, "subagent": 1, "side": 2, "count_tokens": 3}
        with self._lock:
            rows = [r.as_dict() for r in self._stats.values()]
        return sorted(rows, key=lambda r: (r["session"] or "", order.get(r["class"], 9)))

    def reset(self) -> None:
        with self._lock:
            self._streams.clear()
            self._by_session.clear()
            self._main_keys.clear()
            self._side_seq.clear()
            self._thread_seq.clear()
            self._stats.clear()
            self._recent.clear()
            self.texts.clear()

    def __len__(self) -> int:
        return len(self._streams)
