#!/usr/bin/env python3
"""What stableprefix costs: the same requests direct, through bare mitmdump and through mitmdump + addon.

One run, on 127.0.0.1, keep-alive connections with Nagle off on every leg, arms measured alternately:

- ``direct``: client -> recording upstream;
- ``bare``: client -> ``mitmdump`` (reverse mode, no addon) -> upstream;
- ``billing``: client -> ``mitmdump -s addon.py`` (default rules: billing only) -> upstream;
- ``all``: the same with every built-in rule switched on (a rules file with ``[builtins]`` all true).

Bodies are Claude-Code-shaped (`samples.body_of_size`) of 10 KB, 100 KB, 1 MB and 5 MB, sent compact as
Node's ``JSON.stringify`` does. Printed: median and p95 latency per arm, sequential and with 8 concurrent
clients, the ratio addon/bare; the forwarding delay (the client's send to the upstream's receipt of the
whole body, clocked with CLOCK_MONOTONIC in both processes); requests per CPU-second of each proxy process
(all threads, so the analysis the addon runs off the forwarding path counts); the in-process cost per MB of
`pipeline.process` and of the addon's two paths (forwarding path: guard scan, and on a hit parse + rules +
spliced bytes; analysis: fingerprint, detail, streams, before-state) next to the floor of one JSON parse
plus one SHA-256 pass; the latency of 16 concurrent small streaming flows alone and while 5 MB requests go
through and are analysed (stall, on fresh proxies of each arm);
and the RSS growth of the mitmdump + addon process after 10,000 distinct streams (one
``X-Claude-Code-Session-Id`` each).

    .venv/bin/python scripts/bench_overhead.py            # full run, a few minutes on 2 cores
    .venv/bin/python scripts/bench_overhead.py --quick    # smoke run, well under a minute
    .venv/bin/python scripts/bench_overhead.py --profile  # also cProfile the in-process work at 1 MB
    .venv/bin/python scripts/bench_overhead.py --only stall  # one section (also: --skip SECTION)
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import hashlib
import http.client
import io
import json
import multiprocessing
import os
import platform
import pstats
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "addon"))

import orjson  # noqa: E402

from stableprefix.cli import process  # noqa: E402
from stableprefix.core import fingerprint  # noqa: E402
from stableprefix.core import pipeline  # noqa: E402
from stableprefix.core import rules as rulelib  # noqa: E402
from stableprefix.core.analyzer import Analyzer  # noqa: E402
from stableprefix.core.analyzer import before_state  # noqa: E402
from stableprefix.demo import samples  # noqa: E402

KB = 1000
MB = 1000 * KB
SIZES = (10 * KB, 100 * KB, MB, 5 * MB)
ARMS = ("direct", "bare", "billing", "all")
SECTIONS = ("latency", "inprocess", "stall", "memory")
SESSION_HEADER = "X-Claude-Code-Session-Id"
HDRS = {SESSION_HEADER: "bench"}
SENT_HEADER = "X-Bench-Sent-Ns"  # the client's send time; the upstream answers with the delay to receipt
DELAY_HEADER = "X-Bench-Forward-Ns"
GAP_HEADER = "X-Bench-Event-Gap-Ms"  # the upstream waits this long between two SSE events (0: back to back)


# --- the recording upstream (own process, so the client's GIL does not slow it down) -------------------


class _UpstreamHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    received = 0
    received_bytes = 0
    lock = threading.Lock()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        received = time.monotonic_ns()  # CLOCK_MONOTONIC: the same clock in every process of this machine
        sent = self.headers.get(SENT_HEADER)
        delay = str(received - int(sent)) if sent else ""
        with self.lock:  # recording: counts and sizes (keeping 5 MB bodies would only measure memory)
            type(self).received += 1
            type(self).received_bytes += len(body)
        if b'"stream":true' in body[-64:] or b'"stream": true' in body[-64:]:
            events = _sse_events()
            data = "".join(events).encode()
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("content-length", str(len(data)))
            self.send_header(DELAY_HEADER, delay)
            self.end_headers()
            gap = float(self.headers.get(GAP_HEADER) or 0) / 1000
            for k, e in enumerate(events):  # one write per event, as a server streaming tokens would
                if gap and k:
                    time.sleep(gap)  # a paced stream: one event per `gap`, like a model generating tokens
                self.wfile.write(e.encode())
                self.wfile.flush()
            return
        data = b'{"id":"msg_1","type":"message","content":[{"type":"text","text":"ok"}],"usage":{"input_tokens":1,"output_tokens":1}}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header(DELAY_HEADER, delay)
        self.end_headers()
        self.wfile.write(data)


def _sse_events() -> list[str]:
    """An Anthropic Messages stream as a server writes it: message_start (with usage), a text block of six
    deltas, message_delta (output usage), message_stop: 10 events, written one by one."""

    def ev(name: str, data: dict[str, Any]) -> str:
        return f"event: {name}\ndata: {json.dumps({'type': name, **data}, separators=(',', ':'))}\n\n"

    usage = {"input_tokens": 2100, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 2048,
             "output_tokens": 1}  # fmt: skip
    msg: dict[str, Any] = {"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5", "content": [],
           "stop_reason": None, "stop_sequence": None, "usage": usage}  # fmt: skip
    events = [ev("message_start", {"message": msg}),
              ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})]  # fmt: skip
    events += [
        ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": f"word {i} "}})
        for i in range(6)
    ]
    events.append(ev("content_block_stop", {"index": 0}))
    events.append(ev("message_delta", {"delta": {"stop_reason": "end_turn", "stop_sequence": None},
                                       "usage": {"output_tokens": 12}}))  # fmt: skip
    events.append(ev("message_stop", {}))
    return events


def _serve_upstream(port_queue: Any) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _UpstreamHandler)
    server.daemon_threads = True
    port_queue.put(server.server_address[1])
    server.serve_forever()


# --- clients --------------------------------------------------------------------------------------------


class Client:
    """One keep-alive connection with Nagle off."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: http.client.HTTPConnection | None = None
        self.delays: list[float] = []  # seconds from the client's send to the upstream's receipt

    def _connect(self) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        conn.connect()
        assert conn.sock is not None
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def post(self, data: bytes, headers: dict[str, str] | None = None, path: str = "/v1/messages") -> float:
        """Seconds from sending the request to the last byte of the response."""
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = self._connect()
            start = time.perf_counter()
            try:
                sent = {SENT_HEADER: str(time.monotonic_ns())}
                self.conn.request(
                    "POST", path, data, {"content-type": "application/json", **(headers or {}), **sent}
                )
                resp = self.conn.getresponse()
                resp.read()
            except (ConnectionError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
                continue
            elapsed = time.perf_counter() - start
            if delay := resp.getheader(DELAY_HEADER):
                self.delays.append(int(delay) / 1e9)
            if resp.status != 200:
                raise RuntimeError(f"status {resp.status} from port {self.port}")
            if resp.getheader("connection", "").lower() == "close":
                self.conn.close()
                self.conn = None
            return elapsed
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


STALL_CLIENTS = 16


class RawClient:
    """One keep-alive socket (Nagle off) that sends one prepared HTTP/1.1 request and reads the answer
    (Content-Length or chunked) with plain `recv`: a cheap client, so 16 of them in one process measure the
    proxy rather than `http.client`."""

    def __init__(self, port: int, request: bytes) -> None:
        self.port = port
        self.request = request
        self.sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=60)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def exchange(self) -> tuple[float, float, float]:
        """(send time, first body byte, last byte), perf_counter seconds."""
        if self.sock is None:
            self.sock = self._connect()
        sock = self.sock
        start = time.perf_counter()
        sock.sendall(self.request)
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed before the response headers")
            buf += chunk
        head, body = buf.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        if b" 200 " not in lines[0] + b" ":
            raise RuntimeError(f"status line {lines[0]!r} from port {self.port}")
        fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in lines[1:])}
        first = time.perf_counter() if body else 0.0
        chunked = fields.get(b"transfer-encoding", b"").lower() == b"chunked"
        length = -1 if chunked else int(fields.get(b"content-length", b"0"))
        while (len(body) < length) if not chunked else not body.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed mid-response")
            if not body:
                first = time.perf_counter()
            body += chunk
        end = time.perf_counter()
        if fields.get(b"connection", b"").lower() == b"close":
            self.close()
        return start, first or end, end

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class RecordWatcher:
    """Tails the addon's JSONL log on a thread (every 2 ms) and notes when each session's record appeared."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: dict[str, float] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._pos = path.stat().st_size if path.exists() else 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        rest = b""
        while not self._stop.is_set():
            try:
                with self.path.open("rb") as f:
                    f.seek(self._pos)
                    data = f.read()
            except FileNotFoundError:
                data = b""
            if data:
                now = time.perf_counter()
                self._pos += len(data)
                *lines, rest = (rest + data).split(b"\n")
                with self._cond:
                    for line in lines:
                        session = orjson.loads(line).get("session")
                        if session:
                            self.seen.setdefault(session, now)
                    self._cond.notify_all()
            time.sleep(0.002)

    def wait(self, session: str, timeout: float) -> float | None:
        """The perf_counter time the record with this session hash appeared; None on timeout."""
        with self._cond:
            self._cond.wait_for(lambda: session in self.seen, timeout)
            return self.seen.get(session)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def compact(body: Any) -> bytes:
    """Bytes as Node's JSON.stringify writes them (Claude Code): no spaces, non-ASCII kept."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def p95(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(0.95 * (len(s) - 1))))]


def fmt_size(n: int) -> str:
    return f"{n // MB} MB" if n >= MB else f"{n // KB} KB"


# --- the run --------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.tmp = Path(tempfile.mkdtemp(prefix="stableprefix-bench-"))
        self.rules_file = self.tmp / "all.toml"
        self.rules_file.write_text(
            "[builtins]\n" + "".join(f"{name} = true\n" for name in rulelib.builtin_names()), encoding="utf-8"
        )
        ctx = multiprocessing.get_context("spawn")
        q = ctx.Queue()
        self.upstream_proc = ctx.Process(target=_serve_upstream, args=(q,), daemon=True)
        self.upstream_proc.start()
        self.upstream_port: int = q.get(timeout=30)
        up = f"reverse:http://127.0.0.1:{self.upstream_port}"
        self.proxies: dict[str, process.Proxy] = {}
        flags = ["--set", "flow_detail=0"]
        self.proxies["bare"] = process.Proxy(
            process.command(mode=up, confdir=self.tmp / "c-bare", addon=False, extra=flags),
            wait_for_addon=False,
        )
        self.proxies["billing"] = process.Proxy(
            process.command(mode=up, confdir=self.tmp / "c-billing", extra=["--set", "flow_detail=0"]),
        )
        self.proxies["all"] = process.Proxy(
            process.command(
                mode=up,
                confdir=self.tmp / "c-all",
                extra=["--set", "flow_detail=0", "--set", f"stableprefix_rules={self.rules_file}"],
            ),
        )
        self.ports = {"direct": self.upstream_port, **{k: p.port or 0 for k, p in self.proxies.items()}}
        self.lines: list[str] = []
        self.targets: list[tuple[str, float, float]] = []  # (issue 13's target, its bound, measured ratio)

    def close(self) -> None:
        for p in self.proxies.values():
            p.stop()
        self.upstream_proc.terminate()
        self.upstream_proc.join(5)

    def out(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    # -- latency, sequential and concurrent

    def bodies(self, size: int, n: int = 3) -> list[bytes]:
        return [compact(samples.body_of_size(size, seed=s)) for s in range(n)]

    def sequential(self, bodies: list[bytes], reps: int) -> dict[str, list[float]]:
        clients = {arm: Client(port) for arm, port in self.ports.items()}
        lat: dict[str, list[float]] = {arm: [] for arm in ARMS}
        for arm in ARMS:  # warm-up: connections, caches
            clients[arm].post(bodies[0])
        for c in clients.values():
            c.delays.clear()
        for i in range(reps):
            order = ARMS[i % len(ARMS) :] + ARMS[: i % len(ARMS)]  # alternate which arm goes first
            for arm in order:
                lat[arm].append(clients[arm].post(bodies[i % len(bodies)]))
        for c in clients.values():
            c.close()
        self.delays = {arm: list(c.delays) for arm, c in clients.items()}
        return lat

    def concurrent(self, bodies: list[bytes], rounds: int, per_client: int, workers: int = 8) -> dict:
        lat: dict[str, list[float]] = {arm: [] for arm in ARMS}
        rate: dict[str, list[float]] = {arm: [] for arm in ARMS}
        cpu: dict[str, list[float]] = {arm: [0.0, 0] for arm in ARMS}  # proxy CPU seconds, requests
        clients = {arm: [Client(self.ports[arm]) for _ in range(workers)] for arm in ARMS}
        with ThreadPoolExecutor(workers) as pool:

            def run(arm: str, w: int) -> list[float]:
                c = clients[arm][w]
                return [c.post(bodies[(w + k) % len(bodies)]) for k in range(per_client)]

            for arm in ARMS:  # warm-up
                list(pool.map(lambda w, a=arm: clients[a][w].post(bodies[0]), range(workers)))
            for r in range(rounds):
                order = ARMS[r % len(ARMS) :] + ARMS[: r % len(ARMS)]
                for arm in order:
                    cpu0 = self._cpu(arm)
                    start = time.perf_counter()
                    results = list(pool.map(lambda w, a=arm: run(a, w), range(workers)))
                    wall = time.perf_counter() - start
                    if arm in self.proxies:  # the analysis queued by these requests counts too
                        time.sleep(0.05 if size_hint(bodies) < MB else 0.3)
                        cpu[arm][0] += self._cpu(arm) - cpu0
                        cpu[arm][1] += workers * per_client
                    for res in results:
                        lat[arm].extend(res)
                    rate[arm].append(workers * per_client / wall)
        for cs in clients.values():
            for c in cs:
                c.close()
        return {"lat": lat, "rate": rate, "cpu": cpu}

    def _cpu(self, arm: str) -> float:
        """CPU seconds (user + system, all threads) the proxy process of `arm` has used so far."""
        if arm not in self.proxies:
            return 0.0
        fields = Path(f"/proc/{self.proxies[arm].pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def latency_tables(self) -> None:
        seq_reps = {10 * KB: 200, 100 * KB: 120, MB: 40, 5 * MB: 12}
        conc = {10 * KB: (4, 12), 100 * KB: (4, 8), MB: (3, 3), 5 * MB: (2, 1)}  # rounds, per client
        if self.quick:
            seq_reps = {10 * KB: 40, 100 * KB: 20, MB: 8, 5 * MB: 3}
            conc = {10 * KB: (1, 4), 100 * KB: (1, 3), MB: (1, 1), 5 * MB: (1, 1)}
        self.out("### Request latency (ms): median / p95; ratio = median addon / median bare")
        self.out()
        self.out(
            "| body | clients | direct | bare mitmdump | + addon (billing) | + addon (all rules) "
            "| ratio billing | ratio all | req/s bare / billing / all |"
        )
        self.out("|---|---|---|---|---|---|---|---|---|")
        delays: dict[int, dict[str, list[float]]] = {}
        per_core: dict[int, dict[str, list[float]]] = {}
        for size in SIZES:
            bodies = self.bodies(size)
            seq = self.sequential(bodies, seq_reps[size])
            delays[size] = self.delays
            self._row(size, "1 (sequential)", seq, None)
            ratio = {a: median(seq[a]) / median(seq["bare"]) for a in ("billing", "all")}
            if size == 100 * KB:
                self.targets.append(("billing only, 100 KB, median latency", 1.1, ratio["billing"]))
            if size == MB:
                self.targets.append(("billing only, 1 MB, median latency", 1.25, ratio["billing"]))
                self.targets.append(("all built-in rules, 1 MB, median latency", 1.5, ratio["all"]))
            rounds, per_client = conc[size]
            c = self.concurrent(bodies, rounds, per_client)
            per_core[size] = c["cpu"]
            self._row(size, "8 concurrent", c["lat"], c["rate"])
        self.out()
        self.out(
            "### Forwarding delay (ms): client's send -> upstream's receipt of the whole body, sequential; "
            "median / p95; ratio = median addon / median bare"
        )
        self.out()
        self.out(
            "| body | direct | bare mitmdump | + addon (billing) | + addon (all rules) | ratio billing | ratio all |"
        )
        self.out("|---|---|---|---|---|---|---|")
        for size, d in delays.items():
            ms = {a: (median(v) * 1000, p95(v) * 1000) for a, v in d.items() if v}
            cells = " | ".join(f"{ms[a][0]:.2f} / {ms[a][1]:.2f}" for a in ARMS)
            rb, ra = ms["billing"][0] / ms["bare"][0], ms["all"][0] / ms["bare"][0]
            self.out(f"| {fmt_size(size)} | {cells} | {rb:.2f} | {ra:.2f} |")
            if size == MB:
                self.targets.append(("billing only, 1 MB, forwarding delay", 1.15, rb))
        self.out()
        self.out(
            "### Throughput per core: requests per CPU-second of the proxy process (all its threads, the "
            "queued analysis included), 8 concurrent clients"
        )
        self.out()
        self.out("| body | bare mitmdump | + addon (billing) | + addon (all rules) |")
        self.out("|---|---|---|---|")
        for size, cpu in per_core.items():
            cells = " | ".join(
                f"{cpu[a][1] / cpu[a][0]:.0f}" if cpu[a][0] > 0 else "-" for a in ("bare", "billing", "all")
            )
            self.out(f"| {fmt_size(size)} | {cells} |")

    def target_table(self) -> None:
        """Issue 13's targets next to what this run measured (ratios addon / bare mitmdump)."""
        if not self.targets:
            return
        self.out()
        self.out("### Targets (issue 13): ratio addon / bare mitmdump, this run")
        self.out()
        self.out("| target | bound | measured | |")
        self.out("|---|---|---|---|")
        for name, bound, got in self.targets:
            self.out(f"| {name} | <= {bound:.2f}x | {got:.2f}x | {'met' if got <= bound else 'missed'} |")

    def _row(self, size: int, clients: str, lat: dict[str, list[float]], rate: dict | None) -> None:
        ms = {arm: (median(v) * 1000, p95(v) * 1000) for arm, v in lat.items()}
        cells = " | ".join(f"{ms[a][0]:.2f} / {ms[a][1]:.2f}" for a in ARMS)
        rb = ms["billing"][0] / ms["bare"][0]
        ra = ms["all"][0] / ms["bare"][0]
        rates = "-"
        if rate:
            rates = " / ".join(f"{median(rate[a]):.0f}" for a in ("bare", "billing", "all"))
        n = len(lat["bare"])
        self.out(f"| {fmt_size(size)} | {clients} (n={n}) | {cells} | {rb:.2f} | {ra:.2f} | {rates} |")

    # -- in-process cost

    def in_process(self, profile: bool) -> None:
        self.out()
        self.out("### In-process cost, ms per MB (median of repeated runs)")
        self.out()
        self.out(
            "`process` = `pipeline.process` (parse, rules, re-serialise, fingerprint); `hook` = what the addon's "
            "request hook runs (`Analyzer.request`: process + per-block detail + stream tracking, then the content "
            "view's before-state; billing rule), "
            "for the first request of a conversation (every message new) and for a repeated one (messages seen)."
        )
        self.out()
        billing = pipeline.Settings()
        all_rules = pipeline.Settings(
            rules=tuple(rulelib.switch(rulelib.builtin_rules(), rulelib.builtin_names()))
        )
        floors: list[tuple[str, Callable[[bytes], Any]]] = [
            ("json.loads + sha256", lambda raw: (json.loads(raw), hashlib.sha256(raw).digest())),
            ("orjson.loads + sha256", lambda raw: (orjson.loads(raw), hashlib.sha256(raw).digest())),
        ]
        header = (
            "| body | "
            + " | ".join(f"floor: {n}" for n, _ in floors)
            + " | process, billing only | process, all rules | hook, new conversation"
            + " | hook, next turn | forwarding path, billing | analysis, billing | forwarding path, all rules"
            + " | analysis, all rules |"
        )
        self.out(header)
        self.out("|" + "---|" * (header.count("|") - 1))
        for size in SIZES:
            raws = self.bodies(size, 2)
            mb = sum(len(r) for r in raws) / len(raws) / MB
            reps = max(5, int(40 / max(mb, 0.05))) if not self.quick else 5
            reps = min(reps, 400)

            def timed(fn: Callable[[bytes], Any], raws: list[bytes] = raws, reps: int = reps) -> float:
                ts = []
                for i in range(reps):
                    raw = raws[i % len(raws)]
                    t = time.perf_counter()
                    got = fn(raw)
                    elapsed = time.perf_counter() - t
                    ts.append(got if isinstance(got, float) else elapsed)  # a float: the fn timed itself
                return median(ts)

            cells = [timed(f) for _, f in floors]

            for settings in (billing, all_rules):
                sticky = rulelib.StickyMemory()

                def proc(raw: bytes, settings: pipeline.Settings = settings, st: Any = sticky) -> Any:
                    return pipeline.process("POST", "127.0.0.1", "/v1/messages", raw, settings, HDRS, st)

                cells.append(timed(proc))
            # what the addon's request hook runs: pipeline + per-block detail + stream tracking
            seen = Analyzer(billing)

            def hook_new(raw: bytes) -> Any:
                return _hook(_fresh_analyzer(billing), raw)

            def hook_next(raw: bytes, seen: Analyzer = seen) -> Any:
                return _hook(seen, raw)

            cells.append(timed(hook_new, reps=max(3, reps // 4)))
            cells.append(timed(hook_next))
            for settings in (billing, all_rules):  # the two paths of the addon, on a seen conversation
                an = Analyzer(settings)
                _hook(an, raws[0])
                _hook(an, raws[1 % len(raws)])
                cells.append(timed(functools.partial(_forward_only, an)))
                cells.append(timed(functools.partial(_analyse_only, an)))
            self.out(f"| {fmt_size(size)} | " + " | ".join(f"{c * 1000 / mb:.2f}" for c in cells) + " |")
        if profile:
            raw = self.bodies(MB, 1)[0]
            for label, settings in (("billing only", billing), ("all rules", all_rules)):
                an = Analyzer(settings)
                _hook(an, raw)
                for path in ("forwarding path", "analysis"):
                    prof = cProfile.Profile()
                    for _ in range(20):
                        if path == "analysis":
                            fwd = _forward_only(an, raw)  # not profiled: the forwarding path's share
                            prof.enable()
                            an.analyse(fwd)
                        else:
                            prof.enable()
                            _forward_only(an, raw)
                        prof.disable()
                    buf = io.StringIO()
                    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(10)
                    self.out()
                    self.out(f"### cProfile, 20 x 1 MB, {path}, {label} (by own time)")
                    self.out("```")
                    for line in buf.getvalue().splitlines():
                        if line.strip() and not line.startswith(("   Ordered", "   List reduced")):
                            self.out(line.rstrip())
                    self.out("```")

    # -- stall: a 5 MB request alongside 16 small streaming flows

    #: the two loads of the small flows: the upstream's pause between two SSE events (ms)
    STALL_REGIMES = (("back to back", 0), ("paced: 10 ms between events", 10))

    def stall(self) -> None:
        """16 clients send small streaming requests in a loop through each arm, first alone, then while 5 MB
        requests go through the same proxy; the small flows' latency inside each 5 MB window, side by side."""
        arms = ("bare", "billing", "all")
        rounds, bigs, alone_s = (1, 2, 0.6) if self.quick else (3, 3, 1.0)
        small_body = samples.Session(system_chars=1500, tool_count=4, result_chars=200).request(2)
        small_body["stream"] = True
        small = compact(small_body)
        big = self.bodies(5 * MB, 1)[0]
        self.out()
        self.out(f"### {STALL_CLIENTS} small streaming flows while a 5 MB request goes through (ms)")
        self.out()
        self.out(
            f"{STALL_CLIENTS} clients, each on its own keep-alive connection, send a {len(small) / KB:.1f} KB "
            'Claude-Code-shaped `"stream": true` request in a loop; the upstream answers each with 10 SSE '
            "events (message_start with usage ... message_stop) written one by one, back to back (the proxy "
            "saturated: this measures its cost per flow) or paced (a 10 ms pause between events, ~100 ms "
            f"streams, as a model generating tokens). Per arm, first alone for {alone_s:.1f} s (baseline), then "
            f"{bigs} x per round one 5 MB Claude-Code-shaped request ({len(big) / MB:.1f} MB, its own session id) "
            f"through the same proxy; {rounds} rounds, arm order rotated; fresh proxies per regime. **Window** of "
            "a 5 MB request: from its send to the later of its response and its record in the addon's JSONL "
            "log (its analysis and completion done; bare: to its response). A small request counts in the "
            "window when its lifetime overlaps one. Cells: median / p95 / max of the small requests' time to "
            "the last byte, and to the first body byte (ttfb). vs bare = the arm's in-window median / bare's "
            "in-window median; vs alone = the arm's in-window median / its own alone median. Bare mitmdump "
            "buffers SSE answers (mitmproxy's default), the addon streams them: compare last bytes."
        )
        for regime, gap in self.STALL_REGIMES:
            proxies, logs = self._stall_proxies()
            res: dict[str, dict[str, list[float]]] = {
                a: {k: [] for k in ("alone", "alone_ttfb", "during", "during_ttfb", "big", "window")}
                for a in arms
            }
            try:
                for r in range(rounds):
                    for arm in (
                        arms[r % len(arms) :] + arms[: r % len(arms)]
                    ):  # alternate which arm goes first
                        got = self._stall_arm(
                            arm, proxies[arm].port or 0, logs.get(arm), small, big, bigs, alone_s, r, gap
                        )
                        for k, v in got.items():
                            res[arm][k].extend(v)
            finally:
                for p in proxies.values():
                    p.stop()
            self._stall_table(regime, arms, res)

    def _stall_table(
        self, regime: str, arms: tuple[str, ...], res: dict[str, dict[str, list[float]]]
    ) -> None:
        def cell(xs: list[float]) -> str:
            if not xs:
                return "-"
            return f"{median(xs) * 1000:.1f} / {p95(xs) * 1000:.1f} / {max(xs) * 1000:.1f}"

        self.out()
        self.out(f"#### {regime} (load average {os.getloadavg()[0]:.2f} at its end)")
        self.out()
        self.out(
            "| proxy | alone: last byte | alone: ttfb | in window: last byte | in window: ttfb | "
            "n alone / in window | 5 MB request (median) | window (median) | vs bare | vs alone |"
        )
        self.out("|---|---|---|---|---|---|---|---|---|---|")
        bare_during = median(res["bare"]["during"]) if res["bare"]["during"] else float("nan")
        if res["billing"]["during"]:
            self.targets.append(
                (
                    f"16 small streams ({regime}) while 5 MB requests go through, billing only, median",
                    1.25,
                    median(res["billing"]["during"]) / bare_during,
                )
            )
        for arm in arms:
            d = res[arm]
            md = median(d["during"]) if d["during"] else float("nan")
            ma = median(d["alone"]) if d["alone"] else float("nan")
            self.out(
                f"| {arm} | {cell(d['alone'])} | {cell(d['alone_ttfb'])} | {cell(d['during'])} | "
                f"{cell(d['during_ttfb'])} | {len(d['alone'])} / {len(d['during'])} | "
                f"{median(d['big']) * 1000:.0f} | {median(d['window']) * 1000:.0f} | "
                f"{md / bare_during:.2f} | {md / ma:.2f} |"
            )

    def _stall_proxies(self) -> tuple[dict[str, process.Proxy], dict[str, Path]]:
        """Fresh proxies for the stall section (no state from the other sections); the addon arms write a
        JSONL log, whose records tell when a 5 MB request's analysis is done."""
        up = f"reverse:http://127.0.0.1:{self.upstream_port}"
        logs = {arm: self.tmp / f"stall-{arm}.jsonl" for arm in ("billing", "all")}
        proxies = {
            "bare": process.Proxy(
                process.command(
                    mode=up, confdir=self.tmp / "s-bare", addon=False, extra=["--set", "flow_detail=0"]
                ),
                wait_for_addon=False,
            )
        }
        for arm, extra in (("billing", []), ("all", ["--set", f"stableprefix_rules={self.rules_file}"])):
            proxies[arm] = process.Proxy(
                process.command(
                    mode=up,
                    confdir=self.tmp / f"s-{arm}",
                    extra=["--set", "flow_detail=0", "--set", f"stableprefix_log={logs[arm]}", *extra],
                )
            )
        return proxies, logs

    def _stall_arm(
        self,
        arm: str,
        port: int,
        log: Path | None,
        small: bytes,
        big: bytes,
        bigs: int,
        alone_s: float,
        rnd: int,
        gap: int = 0,
    ) -> dict[str, list[float]]:
        """One arm: the small flows alone, then `bigs` 5 MB requests one after the other (each window apart)."""
        request = (
            b"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            + f"{SESSION_HEADER}: stall-small\r\n{GAP_HEADER}: {gap}\r\n".encode()
            + f"content-length: {len(small)}\r\n\r\n".encode()
            + small
        )
        spans: list[tuple[float, float, float]] = []  # (send, first body byte, last byte) per small request
        stop = threading.Event()
        errors: list[BaseException] = []

        def loop() -> None:
            c = RawClient(port, request)
            try:
                while not stop.is_set():
                    spans.append(c.exchange())
            except BaseException as e:  # noqa: BLE001  (reported after the run)
                errors.append(e)
            finally:
                c.close()

        watcher = RecordWatcher(log) if log is not None else None
        threads = [threading.Thread(target=loop, daemon=True) for _ in range(STALL_CLIENTS)]
        for t in threads:
            t.start()
        out: dict[str, list[float]] = {
            k: [] for k in ("alone", "alone_ttfb", "during", "during_ttfb", "big", "window")
        }
        windows: list[tuple[float, float]] = []
        try:
            time.sleep(0.3)  # connections up, caches warm
            a0 = time.perf_counter()
            time.sleep(alone_s)
            a1 = time.perf_counter()
            bc = Client(port)
            for k in range(bigs):
                sid = f"stall-big-{arm}-{gap}-{rnd}-{k}-{os.getpid()}"
                b0 = time.perf_counter()
                bc.post(big, {SESSION_HEADER: sid})
                b1 = time.perf_counter()
                end = b1
                if watcher is not None:
                    written = watcher.wait(pipeline.fingerprint_session(sid), timeout=30.0)
                    if written is None:
                        raise RuntimeError(f"no record of the 5 MB request in {log} within 30 s")
                    end = max(b1, written)
                windows.append((b0, end))
                out["big"].append(b1 - b0)
                out["window"].append(end - b0)
                time.sleep(0.25)  # the small flows settle before the next window
            bc.close()
        finally:
            stop.set()
            for t in threads:
                t.join(30)
            if watcher is not None:
                watcher.close()
        if errors:
            raise RuntimeError(f"small streaming client failed on {arm}: {errors[0]!r}")
        for s, f, e in spans:
            if s >= a0 and e <= a1:
                out["alone"].append(e - s)
                out["alone_ttfb"].append(f - s)
            elif any(s < w1 and e > w0 for w0, w1 in windows):
                out["during"].append(e - s)
                out["during_ttfb"].append(f - s)
        return out

    # -- memory after many distinct streams

    def memory(self) -> None:
        n = 1_000 if self.quick else 10_000
        proxy = self.proxies["all"]
        base = samples.Session(system_chars=3000, tool_count=8, result_chars=300)
        bodies = [compact(base.request(t)) for t in (1, 2, 3)]
        workers = 8
        clients = [Client(proxy.port or 0) for _ in range(workers)]

        def send(w: int, start: int, count: int) -> None:
            for k in range(start + w, start + count, workers):
                clients[w].post(bodies[k % 3], {SESSION_HEADER: f"bench-{k:06d}-{os.getpid()}"})

        warm = 500
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda w: send(w, 0, warm), range(workers)))
            before = _rss_kb(proxy.pid)
            t = time.perf_counter()
            list(pool.map(lambda w: send(w, warm, n), range(workers)))
            elapsed = time.perf_counter() - t
        after = _rss_kb(proxy.pid)
        for c in clients:
            c.close()
        self.out()
        self.out("### Memory: mitmdump + addon (all rules), distinct session ids")
        self.out()
        self.out("| streams | VmRSS before (after 500 warm-up streams) | VmRSS after | growth | req/s |")
        self.out("|---|---|---|---|---|")
        self.out(
            f"| {n} | {before / 1024:.1f} MB | {after / 1024:.1f} MB | {(after - before) / 1024:+.1f} MB "
            f"| {n / elapsed:.0f} |"
        )


def _forward_only(analyzer: Analyzer, raw: bytes) -> Any:
    """The forwarding path alone: guard scan, and on a hit parse + rules + spliced bytes."""
    return analyzer.forward("POST", "127.0.0.1", "/v1/messages", raw, HDRS)


def _analyse_only(analyzer: Analyzer, raw: bytes) -> Any:
    """The analysis path alone (forward is run first, untimed, as the addon's request hook does)."""
    fwd = analyzer.forward("POST", "127.0.0.1", "/v1/messages", raw, HDRS)
    t = time.perf_counter()
    result = analyzer.analyse(fwd) if fwd is not None else None
    if result is not None and result.forward is not None:
        before_state(result)
    return time.perf_counter() - t


def size_hint(bodies: list[bytes]) -> int:
    return len(bodies[0]) if bodies else 0


def _hook(analyzer: Analyzer, raw: bytes) -> Any:
    """What the addon's request hook computes: the analysis, and the content view's before-state when the
    body was rewritten."""
    result = analyzer.request("POST", "127.0.0.1", "/v1/messages", raw, HDRS)
    if result is not None and result.forward is not None:
        before_state(result)
    return result


def _fresh_analyzer(settings: pipeline.Settings) -> Analyzer:
    """An analyzer that has seen nothing: also empties the module-wide caches (message details, canonical
    bytes, chain steps)."""
    fingerprint._MESSAGE_CACHE.clear()
    fingerprint._MEMO.clear()
    fingerprint._LINKS.clear()
    return Analyzer(settings)


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))}), {model}, Python {platform.python_version()}, "
        f"load average {load:.2f} at start"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer repetitions, 1,000 streams")
    ap.add_argument("--profile", action="store_true", help="cProfile the in-process work on a 1 MB body")
    ap.add_argument("--skip", action="append", default=[], choices=SECTIONS)
    ap.add_argument(
        "--only",
        action="append",
        default=[],
        choices=SECTIONS,
        help="run only this section (repeatable); the others are skipped",
    )
    ap.add_argument("--out", help="also write the tables to this file")
    args = ap.parse_args(argv)
    if args.only:
        args.skip = [s for s in SECTIONS if s not in args.only]
    from importlib.metadata import version

    bench = Bench(args.quick)
    started = time.perf_counter()
    try:
        bench.out(f"## stableprefix overhead{' (quick)' if args.quick else ''}")
        bench.out()
        bench.out(
            f"Machine: {machine()}; mitmproxy {version('mitmproxy')}; orjson {'yes' if orjson else 'no'}."
        )
        bench.out()
        if "latency" not in args.skip:
            bench.latency_tables()
        if "inprocess" not in args.skip:
            bench.in_process(args.profile)
        if "stall" not in args.skip:
            bench.stall()
        if "memory" not in args.skip:
            bench.memory()
        bench.target_table()
        bench.out()
        bench.out(f"Total run time {time.perf_counter() - started:.0f} s.")
    finally:
        bench.close()
    for arm in ("billing", "all"):
        if (
            "stableprefix:" not in bench.proxies[arm].output()
            and "stableprefix active" not in bench.proxies[arm].output()
        ):
            print(f"warning: no addon output seen from the {arm} proxy", file=sys.stderr)
    if args.out:
        Path(args.out).write_text("\n".join(bench.lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
