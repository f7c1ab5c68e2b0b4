"""A small LLM-API-shaped HTTP(S) server on 127.0.0.1 that records what it receives.

Used by the demo and the end-to-end tests in place of a model server. It keeps the exact bytes of every
request and answers in the protocol the path names, as the official SDKs and Claude Code parse it:

- Anthropic Messages (``/v1/messages``): a ``message`` object, or the SSE events ``message_start`` (the
  message with its usage), ``content_block_start``, ``ping``, ``content_block_delta``, ``content_block_stop``,
  ``message_delta`` (stop reason and usage), ``message_stop``; ``/v1/messages/count_tokens`` answers
  ``input_tokens``;
- OpenAI Chat Completions: a ``chat.completion``, or ``chat.completion.chunk`` events, the usage in a last
  chunk when ``stream_options.include_usage`` (llama.cpp-style ``timings`` in the finishing chunk);
- OpenAI Responses: a ``response`` object, or the events ``response.created`` ... ``response.completed``;
- Ollama ``/api/chat`` and ``/api/generate``: one JSON object, NDJSON lines when ``"stream": true``.

The answer is "ok done" unless a `Replier` says otherwise (Anthropic answers may carry ``tool_use`` blocks).
Its usage figures come from a one-slot prefix cache simulation: the prompt is the request's system + tools +
messages rendered as JSON without cache markers (its own rendering, not the addon's fingerprint), and the
reused part is the common prefix with the previous prompt (4 characters per token); count_tokens requests
evict nothing. It is a stand-in, not a model; the real server tests use llama-server.
"""

from __future__ import annotations

import gzip
import itertools
import json
import ssl
import threading
import time
import zlib
from collections.abc import Callable
from collections.abc import Iterable
from dataclasses import dataclass
from dataclasses import field
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from os.path import commonprefix
from typing import Any

DEFAULT_TEXT = "ok done"
DEFAULT_MODEL = "stableprefix-upstream"

#: What to answer: the text, or Anthropic content blocks ({"type": "text", "text"} or {"type": "tool_use",
#: "name", "input"[, "id"]}); OpenAI and Ollama answers use the text blocks only.
Reply = str | list[dict[str, Any]]
#: Called with the request path (query string included) and its parsed JSON body (None if not JSON);
#: None means the default answer.
Replier = Callable[[str, Any], Reply | None]


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
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))


def _unmarked(value: Any) -> Any:
    """`value` as a chat template sees it: without ``cache_control`` markers, a role message's string
    content as one text block (servers render both forms alike)."""
    if isinstance(value, list):
        return [_unmarked(v) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: _unmarked(v) for k, v in value.items() if k != "cache_control"}
    if "role" in out and isinstance(out.get("content"), str):
        out["content"] = [{"type": "text", "text": out["content"]}]
    return out


def _prompt_text(body: Any) -> str:
    if not isinstance(body, dict):
        return ""
    keys = ("system", "instructions", "tools", "messages", "input", "prompt")
    return "".join(json.dumps(_unmarked(body.get(k)), ensure_ascii=False) for k in keys if k in body)


def _blocks(reply: Reply) -> list[dict[str, Any]]:
    return [{"type": "text", "text": reply}] if isinstance(reply, str) else reply


def _text(reply: Reply) -> str:
    return "".join(b.get("text", "") for b in _blocks(reply) if b.get("type") == "text")


def _words(text: str) -> list[str]:
    """The text in a few deltas that join back to it exactly."""
    parts = text.split(" ")
    return [p + " " for p in parts[:-1]] + [parts[-1]] if text else [""]


def _out_tokens(reply: Reply) -> int:
    return max(len(json.dumps(_blocks(reply))) // 16, 1)


def sse(event: str | None, data: Any) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n"


class _Handler(BaseHTTPRequestHandler):
    server_version = "stableprefix-upstream"
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    state: _State
    replier: Replier | None

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        if self.path.split("?")[0].endswith("/v1/models"):
            model = {"type": "model", "id": DEFAULT_MODEL, "display_name": DEFAULT_MODEL,
                     "created_at": "2026-01-01T00:00:00Z", "object": "model", "created": 0,
                     "owned_by": "stableprefix"}  # fmt: skip
            data = {"data": [model], "object": "list", "has_more": False,
                    "first_id": DEFAULT_MODEL, "last_id": DEFAULT_MODEL}  # fmt: skip
            self._send(200, json.dumps(data).encode(), "application/json")
            return
        self._send(200, b'{"status":"ok"}', "application/json")

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

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
            n = next(self.state.ids)
        total = max(len(prompt) // 4, 1)
        reply = (self.replier(self.path, body) if self.replier else None) or DEFAULT_TEXT
        model = body.get("model") if isinstance(body, dict) and isinstance(body.get("model"), str) else None
        answer = _Answer(n, model or DEFAULT_MODEL, total, min(cached, total), reply, body)
        stream = isinstance(body, dict) and body.get("stream") is True
        path = self.path.split("?")[0]
        if path.endswith("/count_tokens"):
            self._json({"input_tokens": total})
        elif path.endswith("/v1/messages"):
            self._sse(answer.anthropic_events()) if stream else self._json(answer.anthropic())
        elif path.endswith("/chat/completions"):
            self._sse(answer.chat_chunks()) if stream else self._json(answer.chat())
        elif path.endswith("/responses"):
            self._sse(answer.responses_events()) if stream else self._json(answer.response("completed"))
        elif stream:  # Ollama native and anything else
            self._stream("application/x-ndjson", answer.ollama_lines(path))
        else:
            self._json(answer.ollama(path))

    def _json(self, obj: Any) -> None:
        self._send(200, json.dumps(obj).encode(), "application/json")

    def _send(self, status: int, data: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _sse(self, events: Iterable[str]) -> None:
        self._stream("text/event-stream", events)

    def _stream(self, ctype: str, events: Iterable[str]) -> None:
        self.send_response(200)
        self.send_header("content-type", ctype)
        self.send_header("cache-control", "no-cache")
        self.send_header("connection", "close")
        self.end_headers()
        for e in events:
            self.wfile.write(e.encode())
            self.wfile.flush()
        self.close_connection = True


@dataclass
class _Answer:
    """One answer in every protocol; `cached` of `total` prompt tokens reused."""

    n: int
    model: str
    total: int
    cached: int
    reply: Reply
    body: Any
    created: int = field(default_factory=lambda: int(time.time()))

    # --- Anthropic Messages -----------------------------------------------------------------------------

    def _content(self) -> list[dict[str, Any]]:
        out = []
        for i, b in enumerate(_blocks(self.reply)):
            if b.get("type") == "tool_use":
                out.append({"type": "tool_use", "id": b.get("id") or f"toolu_{self.n:04d}{i:02d}",
                            "name": b["name"], "input": b.get("input", {})})  # fmt: skip
            else:
                out.append({"type": "text", "text": b.get("text", "")})
        return out

    def _anthropic_usage(self, output_tokens: int) -> dict[str, Any]:
        return {
            "input_tokens": self.total - self.cached,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": self.cached,
            "output_tokens": output_tokens,
        }

    def _stop_reason(self) -> str:
        return "tool_use" if any(b["type"] == "tool_use" for b in self._content()) else "end_turn"

    def anthropic(self) -> dict[str, Any]:
        return {
            "id": f"msg_{self.n:08d}",
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": self._content(),
            "stop_reason": self._stop_reason(),
            "stop_sequence": None,
            "usage": self._anthropic_usage(_out_tokens(self.reply)),
        }

    def anthropic_events(self) -> Iterable[str]:
        start = {**self.anthropic(), "content": [], "stop_reason": None, "usage": self._anthropic_usage(1)}
        yield sse("message_start", {"type": "message_start", "message": start})
        for i, block in enumerate(self._content()):
            if block["type"] == "tool_use":
                opening = {**block, "input": {}}
                deltas = [{"type": "input_json_delta", "partial_json": ""}]
                js = json.dumps(block["input"])
                deltas += [{"type": "input_json_delta", "partial_json": js[j : j + 16]}
                           for j in range(0, len(js), 16)]  # fmt: skip
            else:
                opening = {"type": "text", "text": ""}
                deltas = [{"type": "text_delta", "text": w} for w in _words(block["text"])]
            yield sse(
                "content_block_start", {"type": "content_block_start", "index": i, "content_block": opening}
            )
            if i == 0:
                yield sse("ping", {"type": "ping"})
            for d in deltas:
                yield sse("content_block_delta", {"type": "content_block_delta", "index": i, "delta": d})
            yield sse("content_block_stop", {"type": "content_block_stop", "index": i})
        delta = {"stop_reason": self._stop_reason(), "stop_sequence": None}
        usage = self._anthropic_usage(_out_tokens(self.reply))
        yield sse("message_delta", {"type": "message_delta", "delta": delta, "usage": usage})
        yield sse("message_stop", {"type": "message_stop"})

    # --- OpenAI Chat Completions --------------------------------------------------------------------------

    def _chat_usage(self) -> dict[str, Any]:
        out = _out_tokens(self.reply)
        return {
            "prompt_tokens": self.total,
            "completion_tokens": out,
            "total_tokens": self.total + out,
            "prompt_tokens_details": {"cached_tokens": self.cached},
        }

    def _timings(self) -> dict[str, Any]:
        return {"cache_n": self.cached, "prompt_n": self.total - self.cached}

    def chat(self) -> dict[str, Any]:
        message = {"role": "assistant", "content": _text(self.reply), "refusal": None}
        return {
            "id": f"chatcmpl-{self.n:08d}",
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
            "usage": self._chat_usage(),
            "timings": self._timings(),
        }

    def chat_chunks(self) -> Iterable[str]:
        head = {"id": f"chatcmpl-{self.n:08d}", "object": "chat.completion.chunk", "created": self.created,
                "model": self.model}  # fmt: skip

        def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return sse(None, {**head, "choices": [choice], **extra})

        yield chunk({"role": "assistant", "content": ""})
        for w in _words(_text(self.reply)):
            yield chunk({"content": w})
        yield chunk({}, "stop", timings=self._timings())
        opts = self.body.get("stream_options") if isinstance(self.body, dict) else None
        if isinstance(opts, dict) and opts.get("include_usage") is True:
            yield sse(None, {**head, "choices": [], "usage": self._chat_usage()})
        yield "data: [DONE]\n\n"

    # --- OpenAI Responses ---------------------------------------------------------------------------------

    def _message_item(self, done: bool) -> dict[str, Any]:
        part = {"type": "output_text", "text": _text(self.reply), "annotations": []}
        return {"type": "message", "id": f"msg_{self.n:08d}", "status": "completed" if done else "in_progress",
                "role": "assistant", "content": [part] if done else []}  # fmt: skip

    def response(self, status: str) -> dict[str, Any]:
        done = status == "completed"
        out = _out_tokens(self.reply)
        usage = {
            "input_tokens": self.total,
            "input_tokens_details": {"cached_tokens": self.cached},
            "output_tokens": out,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.total + out,
        }
        instructions = self.body.get("instructions") if isinstance(self.body, dict) else None
        return {
            "id": f"resp_{self.n:08d}",
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": None,
            "instructions": instructions if isinstance(instructions, str) else None,
            "model": self.model,
            "output": [self._message_item(True)] if done else [],
            "parallel_tool_calls": True,
            "temperature": 1.0,
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "text": {"format": {"type": "text"}},
            "truncation": "disabled",
            "metadata": {},
            "usage": usage if done else None,
        }

    def responses_events(self) -> Iterable[str]:
        seq = itertools.count()
        item_id = f"msg_{self.n:08d}"
        text = _text(self.reply)
        empty_part = {"type": "output_text", "text": "", "annotations": []}
        where = {"item_id": item_id, "output_index": 0, "content_index": 0}

        def ev(kind: str, **data: Any) -> str:
            return sse(kind, {"type": kind, "sequence_number": next(seq), **data})

        yield ev("response.created", response=self.response("in_progress"))
        yield ev("response.in_progress", response=self.response("in_progress"))
        yield ev("response.output_item.added", output_index=0, item=self._message_item(False))
        yield ev("response.content_part.added", part=empty_part, **where)
        for w in _words(text):
            yield ev("response.output_text.delta", delta=w, logprobs=[], **where)
        yield ev("response.output_text.done", text=text, logprobs=[], **where)
        yield ev("response.content_part.done", part={**empty_part, "text": text}, **where)
        yield ev("response.output_item.done", output_index=0, item=self._message_item(True))
        yield ev("response.completed", response=self.response("completed"))

    # --- Ollama ---------------------------------------------------------------------------------------

    def _ollama_head(self) -> dict[str, Any]:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.created))
        return {"model": self.model, "created_at": stamp}

    def _ollama_piece(self, path: str, text: str) -> dict[str, Any]:
        if path.endswith("/api/generate"):
            return {"response": text}
        return {"message": {"role": "assistant", "content": text}}

    def _ollama_final(self) -> dict[str, Any]:
        return {
            "done": True,
            "done_reason": "stop",
            "prompt_eval_count": self.total,
            "prompt_eval_cached_count": self.cached,
            "eval_count": _out_tokens(self.reply),
        }

    def ollama(self, path: str) -> dict[str, Any]:
        return {**self._ollama_head(), **self._ollama_piece(path, _text(self.reply)), **self._ollama_final()}

    def ollama_lines(self, path: str) -> Iterable[str]:
        for w in _words(_text(self.reply)):
            yield json.dumps({**self._ollama_head(), **self._ollama_piece(path, w), "done": False}) + "\n"
        yield (
            json.dumps({**self._ollama_head(), **self._ollama_piece(path, ""), **self._ollama_final()}) + "\n"
        )


class _Server(ThreadingHTTPServer):
    # socketserver's default listen backlog is 5: under a burst of concurrent connections on a loaded
    # machine the kernel's accept queue overflows and resets connections the proxy already counted as
    # open, and mitmproxy answers 502 "server closed connection".
    request_queue_size = 1024


class Upstream:
    """Start with `with Upstream() as up:`; `up.url`, `up.received`. TLS when given a cert and key file;
    `replier` picks the answers (default: "ok done")."""

    def __init__(
        self,
        certfile: str | None = None,
        keyfile: str | None = None,
        host: str = "127.0.0.1",
        replier: Replier | None = None,
    ) -> None:
        self.state = _State()
        handler = type(
            "Handler",
            (_Handler,),
            {"state": self.state, "replier": staticmethod(replier) if replier else None},
        )
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
