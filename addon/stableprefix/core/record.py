"""The per-request record: its one-line log form, the summary lines, and the JSONL file it is appended to.

A record holds hosts, paths, names, counts and hashes, never prompt text, header values or credentials
(the only exception is the opt-in ``context``: a snippet with every letter and digit masked).
It is written once per request, when the response has completed (or the request failed).

Fields, in order: ``ts``, ``id``; from the pipeline ``host``, ``path``, ``api``, ``rewritten``,
``removed``, ``would_remove`` (observe mode), ``passthrough``, ``billing``, ``session``, ``error``,
``system_hash``, ``tools_hash``, ``tool_names``, ``params_hash``, ``prefix_hash``, ``chain``,
``system_chars``, ``tools_chars``, ``message_chars``; from the stream tracker ``stream``, ``class``,
``verdict``, ``common_prefix_messages``, ``diverged_at``, ``tools_changed``, ``cause``, ``reusable_chars``,
``reusable_tokens_est``, ``interleaved_side`` (``context`` when opted in); from the response ``status``,
``cached_tokens``, ``prompt_tokens``, ``evidence``, ``miss``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import IO
from typing import Any

META_KEY = "stableprefix"  # flow.metadata: the record (JSON-able)
BEFORE_KEY = "stableprefix_before"  # flow.metadata: what the client sent (hashes + changed paths)
MISS_WORDS = {
    "client": "client-side miss",
    "server": "server-side miss",
    "unknown": "server reported nothing",
}


def _rules_part(record: Mapping[str, Any]) -> str:
    changed = record.get("removed") or {}
    would = record.get("would_remove") or {}
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
        return f"first {total} msgs"
    return f"{total} msgs"


def server_text(record: Mapping[str, Any]) -> str:
    if "status" not in record:
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
    return f"server: HTTP {record['status']}, no cache figure"


def log_line(record: Mapping[str, Any]) -> str:
    """One concise line, e.g. ``main a1b2c3d4e5f6 append-only 14/15 msgs, server reused 18,204/18,230
    (anthropic-messages, changed billing=1)``; before the response: API, rules and short prefix hash."""
    api = record.get("api", "?")
    if "error" in record and "prefix_hash" not in record:
        return f"{api} {record.get('path', '')} left unchanged ({record['error']})"
    prefix = str(record.get("prefix_hash", ""))[:12]
    if "class" not in record:
        return f"{api} {_rules_part(record)} prefix {prefix}"
    parts = [f"{record['class']} {prefix} {verdict_text(record)}"]
    if record["class"] != "count_tokens" and (server := server_text(record)):
        parts.append(server)
    miss = record.get("miss")
    if miss in MISS_WORDS:
        parts.append(MISS_WORDS[miss])
    if record.get("interleaved_side") and miss == "server":
        parts.append("side request interleaved")
    return ", ".join(parts) + f" ({api}, {_rules_part(record)})"


def comment(record: Mapping[str, Any]) -> str:
    """The flow comment mitmweb shows and ``~comment`` filters: class and verdict (and location, cause)."""
    verdict = record.get("verdict")
    if verdict is None:
        return f"stableprefix: {record.get('class', 'not analysed')}"
    text = f"stableprefix: {record.get('class')} {verdict}"
    if verdict == "changed":
        text += f" at {record.get('diverged_at')} ({record.get('cause')})"
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


class JsonlWriter:
    """Appends one JSON object per line; safe to share between flows; flushed after every line."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = self.path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str)
        try:
            line.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (e.g. in a tool name): escape instead of failing
            line = json.dumps(record, ensure_ascii=True, separators=(",", ":"), default=str)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()
