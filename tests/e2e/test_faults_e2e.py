"""Faults around the proxy: upstream down, upstream closing mid-stream, a client leaving during an SSE
response, a rules file edited to something invalid while running. Each time the proxy keeps serving,
its state stays consistent, and what happened is logged once."""

from __future__ import annotations

import functools
import http.client
import json
import os
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stableprefix.cli import process
from stableprefix.demo import samples
from tests.conftest import MitmFactory
from tests.support.helpers import free_port
from tests.support.helpers import read_records as records
from tests.support.helpers import wait_until

pytestmark = pytest.mark.e2e

EVENT = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"w"}}\n\n'
START = b'event: message_start\ndata: {"type":"message_start","message":{"id":"m","usage":{"input_tokens":5,"cache_read_input_tokens":0,"output_tokens":1}}}\n\n'
STOP = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


class FaultyUpstream:
    """An HTTP/1.1 upstream written on raw sockets, so it can misbehave. The query string picks the fault:
    ``?fault=close_mid_sse`` (two events, then the connection drops without the last chunk),
    ``?fault=slow_sse`` (an event every 20 ms for 10 s; notes when the proxy hangs up), else a full SSE
    stream (``"stream": true``) or a JSON answer."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.aborted = threading.Event()
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                f = self.request.makefile("rb")
                while True:
                    line = f.readline()
                    if not line:
                        return
                    path = line.split()[1].decode()
                    length = 0
                    while (h := f.readline()) not in (b"\r\n", b""):
                        name, _, value = h.decode().partition(":")
                        if name.strip().lower() == "content-length":
                            length = int(value)
                    body = f.read(length)
                    outer.bodies.append(body)
                    if not outer.answer(self.request, path, body):
                        return

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, sock: socket.socket, path: str, body: bytes) -> bool:
        """Write the answer; False when the connection is done."""
        sse_head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        if "fault=close_mid_sse" in path:
            sock.sendall(sse_head + chunk(START) + chunk(EVENT))
            time.sleep(0.2)
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            return False
        if "fault=slow_sse" in path:
            try:
                sock.sendall(sse_head + chunk(START))
                for _ in range(500):
                    time.sleep(0.02)
                    sock.sendall(chunk(EVENT))
                sock.sendall(chunk(STOP) + b"0\r\n\r\n")
            except OSError:
                self.aborted.set()
                return False
            return True
        if b'"stream":true' in body or b'"stream": true' in body:
            sock.sendall(sse_head + chunk(START) + chunk(EVENT) + chunk(STOP) + b"0\r\n\r\n")
            return True
        data = b'{"id":"m","type":"message","content":[],"usage":{"input_tokens":5,"output_tokens":1}}'
        sock.sendall(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(data)).encode()
            + b"\r\n\r\n"
            + data
        )
        return True

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def faulty() -> Iterator[FaultyUpstream]:
    up = FaultyUpstream()
    yield up
    up.stop()


def body(stream: bool = False, turn: int = 2) -> bytes:
    b = samples.Session(system_chars=2000, tool_count=3).request(turn)
    b["stream"] = stream
    return json.dumps(b).encode()


def connect(port: int) -> tuple[http.client.HTTPConnection, int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    conn.connect()
    assert conn.sock is not None
    return conn, conn.sock.getsockname()[1]


def addon_lines(proxy: process.Proxy, client_port: int) -> list[str]:
    return [
        line
        for line in proxy.output().splitlines()
        if f"[127.0.0.1:{client_port}]" in line and "stableprefix" in line
    ]


def serves(proxy: process.Proxy, faulty: FaultyUpstream, target: str = "") -> None:
    """The proxy still answers and still rewrites (the billing block is gone upstream)."""
    conn, _ = connect(proxy.port or 0)
    conn.request("POST", f"{target}/v1/messages", body(), {"content-type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    conn.close()
    assert resp.status == 200
    assert b"x-anthropic-billing-header" not in faulty.bodies[-1]


def test_upstream_down(mitm: MitmFactory, faulty: FaultyUpstream, tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    proxy = mitm("--set", f"stableprefix_log={log}")  # regular mode: the client names the upstream
    dead = free_port()
    for _ in range(2):
        conn, client = connect(proxy.port or 0)
        conn.request(
            "POST", f"http://127.0.0.1:{dead}/v1/messages", body(), {"content-type": "application/json"}
        )
        resp = conn.getresponse()
        resp.read()
        conn.close()
        assert resp.status == 502
        assert wait_until(functools.partial(lambda c: len(addon_lines(proxy, c)) >= 1, client))
        time.sleep(0.2)
        lines = addon_lines(proxy, client)
        assert len(lines) == 1, lines
        assert "the proxy answered 502" in lines[0], lines  # never a silent lost turn
    serves(proxy, faulty, faulty.url)
    assert wait_until(lambda: len(records(log)) == 3)
    down = records(log)[:2]
    # the client got mitmproxy's 502, and the record says so, with the reason
    assert all(r["status"] == 502 and "no response" in r["error"] for r in down)
    assert all("the proxy answered 502" in r["error"] for r in down)
    assert records(log)[2]["status"] == 200
    assert proxy.stop() == 0


def test_upstream_closes_mid_stream(mitm: MitmFactory, faulty: FaultyUpstream, tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    proxy = mitm("--set", f"stableprefix_log={log}", mode=f"reverse:{faulty.url}")
    conn, client = connect(proxy.port or 0)
    conn.request(
        "POST", "/v1/messages?fault=close_mid_sse", body(stream=True), {"content-type": "application/json"}
    )
    resp = conn.getresponse()
    got = b""
    with pytest.raises((http.client.IncompleteRead, ConnectionError, OSError)):
        while True:
            part = resp.read(64)
            if not part:
                raise ConnectionError("stream ended without its last event")
            got += part
    conn.close()
    assert b"message_start" in got  # what the upstream sent before dropping reached the client
    assert wait_until(lambda: len(records(log)) == 1)
    time.sleep(0.2)
    assert len(addon_lines(proxy, client)) == 1, addon_lines(proxy, client)
    rec = records(log)[0]
    assert rec["error"] or rec["status"] in (200, None)
    serves(proxy, faulty)
    assert wait_until(lambda: len(records(log)) == 2)
    assert proxy.stop() == 0


def test_client_disconnects_during_sse(mitm: MitmFactory, faulty: FaultyUpstream, tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    proxy = mitm("--set", f"stableprefix_log={log}", mode=f"reverse:{faulty.url}")
    conn, client = connect(proxy.port or 0)
    conn.request(
        "POST", "/v1/messages?fault=slow_sse", body(stream=True), {"content-type": "application/json"}
    )
    resp = conn.getresponse()
    assert resp.status == 200
    first = resp.read(40)  # the response streams: the first event arrives long before the last
    assert first
    assert conn.sock is not None
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    assert faulty.aborted.wait(60), "the proxy kept the upstream stream open after the client left"
    assert wait_until(lambda: len(records(log)) == 1)
    time.sleep(0.2)
    assert len(addon_lines(proxy, client)) == 1, addon_lines(proxy, client)
    serves(proxy, faulty)
    assert wait_until(lambda: len(records(log)) == 2)
    assert [r["id"] for r in records(log)] == list(dict.fromkeys(r["id"] for r in records(log)))
    assert proxy.stop() == 0


PIN = """
[[rule]]
name = "pin_date"
scope = "messages:user"
match = "Today's date is (?P<d>\\\\d{{4}}-\\\\d{{2}}-\\\\d{{2}})"
action = "pin"
value = {{ d = "{date}" }}
"""


def _touch(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")
    st = path.stat()
    os.utime(path, (st.st_atime, st.st_mtime + 5))  # a new mtime even within the file system's granularity


def test_rules_file_edited_to_invalid_keeps_previous_rules(
    mitm: MitmFactory, faulty: FaultyUpstream, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text(PIN.format(date="2000-01-01"), encoding="utf-8")
    proxy = mitm("--set", f"stableprefix_rules={rules}", mode=f"reverse:{faulty.url}")

    def send() -> bytes:
        serves(proxy, faulty)
        return faulty.bodies[-1]

    assert b"Today's date is 2000-01-01" in send()
    for broken in (
        '[[rule]\nname = "x"\n',
        '[[rule]]\nname = "bad"\nscope = "system"\nmatch = "(a"\naction = "drop"\n',
    ):
        _touch(rules, broken)
        time.sleep(1.1)  # the addon looks at the file's mtime at most once a second, on a request
        for _ in range(4):  # several polls over 2 s: the previous rules stay, and the warning comes once
            assert b"Today's date is 2000-01-01" in send()
            time.sleep(0.5)
        assert proxy.output().count("keeping the previous rules") == (
            1 if broken.startswith("[[rule]\n") else 2
        )
    assert "not valid TOML" in proxy.output() and "bad regex" in proxy.output()
    _touch(rules, PIN.format(date="1999-12-31"))
    time.sleep(1.1)
    assert b"Today's date is 1999-12-31" in send()
    assert proxy.output().count(f"reloaded {rules}") == 1
    assert proxy.output().count("keeping the previous rules") == 2
    assert proxy.stop() == 0


EVIL = """
[[rule]]
name = "evil_nested"
scope = ["system", "messages:*"]
match = "(a+)+$"
action = "drop"

[[rule]]
name = "evil_repeat"
scope = "messages:user"
match = "(?:.*a){25}!"
action = "mask"
"""


def test_pathological_user_regex_on_a_megabyte_prompt(
    mitm: MitmFactory, faulty: FaultyUpstream, tmp_path: Path
) -> None:
    """Backtracking engines take exponential time on these patterns with 'aaa…a' and no match at the end;
    RE2 is linear, so a 1 MB prompt goes through in well under the bound."""
    rules = tmp_path / "rules.toml"
    rules.write_text(EVIL, encoding="utf-8")
    proxy = mitm("--set", f"stableprefix_rules={rules}", mode=f"reverse:{faulty.url}")
    assert "evil_nested" in proxy.output()  # the rules are loaded
    b = samples.Session(system_chars=2000, tool_count=3).request(1)
    b["system"][2]["text"] += "a" * 300_000 + "?"
    b["messages"][0]["content"][1]["text"] = "a" * 700_000 + "?"
    raw = json.dumps(b).encode()
    assert len(raw) > 1_000_000
    conn, _ = connect(proxy.port or 0)
    t0 = time.monotonic()
    conn.request("POST", "/v1/messages", raw, {"content-type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    elapsed = time.monotonic() - t0
    conn.close()
    assert resp.status == 200
    assert elapsed < 60.0, f"{elapsed:.2f} s for a 1 MB prompt"  # backtracking would take hours
    assert faulty.bodies[-1].count(b"a" * 1000) >= 900  # nothing matched: the text went through whole
    serves(proxy, faulty)


def test_regex_re2_cannot_run_is_refused_at_start(mitm: MitmFactory, tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nname = "backref"\nscope = "system"\nmatch = "(a)\\\\1"\naction = "drop"\n')
    args = process.command(confdir=tmp_path / "c", extra=["--set", f"stableprefix_rules={rules}"])
    with pytest.raises(RuntimeError) as err:
        process.Proxy(args, timeout=20)
    assert "backref" in str(err.value) and str(rules) in str(err.value)
