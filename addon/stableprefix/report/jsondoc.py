"""The report as one versioned JSON document (``stableprefix report --json``); docs/report-json.md is its schema.

Every token figure is an object ``{"tokens": N, "estimated": bool}`` (or null when there is no figure):
``estimated`` false means the server reported it, true that it was counted from characters (scaled by the
server's tokens per character where it reported a prompt size), as ``~`` marks it in the text report.
"""

from __future__ import annotations

from typing import Any

from stableprefix.core import volatile
from stableprefix.report.model import SERVER_REMEDY
from stableprefix.report.model import Report
from stableprefix.report.model import Stream
from stableprefix.report.model import Totals
from stableprefix.report.model import Turn

SCHEMA = "stableprefix-report"
VERSION = 1


def figure(value: int | None, estimated: bool) -> dict[str, Any] | None:
    return None if value is None else {"tokens": value, "estimated": estimated}


def turn_doc(t: Turn) -> dict[str, Any]:
    r = t.rec
    fired, observe = t.rules()
    prompt, p_est = t.prompt()
    reused, r_est = t.reused()
    lost, l_est = t.lost()
    server_lost = t.server_lost_tokens()
    return {
        "n": t.n,
        "where": t.where,
        "id": r.get("id"),
        "class": t.cls,
        "verdict": r.get("verdict"),
        "messages": t.messages,
        "common_prefix_messages": r.get("common_prefix_messages"),
        "diverged_at": r.get("diverged_at"),
        "cause": t.cause,
        "tools_changed": r.get("tools_changed"),
        "nearest_stream": r.get("nearest_stream"),
        "prompt": figure(prompt, p_est),
        "reused": figure(reused if t.cls != "count_tokens" else None, r_est),
        "lost": figure(lost, l_est),
        "cross_conversation": t.cross_loss,
        "server_lost": figure(server_lost, True),
        "miss": r.get("miss"),
        "server_miss_class": r.get("server_miss_class"),
        "evidence": r.get("evidence"),
        "rules": fired,
        "observe": observe,
        "saved": {rule: figure(n, True) for rule, n in t.savings().items()},
    }


def stream_doc(s: Stream) -> dict[str, Any]:
    return {
        "stream": s.attr("stream"),
        "class": s.cls,
        "session": s.attr("session"),
        "host": s.attr("host"),
        "turns": [turn_doc(t) for t in s.turns],
    }


def totals_doc(t: Totals) -> dict[str, Any]:
    causes = {
        cause: {
            "turns": n,
            "tokens": figure(t.client_tokens[cause], cause in t.client_est),
            "remedy": volatile.remedy(cause),
        }
        for cause, n in sorted(t.client_turns.items())
    }
    return {
        "requests": t.requests,
        "by_class": dict(sorted(t.by_class.items())),
        "later_turns": t.later_turns,
        "append_only": t.append_only,
        "changed": t.changed,
        "server_reported": {
            "requests": t.server_requests,
            "cached_tokens": t.server_cached,
            "prompt_tokens": t.server_prompt,
        },
        "reprocessed_by_cause": causes,
        "reprocessed_client": figure(t.client_total, t.client_estimated),
        "cross_conversation_turns": t.cross_turns,
        "server_side": {
            "turns": t.server_turns,
            "tokens": figure(t.server_tokens, True),
            "by_class": dict(sorted(t.server_classes.items())),
            "remedy": SERVER_REMEDY,
        },
        "interleaved": t.interleaved,
        "rules": {
            "rewritten": t.rewritten,
            "fired": dict(sorted(t.fired.items())),
            "saved": figure(t.saved, True),
            "saved_requests": t.saved_turns,
            "saved_by": {k: figure(v, True) for k, v in sorted(t.saved_by.items())},
            "observed": t.observed,
            "would_fire": dict(sorted(t.would_fire.items())),
            "would_save": figure(t.would_save, True),
            "would_save_requests": t.would_save_turns,
            "would_save_by": {k: figure(v, True) for k, v in sorted(t.would_save_by.items())},
        },
    }


def document(report: Report) -> dict[str, Any]:
    """The whole report: totals, every stream with every turn, problems met while reading."""
    return {
        "schema": SCHEMA,
        "version": VERSION,
        "files": list(report.files),
        "totals": totals_doc(report.totals()),
        "streams": [stream_doc(s) for s in report.ordered_streams()],
        "problems": [{"where": p.where, "message": p.message} for p in report.problems],
    }
