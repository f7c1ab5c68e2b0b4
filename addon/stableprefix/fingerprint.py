"""Canonical form and hashes of a (normalised) request, so equal prompts get equal hashes.

Canonical form: ``cache_control`` markers are removed everywhere, a message whose ``content`` is a string
equals one with a single ``{"type": "text", "text": ...}`` block, and JSON is written with sorted keys,
no whitespace and UTF-8 text. Hashes are SHA-256 (hex):

- ``system_hash``: the system-position texts, in order (JSON list of strings);
- ``tools_hash``: the tools list (``tool_names`` keeps their order);
- ``params_hash``: render-affecting parameters (model, thinking, tool_choice, output settings);
- ``prefix_hash``: system + tools, the static prefix requests of one kind share;
- ``chain``: one cumulative hash per message, ``chain[k] = H(chain[k-1] + canon(messages[k]))`` starting
  from ``H(prefix_hash + params_hash)``; two requests share a prompt prefix up to the last equal entry.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from dataclasses import dataclass
from typing import Any

try:  # optional speed-up; the bytes are the same with or without it (see canonical_bytes)
    import orjson
except ImportError:  # pragma: no cover
    orjson = None  # type: ignore[assignment]

from stableprefix.shapes import Parts

CHAIN_HEX = 16  # chain entries are truncated; full digests for the single hashes


def canonical(value: Any) -> Any:
    """`value` without cache markers, with string message content as one text block."""
    if isinstance(value, dict):
        out = {k: canonical(v) for k, v in value.items() if k != "cache_control"}
        if isinstance(out.get("content"), str) and "role" in out:
            out["content"] = [{"type": "text", "text": out["content"]}]
        return out
    if isinstance(value, list):
        return [canonical(v) for v in value]
    return value


def canonical_bytes(value: Any) -> bytes:
    """Deterministic bytes of an already canonical value."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return text.encode("utf-8", "surrogatepass")


def _walk(value: Any, floats: list[float]) -> Any:
    """`canonical(value)` in one pass that also collects the floats it meets."""
    if type(value) is dict:
        out: dict[str, Any] = {}
        for k, v in value.items():
            if k == "cache_control":
                continue
            t = type(v)
            if t is dict or t is list:
                v = _walk(v, floats)
            elif t is float:
                floats.append(v)
            out[k] = v
        if "role" in out and type(out.get("content")) is str:
            out["content"] = [{"type": "text", "text": out["content"]}]
        return out
    if type(value) is list:
        items = []
        for v in value:
            t = type(v)
            if t is dict or t is list:
                v = _walk(v, floats)
            elif t is float:
                floats.append(v)
            items.append(v)
        return items
    if type(value) is float:
        floats.append(value)
    return value


def canonical_dump(value: Any) -> bytes:
    """``canonical_bytes(canonical(value))``, faster.

    orjson writes the same bytes as ``json.dumps(sort_keys=True, ensure_ascii=False, separators=(",", ":"))``
    except for floats below 1e-4 (``1e-05`` vs ``0.00001``), integers beyond 64 bits and lone surrogates
    (orjson refuses the last two): values holding a float or refused by orjson take the json path.
    """
    floats: list[float] = []
    canon = _walk(value, floats)
    if orjson is not None and not floats:
        try:
            return orjson.dumps(canon, option=orjson.OPT_SORT_KEYS)
        except TypeError:  # orjson.JSONEncodeError: big integer, lone surrogate
            pass
    return canonical_bytes(canon)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class Fingerprint:
    system_hash: str
    tools_hash: str
    tool_names: list[str]
    params_hash: str
    prefix_hash: str
    chain: list[str]
    system_chars: int  # sizes, for estimating how much of the prompt a server can reuse
    tools_chars: int
    message_chars: list[int]

    def as_record(self) -> dict[str, Any]:
        return asdict(self)


def fingerprint(parts: Parts) -> Fingerprint:
    """Hashes of a request's parts (see the module docstring for the canonical form)."""
    system = canonical_dump(parts.system)
    tools = canonical_dump(parts.tools)
    params = canonical_dump(parts.params)
    system_hash, tools_hash, params_hash = sha(system), sha(tools), sha(params)
    prefix_hash = sha(f"{system_hash}{tools_hash}".encode())
    link = sha(f"{prefix_hash}{params_hash}".encode())
    chain: list[str] = []
    sizes: list[int] = []
    for m in parts.messages:
        data = canonical_dump(m)
        h = hashlib.sha256(link.encode())
        h.update(data)
        link = h.hexdigest()
        chain.append(link[:CHAIN_HEX])
        sizes.append(len(data))
    return Fingerprint(
        system_hash,
        tools_hash,
        list(parts.tool_names),
        params_hash,
        prefix_hash,
        chain,
        sum(len(t) for t in parts.system),
        len(tools),
        sizes,
    )

