"""The "stableprefix" content view: what the rules did to a request and how it compares with the previous one.

mitmweb, mitmproxy's console and ``mitmdump --flow-detail 3`` pick it automatically for the requests the
addon handled (render priority 2, above the JSON view's 1) and never for anything else (-1). The view
receives the forwarded (rewritten) body; the before-state comes from ``flow.metadata``: the record
(``stableprefix``) and the client's hashes plus the list of changed JSON paths (``stableprefix_before``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from mitmproxy import contentviews
from mitmproxy import http

from stableprefix.core.record import BEFORE_KEY
from stableprefix.core.record import META_KEY
from stableprefix.core.record import MISS_WORDS

BODY_CHARS = 200_000  # the forwarded body is shown pretty-printed up to this size, then cut


def handled(flow: Any) -> bool:
    """True for requests the addon analysed (a record with a fingerprint, not a body it left alone)."""
    if not isinstance(flow, http.HTTPFlow):
        return False
    rec = flow.metadata.get(META_KEY)
    return isinstance(rec, dict) and "prefix_hash" in rec


def _v(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def render(record: Mapping[str, Any], before: Mapping[str, Any], data: bytes) -> str:
    """The view's text (YAML-like header, then the forwarded body as JSON)."""
    lines = ["# stableprefix: this request against the previous one of its conversation"]
    total = len(record.get("chain") or ())
    lines.append("divergence:")
    for key in ("class", "stream", "verdict", "diverged_at", "cause"):
        lines.append(f"  {key}: {_v(record.get(key))}")
    lines.append(f"  common_prefix_messages: {record.get('common_prefix_messages', 0)}  # of {total}")
    chars = record.get("reusable_chars") or 0
    lines.append(f"  reusable: {chars:,} chars  # ~{record.get('reusable_tokens_est', 0):,} tokens")
    if record.get("nearest_stream"):  # a stream's first request: compared with the nearest earlier stream
        lines.append(f"  nearest_stream: {_v(record['nearest_stream'])}  # the fields above compare with it")
        lines.append(
            f"  shareable: {record.get('shareable_chars', 0):,} chars  # if the volatile items were equal"
        )
    if record.get("saved_by"):
        lines.append(
            f"  saved_by_rules: {_v(record['saved_by'])}  # chars shared only because of the rewrite"
        )
    if record.get("tools_changed"):
        lines.append(f"  tools_changed: {_v(record['tools_changed'])}")
    if record.get("interleaved_side"):
        lines.append("  interleaved_side: true  # a side request ran since this stream's previous request")
    if record.get("context"):
        lines.append(f"  context: {_v(record['context'])}  # masked: letters a/A, digits 0")
    lines.append("server:")
    if "status" not in record:
        lines.append("  status: null  # no response yet")
    else:
        for key in ("status", "cached_tokens", "prompt_tokens", "evidence"):
            lines.append(f"  {key}: {_v(record.get(key))}")
        miss = record.get("miss")
        note = f"  # {MISS_WORDS[miss]}" if miss in MISS_WORDS else ""
        lines.append(f"  miss: {_v(miss)}{note}")
    lines.append("rules:")
    if record.get("would_change"):
        lines.append(f"  would_change: {_v(record['would_change'])}  # observe mode: nothing rewritten")
    else:
        lines.append(f"  changed: {_v(record.get('changed') or {})}")
    if record.get("passthrough"):
        lines.append("  passthrough: true  # this host is never rewritten")
    if "system_hash" in before:
        lines.append("  client_sent:")
        for key in ("system_hash", "tools_hash", "prefix_hash"):
            lines.append(f"    {key}: {str(before[key])[:12]}")
    changes = before.get("changes") or []
    if changes:
        lines.append("  changes:  # forwarded body vs. what the client sent (paths, sizes; no text)")
        for c in changes:
            if c["op"] == "changed" and "from_chars" in c:
                desc = (
                    f"changed {c['from_chars']:,} -> {c['to_chars']:,} chars, first difference at {c['at']:,}"
                )
            elif c["op"] == "changed":
                desc = "changed"
            else:
                desc = f"{c['op']} ({c.get('chars', 0):,} chars)"
            lines.append(f"    - {c['path']}: {desc}")
        if before.get("changes_omitted"):
            lines.append(f"    # ... {before['changes_omitted']} more")
    lines.append("forwarded:")
    for key in ("system_hash", "tools_hash", "params_hash", "prefix_hash"):
        lines.append(f"  {key}: {str(record.get(key, ''))[:12]}")
    chain = list(record.get("chain") or ())
    lines.append(f"  chain: {_v(chain[-3:])}  # last 3 of {total}")
    lines.append("# forwarded body")
    try:
        body = json.dumps(json.loads(data), indent=2, ensure_ascii=False)
    except (ValueError, UnicodeDecodeError):
        body = data.decode("utf-8", "replace")
    if len(body) > BODY_CHARS:
        body = body[:BODY_CHARS] + f"\n# ... {len(body) - BODY_CHARS:,} more characters"
    lines.append(body)
    return "\n".join(lines)


class StablePrefixContentview(contentviews.Contentview):
    """Request bodies the addon handled: rules applied, divergence, server evidence, forwarded body."""

    name = "stableprefix"
    syntax_highlight = "yaml"

    def prettify(self, data: bytes, metadata: contentviews.Metadata) -> str:
        flow = metadata.flow
        if not handled(flow):
            raise ValueError("not a request stableprefix handled")
        assert flow is not None
        return render(flow.metadata[META_KEY], flow.metadata.get(BEFORE_KEY) or {}, data)

    def render_priority(self, data: bytes, metadata: contentviews.Metadata) -> float:
        flow = metadata.flow
        if handled(flow) and isinstance(flow, http.HTTPFlow) and metadata.http_message is flow.request:
            return 2
        return -1


contentviews.add(StablePrefixContentview)
