"""The pure core both the mitmproxy addon and the offline report drive: one object, no mitmproxy import.

    a = Analyzer(settings)
    result = a.request(method, host, path, raw, headers)   # pipeline.process + stream tracking
    if result is not None and result.forward is not None: send result.forward instead of raw
    # or in two steps, the second off the forwarding path (in arrival order):
    fwd = a.forward(method, host, path, raw, headers)       # guard scan; parse + rules only on a hit
    send fwd.forward or raw;  result = a.analyse(fwd)
    ... the server answers ...
    record = a.response(result.record, status, headers, body)     # body: JSON, or the SSE text
    # or, streamed:  p = a.sse_parser(result.record, headers, status); p.feed(chunk)...; record = p.finish()
    # or, no answer: record = a.error(result.record, "connection refused")
    for line in a.pop_notices(): warn(line)
    a.summary()  # one dict per stream

`request` returns the `pipeline.Result` whose ``record`` also carries the stream fields (stream, class,
verdict, common_prefix_messages, diverged_at, tools_changed, cause, reusable_chars, reusable_tokens_est,
interleaved_side); `response`/`error` add status, cached_tokens, prompt_tokens, evidence and miss. The
record is then complete and is written once. ``count_tokens`` requests get class ``count_tokens`` and a
null verdict (they are never compared and never a baseline).
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator
from collections.abc import Mapping
from difflib import SequenceMatcher
from typing import Any

from stableprefix.core import evidence
from stableprefix.core import fingerprint
from stableprefix.core import pipeline
from stableprefix.core import shapes
from stableprefix.core import streams
from stableprefix.core.fingerprint import canonical_bytes
from stableprefix.core.jsonedit import apply_edits
from stableprefix.core.rules import StickyMemory

#: A server-side miss: the prefix was stable, yet the server reused less than expected by more than
#: `MISS_SHARE` of the expected tokens and more than `MISS_TOKENS` (Claude Code's own cache-break rule:
#: >5 % and >2,000 tokens), where `MISS_TOKENS` shrinks to `MISS_SMALL_SHARE` of small prompts.
MISS_SHARE = 0.05
MISS_TOKENS = 2000
MISS_SMALL_SHARE = 0.25
CHANGES_CAP = 50  # entries of the before/after change list kept for the content view

INTERLEAVE_NOTICE = (
    "stableprefix: side requests (session titles, command checks and other short queries) ran between "
    "turns of a conversation, and the server then reused only {cached:,} of ~{expected:,} expected prompt "
    "tokens: a single-slot server evicts the conversation's cache for each side request. Remedies: give "
    "llama-server more slots (--parallel 2 / -np 2, with enough context per slot), keep evicted prompts "
    "in host RAM (--cache-ram), Ollama OLLAMA_NUM_PARALLEL=2, or route side requests (the small/fast model) "
    "to another model or server (Claude Code: ANTHROPIC_DEFAULT_HAIKU_MODEL)."
)


#: Server-side miss classes (the prefix was kept, the server reused less) and what to set.
SERVER_MISS_REMEDY = {
    "side-interleaved": (
        "a side request (title, command check: the small/fast model) ran between turns and took the server's "
        "only slot: llama-server --parallel 2 (-np 2; context per slot is -c / np), keep evicted prompts in "
        "host RAM with --cache-ram MiB; Ollama OLLAMA_NUM_PARALLEL=2; or send side requests to another "
        "model or server with Claude Code's ANTHROPIC_DEFAULT_HAIKU_MODEL (and ANTHROPIC_SMALL_FAST_MODEL)"
    ),
    "evicted": (
        "another conversation (or subagent) ran between turns and evicted this one: more slots "
        "(llama-server --parallel N / -np N; Ollama OLLAMA_NUM_PARALLEL=N), and llama-server --cache-ram MiB "
        "to restore evicted prompts from host RAM"
    ),
    "not-kept": (
        "nothing ran in between through stableprefix, yet the server did not keep the prefix: host-RAM cache "
        "off or too small (llama-server --cache-ram MiB), a restart or model unload (Ollama OLLAMA_KEEP_ALIVE), "
        "other clients on the same server, or a context too small for the conversation (-c)"
    ),
}


def server_miss_class(record: Mapping[str, Any]) -> str | None:
    """Why a server-side miss happened, from what ran on the same upstream since the stream's previous
    request: ``side-interleaved``, ``evicted`` (another stream) or ``not-kept``."""
    if record.get("miss") != "server":
        return None
    if record.get("interleaved_side"):
        return "side-interleaved"
    if record.get("interleaved_other"):
        return "evicted"
    return "not-kept"


def expected_cached(record: Mapping[str, Any]) -> int:
    """Prompt tokens the server should have reused: the reusable share of the prompt, in server tokens
    when the server reported its prompt size, else the chars/4 estimate."""
    reusable = int(record.get("reusable_chars") or 0)
    total = int(record.get("system_chars") or 0) + int(record.get("tools_chars") or 0)
    total += sum(record.get("message_chars") or ())
    prompt = record.get("prompt_tokens")
    if isinstance(prompt, int) and prompt > 0 and total > 0:
        return round(prompt * min(reusable, total) / total)
    return reusable // 4


def classify_miss(record: Mapping[str, Any]) -> str | None:
    """null (a hit, a first request, or not a generation), client, server or unknown."""
    cls = record.get("class")
    status = record.get("status")
    if cls in (None, "count_tokens") or not isinstance(status, int) or not 200 <= status < 300:
        return None
    verdict = record.get("verdict")
    if verdict == "changed":
        return "client"
    if verdict != "append-only":
        return None
    cached = record.get("cached_tokens")
    if cached is None:
        return "unknown"
    expected = expected_cached(record)
    shortfall = expected - cached
    threshold = max(expected * MISS_SHARE, min(MISS_TOKENS, expected * MISS_SMALL_SHARE))
    return "server" if shortfall > threshold else None


def _max_tokens(body: Mapping[str, Any]) -> Any:
    for k in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        if k in body:
            return body[k]
    opts = body.get("options")
    return opts.get("num_predict") if isinstance(opts, dict) else None


class Analyzer:
    """Normalises requests, tracks their streams and classifies what the server did."""

    def __init__(
        self,
        settings: pipeline.Settings | None = None,
        *,
        log_context: bool = False,
        stream_cap: int = streams.STREAM_CAP,
    ) -> None:
        self.settings = settings if settings is not None else pipeline.Settings()
        self.sticky = StickyMemory()
        self.tracker = streams.Tracker(stream_cap)
        self.log_context = log_context
        self._lock = threading.Lock()
        self._notices: list[str] = []
        self._warned_interleave = False

    # --- request ---------------------------------------------------------------------------------------

    def request(
        self, method: str, host: str, path: str, raw: bytes, headers: Mapping[str, str] | None = None
    ) -> pipeline.Result | None:
        """`pipeline.process`, then the stream fields added to the record (not for bodies left alone):
        `forward` and `analyse` in one call."""
        fwd = self.forward(method, host, path, raw, headers)
        return None if fwd is None else self.analyse(fwd)

    def forward(
        self, method: str, host: str, path: str, raw: bytes, headers: Mapping[str, str] | None = None
    ) -> pipeline.Forward | None:
        """The forwarding path: the guard scan and, only when a guard occurs, parse + rules + new bytes."""
        with _gc_paused():  # the parsed body holds no cycles; collections it would trigger cost ~15 %
            return pipeline.forward(method, host, path, raw, self.settings, headers or {}, self.sticky)

    def analyse(self, fwd: pipeline.Forward) -> pipeline.Result:
        """Everything else, off the forwarding path: fingerprint, per-block detail, stream tracking,
        verdict. Requests of one conversation must be analysed in the order they arrived."""
        with _gc_paused():
            return self._analyse(fwd)

    def _analyse(self, fwd: pipeline.Forward) -> pipeline.Result:
        result = pipeline.analyse(fwd)
        if result.warning or result.body is None or result.fingerprint is None:
            return result
        parts = (
            result.parts
            if result.parts is not None
            else shapes.parts(shapes.Api(result.record["api"]), result.body)
        )
        detail = fingerprint.detail(parts, result.body, result.fingerprint)
        streams.adopt_session(result.record, result.body)
        counterpart = self._counterpart(result, detail, parts)
        fields = self.tracker.observe(
            result.record, detail, parts, _max_tokens(result.body), self.log_context, counterpart
        )
        result.record.update(fields)
        return result

    def _counterpart(
        self, result: pipeline.Result, detail: fingerprint.Detail, parts: shapes.Parts
    ) -> streams.Counterpart | None:
        """The request on the other side of the rules, for the savings: what the client sent (active mode),
        or what the rules would forward (observe mode: their edits applied to the body, rewriting nothing)."""
        rec = result.record
        if rec.get("passthrough"):
            return None
        observe = self.settings.observe
        fired = rec.get("would_change") if observe else rec.get("changed")
        if not fired:
            return streams.Counterpart(rec, detail, parts.system, not observe)
        if not observe:
            if result.original_body is None:
                return None
            before = shapes.parts(shapes.Api(rec["api"]), result.original_body)
            like = (parts, result.fingerprint) if result.fingerprint is not None else None
            fp = fingerprint.fingerprint(before, like)
            d = fingerprint.detail(before, result.original_body, fp)
            return streams.Counterpart(fp.as_record(), d, before.system, True, tuple(fired))
        if not result.edits or result.body is None:
            return None
        # what the rules would forward: their edits on the body as it came (the messages they leave alone
        # are the same objects, so the fingerprint does not serialise them again)
        body = apply_edits(result.body, result.edits)
        after = shapes.parts(shapes.Api(rec["api"]), body)
        like = (parts, result.fingerprint) if result.fingerprint is not None else None
        fp = fingerprint.fingerprint(after, like)
        d = fingerprint.detail(after, body, fp)
        return streams.Counterpart(fp.as_record(), d, after.system, False, tuple(fired))

    # --- response ---------------------------------------------------------------------------------------

    def response(
        self, record: dict[str, Any], status: int, headers: Mapping[str, str] | None, body: bytes | None
    ) -> dict[str, Any]:
        """Add the server's evidence (from a JSON body or the SSE text) and the miss class to `record`."""
        record["status"] = status
        return self._complete(record, evidence.from_body(body))

    def recorded(self, record: dict[str, Any], status: int, saved: Mapping[str, Any]) -> dict[str, Any]:
        """Complete `record` with the server figures of a record saved earlier (the addon's record in a flow
        file's metadata) when the response body itself is gone (a streamed response is not stored)."""
        record["status"] = status
        cached, prompt = saved.get("cached_tokens"), saved.get("prompt_tokens")
        ok = [
            v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0) for v in (cached, prompt)
        ]
        ev = None
        if all(ok) and (cached is not None or prompt is not None):
            source = saved.get("evidence") if cached is not None else None
            ev = evidence.Evidence(str(source) if source else None, prompt, cached)
            if ev.source is None and cached is not None:
                ev = evidence.Evidence("recorded", prompt, cached)
        elif saved.get("evidence_ignored"):
            ev = evidence.Evidence(None, None, None, str(saved["evidence_ignored"])[:200])
        return self._complete(record, ev)

    def sse_parser(
        self, record: dict[str, Any], headers: Mapping[str, str] | None = None, status: int = 200
    ) -> SSEFeed:
        """A parser to feed a copy of a streamed response's chunks; `finish()` completes `record`."""
        return SSEFeed(self, record, headers or {}, status)

    def error(self, record: dict[str, Any], message: str, status: int | None = None) -> dict[str, Any]:
        """Complete the record of a request that never got a server response; `status` is what the proxy
        itself answered the client instead (mitmproxy's 502), None when the client got nothing."""
        record["status"] = status
        record["state"] = "no-response"
        answered = f"; the proxy answered {status}" if status is not None else ""
        record.setdefault("error", f"no response: {message}{answered}"[:200])
        record.update(
            cached_tokens=None, prompt_tokens=None, evidence=None, miss=None, server_miss_class=None
        )
        return record

    def _complete(self, record: dict[str, Any], ev: evidence.Evidence | None) -> dict[str, Any]:
        record["state"] = "answered"
        record.update(
            ev.as_record()
            if ev is not None
            else {"cached_tokens": None, "prompt_tokens": None, "evidence": None}
        )
        record["miss"] = classify_miss(record)
        record["server_miss_class"] = server_miss_class(record)
        self.tracker.outcome(record)
        if record["miss"] == "server" and record.get("interleaved_side"):
            with self._lock:
                if not self._warned_interleave:
                    self._warned_interleave = True
                    self._notices.append(
                        INTERLEAVE_NOTICE.format(
                            cached=record["cached_tokens"], expected=expected_cached(record)
                        )
                    )
        return record

    def pop_notices(self) -> list[str]:
        """Warnings to show once (e.g. side requests evicting the conversation on a one-slot server)."""
        with self._lock:
            out, self._notices = self._notices, []
        return out

    # --- streams ---------------------------------------------------------------------------------------

    def summary(self) -> list[dict[str, Any]]:
        """Per stream (side and count_tokens requests: per session): requests, verdicts, misses, tokens."""
        return self.tracker.summary()

    def reset(self) -> None:
        """Forget streams and statistics (not the sticky values the rules pinned: forwarded bytes stay)."""
        self.tracker.reset()
        with self._lock:
            self._warned_interleave = False
            self._notices = []


class SSEFeed:
    """Parses a copy of a streamed response; never raises into the stream."""

    def __init__(
        self, analyzer: Analyzer, record: dict[str, Any], headers: Mapping[str, str], status: int
    ) -> None:
        self.analyzer = analyzer
        self.record = record
        self.status = status
        enc = next((v for k, v in headers.items() if k.lower() == "content-encoding"), "")
        self.parser = evidence.SSEParser(enc)
        self.done = False

    def feed(self, chunk: bytes) -> None:
        try:
            self.parser.feed(chunk)
        except Exception:  # a parser bug must never break the client's stream
            self.parser.undecodable = True

    def finish(self) -> dict[str, Any]:
        if self.done:
            return self.record
        self.done = True
        self.record["status"] = self.status
        try:
            ev = self.parser.finish()
        except Exception:
            ev = None
        return self.analyzer._complete(self.record, ev)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# --- the before-state the content view shows -----------------------------------------------------------


def before_state(result: pipeline.Result) -> dict[str, Any]:
    """What the client sent, compactly: its system/tools/prefix hashes and where the forwarded body differs.

    Kept in flow.metadata instead of the original body (which can be megabytes): a list of changed JSON
    paths with sizes and the first differing character, never text.
    """
    out: dict[str, Any] = {"rules": dict(result.record.get("changed") or {})}
    if result.original_body is None or result.body is None or result.original_body is result.body:
        out["changes"] = []
        return out
    api = shapes.Api(result.record["api"])
    system_hash, tools_hash, prefix_hash = fingerprint.prefix_hashes(shapes.parts(api, result.original_body))
    out.update(system_hash=system_hash, tools_hash=tools_hash, prefix_hash=prefix_hash)
    changes: list[dict[str, Any]] = []
    diff_json(result.original_body, result.body, "", changes)
    out["changes"] = changes[:CHANGES_CAP]
    if len(changes) > CHANGES_CAP:
        out["changes_omitted"] = len(changes) - CHANGES_CAP
    return out


def _size(value: Any) -> int:
    return len(value) if isinstance(value, str) else len(canonical_bytes(value))


def _join(path: str, key: str | int) -> str:
    return f"{path}[{key}]" if isinstance(key, int) else (f"{path}.{key}" if path else key)


def diff_json(old: Any, new: Any, path: str, out: list[dict[str, Any]], limit: int = CHANGES_CAP + 1) -> None:
    """Append {path, op, sizes} for every place `new` differs from `old` (lists aligned by content)."""
    if len(out) >= limit or old == new:
        return
    if isinstance(old, dict) and isinstance(new, dict):
        for k in old:
            if k not in new:
                out.append({"path": _join(path, k), "op": "removed", "chars": _size(old[k])})
            else:
                diff_json(old[k], new[k], _join(path, k), out, limit)
        for k in new:
            if k not in old:
                out.append({"path": _join(path, k), "op": "added", "chars": _size(new[k])})
        return
    if isinstance(old, list) and isinstance(new, list):
        if len(old) == len(new):
            for i, (a, b) in enumerate(zip(old, new, strict=True)):
                diff_json(a, b, _join(path, i), out, limit)
            return
        keys_a = [canonical_bytes(x) for x in old]
        keys_b = [canonical_bytes(x) for x in new]
        for op, i1, i2, j1, j2 in SequenceMatcher(None, keys_a, keys_b, autojunk=False).get_opcodes():
            if op == "equal":
                continue
            if op == "replace" and i2 - i1 == j2 - j1:
                for d in range(i2 - i1):
                    diff_json(old[i1 + d], new[j1 + d], _join(path, j1 + d), out, limit)
                continue
            for i in range(i1, i2):
                out.append({"path": _join(path, i), "op": "removed", "chars": _size(old[i])})
            for j in range(j1, j2):
                out.append({"path": _join(path, j), "op": "added", "chars": _size(new[j])})
        return
    if isinstance(old, str) and isinstance(new, str):
        out.append(
            {
                "path": path,
                "op": "changed",
                "from_chars": len(old),
                "to_chars": len(new),
                "at": streams.common_prefix_len(old, new),
            }
        )
        return
    out.append({"path": path, "op": "changed"})
