"""The mitmproxy face of stableprefix: ``mitmdump -s addon/stableprefix/addon.py``.

Options are parsed into `pipeline.Settings` in `configure`; the `request` hook hands the body to the pure
`analyzer.Analyzer` (pipeline + stream tracking) and writes back only what it changed. Anything unexpected
leaves the request as it was, with one warning. The record is completed when the response has arrived
(SSE responses stream on unchanged while a copy of their chunks is parsed), then written to the JSONL log
and logged as one INFO line; the flow gets a comment (the verdict), a mark for a client-side miss and the
"stableprefix" content view. ``mitmdump -s addon/stableprefix/addon.py`` loads this module through a shim.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import os
import time
from collections.abc import Awaitable
from collections.abc import Sequence
from typing import Any

from mitmproxy import addonmanager
from mitmproxy import command
from mitmproxy import ctx
from mitmproxy import exceptions
from mitmproxy import hooks
from mitmproxy import http
from mitmproxy.net import encoding as mitm_encoding

from stableprefix.core import affinity
from stableprefix.core import pipeline
from stableprefix.core import record as records
from stableprefix.core import rules as rulelib
from stableprefix.core.analyzer import Analyzer
from stableprefix.core.analyzer import SSEFeed
from stableprefix.core.analyzer import before_state
from stableprefix.core.record import BEFORE_KEY
from stableprefix.core.record import META_KEY
from stableprefix.core.record import comment
from stableprefix.core.record import log_line
from stableprefix.core.record import summary_lines
from stableprefix.mitm import contentview  # noqa: F401  (registers the "stableprefix" content view)
from stableprefix.mitm import options
from stableprefix.mitm.access import ClientAllowlist
from stableprefix.mitm.jsonl import JsonlWriter
from stableprefix.mitm.worker import HOLD_SECONDS
from stableprefix.mitm.worker import Worker

logger = logging.getLogger("stableprefix")
MARK = ":warning:"  # flow.marked for a client-side miss (mitmweb shows ⚠; filter ~marked)
RULES_POLL_SECONDS = 1.0
AFFINITY_OPTIONS = {"stableprefix_affinity_header", "stableprefix_affinity_side"}


class StablePrefix:
    """Keeps LLM prompt prefixes byte-stable and proves it per request (streams, divergence, server reuse)."""

    name = "stableprefix"

    def __init__(self) -> None:
        self.analyzer = Analyzer()
        self.writer: JsonlWriter | None = None
        self._rules_mtime: float | None = None
        self._rules_checked = 0.0
        self._rules_broken: str | None = None
        self._entries: dict[str, _Entry] = {}  # flow id -> handled flow, until its response completes
        self.worker = Worker()  # the analysis, off the forwarding path, in arrival order
        self._ready: collections.deque[Any] = collections.deque()  # worker results for the event loop
        self._wake_pending = False  # a `_run_ready` is scheduled on the loop and has not started yet
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def settings(self) -> pipeline.Settings:
        return self.analyzer.settings

    @settings.setter
    def settings(self, value: pipeline.Settings) -> None:
        self.analyzer.settings = value

    @property
    def sticky(self) -> rulelib.StickyMemory:
        return self.analyzer.sticky

    def load(self, loader: Any) -> None:
        loader.add_option(
            "stableprefix_billing",
            str,
            "drop",
            "What to do with Claude Code's billing header in system-position text: "
            "drop (remove it), pin (keep it with fixed cch and version suffix), off (leave it).",
            choices=rulelib.BILLING_MODES,
        )
        loader.add_option(
            "stableprefix_passthrough",
            Sequence[str],
            list(pipeline.DEFAULT_PASSTHROUGH),
            "Hosts (glob patterns) whose requests are never rewritten, only hashed and logged. "
            "Default: Anthropic's first-party API, where rewriting breaks subscription recognition.",
        )
        loader.add_option("stableprefix_observe", bool, False, "Hash and log every request, rewrite nothing.")
        loader.add_option(
            "stableprefix_log", str | None, None, "Append one JSON record per handled request to this file."
        )
        loader.add_option(
            "stableprefix_rules",
            str | None,
            None,
            "A TOML rules file: [builtins] switches and [[rule]] tables (see examples/rules.toml). "
            "Re-read when it changes; a broken edit keeps the previous rules.",
        )
        loader.add_option(
            "stableprefix_enable",
            Sequence[str],
            [],
            f"Built-in rules to switch on (repeat the option): {', '.join(rulelib.builtin_names())}.",
        )
        loader.add_option(
            "stableprefix_disable", Sequence[str], [], "Rules to switch off (repeat the option)."
        )
        loader.add_option(
            "stableprefix_log_context",
            bool,
            False,
            "Add to each record a snippet around the first difference from the previous request, with "
            "every letter and digit masked (off: records hold hashes, sizes and names only).",
        )
        self._load_affinity_options(loader)

    def configure(self, updated: set[str]) -> None:
        opts = ctx.options
        if updated & options.SETTINGS_OPTIONS:
            try:
                self.settings = options.settings_from(opts)
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from None
            self._rules_mtime = self._mtime(opts.stableprefix_rules)
            self._rules_broken = None
        if "stableprefix_log" in updated:
            self._open_log(opts.stableprefix_log)
        if updated & AFFINITY_OPTIONS:
            self._check_affinity_options()
        if "stableprefix_log_context" in updated:
            self.analyzer.log_context = bool(opts.stableprefix_log_context)
        if "stream_large_bodies" in updated and getattr(opts, "stream_large_bodies", None):
            logger.warning(
                "stableprefix: stream_large_bodies is set; streamed request bodies are not normalised."
            )

    def _open_log(self, path: str | None) -> None:
        if self.writer:
            self.writer.close()
            self.writer = None
        if path:
            try:
                self.writer = JsonlWriter(path)
            except OSError as e:
                raise exceptions.OptionsError(
                    f"stableprefix_log: cannot open {path!r}: {e.strerror or e}"
                ) from None

    @staticmethod
    def _mtime(path: str | None) -> float | None:
        try:
            return os.stat(path).st_mtime if path else None
        except OSError:
            return None

    def _maybe_reload_rules(self) -> None:
        """Re-read an edited rules file; on a broken edit keep the previous rules and say so once."""
        path = ctx.options.stableprefix_rules
        now = time.monotonic()
        if not path or now - self._rules_checked < RULES_POLL_SECONDS:
            return
        self._rules_checked = now
        mtime = self._mtime(path)
        if mtime == self._rules_mtime:
            return
        self._rules_mtime = mtime
        try:
            settings = options.settings_from(ctx.options)
        except ValueError as e:
            if str(e) != self._rules_broken:
                logger.warning(f"stableprefix: keeping the previous rules: {e}")
                self._rules_broken = str(e)
            return
        self.settings = settings
        self._rules_broken = None
        logger.info(f"stableprefix: reloaded {path}: rules on: {pipeline.rules_summary(settings.rules)}")

    def running(self) -> None:
        s = self.settings
        logger.info(
            f"stableprefix active: billing={ctx.options.stableprefix_billing} observe={s.observe} "
            f"rules on: {pipeline.rules_summary(s.rules)}; passthrough: {', '.join(s.passthrough) or 'none'}; "
            f"log: {ctx.options.stableprefix_log or 'off'}"
        )

    def done(self) -> None:
        if not self.drain(timeout=120.0):  # every queued analysis and record first: none is lost
            logger.warning("stableprefix: the analysis did not finish within 120 s; records may be missing")
        for flow_id in list(self._entries):
            record = self._entries.pop(flow_id).record
            if record is None:
                continue
            self._guard(lambda r=record: self.analyzer.error(r, "proxy shut down before the response"))
            self._write(record)
        for line in summary_lines(self.analyzer.summary()):
            logger.info(line)
        if self.writer:
            self.writer.close()
            self.writer = None

    # --- commands ------------------------------------------------------------------------------------------

    @command.command("stableprefix.summary")
    def summary(self) -> str:
        """Per conversation stream: requests, append-only share, misses by cause, tokens the server reused."""
        self.drain(timeout=10.0)  # the requests answered so far, analysed (a user's command: may wait)
        lines = summary_lines(self.analyzer.summary())
        for line in lines:
            logger.info(line)
        return "\n".join(lines)

    @command.command("stableprefix.reset")
    def reset(self) -> None:
        """Forget all streams and statistics (the next request of every conversation counts as first)."""
        self.worker.submit(self.analyzer.reset)  # after the requests already queued, before later ones
        logger.info("stableprefix: streams and statistics reset")

    # --- hooks ---------------------------------------------------------------------------------------------

    def _guard(self, fn: Any) -> Any:
        """Run `fn`; on an internal error warn (one line) and return None: the addon never raises into
        mitmproxy, and the request or response it was looking at passes unchanged."""
        try:
            return fn()
        except Exception as e:  # fail open
            logger.warning(
                f"stableprefix: internal error ({type(e).__name__}); traffic passes unchanged"  # no message: it could quote the prompt
            )
            return None

    def request(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """The forwarding path: new bytes if a rule changes them, then the analysis is queued (in arrival
        order) and the flow goes on. Returns an awaitable only when the analysis queue is over its budget."""
        if flow.response or flow.error or not flow.live:
            return None
        req = flow.request
        if req.method != "POST" or pipeline.shapes.api_for_path(req.path) is None:
            return None
        self._maybe_reload_rules()
        self._remember_loop()
        extra = {"client": flow.client_conn.peername}
        if req.stream or req.raw_content is None:
            self._left_alone(flow, "request body was streamed (stream_large_bodies); not normalised", extra)
            return None
        try:
            raw = req.get_content(strict=True) or b""
        except ValueError:  # mitmproxy's message quotes body bytes: name the encoding only
            encoding = req.headers.get("content-encoding", "")
            self._left_alone(flow, f"cannot decode body (Content-Encoding {encoding!r})", extra)
            return None
        fwd = self._guard(lambda: self.analyzer.forward(req.method, req.host, req.path, raw, req.headers))
        if fwd is None:
            return None
        if fwd.forward is not None:
            req.content = fwd.forward  # re-encodes Content-Encoding, fixes Content-Length
        entry = _Entry(flow, round(time.time(), 3), extra)
        self._entries[flow.id] = entry
        if ctx.options.stableprefix_affinity_header and self._loop is not None:
            entry.held = asyncio.Event()  # the key depends on the stream the analysis finds: the flow waits
        # held until the response has been passed on (at most HOLD_SECONDS): the analysis does not compete
        # for the interpreter with this flow's own forwarding; a flow waiting for its affinity key: at once
        self.worker.submit(lambda: self._analyse(entry, fwd), len(raw), hold=flow.id)
        self._release(flow.id, 0.0 if entry.held is not None else HOLD_SECONDS)
        if ctx.options.stableprefix_affinity_header and self._loop is None:
            self.drain()  # no event loop (tests): deliver the analysis, and the header, before returning
        waits: list[Awaitable[Any]] = [entry.held.wait()] if entry.held is not None else []
        if self.worker.over_budget():
            if self._loop is None:
                self.worker.room_sync()
            else:
                waits.append(self.worker.room())
        return _all(waits) if waits else None

    # --- off the forwarding path (the worker thread) ---------------------------------------------------

    def _analyse(self, entry: _Entry, fwd: pipeline.Forward) -> None:
        """Worker: the analysis of one request; the flow gets its comment and content view afterwards."""
        try:
            result = self.analyzer.analyse(fwd)
            record: dict[str, Any] = {"ts": entry.ts, "id": entry.flow.id, **result.record}
            before = None if result.warning else self._guard(lambda: before_state(result))
        except Exception as e:  # fail open: the request went on; no record, one warning
            msg = f"stableprefix: internal error ({type(e).__name__}); traffic passes unchanged"
            self._post(lambda: logger.warning(msg))
            if entry.held is not None:  # a flow waiting for its affinity key goes on without one
                self._post(entry.held.set)
            return
        entry.record = record
        self._post(lambda: self._analysed(entry, record, result.warning, before))

    def _analysed(
        self, entry: _Entry, record: dict[str, Any], warning: str | None, before: dict[str, Any] | None
    ) -> None:
        """Event loop: show the analysis on the flow (comment, content view) and in the log."""
        flow = entry.flow
        if warning:
            logger.warning(f"stableprefix: {warning}", extra=entry.extra)
        else:
            if before is not None:
                flow.metadata[BEFORE_KEY] = before
            flow.comment = comment(record)
        flow.metadata[META_KEY] = record
        self._guard(lambda: self._set_affinity(entry, record))
        self._notices()
        _updated(flow)

    def _complete(self, entry: _Entry, fn: Any) -> None:
        """Worker: complete the record of an answered (or failed) request with `fn(record)`, then write it."""
        record = entry.record
        if record is not None:  # else the analysis failed: no record (it said so)
            self._guard(lambda: fn(record))
            self._post(lambda: self._finish(entry.flow, record))
        if entry.done is not None:
            self._post(entry.done.set)

    def _hold_for_record(self, entry: _Entry) -> Awaitable[bool] | None:
        """While flows are being saved (``mitmdump -w``), the response and error hooks wait for the
        completed record, so that the saved flow carries it (the save addon runs after this one)."""
        if self._loop is None or not getattr(ctx.options, "save_stream_file", None):
            return None
        entry.done = asyncio.Event()
        return entry.done.wait()

    def _post(self, fn: Any) -> None:
        """Worker: run `fn` on the event loop (in order); without a running loop, `drain` runs it. One
        wake-up of the loop serves every result posted until it runs (not one per result)."""
        self._ready.append(fn)
        loop = self._loop
        if loop is not None and not self._wake_pending:
            self._wake_pending = True
            try:
                loop.call_soon_threadsafe(self._run_ready)
            except RuntimeError:  # the loop has closed: drain() runs what is left
                self._wake_pending = False

    def _run_ready(self) -> None:
        # cleared before draining: a result posted from now on wakes the loop again
        self._wake_pending = False
        while self._ready:
            try:
                fn = self._ready.popleft()
            except IndexError:
                return
            self._guard(fn)

    def _remember_loop(self) -> None:
        try:
            self._loop = asyncio.get_running_loop()
        except RuntimeError:  # called outside an event loop (tests): `drain` delivers the results
            self._loop = None

    def drain(self, timeout: float | None = None) -> bool:
        """Wait for every queued analysis and completion and deliver their results (flow comments, log
        lines, records) on the calling thread; False if the worker did not finish within `timeout`."""
        done = self.worker.join(timeout)
        self._run_ready()
        return done

    # --- the other flow hooks ----------------------------------------------------------------------------

    # --- the affinity header (issue 14) ---------------------------------------------------------------------

    @staticmethod
    def _load_affinity_options(loader: Any) -> None:
        loader.add_option(
            "stableprefix_affinity_header",
            str | None,
            None,
            "Set this header on each analysed request to a stable per-conversation key (a short hash of the "
            "session id, else of the conversation stream), for a router in front of several replicas: "
            "x-smg-routing-key (sglang-router --policy manual), x-session-id (vllm-router --policy "
            "consistent_hash). Off by default.",
        )
        loader.add_option(
            "stableprefix_affinity_side",
            str,
            "separate",
            "The affinity key of side and count_tokens requests: separate (a key of their own, so they do "
            "not evict the conversation's slot), same (the conversation's key), none (no header).",
            choices=affinity.SIDE_MODES,
        )
        loader.add_option(
            "stableprefix_affinity_override",
            bool,
            False,
            "Replace the affinity header when the client already sent one (default: leave it).",
        )

    @staticmethod
    def _check_affinity_options() -> None:
        opts = ctx.options
        name = opts.stableprefix_affinity_header
        if name is not None and (why := affinity.header_problem(name)):
            raise exceptions.OptionsError(f"stableprefix_affinity_header: {name!r} {why}")
        if opts.stableprefix_affinity_side not in affinity.SIDE_MODES:
            raise exceptions.OptionsError(
                f"stableprefix_affinity_side: {opts.stableprefix_affinity_side!r} is not one of "
                f"{', '.join(affinity.SIDE_MODES)}"
            )

    def _set_affinity(self, entry: _Entry, record: dict[str, Any]) -> None:
        """Set the affinity header from the analysed record on a flow still held for it (not on passthrough
        hosts, not in observe mode, not over a value the client sent unless stableprefix_affinity_override);
        the record notes it. Releases the flow."""
        try:
            self._affinity_header(entry.flow, record)
        finally:
            if entry.held is not None:
                entry.held.set()

    def _affinity_header(self, flow: http.HTTPFlow, record: dict[str, Any]) -> None:
        opts = ctx.options
        name = opts.stableprefix_affinity_header
        if not name or record.get("passthrough") or self.settings.observe or not flow.live:
            return
        headers = flow.request.headers
        if name in headers and not opts.stableprefix_affinity_override:
            record["affinity"] = "client"
            return
        value = affinity.affinity_value(record, opts.stableprefix_affinity_side)
        if value is None:
            return
        headers[name] = value
        record["affinity"] = value

    def _left_alone(self, flow: http.HTTPFlow, reason: str, extra: dict[str, Any]) -> None:
        """A handled request the addon could not read: one warning, and a record saying why."""
        req = flow.request
        path = req.path.split("?")[0]
        logger.warning(f"stableprefix: left {path} unchanged: {reason}", extra=extra)
        api = pipeline.shapes.api_for_path(req.path)
        ts = round(time.time(), 3)
        record = {"ts": ts, "id": flow.id, **records.new(req.host, req.path, str(api), state="left-alone"),
                  "error": reason}  # fmt: skip
        flow.metadata[META_KEY] = record
        entry = _Entry(flow, ts, extra, record, left_alone=True)
        self._entries[flow.id] = entry

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        entry = self._entries.get(flow.id)
        resp = flow.response
        if entry is None or resp is None or entry.left_alone:
            return
        if not resp.headers.get("content-type", "").lower().startswith("text/event-stream"):
            return
        # The record may not be analysed yet: it is attached when the stream finishes (in the worker), and
        # the copy of the chunks is parsed there too (`_DeferredFeed`): the event loop only keeps them.
        feed = _DeferredFeed(self.analyzer, resp.headers, resp.status_code)
        entry.feed = feed
        previous = resp.stream

        def tee(chunk: bytes) -> Any:
            feed.feed(chunk)  # a copy for the parser; never raises
            return previous(chunk) if callable(previous) else chunk

        resp.stream = tee  # stream on, chunk by chunk, unchanged

    def response(self, flow: http.HTTPFlow) -> Awaitable[bool] | None:
        entry = self._entries.pop(flow.id, None)
        resp = flow.response
        if entry is None or resp is None:
            self._release(flow.id)
            return None
        self._remember_loop()
        held = self._hold_for_record(entry)
        status, feed = resp.status_code, entry.feed
        raw, encoding = resp.raw_content, resp.headers.get("content-encoding")
        headers = resp.headers

        def complete(record: dict[str, Any]) -> None:
            if not records.analysed(record):  # a body the addon left alone: no analysis, just the outcome
                record["status"] = status
            elif feed is not None:
                feed.record = record
                feed.finish()
            else:
                self.analyzer.response(record, status, headers, _decoded(raw, encoding))

        self.worker.submit(lambda: self._complete(entry, complete), len(raw or b""), hold=flow.id)
        self._release(flow.id)  # the analysis and this completion, once the answer is passed on
        return held

    def error(self, flow: http.HTTPFlow) -> Awaitable[bool] | None:
        entry = self._entries.pop(flow.id, None)
        if entry is None:
            self._release(flow.id)
            return None
        self._remember_loop()
        held = self._hold_for_record(entry)
        msg = flow.error.msg if flow.error else "unknown error"
        feed = entry.feed
        # No response started: unless the client itself went away, mitmproxy answers it with a 502.
        status = None if flow.response is not None or _client_gone(msg) else 502

        def complete(record: dict[str, Any]) -> None:
            if feed is not None and records.analysed(
                record
            ):  # a stream cut short: what the server said counts
                feed.record = record
                self._guard(feed.finish)
                record.setdefault("error", f"response interrupted: {msg}"[:200])
            else:
                self.analyzer.error(record, msg, status)

        self.worker.submit(lambda: self._complete(entry, complete), hold=flow.id)
        self._release(flow.id)
        return held

    def _release(self, flow_id: str, delay: float = 0.0) -> None:
        """Let the held jobs of this flow run once the current hook has returned and mitmproxy has passed
        the message on (the next turn of the event loop), or after `delay` seconds."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (tests): now
            self.worker.release(flow_id)
            return
        if delay:
            loop.call_later(delay, self.worker.release, flow_id)
        else:
            loop.call_soon(self.worker.release, flow_id)

    def _finish(self, flow: http.HTTPFlow, record: dict[str, Any]) -> None:
        flow.metadata[META_KEY] = record
        if records.analysed(record):
            flow.comment = comment(record)
            if record.get("miss") == "client":
                flow.marked = MARK
            level = (
                logging.WARNING if str(record.get("error", "")).startswith("no response") else logging.INFO
            )
            logger.log(
                level, f"stableprefix: {log_line(record)}", extra={"client": flow.client_conn.peername}
            )
        self._write(record)
        self._notices()
        _updated(flow)

    def _write(self, record: dict[str, Any]) -> None:
        if self.writer:
            try:
                self.writer.write(record)
            except (OSError, ValueError) as e:
                logger.warning(f"stableprefix: cannot write {self.writer.path}: {e}")

    def _notices(self) -> None:
        for line in self.analyzer.pop_notices():
            logger.warning(line)


class _Entry:
    """A handled flow between its hooks: its record (once analysed) and the parser of a streamed answer."""

    __slots__ = ("done", "extra", "feed", "flow", "held", "left_alone", "record", "ts")

    def __init__(
        self,
        flow: http.HTTPFlow,
        ts: float,
        extra: dict[str, Any],
        record: dict[str, Any] | None = None,
        left_alone: bool = False,
    ) -> None:
        self.flow = flow
        self.ts = ts
        self.extra = extra
        self.record = record
        self.left_alone = left_alone
        self.feed: _DeferredFeed | None = None
        self.done: asyncio.Event | None = None  # set once the record is complete (flows being saved)
        self.held: asyncio.Event | None = None  # set once the affinity header is decided (flow waits)


def _decoded(raw: bytes | None, encoding: str | None) -> bytes | None:
    """`Message.get_content(strict=False)` for a body captured at the response hook."""
    if raw is None or not encoding:
        return raw
    try:
        content = mitm_encoding.decode(raw, encoding)
    except ValueError:
        return raw
    return content if isinstance(content, bytes) else raw


def _updated(flow: http.HTTPFlow) -> None:
    """Tell the UIs (mitmweb) that the flow changed after its hooks returned; skipped when no loaded addon
    has a sync ``update`` hook (mitmdump): a trigger walks every addon, ~0.1 ms per call."""
    try:
        manager = ctx.master.addons
        if _update_listeners(manager):
            manager.trigger(hooks.UpdateHook([flow]))
    except Exception:  # no master (unit use) or a UI addon that fails: the flow itself is complete
        pass


def _update_listeners(manager: Any) -> bool:
    """Whether an addon (nested ones included) would receive a sync ``update`` hook, as `trigger` finds them:
    a callable ``update`` attribute that is not a coroutine function (those fail in a sync trigger)."""
    for a in addonmanager.traverse(manager.chain):
        func = getattr(a, "update", None)
        if callable(func) and not inspect.iscoroutinefunction(func):
            return True
    return False


class _DeferredFeed:
    """The copy of a streamed (SSE) response, kept as chunks on the event loop and parsed in the worker at
    `finish`: the tee costs the event loop one list append per chunk. Past `LIMIT` bytes the kept chunks are
    parsed and later ones fed at once (memory stays bounded on a long stream)."""

    LIMIT = 256 * 1024  # bytes kept per open stream at most

    def __init__(self, analyzer: Analyzer, headers: Any, status: int) -> None:
        enc = headers.get("content-encoding")
        self._analyzer = analyzer
        self._headers = {"content-encoding": enc} if enc else {}
        self._status = status
        self._chunks: list[bytes] = []
        self._size = 0
        self._feed: SSEFeed | None = None
        self.record: dict[str, Any] = {}

    def feed(self, chunk: bytes) -> None:
        if self._feed is not None:
            self._feed.feed(chunk)
            return
        self._chunks.append(chunk)
        self._size += len(chunk)
        if self._size > self.LIMIT:
            self._parser()

    def _parser(self) -> SSEFeed:
        if self._feed is None:
            self._feed = self._analyzer.sse_parser(self.record, self._headers, self._status)
            for chunk in self._chunks:
                self._feed.feed(chunk)
            self._chunks = []
        return self._feed

    def finish(self) -> dict[str, Any]:
        feed = self._parser()
        feed.record = self.record
        return feed.finish()


def _client_gone(message: str) -> bool:
    """mitmproxy's error messages for a flow the client ended (no error page is sent then)."""
    return message.lower().startswith(("client disconnected", "killed"))


async def _all(waits: list[Awaitable[Any]]) -> None:
    for w in waits:
        await w


addons = [StablePrefix(), ClientAllowlist()]
