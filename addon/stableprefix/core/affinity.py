"""The per-conversation affinity header: a routing key a router in front of several replicas can stick to.

Routers that keep replica caches warm pick a replica either by prefix (a radix tree over the request text,
defeated by a first line that changes) or by a session key in a header: sglang-router ``--policy manual``
reads ``x-smg-routing-key``, vllm-router ``--policy consistent_hash`` reads ``x-session-id``, vLLM
production-stack ``--routing-logic session --session-key NAME`` reads any name. stableprefix fills such a
header from what its record already holds:

- the conversation: the hashed session id (``session``: Claude Code's session header or
  ``metadata.user_id``), else the conversation stream id (``stream``: from the first message and the system
  prompt, so the same for every stableprefix instance that sees the conversation);
- the request class (``class``): ``main``/``subagent`` turns carry the conversation's key; ``side`` and
  ``count_tokens`` requests follow `SIDE_MODES`: ``same`` (the conversation's key; without a session id a
  side request cannot be tied to its conversation and gets its own stream's key), ``none`` (no header: the
  router's default policy places them) or ``separate`` (a key of their own per class and conversation, so a
  short query does not take, and evict, the conversation's slot on its replica).

The value is a short hash of hashes (16 hex digits): never prompt text, never a credential. Pure: no
mitmproxy, no sockets.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

SIDE_MODES = ("same", "none", "separate")
SHORT_CLASSES = frozenset({"side", "count_tokens"})
VALUE_CHARS = 16
#: Headers a routing key must never replace: framing, hop-by-hop, and credentials.
RESERVED = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "content-encoding",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "expect",
        "proxy-authorization",
        "proxy-authenticate",
        "proxy-connection",
        "authorization",
        "x-api-key",
        "cookie",
        "set-cookie",
        "anthropic-version",
        "anthropic-beta",
        "x-claude-code-session-id",
    }
)
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def header_problem(name: str) -> str | None:
    """Why `name` cannot be the affinity header (None when it can): an HTTP token, not a reserved header."""
    if not _TOKEN.fullmatch(name):
        return "is not an HTTP header name (letters, digits and !#$%&'*+-.^_`|~ only)"
    if name.lower() in RESERVED:
        return "is a header stableprefix must not overwrite (framing, hop-by-hop or credentials)"
    return None


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x00".join(("stableprefix-affinity", *parts)).encode()).hexdigest()[:VALUE_CHARS]


def affinity_value(record: Mapping[str, Any], side: str = "separate") -> str | None:
    """The routing key for one analysed request, or None when it gets no header.

    `record` is the addon's request record (``session``, ``stream``, ``class``); `side` is one of
    `SIDE_MODES`. None when the record has neither a session nor a stream (the body was not analysed), or
    for a side/count_tokens request with ``side="none"``.
    """
    if side not in SIDE_MODES:
        raise ValueError(f"side mode {side!r} is not one of {', '.join(SIDE_MODES)}")
    session, stream, cls = record.get("session"), record.get("stream"), record.get("class")
    conversation = f"session:{session}" if session else f"stream:{stream}" if stream else None
    if conversation is None or cls is None:
        return None
    if cls in SHORT_CLASSES:
        if side == "none":
            return None
        if side == "separate":
            return _digest(conversation, str(cls))
    return _digest(conversation)
