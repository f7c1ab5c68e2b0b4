"""Test-only mitmproxy script: short turns from a small local model for the real-client benchmark.

A small model (SmolLM2) rambles until the request's ``max_tokens`` (Claude Code asks for tens of thousands;
llama-server's own ``-n`` does not cap it). This script lowers ``max_tokens`` of Anthropic Messages requests
to ``CAP`` (``max_tokens`` is not part of the prompt: the cache figures do not change) and reports the
capped answer's ``stop_reason`` ``max_tokens`` as ``end_turn`` to the client, since Claude Code otherwise
keeps asking the model to continue. Load it after the addon
(``mitmdump -s addon/stableprefix/addon.py -s tests/support/cap_max_tokens.py``): the addon's copy of the
stream sees the server's own answer. Benchmarks only.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from collections.abc import Iterable

from mitmproxy import http

CAP = int(os.environ.get("STABLEPREFIX_CAP_MAX_TOKENS", "16"))
STOP = re.compile(rb'"stop_reason"\s*:\s*"max_tokens"')
MARK = "stableprefix_capped"


def _end_turn(data: bytes) -> bytes:
    return STOP.sub(b'"stop_reason":"end_turn"', data)


def request(flow: http.HTTPFlow) -> None:
    req = flow.request
    if req.method != "POST" or not req.path.split("?")[0].endswith("/v1/messages"):
        return
    try:
        body = json.loads(req.get_content(strict=True) or b"")
    except ValueError:
        return
    if isinstance(body, dict) and isinstance(body.get("max_tokens"), int) and body["max_tokens"] > CAP:
        body["max_tokens"] = CAP
        req.content = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        flow.metadata[MARK] = True


def responseheaders(flow: http.HTTPFlow) -> None:
    resp = flow.response
    if resp is None or not flow.metadata.get(MARK):
        return
    if "text/event-stream" not in resp.headers.get("content-type", ""):
        return  # a whole body: rewritten in `response`
    before = resp.stream
    inner: Callable[[bytes], Iterable[bytes] | bytes] | None = before if callable(before) else None

    def fix(data: bytes) -> bytes:  # SSE events of llama-server arrive whole in practice
        if inner is not None:
            out = inner(data)
            data = out if isinstance(out, bytes) else b"".join(out)
        return _end_turn(data)

    resp.stream = fix


def response(flow: http.HTTPFlow) -> None:
    resp = flow.response
    if resp is None or not flow.metadata.get(MARK) or resp.stream:
        return
    content = resp.get_content(strict=False)
    if content:
        resp.content = _end_turn(content)
