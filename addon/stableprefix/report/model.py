"""The offline report: what broke the prompt cache, per conversation stream, from a JSONL log or a flow file.

Inputs (detected by content, not by extension):

- the addon's JSONL log (``--set stableprefix_log=FILE``): one record per handled request;
- a mitmproxy flow file (``mitmdump -w FILE``, recorded with or without the addon) or a HAR file: every HTTP
  flow is fed through `stableprefix.analyzer.Analyzer` in observe mode, so the report shows what the rules
  *would* change on traffic recorded without them. Flows are read one by one (bounded memory).

Figures (``~`` marks an estimate from characters, `CHARS_PER_TOKEN` per token; other figures are what the
server reported):

- *prompt* of a request: ``prompt_tokens`` when the server reported it, else its characters (system + tools +
  messages, canonical form) / 4.
- *reused*: ``cached_tokens`` when the server reported it, else ``reusable_tokens_est`` (the prefix it shares
  with the previous request of its stream).
- *lost to a client-side change* (a turn whose verdict is ``changed``, cause other than
  ``cache_markers_only``): the characters of the previous request of the stream minus the characters this
  request still shares with it, / 4. It counts only what the client changed, whatever the server did.
- *lost server-side* (``miss: server``: prefix kept, server reused less): the tokens the server should have
  reused (`stableprefix.analyzer.expected_cached`: the reusable share of its reported prompt) minus
  ``cached_tokens``.
- *rules saved* (rules active, ``removed``): the estimated reusable prefix of every later turn of a stream whose
  request the rules rewrote. An upper bound: it assumes the removed part would otherwise have changed between
  requests, as Claude Code's per-request ``cch`` does.
- *rules would save* (observe mode, ``would_change``): the tokens lost on turns whose cause is exactly what a
  rule that would have fired removes (billing, date, git_status).

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


def _int(v: Any) -> int | None:
    """`v` as an int when it is a finite number (not a bool); else None. Logs may hold anything."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return int(v) if math.isfinite(v) else None


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
        return (tokens(r), True) if r is not None else (None, True)

    @property
    def client_loss(self) -> bool:
        """The prefix changed on the client's side (not just cache markers)."""
        if self.verdict == "changed":
            return volatile.costs(self.cause or "")
        return self.rec.get("miss") == "client" and self.verdict == "?"

    def lost_tokens(self) -> int | None:
        """Tokens of the previous request that must be processed again because the client changed it."""
        if not self.client_loss or self.prev is None:
            return None
        before, kept = self.prev.chars, self.reusable_chars
        if before is None or kept is None:
            return None
        return tokens(max(0, before - kept))

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

    def saved_tokens(self) -> int | None:
        """Reusable prefix of a later turn whose request the rules rewrote (upper bound, see module doc)."""
        fired, observe = self.rules()
        if not fired or observe or self.n == 1 or self.cls == "count_tokens":
            return None
        r = self.reusable_chars
        return tokens(r) if r is not None else None

    def would_save_tokens(self) -> int | None:
        """Tokens lost on this turn that a rule which would have fired removes exactly."""
        fired, observe = self.rules()
        rule = volatile.rule_for_cause(self.cause or "")
        if not observe or rule is None or rule not in {k.split(".")[0] for k in fired}:
            return None
        return self.lost_tokens()

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
    server_turns: int = 0
    server_tokens: int = 0
    interleaved: int = 0
    rewritten: int = 0
    fired: Counter[str] = field(default_factory=Counter)
    saved: int = 0
    saved_turns: int = 0
    observed: int = 0
    would_fire: Counter[str] = field(default_factory=Counter)
    would_save: int = 0
    would_save_turns: int = 0

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
            if turn.client_loss:
                cause = turn.cause or "unknown"
                t.client_turns[cause] += 1
                t.client_tokens[cause] += turn.lost_tokens() or 0
            if (s := turn.server_lost_tokens()) is not None:
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
            if (s := turn.would_save_tokens()) is not None:
                t.would_save += s
                t.would_save_turns += 1
        return t

    def offences(self) -> list[Turn]:
        """Main-thread turns that lost their prefix for a client-side cause."""
        return [t for t in self.turns() if t.cls == "main" and t.client_loss]


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
