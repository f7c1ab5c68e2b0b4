"""What the server says it reused: cached and total prompt tokens, read from a response body or SSE stream.

Sources, by the name recorded in ``evidence``:

- ``anthropic-usage``: ``usage.cache_read_input_tokens`` (cached) and ``input_tokens`` (uncached only) plus
  ``cache_creation_input_tokens``; in SSE from ``message_start`` and ``message_delta`` (later values win);
- ``llama-timings``: llama.cpp ``timings.cache_n`` (cached) and ``timings.prompt_n`` (processed);
- ``openai-usage``: Chat ``usage.prompt_tokens`` + ``prompt_tokens_details.cached_tokens``, Responses
  ``usage.input_tokens`` + ``input_tokens_details.cached_tokens`` (also inside ``response.completed``);
- ``ollama``: ``prompt_eval_count`` (total, cache included) and ``prompt_eval_cached_count``.

When a body carries several (llama.cpp sends timings and usage), the first in that order wins. A server that
reports a prompt size but no cache figure gives ``prompt_tokens`` without ``cached_tokens``: that is
"unknown", not a miss. A usage block that cannot be true is no figure either: a prompt of 0 tokens (every
request renders at least a template; claude-code-router answers every request with ``input_tokens: 0,
cache_read_input_tokens: 0``) or more tokens reused than the prompt holds; `Evidence.ignored` says why. The SSE parser sees a copy of the chunks as they pass; it keeps only the current
partial line and decodes JSON only for lines that mention usage figures.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Any

SOURCES = ("anthropic-usage", "llama-timings", "openai-usage", "ollama")
MAX_LINE = 4 << 20  # a longer partial line is dropped (usage events are small)
_HINTS = (b"usage", b"timings", b"prompt_eval")


@dataclass(frozen=True)
class Evidence:
    source: str | None  # None: the server reported no cache figure
    prompt_tokens: int | None
    cached_tokens: int | None
    ignored: str | None = None  # a usage block that was there but cannot be true: why it is no figure

    def as_record(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "cached_tokens": self.cached_tokens,
            "prompt_tokens": self.prompt_tokens,
            "evidence": self.source if self.cached_tokens is not None else None,
        }
        if self.ignored is not None:
            out["evidence_ignored"] = self.ignored
        return out


def implausible(source: str, prompt: int | None, cached: int | None) -> str | None:
    """Why a usage figure cannot be true for a non-empty prompt (None: it can)."""
    if prompt == 0:
        return f"{source}: 0 prompt tokens reported (a placeholder, e.g. a router's), not a figure"
    if prompt is not None and cached is not None and cached > prompt:
        return f"{source}: {cached} tokens reused of a {prompt}-token prompt, not a figure"
    return None


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else None


class Collector:
    """Merges usage figures from one JSON body or a sequence of stream events (later values win)."""

    def __init__(self) -> None:
        self.found: dict[str, dict[str, int]] = {}

    def _put(self, source: str, **values: int | None) -> None:
        slot = self.found.setdefault(source, {})
        for k, v in values.items():
            if v is not None:
                slot[k] = v

    def add(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            return
        for holder in (obj, obj.get("message"), obj.get("response")):
            if isinstance(holder, dict) and isinstance(holder.get("usage"), dict):
                self._usage(holder["usage"])
        timings = obj.get("timings")
        if isinstance(timings, dict):
            self._put(
                "llama-timings", cached=_int(timings.get("cache_n")), fresh=_int(timings.get("prompt_n"))
            )
        if "prompt_eval_count" in obj or "prompt_eval_cached_count" in obj:
            self._put(
                "ollama",
                total=_int(obj.get("prompt_eval_count")),
                cached=_int(obj.get("prompt_eval_cached_count")),
            )

    def _usage(self, u: dict[str, Any]) -> None:
        if any(k in u for k in ("cache_read_input_tokens", "cache_creation_input_tokens")) or (
            "input_tokens" in u and "input_tokens_details" not in u and "prompt_tokens" not in u
        ):
            self._put(
                "anthropic-usage",
                cached=_int(u.get("cache_read_input_tokens")),
                fresh=_int(u.get("input_tokens")),
                created=_int(u.get("cache_creation_input_tokens")),
            )
            return
        details = u.get("prompt_tokens_details") or u.get("input_tokens_details")
        cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else None
        total = _int(u.get("prompt_tokens", u.get("input_tokens")))
        self._put("openai-usage", total=total, cached=cached)

    def result(self) -> Evidence | None:
        best: Evidence | None = None
        ignored: str | None = None
        for source in SOURCES:
            f = self.found.get(source)
            if not f:
                continue
            cached = f.get("cached")
            if source in ("anthropic-usage", "llama-timings"):
                parts = [f.get("cached"), f.get("fresh"), f.get("created")]
                known = [p for p in parts if p is not None]
                total = sum(known) if f.get("fresh") is not None else None
            else:
                total = f.get("total")
            if (why := implausible(source, total, cached)) is not None:
                ignored = ignored or why
                continue
            ev = Evidence(source, total, cached)
            if cached is not None:
                return ev
            if best is None and total is not None:
                best = Evidence(None, total, None)
        if ignored is not None:
            return Evidence(None, best.prompt_tokens if best else None, None, ignored)
        return best


def from_body(body: bytes | None) -> Evidence | None:
    """Evidence from a whole response body: one JSON object, SSE text, or NDJSON (Ollama streaming)."""
    if not body:
        return None
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        obj = None
    if isinstance(obj, dict):
        c = Collector()
        c.add(obj)
        return c.result()
    p = SSEParser()
    p.feed(body)
    return p.finish()


class SSEParser:
    """Reads usage figures from a copy of SSE (or NDJSON) chunks; `finish` returns the evidence."""

    def __init__(self, content_encoding: str = "") -> None:
        self.collector = Collector()
        self._buf = b""
        self._skip = False  # inside an over-long line
        enc = content_encoding.strip().lower()
        self._inflate: Any = None
        if enc in ("gzip", "x-gzip"):
            self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif enc == "deflate":
            self._inflate = zlib.decompressobj()
        self.undecodable = enc not in ("", "identity", "none", "gzip", "x-gzip", "deflate")
        self.errors = 0

    def feed(self, chunk: bytes) -> None:
        if not chunk or self.undecodable:
            return
        if self._inflate is not None:
            try:
                chunk = self._inflate.decompress(chunk)
            except zlib.error:
                self.undecodable = True
                return
        self._ingest(chunk)

    def _ingest(self, chunk: bytes) -> None:
        data = self._buf + chunk
        lines = data.split(b"\n")
        self._buf = lines.pop()
        for line in lines:
            if self._skip:
                self._skip = False
                continue
            self._line(line)
        if len(self._buf) > MAX_LINE:
            self._buf, self._skip = b"", True

    def _line(self, line: bytes) -> None:
        line = line.rstrip(b"\r")
        if line.startswith(b"data:"):
            line = line[5:].lstrip(b" ")
        if not line.startswith(b"{") or not any(h in line for h in _HINTS):
            return
        try:
            self.collector.add(json.loads(line))
        except (ValueError, UnicodeDecodeError):
            self.errors += 1

    def finish(self) -> Evidence | None:
        if self._inflate is not None and not self.undecodable:
            try:
                self._ingest(self._inflate.flush())
            except zlib.error:
                pass
        if self._buf and not self._skip:
            self._line(self._buf)
        self._buf = b""
        return self.collector.result()
