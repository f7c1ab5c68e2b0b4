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
plus one SHA-256 pass; the latency of small streaming requests while a 5 MB request goes through (stall);
and the RSS growth of the mitmdump + addon process after 10,000 distinct streams (one
``X-Claude-Code-Session-Id`` each).

    .venv/bin/python scripts/bench_overhead.py            # full run, a few minutes on 2 cores
    .venv/bin/python scripts/bench_overhead.py --quick    # smoke run, well under a minute
    .venv/bin/python scripts/bench_overhead.py --profile  # also cProfile the in-process work at 1 MB
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
SESSION_HEADER = "X-Claude-Code-Session-Id"
HDRS = {SESSION_HEADER: "bench"}
SENT_HEADER = "X-Bench-Sent-Ns"  # the client's send time; the upstream answers with the delay to receipt
DELAY_HEADER = "X-Bench-Forward-Ns"


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
            events = [
                f'event: content_block_delta\ndata: {{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":"w{i}"}}}}\n\n'
                for i in range(8)
            ]
            data = "".join(events).encode()
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("content-length", str(len(data)))
            self.send_header(DELAY_HEADER, delay)
            self.end_headers()
            for e in events:  # one write per event, as a server streaming tokens would
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

    # -- stall: a 5 MB request alongside small streaming ones

    def stall(self) -> None:
        self.out()
        self.out("### A 5 MB request alongside small streaming requests (ms)")
        self.out()
        self.out(
            "| proxy | small SSE median, alone | small SSE max while 5 MB in flight | 5 MB request | "
            "request hook's in-process time for the 5 MB body (forwarding path) |"
        )
        self.out("|---|---|---|---|---|")
        big = self.bodies(5 * MB, 1)[0]
        small_body = samples.Session(system_chars=1500, tool_count=4, result_chars=200).request(2)
        small_body["stream"] = True
        small = compact(small_body)
        rules_all = pipeline.Settings(
            rules=tuple(rulelib.switch(rulelib.builtin_rules(), rulelib.builtin_names()))
        )
        cost = {
            "bare": 0.0,
            "billing": self._cost(big, pipeline.Settings()),
            "all": self._cost(big, rules_all),
        }
        for arm in ("bare", "billing", "all"):
            port = self.ports[arm]
            worst, bigs, alone = [], [], []
            for _ in range(2 if self.quick else 4):
                stop = threading.Event()
                spans: list[tuple[float, float]] = []

                def loop(port: int = port, stop: threading.Event = stop, spans: list = spans) -> None:
                    c = Client(port)
                    while not stop.is_set():
                        t0 = time.perf_counter()
                        c.post(small)
                        spans.append((t0, time.perf_counter()))
                    c.close()

                th = threading.Thread(target=loop)
                th.start()
                time.sleep(0.3)
                bc = Client(port)
                b0 = time.perf_counter()
                bc.post(big)
                b1 = time.perf_counter()
                bc.close()
                time.sleep(0.3)
                stop.set()
                th.join()
                during = [e - s for s, e in spans if e > b0 and s < b1]
                before = [e - s for s, e in spans if e < b0]
                worst.append(max(during) if during else 0.0)
                alone.extend(before)
                bigs.append(b1 - b0)
            self.out(
                f"| {arm} | {median(alone) * 1000:.2f} | {median(worst) * 1000:.1f} (worst {max(worst) * 1000:.1f}) "
                f"| {median(bigs) * 1000:.1f} | {cost[arm] * 1000:.1f} |"
            )

    def _cost(self, raw: bytes, settings: pipeline.Settings) -> float:
        """The request hook's in-process time for `raw` (the forwarding path: guard scan, and on a hit parse,
        rules and spliced bytes; the analysis runs in the worker thread), the body seen before."""
        analyzer = Analyzer(settings)
        _hook(analyzer, raw)
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            _forward_only(analyzer, raw)
            ts.append(time.perf_counter() - t)
        return median(ts)

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
    """An analyzer that has seen nothing: also empties the per-message detail cache (module-wide)."""
    cache = getattr(fingerprint, "_MESSAGE_CACHE", None)
    if cache is not None:
        cache.clear()
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
    ap.add_argument(
        "--skip", action="append", default=[], choices=["latency", "inprocess", "stall", "memory"]
    )
    ap.add_argument("--out", help="also write the tables to this file")
    args = ap.parse_args(argv)
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
