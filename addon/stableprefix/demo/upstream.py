"""A small LLM-API-shaped HTTP(S) server on 127.0.0.1 that records what it receives.

Used by the demo and the end-to-end tests in place of a model server. It keeps the exact bytes of every
request and answers in the shape of the API the path names (Anthropic Messages, OpenAI Chat/Responses,
Ollama), streaming SSE when asked. Its usage figures come from a one-slot prefix cache simulation: the
prompt is the request's system + tools + messages JSON without cache markers, and the reused part is the
common prefix with the previous prompt (4 characters per token); count_tokens requests evict nothing. It is a stand-in, not a model; the real server tests use
llama-server.
"""

from __future__ import annotations

import gzip
import json
import ssl
import threading
import zlib
from dataclasses import dataclass
from dataclasses import field
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from os.path import commonprefix
from typing import Any

from stableprefix.core.fingerprint import canonical


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes  # exactly as received (still encoded if Content-Encoding says so)

    def decoded(self) -> bytes:
        enc = self.headers.get("content-encoding", "").lower()
        if enc == "gzip":
            return gzip.decompress(self.body)
        if enc == "deflate":
            return zlib.decompress(self.body)
        return self.body


@dataclass
class _State:
    received: list[Received] = field(default_factory=list)
    last_prompt: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)


def _prompt_text(body: Any) -> str:
    if not isinstance(body, dict):
        return ""
    keys = ("system", "instructions", "tools", "messages", "input", "prompt")
    # like a chat template: markers such as cache_control are not rendered
    return "".join(json.dumps(canonical(body.get(k)), ensure_ascii=False) for k in keys if k in body)


class _Handler(BaseHTTPRequestHandler):
    server_version = "stableprefix-upstream"
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    state: _State

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self._send(200, b'{"status":"ok"}', "application/json")

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length)
        rec = Received("POST", self.path, {k.lower(): v for k, v in self.headers.items()}, raw)
        try:
            body = json.loads(rec.decoded())
        except (ValueError, OSError, zlib.error, RecursionError):
            body = None
        prompt = _prompt_text(body)
        with self.state.lock:
            self.state.received.append(rec)
            cached = len(commonprefix([self.state.last_prompt, prompt])) // 4 if prompt else 0
            if prompt and not self.path.split("?")[0].endswith("/count_tokens"):  # counting evicts nothing
                self.state.last_prompt = prompt
        total = max(len(prompt) // 4, 1)
        stream = isinstance(body, dict) and body.get("stream") is True
        self._answer(self.path.split("?")[0], total, min(cached, total), stream)

    def _answer(self, path: str, total: int, cached: int, stream: bool) -> None:
        fresh = total - cached
        usage: dict[str, Any]
        out: dict[str, Any]
        if path.endswith("/v1/messages"):
            usage = {"input_tokens": fresh, "cache_read_input_tokens": cached, "output_tokens": 3}
            if stream:
                events = [
                    ("message_start", {"type": "message_start", "message": {"id": "msg_1", "usage": usage}}),
                    (
                        "content_block_start",
                        {
                            "type": "content_block_start",
                            "index": 0,
                            "content_block": {"type": "text", "text": ""},
                        },
                    ),
                    *[
                        (
                            "content_block_delta",
                            {
                                "type": "content_block_delta",
                                "index": 0,
                                "delta": {"type": "text_delta", "text": w},
                            },
                        )
                        for w in ("ok ", "done")
                    ],
                    ("message_delta", {"type": "message_delta", "usage": {"output_tokens": 3}}),
                    ("message_stop", {"type": "message_stop"}),
                ]
                self._send_sse(f"event: {e}\ndata: {json.dumps(d)}\n\n" for e, d in events)
                return
            out = {
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "content": [{"type": "text", "text": "ok"}],
                "usage": usage,
            }
            self._send(200, json.dumps(out).encode(), "application/json")
        elif path.endswith("/count_tokens"):
            self._send(200, json.dumps({"input_tokens": total}).encode(), "application/json")
        elif path.endswith("/chat/completions"):
            usage = {
                "prompt_tokens": total,
                "completion_tokens": 3,
                "prompt_tokens_details": {"cached_tokens": cached},
            }
            timings = {"cache_n": cached, "prompt_n": fresh}
            if stream:
                chunks: list[dict[str, Any]] = [
                    {"choices": [{"delta": {"content": w}}]} for w in ("ok ", "done")
                ]
                chunks.append({"choices": [], "usage": usage, "timings": timings})
                self._send_sse([f"data: {json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"])
                return
            out = {
                "choices": [{"message": {"role": "assistant", "content": "ok"}}],
                "usage": usage,
                "timings": timings,
            }
            self._send(200, json.dumps(out).encode(), "application/json")
        elif path.endswith("/responses"):
            usage = {
                "input_tokens": total,
                "output_tokens": 3,
                "input_tokens_details": {"cached_tokens": cached},
            }
            self._send(200, json.dumps({"output": [], "usage": usage}).encode(), "application/json")
        else:  # Ollama native and anything else
            out = {
                "message": {"role": "assistant", "content": "ok"},
                "done": True,
                "prompt_eval_count": total,
                "prompt_eval_cached_count": cached,
            }
            self._send(200, json.dumps(out).encode(), "application/json")

    def _send(self, status: int, data: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_sse(self, events: Any) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("connection", "close")
        self.end_headers()
        for e in events:
            self.wfile.write(e.encode())
            self.wfile.flush()
        self.close_connection = True


class _Server(ThreadingHTTPServer):
    # socketserver's default listen backlog is 5: under a burst of concurrent connections on a loaded
    # machine the kernel's accept queue overflows and resets connections the proxy already counted as
    # open, and mitmproxy answers 502 "server closed connection".
    request_queue_size = 1024


class Upstream:
    """Start with `with Upstream() as up:`; `up.url`, `up.received`. TLS when given a cert and key file."""

    def __init__(
        self, certfile: str | None = None, keyfile: str | None = None, host: str = "127.0.0.1"
    ) -> None:
        self.state = _State()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.server = _Server((host, 0), handler)
        self.server.daemon_threads = True
        self.scheme = "http"
        if certfile:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(certfile, keyfile)
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def received(self) -> list[Received]:
        with self.state.lock:
            return list(self.state.received)

    def start(self) -> Upstream:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Upstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
