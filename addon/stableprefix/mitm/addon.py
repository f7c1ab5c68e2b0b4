"""The mitmproxy face of stableprefix: ``mitmdump -s addon/stableprefix/addon.py``.

Options are parsed into `pipeline.Settings` in `configure`; the `request` hook hands the body to the pure
`analyzer.Analyzer` (pipeline + stream tracking) and writes back only what it changed. Anything unexpected
leaves the request as it was, with one warning. The record is completed when the response has arrived
(SSE responses stream on unchanged while a copy of their chunks is parsed), then written to the JSONL log
and logged as one INFO line; the flow gets a comment (the verdict), a mark for a client-side miss and the
"stableprefix" content view. ``mitmdump -s addon/stableprefix/addon.py`` loads this module through a shim.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

from mitmproxy import command
from mitmproxy import ctx
from mitmproxy import exceptions
from mitmproxy import http

from stableprefix.core import affinity
from stableprefix.core import pipeline
from stableprefix.core import rules as rulelib
from stableprefix.core.analyzer import Analyzer
from stableprefix.core.analyzer import SSEFeed
from stableprefix.core.analyzer import before_state
from stableprefix.core.record import BEFORE_KEY
from stableprefix.core.record import META_KEY
from stableprefix.core.record import JsonlWriter
from stableprefix.core.record import comment
from stableprefix.core.record import log_line
from stableprefix.core.record import summary_lines
from stableprefix.mitm import contentview  # noqa: F401  (registers the "stableprefix" content view)
from stableprefix.mitm.access import ClientAllowlist

logger = logging.getLogger("stableprefix")
MARK = ":warning:"  # flow.marked for a client-side miss (mitmweb shows ⚠; filter ~marked)
RULES_POLL_SECONDS = 1.0
AFFINITY_OPTIONS = {"stableprefix_affinity_header", "stableprefix_affinity_side"}


def build_rules(billing: str, rules_file: str | None, enable: Sequence[str], disable: Sequence[str]) -> list:
    """The rule list the options describe. Raises ValueError (RuleError) naming what is wrong."""
    if billing not in rulelib.BILLING_MODES:
        raise ValueError(
            f"stableprefix_billing: {billing!r} is not one of {', '.join(rulelib.BILLING_MODES)}"
        )
    rules = rulelib.builtin_rules(billing)
    user = rulelib.load_rules_file(rules_file) if rules_file else rulelib.RuleSet()
    rules = rulelib.switch(rules, user.on, user.off) + list(user.rules)
    known = {r.name for r in rules} | {r.preset for r in rules} | {"billing"}
    for option, names in (("stableprefix_enable", enable), ("stableprefix_disable", disable)):
        for name in names:
            if name not in known:
                raise ValueError(f"{option}: unknown rule {name!r}; known: {', '.join(sorted(known))}")
    return rulelib.switch(rules, enable, disable)


class StablePrefix:
    """Keeps LLM prompt prefixes byte-stable and proves it per request (streams, divergence, server reuse)."""

    name = "stableprefix"

    def __init__(self) -> None:
        self.analyzer = Analyzer()
        self.writer: JsonlWriter | None = None
        self._rules_mtime: float | None = None
        self._rules_checked = 0.0
        self._rules_broken: str | None = None
        self._pending: dict[str, dict[str, Any]] = {}  # flow id -> record, until the response completes
        self._feeds: dict[str, SSEFeed] = {}  # flow id -> parser of a streamed response

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
            f"Built-in rules to switch on (repeat the option): {', '.join(rulelib.BUILTIN_NAMES)}.",
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
        if "stableprefix_passthrough" in updated:
            for host in opts.stableprefix_passthrough:
                if not host or any(c in host for c in " /:@") or host != host.strip():
                    raise exceptions.OptionsError(
                        f"stableprefix_passthrough: {host!r} is not a host name or glob (e.g. *.anthropic.com)"
                    )
        rule_opts = {
            "stableprefix_billing",
            "stableprefix_rules",
            "stableprefix_enable",
            "stableprefix_disable",
        }
        if updated & rule_opts:
            try:
                self._set_rules(self._build_rules())
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from None
            self._rules_mtime = self._mtime(opts.stableprefix_rules)
            self._rules_broken = None
        if updated & (rule_opts | {"stableprefix_passthrough", "stableprefix_observe"}):
            self.settings = pipeline.Settings(
                rules=self.settings.rules,
                observe=opts.stableprefix_observe,
                passthrough=tuple(opts.stableprefix_passthrough),
            )
        if "stableprefix_log" in updated:
            if self.writer:
                self.writer.close()
                self.writer = None
            if opts.stableprefix_log:
                try:
                    self.writer = JsonlWriter(opts.stableprefix_log)
                except OSError as e:
                    raise exceptions.OptionsError(
                        f"stableprefix_log: cannot open {opts.stableprefix_log!r}: {e.strerror or e}"
                    ) from None
        if updated & AFFINITY_OPTIONS:
            self._check_affinity_options()
        if "stableprefix_log_context" in updated:
            self.analyzer.log_context = bool(opts.stableprefix_log_context)
        if "stream_large_bodies" in updated and getattr(opts, "stream_large_bodies", None):
            logger.warning(
                "stableprefix: stream_large_bodies is set; streamed request bodies are not normalised."
            )

    def _build_rules(self) -> list:
        o = ctx.options
        return build_rules(
            o.stableprefix_billing, o.stableprefix_rules, o.stableprefix_enable, o.stableprefix_disable
        )

    def _set_rules(self, rules: list) -> None:
        self.settings = pipeline.Settings(tuple(rules), self.settings.observe, self.settings.passthrough)

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
            rules = self._build_rules()
        except ValueError as e:
            if str(e) != self._rules_broken:
                logger.warning(f"stableprefix: keeping the previous rules: {e}")
                self._rules_broken = str(e)
            return
        self._set_rules(rules)
        self._rules_broken = None
        logger.info(f"stableprefix: reloaded {path}: rules on: {pipeline.rules_summary(rules)}")

    def running(self) -> None:
        s = self.settings
        logger.info(
            f"stableprefix active: billing={ctx.options.stableprefix_billing} observe={s.observe} "
            f"rules on: {pipeline.rules_summary(s.rules)}; passthrough: {', '.join(s.passthrough) or 'none'}; "
            f"log: {ctx.options.stableprefix_log or 'off'}"
        )

    def done(self) -> None:
        for flow_id in list(self._pending):
            record = self._pending.pop(flow_id)
            self._feeds.pop(flow_id, None)
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
        lines = summary_lines(self.analyzer.summary())
        for line in lines:
            logger.info(line)
        return "\n".join(lines)

    @command.command("stableprefix.reset")
    def reset(self) -> None:
        """Forget all streams and statistics (the next request of every conversation counts as first)."""
        self.analyzer.reset()
        logger.info("stableprefix: streams and statistics reset")

    # --- hooks ---------------------------------------------------------------------------------------------

    def _guard(self, fn: Any) -> Any:
        """Run `fn`; on an internal error warn (one line) and return None: the addon never raises into
        mitmproxy, and the request or response it was looking at passes unchanged."""
        try:
            return fn()
        except Exception as e:  # fail open
            logger.warning(
                f"stableprefix: internal error ({type(e).__name__}: {e}); traffic passes unchanged"
            )
            return None

    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live:
            return
        req = flow.request
        if req.method != "POST" or pipeline.shapes.api_for_path(req.path) is None:
            return
        self._maybe_reload_rules()
        extra = {"client": flow.client_conn.peername}
        if req.stream or req.raw_content is None:
            self._left_alone(flow, "request body was streamed (stream_large_bodies); not normalised", extra)
            return
        try:
            raw = req.get_content(strict=True) or b""
        except ValueError:  # mitmproxy's message quotes body bytes: name the encoding only
            encoding = req.headers.get("content-encoding", "")
            self._left_alone(flow, f"cannot decode body (Content-Encoding {encoding!r})", extra)
            return
        result = self._guard(lambda: self.analyzer.request(req.method, req.host, req.path, raw, req.headers))
        if result is None:
            return
        record: dict[str, Any] = {"ts": round(time.time(), 3), "id": flow.id, **result.record}
        if result.warning:
            logger.warning(f"stableprefix: {result.warning}", extra=extra)
        else:
            if result.forward is not None:
                req.content = result.forward  # re-encodes Content-Encoding, fixes Content-Length
            before = self._guard(lambda: before_state(result))
            if before is not None:
                flow.metadata[BEFORE_KEY] = before
            flow.comment = comment(record)
        flow.metadata[META_KEY] = record
        self._pending[flow.id] = record
        self._guard(lambda: self._set_affinity(flow, record))
        self._notices()

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

    def _set_affinity(self, flow: http.HTTPFlow, record: dict[str, Any]) -> None:
        """Set the affinity header from the analysed record (not on passthrough hosts, not in observe
        mode, not over a value the client sent unless stableprefix_affinity_override); the record notes it."""
        opts = ctx.options
        name = opts.stableprefix_affinity_header
        if not name or record.get("passthrough") or self.settings.observe:
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
        record = {"ts": round(time.time(), 3), "id": flow.id, "host": req.host, "path": path, "api": str(api),
                  "rewritten": False, "error": reason}  # fmt: skip
        flow.metadata[META_KEY] = record
        self._pending[flow.id] = record

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        record = self._pending.get(flow.id)
        resp = flow.response
        if record is None or resp is None or "class" not in record:
            return
        if not resp.headers.get("content-type", "").lower().startswith("text/event-stream"):
            return
        feed = self.analyzer.sse_parser(record, resp.headers, resp.status_code)
        self._feeds[flow.id] = feed
        previous = resp.stream

        def tee(chunk: bytes) -> Any:
            feed.feed(chunk)  # a copy for the parser; never raises
            return previous(chunk) if callable(previous) else chunk

        resp.stream = tee  # stream on, chunk by chunk, unchanged

    def response(self, flow: http.HTTPFlow) -> None:
        record = self._pending.pop(flow.id, None)
        feed = self._feeds.pop(flow.id, None)
        resp = flow.response
        if record is None or resp is None:
            return
        if "class" not in record:  # a body the addon left alone: no analysis, just the outcome
            record["status"] = resp.status_code
        elif feed is not None:
            self._guard(feed.finish)
        else:
            body = resp.get_content(strict=False)
            self._guard(lambda: self.analyzer.response(record, resp.status_code, resp.headers, body))
        self._finish(flow, record)

    def error(self, flow: http.HTTPFlow) -> None:
        record = self._pending.pop(flow.id, None)
        feed = self._feeds.pop(flow.id, None)
        if record is None:
            return
        msg = flow.error.msg if flow.error else "unknown error"
        if feed is not None:  # a stream cut short: what the server reported so far still counts
            self._guard(feed.finish)
            record.setdefault("error", f"response interrupted: {msg}"[:200])
        else:
            # No response started: unless the client itself went away, mitmproxy answers it with a 502.
            status = None if flow.response is not None or _client_gone(msg) else 502
            self._guard(lambda: self.analyzer.error(record, msg, status))
        self._finish(flow, record)

    def _finish(self, flow: http.HTTPFlow, record: dict[str, Any]) -> None:
        flow.metadata[META_KEY] = record
        if "class" in record:
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

    def _write(self, record: dict[str, Any]) -> None:
        if self.writer:
            try:
                self.writer.write(record)
            except (OSError, ValueError) as e:
                logger.warning(f"stableprefix: cannot write {self.writer.path}: {e}")

    def _notices(self) -> None:
        for line in self.analyzer.pop_notices():
            logger.warning(line)


def _client_gone(message: str) -> bool:
    """mitmproxy's error messages for a flow the client ended (no error page is sent then)."""
    return message.lower().startswith(("client disconnected", "killed"))


addons = [StablePrefix(), ClientAllowlist()]
