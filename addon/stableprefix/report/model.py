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

import json
import math
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import IO
from typing import Any
from typing import BinaryIO

from stableprefix.core import record as records
from stableprefix.core import volatile

CHARS_PER_TOKEN = 4
MAX_PROBLEMS_PER_FILE = 5
SERVER_REMEDY = (
    "prefix kept but the server reused less: more slots (llama-server --parallel), a host-RAM cache "
    "(--cache-ram), or route side requests to another server"
)
CLASS_ORDER = {"main": 0, "subagent": 1, "side": 2, "count_tokens": 3}
_FLOW_HEAD = re.compile(rb"\A\d{1,12}:")


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

    # -- reading

    def read(self, path: str | Path, progress: bool | None = None) -> None:
        """Add every record of one file; problems are collected, never raised."""
        name = str(path)
        self.files.append(name)
        show = sys.stderr.isatty() if progress is None else progress
        try:
            fo = open(path, "rb")  # noqa: SIM115 - closed below
        except OSError as e:
            self.problem(name, f"cannot read: {e.strerror or e}")
            return
        with fo:
            try:
                size = os.fstat(fo.fileno()).st_size
                head = fo.read(64)
                fo.seek(0)
            except OSError as e:
                self.problem(name, f"cannot read: {e.strerror or e}")
                return
            meter = Progress(name, size, sys.stderr) if show else None
            try:
                kind = detect(head, fo)
                if kind == "jsonl":
                    self._read_jsonl(fo, name, meter)
                elif kind in ("flows", "har"):
                    self._read_flows(fo, name, meter)
                elif kind == "empty":
                    pass
                else:
                    self.problem(
                        name,
                        "not a stableprefix JSONL log, a mitmproxy flow file or a HAR file "
                        f"(it starts with {head[:16]!r})",
                    )
            except OSError as e:
                self.problem(name, f"cannot read: {e.strerror or e}")
            finally:
                if meter:
                    meter.done()

    def _read_jsonl(self, fo: BinaryIO, name: str, meter: Progress | None) -> None:
        bad = 0
        for lineno, raw in enumerate(fo, 1):
            if meter:
                meter.update(fo.tell(), lineno, "lines")
            if not raw.strip():
                continue
            where = f"{name}:{lineno}"
            try:
                rec = json.loads(raw)
            except (ValueError, RecursionError) as e:
                bad += 1
                if bad <= MAX_PROBLEMS_PER_FILE:
                    why = "not UTF-8" if isinstance(e, UnicodeDecodeError) else f"not JSON ({e})"
                    self.problem(where, f"line is {why}"[:200])
                continue
            if not isinstance(rec, dict):
                bad += 1
                if bad <= MAX_PROBLEMS_PER_FILE:
                    self.problem(where, f"line is JSON but not an object ({type(rec).__name__})")
                continue
            self.add(records.upgrade(rec), where, name)
        if bad > MAX_PROBLEMS_PER_FILE:
            self.problem(name, f"{bad - MAX_PROBLEMS_PER_FILE} more lines skipped (not JSON objects)")

    def _read_flows(self, fo: BinaryIO, name: str, meter: Progress | None) -> None:
        from mitmproxy import exceptions
        from mitmproxy import http
        from mitmproxy import io as mio

        analyzer: Any = None
        reader = mio.FlowReader(fo)
        index = 0  # flows read so far, readable or not
        skipped: dict[str, list[int]] = {}  # message -> [first flow, count]
        while True:
            try:
                for f in reader.stream():
                    index += 1
                    if meter:
                        meter.update(fo.tell(), index, "flows")
                    if not isinstance(f, http.HTTPFlow):
                        continue
                    where = f"{name} flow {index}"
                    if analyzer is None:
                        analyzer = new_analyzer()
                    try:
                        rec = analyze_flow(analyzer, f)
                    except Exception as e:  # noqa: BLE001 - one bad flow must not end the report
                        self.problem(where, f"cannot analyse: {type(e).__name__}: {e}"[:200])
                        continue
                    if rec is not None:
                        self.add(rec, where, name)
                break
            except exceptions.FlowReadException as e:
                index += 1
                msg = str(e).rstrip(".") or "unreadable flow"
                if msg == "Invalid data format" or "HAR" in msg:  # the rest of the file is lost
                    where = f"{name} flow {index}" if index > 1 else name
                    what = "a readable mitmproxy flow file" + (" from here on" if index > 1 else "")
                    self.problem(where, f"not {what} ({msg})")
                    break
                # one flow in a format this mitmproxy cannot read (another version): skip it, read on
                skipped.setdefault(msg, [index, 0])[1] += 1
            except Exception as e:  # noqa: BLE001 - whatever a corrupt file makes mitmproxy raise
                self.problem(f"{name} flow {index + 1}", f"cannot read flow: {type(e).__name__}: {e}"[:200])
                break
        for msg, (first, count) in skipped.items():
            more = f" (and {count - 1} more flow{'s' if count > 2 else ''} like it)" if count > 1 else ""
            self.problem(f"{name} flow {first}", f"skipped: {msg}{more}")

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


def detect(head: bytes, fo: BinaryIO) -> str:
    """'jsonl', 'flows', 'har', 'empty' or 'unknown', from the first bytes (and line) of a file."""
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    if not text:
        return "empty" if not head.strip() else "unknown"
    if _FLOW_HEAD.match(head):
        return "flows"
    if text.startswith(b"{"):
        first = fo.readline(1 << 20).strip().lstrip(b"\xef\xbb\xbf")
        fo.seek(0)
        return "har" if first == b"{" else "jsonl"
    return "unknown"


def new_analyzer() -> Any:
    """The core that fingerprints recorded requests offline, in observe mode (rules report, never rewrite)."""
    from stableprefix.core import pipeline
    from stableprefix.core.analyzer import Analyzer

    return Analyzer(pipeline.Settings(observe=True))


def analyze_flow(analyzer: Any, f: Any) -> dict[str, Any] | None:
    """The record of one recorded HTTP flow (None when it is not an LLM request)."""
    req = f.request
    raw = req.get_content(strict=False) or b""
    result = analyzer.request(req.method, req.host, req.path, raw, req.headers)
    if result is None:
        return None
    rec: dict[str, Any] = {"ts": round(req.timestamp_start or 0, 3), "id": f.id, **result.record}
    if f.response is not None:
        resp = f.response
        rec = analyzer.response(rec, resp.status_code, resp.headers, resp.get_content(strict=False)) or rec
    elif f.error is not None:
        rec["error"] = rec.get("error") or str(f.error.msg)[:200]
    return rec


class Progress:
    """A one-line progress meter on a terminal (stderr), redrawn at most 5 times a second."""

    def __init__(self, name: str, size: int, out: IO[str]) -> None:
        self.name, self.size, self.out = name, size, out
        self.last = 0.0
        self.shown = False

    def update(self, pos: int, count: int, unit: str) -> None:
        now = time.monotonic()
        if now - self.last < 0.2:
            return
        self.last = now
        pct = f" {100 * pos / self.size:.0f}%" if self.size else ""
        self.out.write(
            f"\rreading {self.name}: {pos / 1e6:,.1f}/{self.size / 1e6:,.1f} MB{pct}, {count:,} {unit}"
        )
        self.out.flush()
        self.shown = True

    def done(self) -> None:
        if self.shown:
            self.out.write("\r\033[K")
            self.out.flush()


def read(paths: list[str | Path] | list[str] | list[Path], progress: bool | None = None) -> Report:
    report = Report()
    for p in paths:
        report.read(p, progress)
    return report


# ---------------------------------------------------------------------------------------------- text


def table(rows: list[list[str]], right: set[int], indent: str = "  ") -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        out.append((indent + "  ".join(cells)).rstrip())
    return out


TURN_HEAD = [
    "#",
    "class",
    "verdict",
    "msgs kept",
    "diverged at",
    "cause",
    "reused/prompt",
    "lost",
    "miss",
    "rules",
]
TURN_RIGHT = {0, 3, 6, 7}


def turn_row(t: Turn) -> list[str]:
    reused, r_est = t.reused()
    prompt, p_est = t.prompt()
    kept = t.rec.get("common_prefix_messages")
    msgs = t.messages
    compared = t.verdict in ("append-only", "changed") and kept is not None
    kept_s = f"{kept}/{msgs if msgs is not None else '?'}" if compared else "-"
    fired, observe = t.rules()
    rules = " ".join(f"{k}={v}" for k, v in fired.items())
    if observe and rules:
        rules = "would: " + rules
    loss = t.lost_tokens()
    return [
        str(t.n),
        t.cls,
        t.verdict,
        kept_s,
        t.location(),
        t.cause or "-",
        f"{fmt(reused, r_est) if t.cls != 'count_tokens' else '-'}/{fmt(prompt, p_est)}",
        fmt(loss, True) if loss is not None else "-",
        str(t.rec.get("miss") or "-"),
        rules or "-",
    ]


def stream_title(s: Stream) -> str:
    sid = s.attr("stream")
    bits = [f"stream {sid[:12]}" if sid else "stream (no id in the log)", s.cls]
    bits.append(f"{len(s.turns)} request{'s' if len(s.turns) != 1 else ''}")
    if sess := s.attr("session"):
        bits.append(f"session {sess[:12]}")
    if host := s.attr("host"):
        bits.append(f"host {host}")
    first = s.turns[0].where if s.turns else ""
    bits.append(f"from {first}")
    return " · ".join(bits)


def render_text(report: Report) -> str:
    lines: list[str] = []
    t = report.totals()
    nstreams = len(report.streams)
    lines.append(
        f"stableprefix report: {len(report.files)} file{'s' if len(report.files) != 1 else ''}, "
        f"{t.requests} request{'s' if t.requests != 1 else ''} in {nstreams} stream{'s' if nstreams != 1 else ''}"
    )
    side: list[Stream] = []
    for s in report.ordered_streams():
        if s.side:
            side.append(s)
            continue
        lines.append("")
        lines.append(stream_title(s))
        lines += table([TURN_HEAD] + [turn_row(x) for x in s.turns], TURN_RIGHT)
    if side:
        lines.append("")
        nside = sum(len(s.turns) for s in side)
        lines.append(
            f"side requests and token counts: {nside} request{'s' if nside != 1 else ''} in {len(side)} stream{'s' if len(side) != 1 else ''}"
        )
        rows = [["stream", *TURN_HEAD]]
        for s in side:
            rows += [[s.key[:12], *turn_row(x)] for x in s.turns]
        lines += table(rows, {i + 1 for i in TURN_RIGHT})
    lines.append("")
    lines += render_totals(t)
    if report.problems:
        lines.append("")
        lines.append(f"problems ({len(report.problems)}; see stderr)")
    return "\n".join(lines) + "\n"


def pct(a: int, b: int) -> str:
    return f"{100 * a / b:.1f}%" if b else "-"


def render_totals(t: Totals) -> list[str]:
    out = ["totals"]
    classes = ", ".join(
        f"{k} {v}" for k, v in sorted(t.by_class.items(), key=lambda kv: CLASS_ORDER.get(kv[0], 9))
    )
    out.append(f"  requests: {t.requests} ({classes or 'none'})")
    out.append(
        f"  turns after the first of their stream: {t.later_turns} (append-only {t.append_only}, changed {t.changed})"
    )
    if t.server_requests:
        out.append(
            f"  server reported: reused {t.server_cached:,} of {t.server_prompt:,} prompt tokens "
            f"({pct(t.server_cached, t.server_prompt)}) on {t.server_requests} request{'s' if t.server_requests != 1 else ''}"
        )
    else:
        out.append("  server reported: nothing (no cache figures in the responses)")
    nclient = sum(t.client_turns.values())
    out.append(
        f"  reprocessed because the client changed the prefix: {fmt(t.client_total, True)} tokens "
        f"on {nclient} turn{'s' if nclient != 1 else ''}"
    )
    if nclient:
        rows = [["cause", "turns", "tokens", "what to do"]]
        for cause, n in sorted(t.client_turns.items(), key=lambda kv: (-t.client_tokens[kv[0]], kv[0])):
            rows.append([cause, str(n), fmt(t.client_tokens[cause], True), volatile.remedy(cause)])
        out += table(rows, {1, 2}, indent="    ")
    if t.server_turns:
        out.append(
            f"  reprocessed although the prefix was kept (server-side): {fmt(t.server_tokens, True)} tokens on "
            f"{t.server_turns} turn{'s' if t.server_turns != 1 else ''}"
        )
        out.append(f"    what to do: {SERVER_REMEDY}")
    if t.interleaved:
        out.append(f"  side requests interleaved with a stream: {t.interleaved}")
    if t.rewritten:
        fired = " ".join(f"{k}={v}" for k, v in sorted(t.fired.items()))
        out.append(
            f"  rules rewrote {t.rewritten} request{'s' if t.rewritten != 1 else ''} ({fired}); "
            f"prefix they kept reusable on {t.saved_turns} later turn{'s' if t.saved_turns != 1 else ''}: "
            f"up to {fmt(t.saved, True)} tokens"
        )
    if t.observed:
        fired = " ".join(f"{k}={v}" for k, v in sorted(t.would_fire.items()))
        out.append(
            f"  observe mode: rules would rewrite {t.observed} request{'s' if t.observed != 1 else ''} ({fired}) "
            f"and save {fmt(t.would_save, True)} tokens on {t.would_save_turns} turn{'s' if t.would_save_turns != 1 else ''}"
        )
    if t.requests and not t.verdicts:
        out.append(
            "  this log has no verdicts (written before stableprefix tracked streams): sizes and rules only"
        )
    out.append("  ~ = estimated (4 characters per token); other figures as the server reported them.")
    out.append(
        "  lost = tokens of the previous request of the stream processed again after a client-side change."
    )
    return out


def check_lines(report: Report) -> list[str]:
    """One line per main-thread turn that lost its prefix for a client-side cause."""
    out = []
    for t in report.offences():
        loss = t.lost_tokens()
        lost = f", {fmt(loss, True)} tokens reprocessed" if loss is not None else ""
        out.append(
            f"{t.where}: main turn {t.n} of stream {t.stream_short()} lost its prefix at {t.location()} "
            f"(cause {t.cause}){lost}"
        )
    return out
