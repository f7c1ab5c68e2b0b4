"""The report as text: the per-stream turn tables, the totals with causes and remedies, ``--check``."""

from __future__ import annotations

from collections import Counter

from stableprefix.core import volatile
from stableprefix.core.analyzer import SERVER_MISS_REMEDY
from stableprefix.report.model import CLASS_ORDER
from stableprefix.report.model import SERVER_REMEDY
from stableprefix.report.model import Report
from stableprefix.report.model import Stream
from stableprefix.report.model import Totals
from stableprefix.report.model import Turn
from stableprefix.report.model import fmt


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
    "allowed",
    "lost",
    "miss",
    "rules",
]
TURN_RIGHT = {0, 3, 6, 7, 8}


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
    loss, loss_est = t.lost()
    return [
        str(t.n),
        t.cls,
        t.verdict,
        kept_s,
        t.location(),
        t.cause or "-",
        f"{fmt(reused, r_est) if t.cls != 'count_tokens' else '-'}/{fmt(prompt, p_est)}",
        fmt(t.allowed(), True),
        fmt(loss, loss_est) if loss is not None else "-",
        t.miss_text(),
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
        f"  reprocessed because the client changed the prefix: {fmt(t.client_total, t.client_estimated)} tokens "
        f"on {nclient} turn{'s' if nclient != 1 else ''}"
        + (f" ({t.cross_turns} of them a conversation's first request)" if t.cross_turns else "")
    )
    if nclient:
        rows = [["cause", "turns", "tokens", "what to do"]]
        for cause, n in sorted(t.client_turns.items(), key=lambda kv: (-t.client_tokens[kv[0]], kv[0])):
            rows.append(
                [cause, str(n), fmt(t.client_tokens[cause], cause in t.client_est), volatile.remedy(cause)]
            )
        out += table(rows, {1, 2}, indent="    ")
    if t.server_turns:
        out.append(
            f"  reprocessed although the prefix was kept (server-side): {fmt(t.server_tokens, True)} tokens on "
            f"{t.server_turns} turn{'s' if t.server_turns != 1 else ''}"
        )
        if set(t.server_classes) <= set(SERVER_MISS_REMEDY):
            rows = [["class", "turns", "tokens", "what to do"]]
            for why, n in sorted(t.server_classes.items(), key=lambda kv: -t.server_class_tokens[kv[0]]):
                rows.append([why, str(n), fmt(t.server_class_tokens[why], True), SERVER_MISS_REMEDY[why]])
            out += table(rows, {1, 2}, indent="    ")
        else:
            out.append(f"    what to do: {SERVER_REMEDY}")
    if t.interleaved:
        out.append(f"  side requests interleaved with a stream: {t.interleaved}")
    if t.rewritten:
        fired = " ".join(f"{k}={v}" for k, v in sorted(t.fired.items()))
        out.append(
            f"  rules rewrote {requests(t.rewritten)} ({fired}); prefix shared only because of the rewrite: "
            f"{fmt(t.saved, True)} tokens on {requests(t.saved_turns)}{by_rule(t.saved_by)}"
        )
    if t.observed:
        fired = " ".join(f"{k}={v}" for k, v in sorted(t.would_fire.items()))
        out.append(
            f"  observe mode: rules would rewrite {requests(t.observed)} ({fired}) and save "
            f"{fmt(t.would_save, True)} tokens on {requests(t.would_save_turns)}{by_rule(t.would_save_by)}"
        )
    if t.requests and not t.verdicts:
        out.append(
            "  this log has no verdicts (written before stableprefix tracked streams): sizes and rules only"
        )
    out.append(
        "  ~ = estimated (characters, scaled by the server's tokens per character where it reported a prompt "
        "size, else 4 per token); other figures as the server reported them."
    )
    out.append(
        "  allowed = tokens the client's prefix allowed the server to reuse (shared with the previous request "
        "of the stream, or with the nearest earlier stream for a first request)."
    )
    out.append(
        "  lost = tokens of the previous request of the stream processed again after a client-side change; on a "
        "conversation's first request: tokens it would have shared with the nearest earlier one had the cause "
        "been stable."
    )
    return out


def by_rule(counts: Counter[str] | dict[str, int]) -> str:
    """`` (billing ~1,234, date ~56)`` when more than one rule saved, else ``""``."""
    if len(counts) < 2:
        return ""
    return " (" + ", ".join(f"{k} {fmt(v, True)}" for k, v in sorted(counts.items())) + ")"


def check_lines(report: Report, cross: bool = False) -> list[str]:
    """One line per main-thread turn that lost its prefix for a client-side cause (with `cross`, also per
    conversation start that lost a shared prefix to a cause a built-in rule removes)."""
    out = []
    for t in report.offences(cross):
        loss, est = t.lost()
        lost = f", {fmt(loss, est)} tokens reprocessed" if loss is not None else ""
        if t.verdict == "first":
            out.append(
                f"{t.where}: {t.cls} stream {t.stream_short()} started without the prefix it shares with stream "
                f"{str(t.rec.get('nearest_stream'))[:12]}: diverged at {t.location()} "
                f"(cause {t.cause}, rule {volatile.rule_for_cause(t.cause or '')}){lost}"
            )
            continue
        out.append(
            f"{t.where}: main turn {t.n} of stream {t.stream_short()} lost its prefix at {t.location()} "
            f"(cause {t.cause}){lost}"
        )
    return out


def requests(n: int) -> str:
    """``1 request``, ``3 requests``."""
    return f"{n} request{'s' if n != 1 else ''}"
