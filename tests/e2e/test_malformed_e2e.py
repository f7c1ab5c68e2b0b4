"""A malformed corpus through real mitmdump: every body reaches the upstream byte-identical (or correctly
rewritten where it is valid), the proxy stays up, and each bad request gets exactly one warning line."""

from __future__ import annotations

import gzip
import json
import re
import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from mitmproxy.net import encoding

from stableprefix.cli import process
from stableprefix.core import pipeline
from stableprefix.core import rules as rulelib
from stableprefix.demo import samples
from stableprefix.demo.upstream import Received
from tests.conftest import MitmFactory
from tests.support.helpers import FIXTURES
from tests.support.helpers import assert_only_deleted
from tests.support.helpers import post

pytestmark = pytest.mark.e2e

#: The addon's warning lines: a body it left alone, an internal error, a streamed body.
WARNING = re.compile(r"stableprefix: (?:left \S+ unchanged|internal error|request body was streamed)")

BAD = [  # (fixture, why the addon leaves it alone)
    ("malformed_empty.bin", "empty body"),
    ("malformed_not_json.txt", "JSONDecodeError"),
    ("malformed_truncated.json", "JSONDecodeError"),
    ("malformed_array.json", "NotAnObject"),
    ("malformed_scalar.json", "NotAnObject"),
    ("malformed_system_number.json", "ShapeError"),
    ("malformed_system_object.json", "ShapeError"),
    ("malformed_system_list_of_strings.json", "ShapeError"),
    ("malformed_messages_not_list.json", "ShapeError"),
    ("malformed_deep_nesting.json", "RecursionError"),
    ("malformed_invalid_utf8.bin", "not UTF-8"),
]


class RawUpstream:
    """Records every request's exact bytes and answers 200 without reading the body as JSON (the built-in
    upstream parses bodies for its usage figures, and a 20,000-deep array is more than its parser takes)."""

    def __init__(self) -> None:
        self.received: list[Received] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                outer.received.append(Received("POST", self.path, headers, body))
                data = b'{"ok":true}'
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upstream() -> Iterator[RawUpstream]:
    up = RawUpstream()
    yield up
    up.stop()


def warnings(proxy: process.Proxy) -> list[str]:
    return [line for line in proxy.output().splitlines() if WARNING.search(line)]


def wait_count(proxy: process.Proxy, n: int, timeout: float = 10.0) -> list[str]:
    """The warning lines once there are at least `n` (and a moment more, so an extra one would show)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(warnings(proxy)) < n:
        time.sleep(0.02)
    time.sleep(0.15)
    return warnings(proxy)


def expected(raw: bytes, path: str = "/v1/messages") -> bytes:
    """The core's output for `raw`, itself checked independently: `raw` with the header cut, nothing else."""
    result = pipeline.process("POST", "127.0.0.1", path, raw, pipeline.Settings())
    assert result is not None
    if result.forward is None:
        return raw
    assert_only_deleted(raw, result.forward)
    return result.forward


def valid_body() -> bytes:
    return json.dumps(samples.Session().request(3)).encode()


def test_bad_bodies_pass_byte_identical_with_one_warning_each(
    mitm: MitmFactory, upstream: RawUpstream
) -> None:
    proxy = mitm(mode=f"reverse:{upstream.url}")
    assert proxy.port
    for i, (name, why) in enumerate(BAD, start=1):
        raw = (FIXTURES / name).read_bytes()
        status, _ = post(proxy.port, "/v1/messages", raw)
        assert status == 200, name
        got = upstream.received[-1]
        assert got.body == raw, f"{name} was changed on the way"
        assert got.headers.get("content-length", "0") == str(len(raw))
        lines = wait_count(proxy, i)
        assert len(lines) == i, f"{name}: expected one more warning, got {lines[i - 1 :]}"
        assert why in lines[-1], (name, lines[-1])
    # the proxy is still up and still rewrites
    raw = valid_body()
    post(proxy.port, "/v1/messages", raw)
    assert upstream.received[-1].body == expected(raw) != raw
    assert len(warnings(proxy)) == len(BAD)
    assert proxy.stop() == 0


def test_lone_surrogates_are_valid_json_and_rewritten(mitm: MitmFactory, upstream: RawUpstream) -> None:
    proxy = mitm(mode=f"reverse:{upstream.url}")
    assert proxy.port
    raw = (FIXTURES / "malformed_lone_surrogates.json").read_bytes()
    post(proxy.port, "/v1/messages", raw)
    got = upstream.received[-1].body
    assert got == expected(raw) != raw  # the billing block went; the rest, \u escapes included, is untouched
    assert b"lone \\ud800 high" in got and b"\\udfff low \\ud83d\\ude42 pair" in got
    assert proxy.wait_for("changed billing=1") or proxy.wait_for("billing")
    assert not wait_count(proxy, 1, timeout=0.5)


def test_twenty_megabyte_body_is_rewritten(mitm: MitmFactory, upstream: RawUpstream) -> None:
    proxy = mitm(mode=f"reverse:{upstream.url}")
    assert proxy.port
    body = samples.Session(result_chars=20_000).request(2)
    filler = "0123456789abcdef" * (20_000_000 // 16)  # one huge tool result: 20 MB of prompt text
    body["messages"][-1]["content"][0]["content"] = filler
    raw = json.dumps(body, separators=(",", ":")).encode()
    assert len(raw) > 20_000_000
    status, _ = post(proxy.port, "/v1/messages", raw)
    assert status == 200
    got = upstream.received[-1].body
    assert got == expected(raw)
    assert len(raw) - len(got) == len(raw) - len(expected(raw)) > 0
    assert not warnings(proxy)


def _encode(data: bytes, enc: str) -> bytes:
    return encoding.encode(data, enc)


def test_encoded_bodies_are_rewritten_and_stay_encoded(mitm: MitmFactory, upstream: RawUpstream) -> None:
    proxy = mitm(mode=f"reverse:{upstream.url}")
    assert proxy.port
    raw = valid_body()
    bad = (FIXTURES / "malformed_truncated.json").read_bytes()
    for n, enc in enumerate(["gzip", "deflate", "br", "zstd"], start=1):
        post(proxy.port, "/v1/messages", _encode(raw, enc), headers={"content-encoding": enc})
        got = upstream.received[-1]
        assert got.headers["content-encoding"] == enc
        assert got.headers["content-length"] == str(len(got.body))
        assert encoding.decode(got.body, enc) == expected(raw) != raw, enc
        # a bad body inside a valid encoding: byte-identical, one warning
        sent = _encode(bad, enc)
        post(proxy.port, "/v1/messages", sent, headers={"content-encoding": enc})
        assert upstream.received[-1].body == sent
        assert len(wait_count(proxy, n)) == n, enc


def test_deflate_without_zlib_header_is_read_too(mitm: MitmFactory, upstream: RawUpstream) -> None:
    """Some clients send raw deflate for `deflate`; mitmproxy reads both, and writes back what it read."""
    proxy = mitm(mode=f"reverse:{upstream.url}")
    assert proxy.port
    raw = valid_body()
    c = zlib.compressobj(wbits=-15)
    sent = c.compress(raw) + c.flush()
    post(proxy.port, "/v1/messages", sent, headers={"content-encoding": "deflate"})
    got = upstream.received[-1]
    assert encoding.decode(got.body, got.headers["content-encoding"]) == expected(raw)


LIES = [  # (Content-Encoding header, what the body really is)
    ("gzip", "plain"),
    ("br", "gzip"),
    ("zstd", "plain"),
    ("deflate", "plain"),
    ("gzip, br", "plain"),  # a list: mitmproxy decodes one coding only
    ("x-unknown", "plain"),
]


def test_lying_content_encoding_passes_untouched_with_one_warning(
    mitm: MitmFactory, upstream: RawUpstream
) -> None:
    proxy = mitm(mode=f"reverse:{upstream.url}")
    assert proxy.port
    raw = valid_body()
    n = 0
    for header, payload in LIES:
        sent = gzip.compress(raw) if payload == "gzip" else raw
        for _ in (1, 2):
            status, _ = post(proxy.port, "/v1/messages", sent, headers={"content-encoding": header})
            assert status == 200
            got = upstream.received[-1]
            assert got.body == sent, header
            assert got.headers["content-encoding"] == header
            n += 1
            lines = wait_count(proxy, n)
            assert len(lines) == n, (header, lines[-2:])
            assert "cannot decode body" in lines[-1]
    post(proxy.port, "/v1/messages", raw)  # still serving, still rewriting
    assert upstream.received[-1].body == expected(raw)
    assert proxy.stop() == 0


def test_bad_bodies_on_every_api_path(mitm: MitmFactory, upstream: RawUpstream) -> None:
    proxy = mitm(mode=f"reverse:{upstream.url}")
    assert proxy.port
    paths = [
        "/v1/messages/count_tokens",
        "/v1/chat/completions",
        "/v1/responses",
        "/api/chat",
        "/api/generate",
    ]
    bad = [(FIXTURES / n).read_bytes() for n in ("malformed_truncated.json", "malformed_array.json")]
    wrong_type = b'{"model":"m","messages":"nope","input":7,"system":[1]}'  # nothing /api/generate reads
    n = 0
    for path in paths:
        for raw in bad + ([wrong_type] if path != "/api/generate" else []):
            post(proxy.port, path, raw)
            n += 1
            assert upstream.received[-1].body == raw
            assert upstream.received[-1].path == path
            assert len(wait_count(proxy, n)) == n, (path, raw[:40])
    # unknown paths are not ours: untouched, silent
    raw = valid_body()
    post(proxy.port, "/v1/unknown", raw)
    assert upstream.received[-1].body == raw
    assert len(wait_count(proxy, n)) == n


def test_lone_surrogates_with_regex_rules(mitm: MitmFactory, upstream: RawUpstream, tmp_path: Path) -> None:
    """RE2 works on UTF-8; a prompt holding a lone surrogate still goes through the regex rules."""
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text("[builtins]\ndate = true\nenv_block = true\n", encoding="utf-8")
    proxy = mitm("--set", f"stableprefix_rules={rules_file}", mode=f"reverse:{upstream.url}")
    assert proxy.port
    raw = (FIXTURES / "malformed_lone_surrogates.json").read_bytes()
    on = pipeline.Settings(rules=tuple(rulelib.switch(rulelib.builtin_rules(), ["date", "env_block"])))
    result = pipeline.process("POST", "127.0.0.1", "/v1/messages", raw, on)
    assert result is not None and result.warning is None and result.forward is not None
    for _ in range(2):
        post(proxy.port, "/v1/messages", raw)
        assert upstream.received[-1].body == result.forward
    assert not wait_count(proxy, 1, timeout=0.5)
