"""The offline report: what broke the prompt cache, per conversation stream, from a JSONL log or a flow file.

Inputs (detected by content, not by extension):

- the addon's JSONL log (``--set stableprefix_log=FILE``): one record per handled request;
- a mitmproxy flow file (``mitmdump -w FILE``, recorded with or without the addon) or a HAR file: every HTTP
  flow is fed through `stableprefix.analyzer.Analyzer` in observe mode, so the report shows what the rules
  *would* change on traffic recorded without them. Flows are read one by one (bounded memory).

Figures (``~`` marks an estimate; other figures are what the server reported). An estimate counts
characters, scaled by the server's own tokens per character where it reported the prompt's size (a chat
template may not render all the text: SmolLM2's drops the tools), else `CHARS_PER_TOKEN` per token:

- *prompt* of a request: ``prompt_tokens`` when the server reported it, else its characters (system + tools +
  messages, canonical form) / 4.
- *reused*: ``cached_tokens`` when the server reported it, else the estimated prefix it shares with the
  previous request of its stream.
- *lost to a client-side change* (a turn whose verdict is ``changed``, cause other than
  ``cache_markers_only``): measured as the previous request's ``prompt_tokens`` minus this request's
  ``cached_tokens`` when the server reported both; else estimated from the characters of the previous request
  minus the characters this request still shares with it.
- *lost server-side* (``miss: server``: prefix kept, server reused less): the tokens the server should have
  reused (`stableprefix.analyzer.expected_cached`: the reusable share of its reported prompt) minus
  ``cached_tokens``.
- *rules saved* (rules active, ``changed``) and *would save* (observe mode, ``would_change``): the record's
  ``saved_by`` (a counterfactual the addon measures per request: the prefix shared after the rewrite that
  would not have been shared before it, against the previous request of the stream, or the nearest earlier
  stream for a first request), in estimated tokens. Both modes give the same figure for the same traffic.
  Logs written before ``saved_by`` existed show no saving (the old "up to" figure was an upper bound).

``--check`` fails a main-thread turn that lost its prefix for a client-side cause (verdict ``changed``, cause
other than ``cache_markers_only``).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from typing import Any

from stableprefix.core import volatile

CHARS_PER_TOKEN = 4
SERVER_REMEDY = (
    "prefix kept but the server reused less: more slots (llama-server --parallel), a host-RAM cache "
    "(--cache-ram), or route side requests to another server"
)
CLASS_ORDER = {"main": 0, "subagent": 1, "side": 2, "count_tokens": 3}


def tokens(chars: float) -> int:
    return int(round(chars / CHARS_PER_TOKEN))


def fmt(n: int | None, est: bool = False) -> str:
    if n is None:
        return "-"
    return f"~{n:,}" if est else f"{n:,}"


MAX_FIGURE = 10**15  # a larger count in a log is corrupt, not a figure


def _int(v: Any) -> int | None:
    """`v` as an int when it is a finite number (not a bool) of sane size; else None. Logs may hold anything."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return int(v) if abs(v) <= MAX_FIGURE else None


def _count(v: Any) -> int:
    """A rule's count; a rule named with a count that is not a number fired once."""
    n = _int(v)
    return n if n is not None else 1


# ---------------------------------------------------------------------------------------------- the model


@dataclass
class Turn:
    """One request of a stream, with the previous request of the same stream."""

    rec: dict[str, Any]
    where: str  # "FILE:LINE" or "FILE flow N"
    n: int  # 1-based position in its stream
    prev: Turn | None = None

    @property
    def cls(self) -> str:
        return str(self.rec.get("class") or "?")

    @property
    def verdict(self) -> str:
        v = self.rec.get("verdict")
        if v:
            return str(v)
        return "-" if self.cls == "count_tokens" else "?"

    @property
    def cause(self) -> str | None:
        c = self.rec.get("cause")
        if self.verdict == "changed" and not c:
            return "unknown"
        return str(c) if c else None

    @property
    def chars(self) -> int | None:
        """Characters of the whole prompt (system + tools + messages), if the record has the sizes."""
        r = self.rec
        if "system_chars" not in r and "tools_chars" not in r and "message_chars" not in r:
            return None
        msgs = r.get("message_chars")
        return (
            (_int(r.get("system_chars")) or 0)
            + (_int(r.get("tools_chars")) or 0)
            + sum(_int(x) or 0 for x in (msgs if isinstance(msgs, list) else ()))
        )

    @property
    def messages(self) -> int | None:
        r = self.rec
        if isinstance(r.get("_messages"), int):
            return int(r["_messages"])
        for key in ("message_chars", "chain"):
            if isinstance(r.get(key), list):
                return len(r[key])
        return _int(r.get("messages"))

    @property
    def reusable_chars(self) -> int | None:
        r = self.rec
        if (c := _int(r.get("reusable_chars"))) is not None:
            return c
        if (t := _int(r.get("reusable_tokens_est"))) is not None:
            return t * CHARS_PER_TOKEN
        return None

    @property
    def server_cached(self) -> int | None:
        return _int(self.rec.get("cached_tokens"))

    @property
    def server_prompt(self) -> int | None:
        return _int(self.rec.get("prompt_tokens"))

    def per_char(self) -> float | None:
        """Tokens per character of this prompt as the server counted it (its template may drop text, e.g.
        the tools), from the server's prompt size; None when the server reported none."""
        p, c = self.server_prompt, self.chars
        return p / c if p is not None and p > 0 and c else None

    def estimate(self, chars: int) -> int:
        """Tokens of `chars` characters of this prompt: scaled by the server's count when it reported one,
        else `CHARS_PER_TOKEN`. Always an estimate (print it with ``~``)."""
        ratio = self.per_char()
        return int(round(chars * ratio)) if ratio is not None else tokens(chars)

    def prompt(self) -> tuple[int | None, bool]:
        """(prompt tokens, estimated?)"""
        if (p := self.server_prompt) is not None:
            return p, False
        c = self.chars
        return (tokens(c), True) if c is not None else (None, True)

    def reused(self) -> tuple[int | None, bool]:
        """(reused tokens, estimated?)"""
        if (c := self.server_cached) is not None:
            return c, False
        r = self.reusable_chars
        if r is None and self.verdict == "first":
            r = 0
        return (self.estimate(r), True) if r is not None else (None, True)

    def allowed(self) -> int | None:
        """Tokens the client's prefix allowed the server to reuse (shared with the previous request of the
        stream, or with the nearest earlier stream for a first request), in the server's tokens per character
        where it reported a prompt size. An estimate; None when there is nothing to compare with."""
        if self.cls == "count_tokens" or self.verdict not in ("append-only", "changed", "first"):
            return None
        if self.verdict == "first" and not self.rec.get("nearest_stream"):
            return None
        r = self.reusable_chars
        return self.estimate(r) if r is not None else None

    def miss_text(self) -> str:
        """``client``, ``server (evicted)``, ``unknown`` or ``-``."""
        miss = self.rec.get("miss")
        if not miss:
            return "-"
        why = self.rec.get("server_miss_class")
        if miss == "server" and not why and self.rec.get("interleaved_side"):
            why = "side-interleaved"
        return f"server ({why})" if miss == "server" and why else str(miss)

    @property
    def client_loss(self) -> bool:
        """The prefix changed on the client's side (not just cache markers)."""
        if self.verdict == "changed":
            return volatile.costs(self.cause or "")
        return self.rec.get("miss") == "client" and self.verdict == "?"

    @property
    def cross_loss(self) -> bool:
        """A stream's first request that would have shared more with the nearest earlier stream had a known
        volatile item (billing suffix, date, ...) been equal: a cross-conversation miss the rules address."""
        r = self.rec
        if self.verdict != "first" or not r.get("nearest_stream") or not volatile.costs(self.cause or ""):
            return False
        more = (_int(r.get("shareable_chars")) or 0) - (self.reusable_chars or 0)
        return more > 0 and self.cause not in (None, "unknown")

    def cross_lost(self) -> tuple[int | None, bool]:
        """(tokens processed because of a cross-conversation miss, estimated?): the prefix shareable with the
        nearest earlier stream, in the server's tokens per character, minus what the server reused (or minus
        the prefix shared, without a server figure). Always scaled, so an estimate."""
        if not self.cross_loss:
            return None, True
        shareable = _int(self.rec.get("shareable_chars")) or 0
        cached = self.server_cached
        if cached is not None:
            return max(0, self.estimate(shareable) - cached), True
        return self.estimate(max(0, shareable - (self.reusable_chars or 0))), True

    def lost(self) -> tuple[int | None, bool]:
        """(tokens of the previous request processed again because the client changed it, estimated?).

        Measured when the server reported the previous prompt's size and this request's reuse: previous
        prompt tokens minus tokens reused now. Else the characters lost, scaled by the server's tokens per
        character when it reported a prompt size (its template may not render all the text), else / 4."""
        if self.cross_loss:
            return self.cross_lost()
        if not self.client_loss or self.prev is None:
            return None, True
        prev_prompt, cached = self.prev.server_prompt, self.server_cached
        if prev_prompt is not None and prev_prompt > 0 and cached is not None:
            return max(0, prev_prompt - cached), False
        before, kept = self.prev.chars, self.reusable_chars
        if before is None or kept is None:
            return None, True
        gone = max(0, before - kept)
        ratio = self.prev.per_char() or self.per_char()
        return (int(round(gone * ratio)) if ratio is not None else tokens(gone)), True

    def lost_tokens(self) -> int | None:
        """The figure of `lost` (measured or estimated)."""
        return self.lost()[0]

    def server_lost_tokens(self) -> int | None:
        if self.rec.get("miss") != "server":
            return None
        cached = self.server_cached
        if cached is None or self.reusable_chars is None:
            return None
        from stableprefix.core.analyzer import expected_cached  # pure: the figure the miss was classified by

        return max(0, expected_cached(self.rec) - cached)

    def rules(self) -> tuple[dict[str, int], bool]:
        """(rule -> count, observe?) of what the rules changed or would have changed."""
        removed = self.rec.get("changed")
        if isinstance(removed, dict) and removed:
            return {str(k): _count(v) for k, v in removed.items()}, False
        would = self.rec.get("would_change")
        if isinstance(would, dict) and would:
            return {str(k): _count(v) for k, v in would.items()}, True
        return {}, False

    def savings(self) -> dict[str, int]:
        """Rule -> estimated tokens of prefix shared only because of the rewrite (or would be, observing)."""
        by = self.rec.get("saved_by")
        if not isinstance(by, dict):
            return {}
        out = {}
        for rule, chars in by.items():
            c = _int(chars)
            if c is not None and c > 0:
                out[str(rule)] = self.estimate(c)
        return out

    def saved_tokens(self) -> int | None:
        """Tokens the rules' rewrite kept shared on this request (rules active), or None."""
        fired, observe = self.rules()
        s = self.savings()
        return sum(s.values()) if s and not observe else None

    def would_save_tokens(self) -> int | None:
        """Tokens the rules would keep shared on this request (observe mode), or None."""
        fired, observe = self.rules()
        s = self.savings()
        return sum(s.values()) if s and observe else None

    def stream_short(self) -> str:
        return str(self.rec.get("stream") or "?")[:12]

    def location(self) -> str:
        d = self.rec.get("diverged_at")
        if not d:
            return "-"
        changed = self.rec.get("tools_changed")
        if d == "tools" and isinstance(changed, dict):
            bits = [f"{k} {','.join(map(str, v))}" for k, v in changed.items() if v]
            if bits:
                return f"tools ({'; '.join(bits)})"
        elif d == "tools" and isinstance(changed, list) and changed:
            return f"tools ({','.join(map(str, changed))})"
        return str(d)


@dataclass
class Stream:
    key: str
    turns: list[Turn] = field(default_factory=list)

    @property
    def cls(self) -> str:
        counts = Counter(t.cls for t in self.turns)
        return counts.most_common(1)[0][0] if counts else "?"

    @property
    def side(self) -> bool:
        return self.cls in ("side", "count_tokens")

    def attr(self, key: str) -> str | None:
        for t in self.turns:
            if t.rec.get(key):
                return str(t.rec[key])
        return None


@dataclass
class Problem:
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass
class Totals:
    requests: int = 0
    verdicts: int = 0  # records that carry a verdict (older logs have none)
    by_class: Counter[str] = field(default_factory=Counter)
    later_turns: int = 0  # turns after the first of their stream (count_tokens excluded)
    append_only: int = 0
    changed: int = 0
    server_requests: int = 0
    server_cached: int = 0
    server_prompt: int = 0
    client_turns: Counter[str] = field(default_factory=Counter)
    client_tokens: Counter[str] = field(default_factory=Counter)
    client_est: set[str] = field(default_factory=set)  # causes whose client_tokens hold an estimate
    cross_turns: int = 0  # of client_turns: first requests of a stream (cross-conversation misses)
    server_classes: Counter[str] = field(default_factory=Counter)  # server-side misses by class
    server_class_tokens: Counter[str] = field(default_factory=Counter)
    server_turns: int = 0
    server_tokens: int = 0
    interleaved: int = 0
    rewritten: int = 0
    fired: Counter[str] = field(default_factory=Counter)
    saved: int = 0
    saved_turns: int = 0
    saved_by: Counter[str] = field(default_factory=Counter)
    observed: int = 0
    would_fire: Counter[str] = field(default_factory=Counter)
    would_save: int = 0
    would_save_turns: int = 0
    would_save_by: Counter[str] = field(default_factory=Counter)

    @property
    def client_estimated(self) -> bool:
        return bool(self.client_est)

    @property
    def client_total(self) -> int:
        return sum(self.client_tokens.values())


class Report:
    """Records grouped into streams, in the order they were read; problems met on the way."""

    def __init__(self) -> None:
        self.files: list[str] = []
        self.streams: dict[str, Stream] = {}
        self.problems: list[Problem] = []
        self._by_id: dict[tuple[str, str], Turn] = {}

    # -- building

    def add(self, rec: dict[str, Any], where: str, file: str = "") -> Turn | None:
        rec = slim(rec)
        rid = rec.get("id")
        if isinstance(rid, str) and (file, rid) in self._by_id:  # a later line completing the record
            turn = self._by_id[(file, rid)]
            turn.rec.update(rec)
            return turn
        key = str(rec.get("stream") or (f"session:{rec['session']}" if rec.get("session") else "?"))
        stream = self.streams.setdefault(key, Stream(key))
        prev = next((t for t in reversed(stream.turns) if t.cls != "count_tokens"), None)
        turn = Turn(rec, where, len(stream.turns) + 1, prev)
        stream.turns.append(turn)
        if isinstance(rid, str):
            self._by_id[(file, rid)] = turn
        return turn

    def problem(self, where: str, message: str) -> None:
        self.problems.append(Problem(where, message))

    # -- figures

    def turns(self) -> Iterator[Turn]:
        for s in self.streams.values():
            yield from s.turns

    def ordered_streams(self) -> list[Stream]:
        """Main threads first, then subagents, then side streams; in order of appearance within each."""
        order = list(self.streams.values())
        return sorted(order, key=lambda s: CLASS_ORDER.get(s.cls, 9))

    def totals(self) -> Totals:
        t = Totals()
        for turn in self.turns():
            r = turn.rec
            t.requests += 1
            t.by_class[turn.cls] += 1
            if r.get("verdict"):
                t.verdicts += 1
            if turn.cls != "count_tokens" and turn.n > 1:
                t.later_turns += 1
                if turn.verdict == "append-only":
                    t.append_only += 1
                elif turn.verdict == "changed":
                    t.changed += 1
            if turn.server_cached is not None and turn.server_prompt is not None:
                t.server_requests += 1
                t.server_cached += turn.server_cached
                t.server_prompt += turn.server_prompt
            if turn.client_loss or turn.cross_loss:
                cause = turn.cause or "unknown"
                t.client_turns[cause] += 1
                t.cross_turns += int(turn.cross_loss)
                lost, est = turn.lost()
                t.client_tokens[cause] += lost or 0
                if est and lost is not None:
                    t.client_est.add(cause)
            if (s := turn.server_lost_tokens()) is not None:
                why = r.get("server_miss_class") or (
                    "side-interleaved" if r.get("interleaved_side") else None
                )
                t.server_classes[str(why or "unclassified")] += 1
                t.server_class_tokens[str(why or "unclassified")] += s
                t.server_turns += 1
                t.server_tokens += s
            if r.get("interleaved_side"):
                t.interleaved += 1
            fired, observe = turn.rules()
            if fired and not observe:
                t.rewritten += 1
                t.fired.update(fired)
            elif fired:
                t.observed += 1
                t.would_fire.update(fired)
            if (s := turn.saved_tokens()) is not None:
                t.saved += s
                t.saved_turns += 1
                t.saved_by.update(turn.savings())
            if (s := turn.would_save_tokens()) is not None:
                t.would_save += s
                t.would_save_turns += 1
                t.would_save_by.update(turn.savings())
        return t

    def offences(self, cross: bool = False) -> list[Turn]:
        """Main-thread turns that lost their prefix for a client-side cause; with `cross` also the first
        requests of conversations (main or subagent) that lost a prefix shared with an earlier one to a cause
        a built-in rule removes (the rules could have prevented it)."""
        out = []
        for t in self.turns():
            if t.cls == "main" and t.client_loss:
                out.append(t)
            elif cross and t.cross_loss and volatile.rule_for_cause(t.cause or "") is not None:
                out.append(t)
        return out


#: record fields the report never reads; dropped so memory grows by a few hundred bytes per request,
#: not by the length of each conversation
UNUSED_FIELDS = ("chain", "tool_names", "system_hash", "tools_hash", "params_hash", "prefix_hash", "context")


def slim(rec: dict[str, Any]) -> dict[str, Any]:
    """`rec` without the per-message lists: ``message_chars`` becomes its sum, its length ``_messages``."""
    out = {k: v for k, v in rec.items() if k not in UNUSED_FIELDS}
    for key in ("message_chars", "chain"):
        if isinstance(rec.get(key), list):
            out["_messages"] = len(rec[key])
            break
    msgs = rec.get("message_chars")
    if isinstance(msgs, list):
        out["message_chars"] = [sum(x for x in msgs if isinstance(x, int) and not isinstance(x, bool))]
    return out
