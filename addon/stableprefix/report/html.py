"""The report as one self-contained HTML page: inline CSS, one inline SVG chart per stream, no scripts, no
network. Each chart shows, per turn, the prompt tokens the server reused (green), those of the previous
request it had to process again because the client changed the prefix (red), and the rest it processed
(amber: new messages, a first request, a server-side miss); from the server's figures where it reported
them, estimates (paler bars) where it did not.
"""

from __future__ import annotations

import html
import math
import time

from stableprefix.core import volatile
from stableprefix.report.model import SERVER_REMEDY
from stableprefix.report.model import Report
from stableprefix.report.model import Stream
from stableprefix.report.model import Totals
from stableprefix.report.model import Turn
from stableprefix.report.model import fmt
from stableprefix.report.text import TURN_HEAD
from stableprefix.report.text import TURN_RIGHT
from stableprefix.report.text import pct
from stableprefix.report.text import stream_title
from stableprefix.report.text import turn_row

REUSED = "#2e7d32"
REPROCESSED = "#f9a825"
LOST = "#c62828"
SERVER_LABEL = "#8d6e00"
ESTIMATE_OPACITY = "0.45"

CSS = """
body{font:14px/1.45 "DejaVu Sans",system-ui,-apple-system,"Segoe UI",sans-serif;color:#1c1c1c;
 margin:0;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:20px 24px 40px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}h3{font-size:14px;margin:18px 0 6px}
.sub{color:#555;font-size:12px}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:14px 0}
.card{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:10px 14px;min-width:170px}
.card b{display:block;font-size:20px}.card span{color:#555;font-size:12px}
.card.bad b{color:#c62828}.card.good b{color:#2e7d32}
section.stream{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:8px 16px 14px;margin:14px 0}
table{border-collapse:collapse;font-size:12px;width:100%;margin-top:6px}
th,td{padding:3px 8px;border-bottom:1px solid #eceff2;text-align:left;white-space:nowrap}
th{background:#f0f2f5;font-weight:600}td.r,th.r{text-align:right}
tr.lost td{background:#fdecea}tr.server td{background:#fff6db}
.problems{background:#fff3f3;border:1px solid #e0b4b4;border-radius:6px;padding:8px 14px;color:#8a1f1f}
.note{color:#555;font-size:12px;margin-top:8px}
svg text{font-family:"DejaVu Sans",sans-serif}
"""


def e(s: object) -> str:
    return html.escape(str(s), quote=True)


def nice_max(v: float) -> tuple[float, float]:
    """(axis maximum, tick step) covering `v` with 4-5 round ticks."""
    if v <= 0:
        return 1.0, 1.0
    raw = v / 4
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return step * math.ceil(v / step), step


def short_num(v: float) -> str:
    if v >= 1_000_000:
        return f"{v / 1e6:g}M"
    if v >= 1000:
        return f"{v / 1e3:g}k"
    return f"{v:g}"


def chart(stream: Stream, width: int = 1100, height: int = 260) -> str:
    """Stacked bars per turn: reused vs processed again."""
    left, right, top, bottom = 62, 14, 30, 38
    pw, ph = width - left - right, height - top - bottom
    bars = []
    for t in stream.turns:
        prompt, p_est = t.prompt()
        reused, r_est = t.reused()
        p = prompt or 0
        r = min(reused or 0, p) if p else (reused or 0)
        p = max(p, r)
        bars.append((t, p, r, p_est or r_est))
    top_value, step = nice_max(max((b[1] for b in bars), default=0))
    n = max(len(bars), 1)
    slot = pw / n
    bw = max(1.0, min(46.0, slot * 0.72))

    def y(v: float) -> float:
        return top + ph - ph * v / top_value

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="reused versus reprocessed tokens per turn">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
    ]
    v = 0.0
    while v <= top_value + 1e-9:
        yy = y(v)
        out.append(f'<line x1="{left}" x2="{width - right}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#e3e6ea"/>')
        out.append(
            f'<text x="{left - 6}" y="{yy + 4:.1f}" font-size="11" text-anchor="end" fill="#555">'
            f"{short_num(v)}</text>"
        )
        v += step
    out.append(
        f'<text x="14" y="{top + ph / 2:.0f}" font-size="11" fill="#555" text-anchor="middle" '
        f'transform="rotate(-90 14 {top + ph / 2:.0f})">tokens</text>'
    )
    label_every = max(1, math.ceil(n / 24))
    for i, (t, p, r, est) in enumerate(bars):
        x = left + slot * i + (slot - bw) / 2
        opacity = f' fill-opacity="{ESTIMATE_OPACITY}"' if est else ""
        lost = t.client_loss
        tip = (
            f"turn {t.n} ({t.cls}, {t.verdict}{', cause ' + (t.cause or '') if lost else ''}): "
            f"reused {fmt(r, est)} of {fmt(p, est)} tokens"
            + (
                f", {fmt(t.lost()[0], t.lost()[1])} lost to the change"
                if lost and t.lost_tokens() is not None
                else ""
            )
        )
        out.append(f"<g><title>{e(tip)}</title>")
        if r:
            out.append(
                f'<rect x="{x:.1f}" y="{y(r):.1f}" width="{bw:.1f}" height="{y(0) - y(r):.1f}" '
                f'fill="{REUSED}"{opacity}/>'
            )
        # processed again = lost to a client change (red, the previous prompt's tokens) + the rest (amber)
        gone = min(t.lost_tokens() or 0, p - r) if lost else 0
        for lo, hi, color in ((r, r + gone, LOST), (r + gone, p, REPROCESSED)):
            if hi > lo:
                out.append(
                    f'<rect x="{x:.1f}" y="{y(hi):.1f}" width="{bw:.1f}" height="{y(lo) - y(hi):.1f}" '
                    f'fill="{color}"{opacity}/>'
                )
        out.append("</g>")
        cx = x + bw / 2
        if i % label_every == 0 or i == n - 1:
            out.append(
                f'<text x="{cx:.1f}" y="{top + ph + 15}" font-size="11" text-anchor="middle" fill="#333">{t.n}</text>'
            )
        label = t.cause if lost else ("server miss" if t.rec.get("miss") == "server" else None)
        if label and n <= 40:
            out.append(
                f'<text x="{cx:.1f}" y="{y(p) - 5:.1f}" font-size="10" text-anchor="middle" '
                f'fill="{LOST if lost else SERVER_LABEL}">{e(label)}</text>'
            )
    out.append(f'<line x1="{left}" x2="{width - right}" y1="{y(0):.1f}" y2="{y(0):.1f}" stroke="#999"/>')
    out.append(
        f'<text x="{left + pw / 2:.0f}" y="{height - 6}" font-size="11" text-anchor="middle" fill="#555">turn</text>'
    )
    lx = width - right - 430
    for j, (color, label) in enumerate(
        ((REUSED, "reused"), (REPROCESSED, "processed again"), (LOST, "lost to a client change"))
    ):
        xx = lx + j * 140
        out.append(f'<rect x="{xx}" y="8" width="12" height="12" fill="{color}"/>')
        out.append(f'<text x="{xx + 17}" y="18" font-size="11" fill="#333">{label}</text>')
    out.append("</svg>")
    return "".join(out)


def turn_table(turns: list[Turn], with_stream: bool = False) -> str:
    head = (["stream"] if with_stream else []) + TURN_HEAD
    right = {i + (1 if with_stream else 0) for i in TURN_RIGHT}
    rows = ["<table><thead><tr>"]
    rows += [f'<th class="r">{e(h)}</th>' if i in right else f"<th>{e(h)}</th>" for i, h in enumerate(head)]
    rows.append("</tr></thead><tbody>")
    for t in turns:
        cells = ([t.stream_short()] if with_stream else []) + turn_row(t)
        cls = (
            ' class="lost"' if t.client_loss else (' class="server"' if t.rec.get("miss") == "server" else "")
        )
        rows.append(f"<tr{cls}>")
        rows += [
            f'<td class="r">{e(c)}</td>' if i in right else f"<td>{e(c)}</td>" for i, c in enumerate(cells)
        ]
        rows.append("</tr>")
    rows.append("</tbody></table>")
    return "".join(rows)


def cards(t: Totals) -> str:
    items = [
        ("", f"{t.requests:,}", "requests"),
        (
            "good" if t.later_turns and t.append_only == t.later_turns else "",
            pct(t.append_only, t.later_turns),
            f"append-only ({t.append_only} of {t.later_turns} later turns)",
        ),
        (
            "bad" if t.client_total else "good",
            fmt(t.client_total, True),
            f"tokens reprocessed after client changes ({sum(t.client_turns.values())} turns)",
        ),
        (
            "",
            pct(t.server_cached, t.server_prompt) if t.server_requests else "-",
            f"reused by the server ({t.server_cached:,} of {t.server_prompt:,} tokens)"
            if t.server_requests
            else "the server reported no cache figures",
        ),
    ]
    if t.rewritten:
        items.append(
            (
                "good",
                fmt(t.saved, True),
                f"tokens shared only because of the rules ({t.rewritten} rewritten)",
            )
        )
    if t.observed:
        items.append(("", fmt(t.would_save, True), f"tokens the rules would save ({t.observed} requests)"))
    return (
        '<div class="cards">'
        + "".join(
            f'<div class="card {c}"><b>{e(v)}</b><span>{e(label)}</span></div>' for c, v, label in items
        )
        + "</div>"
    )


def causes(t: Totals) -> str:
    if not t.client_turns and not t.server_turns:
        return '<p class="note">No turn lost its prefix to a client-side change.</p>'
    rows = [
        '<table><thead><tr><th>cause</th><th class="r">turns</th><th class="r">tokens</th>'
        "<th>what to do</th></tr></thead><tbody>"
    ]
    for cause, n in sorted(t.client_turns.items(), key=lambda kv: (-t.client_tokens[kv[0]], kv[0])):
        rows.append(
            f'<tr><td>{e(cause)}</td><td class="r">{n}</td><td class="r">{e(fmt(t.client_tokens[cause], cause in t.client_est))}</td>'
            f"<td>{e(volatile.remedy(cause))}</td></tr>"
        )
    if t.server_turns:
        rows.append(
            f'<tr><td>server-side</td><td class="r">{t.server_turns}</td>'
            f'<td class="r">{e(fmt(t.server_tokens, True))}</td><td>{e(SERVER_REMEDY)}</td></tr>'
        )
    rows.append("</tbody></table>")
    return "".join(rows)


def section(title: str, report: Report) -> str:
    t = report.totals()
    parts = [f"<h2>{e(title)}</h2>"] if title else []
    parts.append(f'<div class="sub">{e(", ".join(report.files))}</div>')
    if report.problems:
        parts.append(
            '<div class="problems"><b>Problems reading the input</b><br>'
            + "<br>".join(e(p) for p in report.problems)
            + "</div>"
        )
    parts.append(cards(t))
    parts.append("<h3>Reprocessed tokens by cause</h3>")
    parts.append(causes(t))
    side: list[Turn] = []
    for s in report.ordered_streams():
        if s.side:
            side += s.turns
            continue
        parts.append('<section class="stream">')
        parts.append(f"<h3>{e(stream_title(s))}</h3>")
        parts.append(chart(s))
        parts.append(turn_table(s.turns))
        parts.append("</section>")
    if side:
        parts.append('<section class="stream"><h3>Side requests and token counts</h3>')
        parts.append(turn_table(side, with_stream=True))
        parts.append("</section>")
    parts.append(
        '<p class="note">~ marks estimates (4 characters per token); other figures are what the server reported. '
        "Paler bars are estimates. <i>lost</i>: tokens of the previous request of the stream that had to be "
        "processed again because the client changed the prompt.</p>"
    )
    return "".join(parts)


def render_html(sections: list[tuple[str, Report]], title: str = "stableprefix report") -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    body = "".join(section(t, r) for t, r in sections)
    return (
        "<!DOCTYPE html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<style>{CSS}</style></head><body><main>"
        f'<h1>{e(title)}</h1><div class="sub">what broke the prompt cache, per conversation stream · '
        f"generated {e(stamp)}</div>{body}</main></body></html>\n"
    )
