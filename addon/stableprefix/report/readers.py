"""The report's readers: the addon's JSONL log, mitmproxy flow files and HAR files, detected by content.

Flow and HAR files are fed through the core `Analyzer` in observe mode, one flow at a time (bounded
memory), so a report shows what the rules *would* change on traffic recorded without them. Problems are
collected on the `Report`, never raised.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path
from typing import IO
from typing import Any
from typing import BinaryIO

from stableprefix.core import record as records
from stableprefix.report.model import Report

MAX_PROBLEMS_PER_FILE = 5
_FLOW_HEAD = re.compile(rb"\A\d{1,12}:")


def read_file(report: Report, path: str | Path, progress: bool | None = None) -> None:
    """Add every record of one file; problems are collected, never raised."""
    name = str(path)
    report.files.append(name)
    show = sys.stderr.isatty() if progress is None else progress
    try:
        fo = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        report.problem(name, f"cannot read: {e.strerror or e}")
        return
    with fo:
        try:
            size = os.fstat(fo.fileno()).st_size
            head = fo.read(64)
            fo.seek(0)
        except OSError as e:
            report.problem(name, f"cannot read: {e.strerror or e}")
            return
        meter = Progress(name, size, sys.stderr) if show else None
        try:
            kind = detect(head, fo)
            if kind == "jsonl":
                _read_jsonl(report, fo, name, meter)
            elif kind in ("flows", "har"):
                _read_flows(report, fo, name, meter)
            elif kind == "empty":
                pass
            else:
                report.problem(
                    name,
                    "not a stableprefix JSONL log, a mitmproxy flow file or a HAR file "
                    f"(it starts with {head[:16]!r})",
                )
        except OSError as e:
            report.problem(name, f"cannot read: {e.strerror or e}")
        finally:
            if meter:
                meter.done()


def _read_jsonl(report: Report, fo: BinaryIO, name: str, meter: Progress | None) -> None:
    bad = 0
    for lineno, raw in enumerate(fo, 1):
        if meter:
            meter.update(fo.tell(), lineno, "lines")
        if not raw.strip():
            continue
        where = f"{name}:{lineno}"
        try:
            rec = json.loads(raw)
        except (ValueError, RecursionError) as e:
            bad += 1
            if bad <= MAX_PROBLEMS_PER_FILE:
                why = "not UTF-8" if isinstance(e, UnicodeDecodeError) else f"not JSON ({e})"
                report.problem(where, f"line is {why}"[:200])
            continue
        if not isinstance(rec, dict):
            bad += 1
            if bad <= MAX_PROBLEMS_PER_FILE:
                report.problem(where, f"line is JSON but not an object ({type(rec).__name__})")
            continue
        report.add(records.upgrade(rec), where, name)
    if bad > MAX_PROBLEMS_PER_FILE:
        report.problem(name, f"{bad - MAX_PROBLEMS_PER_FILE} more lines skipped (not JSON objects)")


def _read_flows(report: Report, fo: BinaryIO, name: str, meter: Progress | None) -> None:
    from mitmproxy import exceptions
    from mitmproxy import http
    from mitmproxy import io as mio

    analyzer: Any = None
    reader = mio.FlowReader(fo)
    index = 0  # flows read so far, readable or not
    skipped: dict[str, list[int]] = {}  # message -> [first flow, count]
    while True:
        try:
            for f in reader.stream():
                index += 1
                if meter:
                    meter.update(fo.tell(), index, "flows")
                if not isinstance(f, http.HTTPFlow):
                    continue
                where = f"{name} flow {index}"
                if analyzer is None:
                    analyzer = new_analyzer()
                try:
                    rec = analyze_flow(analyzer, f)
                except Exception as e:  # noqa: BLE001 - one bad flow must not end the report
                    report.problem(where, f"cannot analyse: {type(e).__name__}: {e}"[:200])
                    continue
                if rec is not None:
                    report.add(rec, where, name)
            break
        except exceptions.FlowReadException as e:
            index += 1
            msg = str(e).rstrip(".") or "unreadable flow"
            if msg == "Invalid data format" or "HAR" in msg:  # the rest of the file is lost
                where = f"{name} flow {index}" if index > 1 else name
                what = "a readable mitmproxy flow file" + (" from here on" if index > 1 else "")
                report.problem(where, f"not {what} ({msg})")
                break
            # one flow in a format this mitmproxy cannot read (another version): skip it, read on
            skipped.setdefault(msg, [index, 0])[1] += 1
        except Exception as e:  # noqa: BLE001 - whatever a corrupt file makes mitmproxy raise
            report.problem(f"{name} flow {index + 1}", f"cannot read flow: {type(e).__name__}: {e}"[:200])
            break
    for msg, (first, count) in skipped.items():
        more = f" (and {count - 1} more flow{'s' if count > 2 else ''} like it)" if count > 1 else ""
        report.problem(f"{name} flow {first}", f"skipped: {msg}{more}")


def detect(head: bytes, fo: BinaryIO) -> str:
    """'jsonl', 'flows', 'har', 'empty' or 'unknown', from the first bytes (and line) of a file."""
    text = head.lstrip(b"\xef\xbb\xbf").lstrip()
    if not text:
        return "empty" if not head.strip() else "unknown"
    if _FLOW_HEAD.match(head):
        return "flows"
    if text.startswith(b"{"):
        first = fo.readline(1 << 20).strip().lstrip(b"\xef\xbb\xbf")
        fo.seek(0)
        return "har" if first == b"{" else "jsonl"
    return "unknown"


def new_analyzer() -> Any:
    """The core that fingerprints recorded requests offline, in observe mode (rules report, never rewrite)."""
    from stableprefix.core import pipeline
    from stableprefix.core.analyzer import Analyzer

    return Analyzer(pipeline.Settings(observe=True))


def analyze_flow(analyzer: Any, f: Any) -> dict[str, Any] | None:
    """The record of one recorded HTTP flow (None when it is not an LLM request)."""
    req = f.request
    raw = req.get_content(strict=False) or b""
    result = analyzer.request(req.method, req.host, req.path, raw, req.headers)
    if result is None:
        return None
    rec: dict[str, Any] = {"ts": round(req.timestamp_start or 0, 3), "id": f.id, **result.record}
    saved = f.metadata.get(records.META_KEY) if isinstance(f.metadata, dict) else None
    saved = saved if isinstance(saved, dict) else None
    if saved is not None:  # recorded with the addon loaded: what its rules did to the request
        for key in ("changed", "actions", "rewritten", "session"):
            if key in saved and not (key == "session" and rec.get("session")):
                rec[key] = saved[key]
        if saved.get("changed"):  # the request here is the forwarded one: the savings are the record's
            rec.pop("would_change", None)
            for key in ("saved_chars", "saved_by"):
                if key in saved:
                    rec[key] = saved[key]
    if f.response is not None:
        resp = f.response
        body = resp.get_content(strict=False)
        if not body and saved is not None and saved.get("state") == "answered":
            # a streamed response's body is not stored ("content missing"): the addon's record is
            rec = analyzer.recorded(rec, resp.status_code, saved)
            rec["evidence_from"] = "flow-metadata"
        else:
            rec = analyzer.response(rec, resp.status_code, resp.headers, body) or rec
    elif f.error is not None:
        rec["error"] = rec.get("error") or str(f.error.msg)[:200]
    return rec


class Progress:
    """A one-line progress meter on a terminal (stderr), redrawn at most 5 times a second."""

    def __init__(self, name: str, size: int, out: IO[str]) -> None:
        self.name, self.size, self.out = name, size, out
        self.last = 0.0
        self.shown = False

    def update(self, pos: int, count: int, unit: str) -> None:
        now = time.monotonic()
        if now - self.last < 0.2:
            return
        self.last = now
        pct = f" {100 * pos / self.size:.0f}%" if self.size else ""
        self.out.write(
            f"\rreading {self.name}: {pos / 1e6:,.1f}/{self.size / 1e6:,.1f} MB{pct}, {count:,} {unit}"
        )
        self.out.flush()
        self.shown = True

    def done(self) -> None:
        if self.shown:
            self.out.write("\r\033[K")
            self.out.flush()


def read(paths: list[str | Path] | list[str] | list[Path], progress: bool | None = None) -> Report:
    report = Report()
    for p in paths:
        read_file(report, p, progress)
    return report
