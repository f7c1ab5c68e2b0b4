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
from bisect import bisect_right
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from typing import Any

import orjson

from stableprefix.core import billing
from stableprefix.core import record as records
from stableprefix.core import shapes
from stableprefix.core.fingerprint import Fingerprint
from stableprefix.core.fingerprint import fingerprint
from stableprefix.core.jsonedit import Document
from stableprefix.core.jsonedit import Edit
from stableprefix.core.jsonedit import Layout
from stableprefix.core.jsonedit import RawDocument
from stableprefix.core.jsonedit import SparseDocument
from stableprefix.core.jsonedit import apply_edits
from stableprefix.core.jsonedit import compact_array
from stableprefix.core.jsonedit import decode
from stableprefix.core.jsonedit import layout_at
from stableprefix.core.jsonedit import undecoded
from stableprefix.core.rules import MOVE
from stableprefix.core.rules import Outcome
from stableprefix.core.rules import Rule
from stableprefix.core.rules import StickyMemory
from stableprefix.core.rules import apply
from stableprefix.core.rules import builtin_rules
from stableprefix.core.rules import guard_literals
from stableprefix.core.rules import guard_ok
from stableprefix.core.rules import literal_finder
from stableprefix.core.rules import literals_hit
from stableprefix.core.rules import may_hide_guard
from stableprefix.core.rules import slot_scopes as rules_slot_scopes
from stableprefix.core.rules import text_guard
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
    def sparse_plans(self) -> dict[shapes.Api, SparsePlan | None]:
        """Per API, what the forwarding path decodes of a body for the enabled rules (None: it parses in full)."""
        return {api: sparse_plan(self.rules, api) for api in shapes.Api}

    @functools.cached_property
    def slot_scopes(self) -> frozenset[str] | None:
        """The text scopes the enabled rules read ("system" always: the record's billing fields come from it)."""
        scopes = rules_slot_scopes(self.rules)
        return None if scopes is None else scopes | {"system"}

    @functools.cached_property
    def guards(self) -> tuple[bytes, ...] | None:
        """`rules.guard_literals` of the rules, computed once."""
        return guard_literals(self.rules)

    @functools.cached_property
    def _passthrough_seen(self) -> dict[str, bool]:
        return {}

    def is_passthrough(self, host: str) -> bool:
        seen = self._passthrough_seen
        hit = seen.get(host)
        if hit is None:
            name = host.lower().rstrip(".")
            hit = any(fnmatch.fnmatchcase(name, p.lower()) for p in self.passthrough)
            if len(seen) < 1024:  # hosts a proxy sees are few; a flood of names is not remembered
                seen[host] = hit
        return hit


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
    #: the edits the rules made (observe mode: would make) to `original_body`
    edits: list[Edit] = field(default_factory=list, repr=False)


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


@dataclass
class Forward:
    """What the forwarding path decided for one request: the bytes to send (None: the original) and what it
    parsed to decide (None when the guard scan found nothing any rule could change: then `analyse` parses)."""

    forward: bytes | None
    record: dict[str, Any]
    raw: bytes
    headers: Mapping[str, str]
    settings: Settings
    sticky: StickyMemory | None = None
    doc: Document | RawDocument | SparseDocument | None = None
    shape: Shape | None = None
    session: str = ""
    outcome: Outcome | None = None
    body: dict[str, Any] | None = None  # the body as forwarded, when rules changed it
    warning: str | None = None


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
    fwd = forward(method, host, path, raw, settings, headers, sticky)
    return None if fwd is None else analyse(fwd)


def forward(
    method: str,
    host: str,
    path: str,
    raw: bytes,
    settings: Settings,
    headers: Mapping[str, str] | None = None,
    sticky: StickyMemory | None = None,
) -> Forward | None:
    """Only what decides the bytes to send: a guard scan (`rules.guard_hits`), and when a guard occurs,
    parse, rules and the spliced edits. None when it is not an LLM request this project handles."""
    api = shapes.api_for_path(path)
    if method.upper() != "POST" or api is None:
        return None
    record = records.new(host, path, str(api))
    fwd = Forward(None, record, raw, headers or {}, settings, sticky)
    if settings.observe or settings.is_passthrough(host) or not literals_hit(settings.guards, raw):
        return fwd  # no rule can change these bytes: they go out as they came, `analyse` parses them
    if not _sparse(fwd) and not _parse(fwd):
        return fwd
    assert fwd.doc is not None and fwd.shape is not None
    try:
        fwd.session = session_id(fwd.headers, fwd.doc.value)
        fwd.outcome = apply(fwd.shape, settings.rules, fwd.session, sticky)
        if fwd.outcome.edits:
            fwd.forward = _edited(fwd.doc, fwd.outcome.edits)
            if not isinstance(fwd.doc, SparseDocument):  # else `analyse` edits the full value
                fwd.body = apply_edits(fwd.doc.value, fwd.outcome.edits)
            record["rewritten"] = True
    except Exception as e:  # a bug must never cost a request: forward the original bytes, say why once
        fwd.forward = fwd.body = None
        record["rewritten"] = False
        _internal_error(fwd, e)
    return fwd


def _edited(doc: Document | RawDocument | SparseDocument, edits: list[Edit]) -> bytes:
    """The body bytes with `edits` spliced in (through `Document` when a container is not compact)."""
    if isinstance(doc, RawDocument | SparseDocument):
        try:
            return doc.edited_bytes(edits)
        except ValueError:
            return Document.parse(doc.raw).edited(edits).encode("utf-8")
    return doc.edited(edits).encode("utf-8")


#: Top-level members decoded in full on the sparse path, per API (besides ``metadata``: the session id, and
#: what path and tools rules name); the list of messages (or items) is decoded only where a rule may read.
_SPARSE_FULL: dict[shapes.Api, tuple[str, ...]] = {
    shapes.Api.ANTHROPIC: ("system",),
    shapes.Api.ANTHROPIC_COUNT: ("system",),
    shapes.Api.OPENAI_CHAT: (),
    shapes.Api.OLLAMA_CHAT: (),
    shapes.Api.OPENAI_RESPONSES: ("instructions",),
    shapes.Api.OLLAMA_GENERATE: ("system", "prompt"),
}
_SPARSE_LISTS: dict[shapes.Api, str] = {
    shapes.Api.ANTHROPIC: "messages",
    shapes.Api.ANTHROPIC_COUNT: "messages",
    shapes.Api.OPENAI_CHAT: "messages",
    shapes.Api.OLLAMA_CHAT: "messages",
    shapes.Api.OPENAI_RESPONSES: "input",
}
_SYSTEMISH = frozenset({"system", "developer"})


@dataclass(frozen=True)
class SparsePlan:
    """What the sparse forwarding path decodes for a set of rules: top-level members in full (`full`), and
    of the list of messages (`items`: ``messages`` or ``input``) only the elements a rule may change: those
    of a system-like or unknown role (`by_role`: some rule edits system text), those holding one of
    `guards` (a literal one of which every change a message rule or a path rule into the list makes
    contains), and the first turn (`first_turn`: the move rule reads it)."""

    full: frozenset[str]
    items: str | None
    by_role: bool
    guards: tuple[bytes, ...]
    first_turn: bool


def sparse_plan(rules: Sequence[Rule], api: shapes.Api) -> SparsePlan | None:
    """The plan for `rules` on `api`; None when a rule may change a message without a literal to find it by."""
    items = _SPARSE_LISTS.get(api)
    full = {*_SPARSE_FULL[api], "metadata"}
    guards: list[str] = []
    by_role = first_turn = False
    for r in rules:
        if not r.enabled:
            continue
        first_turn |= r.action == MOVE
        for scope in r.scopes:
            if scope.kind == "system":
                by_role |= r.matcher is not None
            elif scope.kind == "messages" and r.matcher is not None:
                literals = text_guard(r)
                if literals is None:
                    return None
                guards += literals
            elif scope.kind == "tools":
                full.add("tools")
            elif scope.kind == "path" and isinstance(head := scope.pattern[0], str):
                if head != items:
                    full.add(head)
                    continue
                inside = [k for k in scope.pattern[1:] if isinstance(k, str)]
                if not inside or not guard_ok(inside[-1]):
                    return None  # e.g. ``messages[*]``: every element, no literal to find them by
                guards.append(inside[-1])
    full.discard(items or "")
    return SparsePlan(
        frozenset(full), items, by_role, tuple(g.encode() for g in dict.fromkeys(guards)), first_turn
    )


def _sparse(fwd: Forward) -> bool:
    """The forwarding path's fastest case: validate the whole body without building it, decode only the
    members and messages the enabled rules may change (`SparsePlan`), detect the shape on that. False
    (nothing set) when it does not apply or cannot prove something: the caller parses in full, which gives
    the exact answer (errors included)."""
    raw = fwd.raw
    api = shapes.api_for_path(fwd.record["path"])
    plan = None if api is None else fwd.settings.sparse_plans[api]
    if api is None or plan is None:
        return False
    top = SparseDocument.scan(raw)
    if top is None:
        return False
    value: dict[str, Any] = {}
    known: dict[int, Layout] = {}
    only: list[int] | None = None
    view = memoryview(raw)
    literals = (*plan.guards, *(_SYSTEMISH_LITERALS[api] if plan.by_role else ()))
    try:
        for i, key in enumerate(map(str, top.keys)):
            node, at, end = top.values[i], top.value_starts[i], top.ends[i]
            if key == plan.items and raw[at] == 0x5B:  # "[": the list, sparsely
                got = _items(raw, at, end, node, literals, plan)
                if got is None:
                    return False
                known[at], value[key], only = got
            elif key in plan.full or key == plan.items:
                value[key] = orjson.loads(view[at:end])
            else:
                value[key] = node  # not decoded: neither the shape nor a rule reads it
        shape = shapes.detect(fwd.record["path"], value, fwd.settings.slot_scopes, only)
    except (ValueError, RecursionError):  # a shape error, or orjson refusing what msgspec took
        return False
    if shape is None:
        return False
    fwd.doc, fwd.shape = SparseDocument(raw, value, top, known), shape
    return True


def _items(
    raw: bytes, start: int, end: int, node: Any, literals: tuple[bytes, ...], plan: SparsePlan
) -> tuple[Layout, list[Any], list[int]] | None:
    """The list of messages at `raw[start:end]` (`node`: its elements undecoded, or the whole of it) with
    the elements `plan` names decoded (the others undecoded), and their indices: those holding one of
    `literals` (a guard, or the role literal of a system-like role), and the first turn. None when it
    cannot say (an element not an object: the full parse says why; an escape that may spell a literal)."""
    layout = compact_array(start, node) if type(node) is list else layout_at(raw, start, end)
    assert layout is not None
    if not set(map(raw.__getitem__, layout.value_starts)) <= {0x7B}:
        return None  # not all objects ("{")
    if literals and may_hide_guard(raw):
        return None
    wanted = set()
    starts, ends = layout.starts, layout.ends
    for literal in literals:
        search = literal_finder(literal)
        found = search(raw, start, end)
        while found is not None:
            k = bisect_right(starts, found.start()) - 1
            wanted.add(k)
            found = search(raw, max(ends[k], found.start() + 1), end)
    items = list(layout.values)
    if plan.first_turn:  # up to the first assistant message (`rules.move_inline_system` reads that far)
        for k, item in enumerate(items):
            items[k] = decode(item)
            wanted.add(k)
            if items[k].get("role") == "assistant":
                break
    for k in wanted:
        if undecoded(items[k]):
            items[k] = decode(items[k])
    return layout, items, sorted(wanted)


#: The bytes every message of a system-position role holds (its role, as encoders write it), per API.
_SYSTEMISH_LITERALS = {api: (b'"system"', b'"developer"') for api in shapes.Api} | {
    shapes.Api.ANTHROPIC: (b'"system"',),
    shapes.Api.ANTHROPIC_COUNT: (b'"system"',),
}


def _parse(fwd: Forward) -> bool:
    """Parse `fwd.raw` into `fwd.doc` and `fwd.shape`; on a bad body set the record's error and the warning."""
    record = fwd.record
    try:
        fwd.doc = RawDocument.parse(fwd.raw) or Document.parse(fwd.raw)  # the fast case, else the exact one
        fwd.shape = shapes.detect(record["path"], fwd.doc.value, fwd.settings.slot_scopes)
    except (ValueError, RecursionError) as e:
        reason = f"{type(e).__name__}: {e}" if not isinstance(e, UnicodeDecodeError) else "body is not UTF-8"
        record["error"] = reason[:200]
        record["state"] = "left-alone"
        fwd.warning = f"left {record['path']} unchanged: {reason[:200]}"
        return False
    assert fwd.shape is not None
    return True


def _internal_error(fwd: Forward, e: Exception) -> None:
    record = fwd.record
    record["error"] = f"internal error ({type(e).__name__})"  # its message could quote prompt text
    if fwd.forward is None:
        record["state"] = "left-alone"
        fwd.warning = f"left {record['path']} unchanged: {record['error']}"
    else:
        fwd.warning = f"analysis of {record['path']} failed: {record['error']}"


def analyse(fwd: Forward) -> Result:
    """Everything that does not change the bytes: billing fields, session, fingerprint; for bodies the
    forwarding path did not parse, the parse (and in observe mode the rules) too."""
    record = fwd.record
    if isinstance(fwd.doc, SparseDocument) and fwd.warning is None:
        try:
            _complete(fwd)
        except (ValueError, RecursionError) as e:  # the bytes went on edited; only the analysis fails
            _internal_error(fwd, e)
            return Result(fwd.forward, record, warning=fwd.warning)
    if fwd.warning is None and fwd.doc is None and not _parse(fwd):
        return Result(None, record, warning=fwd.warning)
    if fwd.warning is not None:
        return Result(None, record, fwd.doc.value if fwd.doc else None, warning=fwd.warning)
    assert fwd.doc is not None and fwd.shape is not None
    try:
        return _normalise(fwd)
    except Exception as e:
        _internal_error(fwd, e)
        return Result(fwd.forward, record, fwd.doc.value, warning=fwd.warning)


def _complete(fwd: Forward) -> None:
    """After the sparse forwarding path: the full value, its shape and the body as forwarded."""
    try:
        value = orjson.loads(fwd.raw)
    except ValueError:  # deeper than orjson goes, an integer beyond 64 bits: the exact parser
        value = Document.parse(fwd.raw).value
    if not isinstance(value, dict):
        raise ValueError("top level is not an object")
    shape = shapes.detect(fwd.record["path"], value, fwd.settings.slot_scopes)
    if shape is None:
        raise ValueError("no shape")
    fwd.doc = RawDocument(fwd.raw, value, ())  # the value only: the bytes were edited already
    fwd.shape = shape
    if fwd.outcome is not None and fwd.outcome.edits:
        fwd.body = apply_edits(value, fwd.outcome.edits)


def _normalise(fwd: Forward) -> Result:
    doc, shape, settings, record = fwd.doc, fwd.shape, fwd.settings, fwd.record
    assert doc is not None and shape is not None
    if fwd.outcome is None:
        fwd.session = session_id(fwd.headers, doc.value)
    api = shape.api
    session = fwd.session
    record["changed"] = {}
    record["actions"] = {}
    if (bill := billing_fields(shape)) is not None:
        record["billing"] = bill
    passthrough = settings.is_passthrough(record["host"])
    outcome = fwd.outcome
    if outcome is None and settings.observe and not passthrough:
        outcome = apply(shape, settings.rules, session, fwd.sticky)  # observe: what the rules would do
    body = fwd.body if fwd.body is not None else doc.value
    if outcome and outcome.edits:
        fired = dict(sorted(outcome.fired.items()))
        action = {r.name: r.action for r in settings.rules}
        record["actions"] = {name: action.get(name, "?") for name in fired}
        record["would_change" if settings.observe else "changed"] = fired
    if passthrough:
        record["passthrough"] = True
    record["session"] = fingerprint_session(session) if session else None
    parts = shapes.parts(api, body)
    fp = fingerprint(parts)
    record.update(fp.as_record())
    edits = outcome.edits if outcome is not None else []
    return Result(fwd.forward, record, body, fp, parts, original_body=doc.value, edits=edits)


def fingerprint_session(session: str) -> str:
    """A short hash of the session id: groups requests without logging the id itself."""
    return hashlib.sha256(session.encode()).hexdigest()[:12]


def rules_summary(rules: Sequence[Rule]) -> str:
    on = [r.name for r in rules if r.enabled]
    return ",".join(on) if on else "none"
