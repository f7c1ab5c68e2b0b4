"""The per-request record (`Record`, schema version `VERSION`), its one-line log form and the summary lines. docs/record.md documents every field.

A record holds hosts, paths, names, counts and hashes, never prompt text, header values or credentials
(the only exception is the opt-in ``context``: a snippet with every letter and digit masked). It is
created once (`new`), filled by the pipeline, the stream tracker and the response, and written once per
request, when the response has completed or the request failed. ``state`` says how far it got.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from typing import Literal
from typing import TypedDict

VERSION = 2  # v1 (before 2026-12): "removed"/"would_remove" for "changed"/"would_change", no "v"/"state"
State = Literal["left-alone", "sent", "answered", "no-response"]


#: One request, as logged (docs/record.md says what each field means). Functional form: "class" is a keyword.
Record = TypedDict(
    "Record",
    {
        "v": int,
        "state": State,
        "ts": float,
        "id": str,
        "host": str,
        "path": str,
        "api": str,
        "rewritten": bool,
        "changed": dict[str, int],
        "would_change": dict[str, int],
        "actions": dict[str, str],
        "passthrough": bool,
        "billing": dict[str, Any],
        "session": str | None,
        "error": str,
        "system_hash": str,
        "tools_hash": str,
        "tool_names": list[str],
        "params_hash": str,
        "prefix_hash": str,
        "chain": list[str],
        "system_chars": int,
        "tools_chars": int,
        "message_chars": list[int],
        "stream": str,
        "class": str | None,
        "verdict": str | None,
        "common_prefix_messages": int,
        "diverged_at": str | None,
        "tools_changed": dict[str, list[str]] | None,
        "cause": str | None,
        "reusable_chars": int,
        "reusable_tokens_est": int,
        "interleaved_side": bool,
        "interleaved_other": bool,
        "nearest_stream": str | None,
        "shareable_chars": int,
        "saved_chars": int,
        "saved_by": dict[str, int],
        "context": str,
        "affinity": str,
        "status": int | None,
        "cached_tokens": int | None,
        "prompt_tokens": int | None,
        "evidence": str | None,
        "evidence_ignored": str,
        "evidence_from": str,
        "miss": str | None,
        "server_miss_class": str | None,
    },
    total=False,
)


def new(host: str, path: str, api: str, state: State = "sent") -> dict[str, Any]:
    """A record's first fields (the one place records are created)."""
    return {
        "v": VERSION,
        "state": state,
        "host": host,
        "path": path.split("?", 1)[0],
        "api": api,
        "rewritten": False,
    }


def upgrade(record: dict[str, Any]) -> dict[str, Any]:
    """A record of an older schema in today's names (the report reads old logs too)."""
    if record.get("v") == VERSION:
        return record
    out = dict(record)
    if "removed" in out:
        out["changed"] = out.pop("removed")
    if "would_remove" in out:
        out["would_change"] = out.pop("would_remove")
    if "state" not in out:
        if "class" not in out:
            out["state"] = "left-alone" if "error" in out else "sent"
        elif "status" in out:
            out["state"] = "answered" if out.get("status") is not None else "no-response"
        else:
            out["state"] = "sent"
    out["v"] = VERSION
    return out


def analysed(record: Mapping[str, Any]) -> bool:
    """True for a record the stream tracker saw (not a body left alone)."""
    return record.get("state") in ("sent", "answered", "no-response") and "class" in record


META_KEY = "stableprefix"  # flow.metadata: the record (JSON-able)
BEFORE_KEY = "stableprefix_before"  # flow.metadata: what the client sent (hashes + changed paths)
MISS_WORDS = {
    "client": "client-side miss",
    "server": "server-side miss",
    "unknown": "server reported nothing",
}


SERVER_MISS_WORDS = {
    "side-interleaved": "side request interleaved",
    "evicted": "evicted by another conversation",
    "not-kept": "prefix not kept by the server",
}


def _rules_part(record: Mapping[str, Any]) -> str:
    changed = record.get("changed") or {}
    would = record.get("would_change") or {}
    out = []
    if record.get("passthrough"):
        out.append("passthrough")
    if changed:
        out.append("changed " + " ".join(f"{k}={v}" for k, v in changed.items()))
    elif would:
        out.append("observe: would change " + " ".join(f"{k}={v}" for k, v in would.items()))
    else:
        out.append("unchanged")
    return ", ".join(out)


def verdict_text(record: Mapping[str, Any]) -> str:
    """``append-only 14/15 msgs``, ``changed at system[1]@8690 (git_status) 0/7 msgs``, ``first 1 msgs``."""
    verdict = record.get("verdict")
    total = len(record.get("chain") or ())
    common = record.get("common_prefix_messages") or 0
    if verdict == "append-only":
        text = f"append-only {common}/{total} msgs"
        if record.get("cause"):
            text += f" ({record['cause']})"
        return text
    if verdict == "changed":
        text = f"changed at {record.get('diverged_at')}"
        if record.get("cause"):
            text += f" ({record['cause']})"
        tc = record.get("tools_changed")
        if tc:
            bits = [f"{k} {','.join(v)}" for k, v in tc.items() if v]
            if bits:
                text += " [tools " + "; ".join(bits) + "]"
        return f"{text} {common}/{total} msgs"
    if verdict == "first":
        return f"first {total} msgs" + (f", {shared_text(record)}" if record.get("nearest_stream") else "")
    return f"{total} msgs"


def shared_text(record: Mapping[str, Any]) -> str:
    """A first request against the nearest earlier stream: ``shares 41 chars (~10 tokens) with stream
    1a2b3c4d, diverged at system[0]@41 (billing; ~7,958 tokens more if stable)``."""
    chars = int(record.get("reusable_chars") or 0)
    total = int(record.get("system_chars") or 0) + int(record.get("tools_chars") or 0)
    total += sum(c for c in record.get("message_chars") or () if isinstance(c, int))
    prompt = record.get("prompt_tokens")
    # in the server's tokens per character once it reported the prompt's size (its template may drop text)
    ratio = prompt / total if isinstance(prompt, int) and prompt > 0 and total > 0 else 0.25

    def tok(n: int) -> str:
        return f"~{round(n * ratio):,}"

    text = f"shares {chars:,} chars ({tok(chars)} tokens) with stream {str(record['nearest_stream'])[:8]}"
    if record.get("diverged_at"):
        text += f", diverged at {record['diverged_at']}"
        bits = [str(record.get("cause") or "unknown")]
        tc = record.get("tools_changed")
        if tc:
            bits += [f"{k} {','.join(v)}" for k, v in tc.items() if v]
        more = int(record.get("shareable_chars") or 0) - chars
        if more > 0:
            bits.append(f"{tok(more)} tokens more if stable")
        text += f" ({'; '.join(bits)})"
    return text


def server_text(record: Mapping[str, Any]) -> str:
    if record.get("state") not in ("answered", "no-response"):
        return ""
    if record.get("status") is None:
        return "no response"
    if str(record.get("error", "")).startswith("no response"):
        return str(record["error"])
    cached, prompt = record.get("cached_tokens"), record.get("prompt_tokens")
    if cached is not None:
        return f"server reused {cached:,}/{prompt:,}" if prompt is not None else f"server reused {cached:,}"
    if prompt is not None:
        return f"server: {prompt:,} prompt tokens, no cache figure"
    if record.get("evidence_ignored"):
        return f"server: HTTP {record['status']}, no cache figure (usage block not plausible, ignored)"
    return f"server: HTTP {record['status']}, no cache figure"


def log_line(record: Mapping[str, Any]) -> str:
    """One concise line, e.g. ``main a1b2c3d4e5f6 append-only 14/15 msgs, server reused 18,204/18,230
    (anthropic-messages, changed billing=1)``; before the response: API, rules and short prefix hash."""
    api = record.get("api", "?")
    if "error" in record and "prefix_hash" not in record:
        return f"{api} {record.get('path', '')} left unchanged ({record['error']})"
    prefix = str(record.get("prefix_hash", ""))[:12]
    if not analysed(record):
        return f"{api} {_rules_part(record)} prefix {prefix}"
    parts = [f"{record['class']} {prefix} {verdict_text(record)}"]
    if record["class"] != "count_tokens" and (server := server_text(record)):
        parts.append(server)
    miss = record.get("miss")
    if miss in MISS_WORDS:
        parts.append(MISS_WORDS[miss])
    if miss == "server":
        why = record.get("server_miss_class") or (
            "side-interleaved" if record.get("interleaved_side") else None
        )
        if why in SERVER_MISS_WORDS:
            parts.append(SERVER_MISS_WORDS[why])
    return ", ".join(parts) + f" ({api}, {_rules_part(record)})"


def comment(record: Mapping[str, Any]) -> str:
    """The flow comment mitmweb shows and ``~comment`` filters: class and verdict (and location, cause)."""
    verdict = record.get("verdict")
    if verdict is None:
        return f"stableprefix: {record.get('class', 'not analysed')}"
    text = f"stableprefix: {record.get('class')} {verdict}"
    if verdict == "changed":
        text += f" at {record.get('diverged_at')} ({record.get('cause')})"
    elif verdict == "first" and record.get("nearest_stream"):
        text += f"; {shared_text(record)}"
    if record.get("miss") in ("server", "client"):
        text += f"; {MISS_WORDS[record['miss']]}"
    return text


def summary_lines(rows: list[dict[str, Any]]) -> list[str]:
    """One line per summary row (see `streams.Stats.as_dict`)."""
    if not rows:
        return ["stableprefix summary: no requests seen"]
    out = [f"stableprefix summary: {len(rows)} stream(s)"]
    for r in rows:
        share = r.get("append_only_share")
        judged = r["append_only"] + r["changed"]
        bits = [f"{r['requests']} requests"]
        if r["streams"] > 1:
            bits.append(f"{r['streams']} streams")
        if judged:
            bits.append(f"append-only {r['append_only']}/{judged} ({share:.0%})")
        if r["misses_by_cause"]:
            bits.append("client misses " + " ".join(f"{k}={v}" for k, v in r["misses_by_cause"].items()))
        if r["server_misses"]:
            bits.append(f"server misses {r['server_misses']}")
        if r["unknown"]:
            bits.append(f"no cache figures {r['unknown']}")
        if r["prompt_tokens"]:
            bits.append(f"server reused {r['cached_tokens']:,}/{r['prompt_tokens']:,} tokens")
        if r["interleaved_side"]:
            bits.append(f"side requests interleaved {r['interleaved_side']}x")
        session = f" session {r['session']}" if r.get("session") else ""
        out.append(f"  {r['class']} {r['stream']}{session}: " + ", ".join(bits))
    return out
