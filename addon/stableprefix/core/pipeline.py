"""The one way through: request bytes -> shape -> rules -> new bytes + fingerprint -> record.

`process` is pure (no mitmproxy): the addon, the offline report and the tests all call it. It never raises
for a bad body; it says why it left the body alone in `Result.warning` and the caller forwards the
original bytes.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from typing import Any

from stableprefix.core import billing
from stableprefix.core import record as records
from stableprefix.core import shapes
from stableprefix.core.fingerprint import Fingerprint
from stableprefix.core.fingerprint import fingerprint
from stableprefix.core.jsonedit import Document
from stableprefix.core.jsonedit import apply_edits
from stableprefix.core.rules import Rule
from stableprefix.core.rules import StickyMemory
from stableprefix.core.rules import apply
from stableprefix.core.rules import builtin_rules
from stableprefix.core.rules import slot_scopes as rules_slot_scopes
from stableprefix.core.shapes import Shape

#: Anthropic's first-party API: rewriting there breaks subscription recognition and gains nothing.
DEFAULT_PASSTHROUGH = ("api.anthropic.com", "*.anthropic.com")
SESSION_HEADER = "x-claude-code-session-id"


@dataclass(frozen=True)
class Settings:
    rules: tuple[Rule, ...] = tuple(builtin_rules())
    observe: bool = False  # hash and log, rewrite nothing
    passthrough: tuple[str, ...] = DEFAULT_PASSTHROUGH

    @functools.cached_property
    def slot_scopes(self) -> frozenset[str] | None:
        """The text scopes the enabled rules read ("system" always: the record's billing fields come from it)."""
        scopes = rules_slot_scopes(self.rules)
        return None if scopes is None else scopes | {"system"}

    def is_passthrough(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return any(fnmatch.fnmatchcase(host, p.lower()) for p in self.passthrough)


@dataclass
class Result:
    """What to forward (None: the original bytes) and the record of what happened."""

    forward: bytes | None
    record: dict[str, Any]
    body: dict[str, Any] | None = None  # the normalised body (as forwarded)
    fingerprint: Fingerprint | None = None
    parts: shapes.Parts | None = None  # what the fingerprint hashed
    warning: str | None = None
    original_body: dict[str, Any] | None = field(default=None, repr=False)


def session_id(headers: Mapping[str, str], body: Mapping[str, Any]) -> str:
    """The client's conversation id: Claude Code's session header, else the one in metadata.user_id."""
    for k, v in headers.items():
        if k.lower() == SESSION_HEADER and v:
            return str(v)
    meta = body.get("metadata")
    uid = meta.get("user_id") if isinstance(meta, dict) else None
    if isinstance(uid, str) and uid:
        if uid.startswith("{"):
            try:
                sid = json.loads(uid).get("session_id")
                if isinstance(sid, str):
                    return sid
            except (ValueError, AttributeError):
                pass
        if "_session_" in uid:
            return uid.rsplit("_session_", 1)[1]
    return ""


def billing_fields(shape: Shape) -> dict[str, Any] | None:
    """Version, entrypoint and flags of the billing header (no hashes, no prompt text), if there is one."""
    for slot in shape.slots:
        if slot.scope == "system" and (h := billing.find(slot.text)) is not None:
            version = h.fields.get("cc_version", "")
            return {
                "cc_version": ".".join(version.split(".")[:3]),
                "cc_entrypoint": h.fields.get("cc_entrypoint"),
                "cch": "cch" in h.fields,
                "cc_workload": h.fields.get("cc_workload"),
            }
    return None


def process(
    method: str,
    host: str,
    path: str,
    raw: bytes,
    settings: Settings,
    headers: Mapping[str, str] | None = None,
    sticky: StickyMemory | None = None,
) -> Result | None:
    """Normalise one request. None when it is not an LLM request this project handles."""
    api = shapes.api_for_path(path)
    if method.upper() != "POST" or api is None:
        return None
    record = records.new(host, path, str(api))
    try:
        doc = Document.parse(raw)
        shape = shapes.detect(path, doc.value, settings.slot_scopes)
    except (ValueError, RecursionError) as e:
        reason = f"{type(e).__name__}: {e}" if not isinstance(e, UnicodeDecodeError) else "body is not UTF-8"
        record["error"] = reason[:200]
        record["state"] = "left-alone"
        return Result(None, record, warning=f"left {record['path']} unchanged: {reason[:200]}")
    assert shape is not None
    try:
        return _normalise(doc, shape, host, record, settings, headers or {}, sticky)
    except Exception as e:  # a bug must never cost a request: forward the original bytes, say why once
        record["error"] = f"internal error ({type(e).__name__})"  # its message could quote prompt text
        record["state"] = "left-alone"
        return Result(None, record, doc.value, warning=f"left {record['path']} unchanged: {record['error']}")


def _normalise(
    doc: Document,
    shape: Shape,
    host: str,
    record: dict[str, Any],
    settings: Settings,
    headers: Mapping[str, str],
    sticky: StickyMemory | None,
) -> Result:
    api = shape.api
    session = session_id(headers, doc.value)
    record["changed"] = {}
    record["actions"] = {}
    if (bill := billing_fields(shape)) is not None:
        record["billing"] = bill
    passthrough = settings.is_passthrough(host)
    outcome = apply(shape, settings.rules, session, sticky) if not passthrough else None
    body = doc.value
    forward = None
    if outcome and outcome.edits:
        fired = dict(sorted(outcome.fired.items()))
        action = {r.name: r.action for r in settings.rules}
        record["actions"] = {name: action.get(name, "?") for name in fired}
        if settings.observe:
            record["would_change"] = fired
        else:
            forward = doc.edited(outcome.edits).encode("utf-8")
            body = apply_edits(doc.value, outcome.edits)
            record["changed"] = fired
            record["rewritten"] = True
    if passthrough:
        record["passthrough"] = True
    record["session"] = fingerprint_session(session) if session else None
    parts = shapes.parts(api, body)
    fp = fingerprint(parts)
    record.update(fp.as_record())
    return Result(forward, record, body, fp, parts, original_body=doc.value)


def fingerprint_session(session: str) -> str:
    """A short hash of the session id: groups requests without logging the id itself."""
    return hashlib.sha256(session.encode()).hexdigest()[:12]


def rules_summary(rules: Sequence[Rule]) -> str:
    on = [r.name for r in rules if r.enabled]
    return ",".join(on) if on else "none"
