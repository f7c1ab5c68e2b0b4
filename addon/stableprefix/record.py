"""The per-request record: its one-line log form and the JSONL file it is appended to.

A record holds hosts, paths, names, counts and hashes, never prompt text, header values or credentials.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import IO
from typing import Any


def log_line(record: dict[str, Any]) -> str:
    """One concise line: API, what the rules changed, short prefix hash."""
    parts = [record.get("api", "?")]
    if "error" in record:
        return f"{parts[0]} {record.get('path', '')} left unchanged ({record['error']})"
    changed = record.get("removed") or {}
    would = record.get("would_remove") or {}
    if record.get("passthrough"):
        parts.append("passthrough")
    if changed:
        parts.append("changed " + " ".join(f"{k}={v}" for k, v in changed.items()))
    elif would:
        parts.append("observe: would change " + " ".join(f"{k}={v}" for k, v in would.items()))
    else:
        parts.append("unchanged")
    parts.append(f"prefix {str(record.get('prefix_hash', ''))[:12]}")
    return " ".join(parts)


class JsonlWriter:
    """Appends one JSON object per line; safe to share between flows; flushed after every line."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = self.path.open("a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str)
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()
