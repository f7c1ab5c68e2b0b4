"""Rules as data: what a rule may touch (scope), what it finds (matcher) and what it does (action).

A rule edits only its declared scope:

- ``system``: system-position text (Anthropic ``system`` and inline system messages, OpenAI system/developer
  messages, Responses ``instructions`` and system items, Ollama system prompts);
- ``messages:<role>``: message text of one role (``user``, ``assistant``, ``tool`` for tool results; ``*`` any);
- ``path:<pattern>``: the JSON values a path names, e.g. ``metadata.user_id`` or ``tools[*].cache_control``;
- ``tools``: the tools list (``sort`` by name, or ``drop`` tools whose name matches).

Actions: ``drop`` (the matched span, or the field/block), ``pin`` (a constant), ``mask`` (a placeholder),
``sticky`` (the first value seen in the same conversation), ``sort``. With named groups in the pattern, pin,
mask and sticky replace only the groups. Patterns run on RE2, a linear-time engine, so a user's regex cannot
backtrack catastrophically on a megabyte prompt (RE2 syntax: no backreferences or lookaround; ``\\z`` ends text).

`apply` turns rules plus a request `Shape` into `jsonedit` edits and counts of what fired (names only).
"""

from __future__ import annotations

import functools
import re
import threading
import tomllib
from collections import Counter
from collections import OrderedDict
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from dataclasses import replace
from pathlib import Path
from typing import Any
from typing import NamedTuple
from typing import Protocol

import re2

from stableprefix.core import billing
from stableprefix.core import volatile
from stableprefix.core.jsonedit import Delete
from stableprefix.core.jsonedit import Edit
from stableprefix.core.jsonedit import JsonPath
from stableprefix.core.jsonedit import Replace
from stableprefix.core.jsonedit import apply_edits
from stableprefix.core.shapes import Api
from stableprefix.core.shapes import Shape
from stableprefix.core.shapes import TextSlot
from stableprefix.core.shapes import tool_name

ACTIONS = ("drop", "pin", "mask", "sticky", "sort")  # what a rules file may use
MOVE = "move"  # a built-in action only: `move_inline_system`
ROLES = ("user", "assistant", "tool", "*")
BILLING_MODES = ("drop", "pin", "off")
DEFAULT_MASK = "[masked]"
MAX_PASSES = 4  # text rules run over a text until it stops changing (each rule is idempotent)
STICKY_CAP = 10_000  # remembered first values (session, rule, group); least recently used go first


class RuleError(ValueError):
    """A rule or rules file that cannot be used; the message names the file, the rule and the problem."""


@dataclass(frozen=True, slots=True)
class Target:
    start: int
    end: int
    group: str  # "" for the whole match


@dataclass(frozen=True, slots=True)
class Found:
    start: int
    end: int
    targets: tuple[Target, ...]  # the spans pin/mask/sticky replace


class Matcher(Protocol):
    def find(self, text: str, lead: bool) -> list[Found]: ...


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False


@dataclass(frozen=True)
class RegexMatcher:
    """Every non-empty match of an RE2 pattern; named groups become the targets."""

    pattern: str
    compiled: Any = field(repr=False, compare=False, default=None)
    #: Literals of which one occurs in every match (`required_literals`); None: none known.
    literals: tuple[str, ...] | None = field(repr=False, compare=False, default=None)

    @classmethod
    def compile(cls, pattern: str) -> RegexMatcher:
        try:
            compiled = re2.compile(pattern, _RE2_OPTIONS)
        except Exception as e:  # re2.error carries bytes
            raise ValueError(f"bad regex {pattern!r}: {_re2_message(e)}") from None
        return cls(pattern, compiled, required_literals(pattern))

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(self.compiled.groupindex)

    def find(self, text: str, lead: bool) -> list[Found]:
        if self.literals is not None and not any(lit in text for lit in self.literals):
            return []  # no match can lack them: skip the regex engine
        out = []
        groups = list(self.compiled.groupindex.items())  # google-re2 spans take group numbers only
        if text.isascii():  # byte offsets are character offsets: no conversions in the wrapper (3x faster)
            matches = list(self.compiled.finditer(text.encode("ascii")))
        else:
            try:
                matches = list(self.compiled.finditer(text))
            except (
                UnicodeEncodeError
            ):  # RE2 matches UTF-8; lone surrogates (valid JSON escapes) cannot be encoded
                matches = list(self.compiled.finditer(_SURROGATE.sub("\ufffd", text)))  # same offsets
        for m in matches:
            if m.end() == m.start():
                continue
            targets = tuple(Target(m.start(i), m.end(i), g) for g, i in groups if m.start(i) >= 0)
            out.append(Found(m.start(), m.end(), targets or (Target(m.start(), m.end(), ""),)))
        return out


_SURROGATE = re.compile("[\ud800-\udfff]")


def _re2_message(e: Exception) -> str:
    arg = e.args[0] if e.args else e
    return arg.decode(errors="replace") if isinstance(arg, bytes) else str(arg)


class BillingMatcher:
    """The attribution header(s) at the start of a system container's first text, or filling a whole block."""

    groups = ("cch", "suffix")

    def find(self, text: str, lead: bool) -> list[Found]:
        if billing.GUARD not in text:
            return []
        headers = billing.find_all(text)
        if not headers or not (lead or not text[headers[-1].end :].strip()):
            return []
        start = 0
        out = []
        for h in headers:
            targets = tuple(
                Target(s, e, "cch" if c == billing.PINNED_CCH else "suffix") for s, e, c in h.volatile
            )
            out.append(Found(start, h.end, targets))
            start = h.end
        return out


class Scope(NamedTuple):
    """A scope parsed once: ``system``, ``tools``, ``messages`` (``role``: user, assistant, tool or *) or
    ``path`` (``pattern``: the parsed ``a.b[*].c``); ``text`` as written."""

    kind: str
    text: str
    role: str = ""
    pattern: tuple[str | int | None, ...] = ()


def parse_scope(scope: str) -> Scope:
    """Parse one scope as a rules file writes it; ValueError naming it when it is not one."""
    if scope in ("system", "tools"):
        return Scope(scope, scope)
    if scope.startswith("messages:") and scope.split(":", 1)[1] in ROLES:
        return Scope("messages", scope, role=scope.split(":", 1)[1])
    if scope.startswith("path:"):
        return Scope("path", scope, pattern=parse_path_pattern(scope[5:]))
    raise ValueError(
        f"unknown scope {scope!r} (system, tools, messages:<{'|'.join(ROLES)}>, path:<a.b[*].c>)"
    )


def parse_scopes(scopes: Iterable[str | Scope]) -> tuple[Scope, ...]:
    return tuple(s if isinstance(s, Scope) else parse_scope(s) for s in scopes)


@dataclass(frozen=True)
class Rule:
    """A named, switchable edit of one part of a request."""

    name: str
    scopes: tuple[Scope, ...]
    action: str
    matcher: Matcher | None = None
    value: Any = None  # str, or a table group -> str, or (path rules) any JSON value
    enabled: bool = True
    #: Literals of which at least one occurs in the raw body whenever the rule can change it (a cheap
    #: ``bytes.find`` before any parse); None: the rule has no such literal and every body is parsed.
    #: Left None, it is derived from the matcher and scopes (`derive_guard`).
    guard: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.guard is None:
            object.__setattr__(self, "guard", derive_guard(self))

    @property
    def preset(self) -> str:
        return self.name.split(".", 1)[0]


# --- guards: literals a body must contain for a rule to fire ------------------------------------------

#: Characters a guard may hold: printable ASCII that JSON writes as is (no quote, backslash or slash, which
#: encoders may escape). Any of them can still be written as a ``\u00XX`` escape: `may_hide_guard` checks.
_GUARD_CHARS = frozenset(chr(c) for c in range(0x20, 0x7F)) - {'"', "\\", "/"}
_MIN_GUARD = 3


def derive_guard(rule: Rule) -> tuple[str, ...] | None:
    """The guard of a rule: its matcher's required literal(s), else the JSON key its path or tools scope
    names; None when neither exists (a text rule whose regex has no required literal)."""
    if isinstance(rule.matcher, BillingMatcher):
        return (billing.GUARD,)
    if isinstance(rule.matcher, RegexMatcher):
        literals = required_literals(rule.matcher.pattern)
        if literals is not None:
            return literals
    keys: list[str] = []
    for scope in rule.scopes:
        if scope.kind == "tools":
            keys.append("tools")
        elif scope.kind == "path":
            named = [k for k in scope.pattern if isinstance(k, str)]
            if not named or not guard_ok(named[-1]):
                return None
            keys.append(named[-1])
        else:
            return None
    return tuple(dict.fromkeys(keys)) or None


def guard_ok(literal: str) -> bool:
    """Whether `literal` can serve as a guard (long enough, only characters JSON writes as they are)."""
    return len(literal) >= _MIN_GUARD and all(c in _GUARD_CHARS for c in literal)


def required_literals(pattern: str) -> tuple[str, ...] | None:
    """Literals of which at least one occurs in every match of an RE2 `pattern`; None if none is known.

    Read with Python's own regex parser, which reads RE2's common syntax the same way; patterns it reads
    differently (POSIX classes ``[[:alpha:]]``), or cannot read (``\\pL``, ``\\Q``), and case-insensitive
    patterns get None.
    """
    if "[:" in pattern:
        return None
    try:
        parsed = re._parser.parse(pattern.replace("\\z", "\\Z"))  # type: ignore[attr-defined]
    except (re.error, OverflowError, RecursionError, ValueError):
        return None
    if parsed.state.flags & re.IGNORECASE:
        return None
    return _required(list(parsed))


def _required(items: list[Any]) -> tuple[str, ...] | None:
    """The most selective required alternatives of a parsed sequence (longest shortest literal)."""
    from re import _constants as sre  # type: ignore[attr-defined]

    best: tuple[str, ...] | None = None
    run: list[str] = []

    def consider(alts: tuple[str, ...] | None) -> None:
        nonlocal best
        if alts and (best is None or min(map(len, alts)) > min(map(len, best))):
            best = alts

    def flush() -> None:
        literal = "".join(run)
        run.clear()
        if guard_ok(literal):
            consider((literal,))

    for op, av in items:
        if op is sre.LITERAL and chr(av) in _GUARD_CHARS:
            run.append(chr(av))
            continue
        flush()
        if op is sre.SUBPATTERN:
            _group, add_flags, _del_flags, sub = av
            if not add_flags & re.IGNORECASE:
                consider(_required(list(sub)))
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT, sre.POSSESSIVE_REPEAT) and av[0] >= 1:
            consider(_required(list(av[2])))
        elif op is sre.ATOMIC_GROUP:
            consider(_required(list(av)))
        elif op is sre.BRANCH:
            alts: list[str] = []
            for branch in av[1]:
                got = _required(list(branch))
                if got is None:
                    break
                alts.extend(got)
            else:
                consider(tuple(dict.fromkeys(alts)))
    flush()
    return best


_HIDING_ESCAPE = re2.compile(rb"\\u00[2-7]", _RE2_OPTIONS)


def may_hide_guard(raw: bytes) -> bool:
    """Whether `raw` holds a ``\\u00XX`` escape of a printable ASCII character (``\\u0020``-``\\u007f``),
    which could spell a guard without its literal bytes. JavaScript's and Python's encoders never write
    such escapes. One RE2 scan (a tenth of ``bytes.find``'s time for this needle: backslashes are common)."""
    return _HIDING_ESCAPE.search(raw) is not None


def text_guard(rule: Rule) -> tuple[str, ...] | None:
    """Literals of which one occurs in a text whenever the text rule `rule` can change it (its matcher's
    own: the billing header, a regex's required literals); None when there is none. Unlike `Rule.guard`
    (which a caller may set to any literal of the body), this holds text by text, so it may pick the
    messages to read."""
    if isinstance(rule.matcher, BillingMatcher):
        return (billing.GUARD,)
    if isinstance(rule.matcher, RegexMatcher):
        return rule.matcher.literals
    return None


def guard_hits(rules: Iterable[Rule], raw: bytes) -> bool:
    """Whether any enabled rule could change `raw`: a guard occurs, a rule has none, or an escape may hide one."""
    return literals_hit(guard_literals(rules), raw)


def guard_literals(rules: Iterable[Rule]) -> tuple[bytes, ...] | None:
    """The guards of the enabled rules, as bytes, once each; None when a rule has none (every body may change)."""
    guards: list[bytes] = []
    for r in rules:
        if not r.enabled:
            continue
        if r.guard is None:
            return None
        guards.extend(g.encode() for g in r.guard)
    return tuple(dict.fromkeys(guards))


def literals_hit(literals: tuple[bytes, ...] | None, raw: bytes) -> bool:
    """`guard_hits` for the `guard_literals` of a set of rules."""
    if literals is None:
        return True
    if not literals:
        return False
    return any(literal_finder(g)(raw) is not None for g in literals) or may_hide_guard(raw)


@functools.cache
def literal_finder(literal: bytes) -> Any:
    """The ``search(raw, pos, endpos)`` of an RE2 pattern for `literal`: RE2 skips ahead with ``memchr``,
    ten times faster than ``bytes.find`` on JSON bodies."""
    return re2.compile(re2.escape(literal), _RE2_OPTIONS).search


# --- built-in rules -----------------------------------------------------------------------------------


def builtin_rules(billing_mode: str = "drop") -> list[Rule]:
    """Every built-in rule, from the volatile-field table. Only billing is on by default; the others
    change what the model sees. `billing_mode`: drop, pin (fixed cch and version suffix) or off."""
    out = []
    for f in volatile.rule_fields():
        if f.name == "billing":
            if billing_mode == "off":
                continue
            pins = (
                {"cch": billing.PINNED_CCH, "suffix": billing.PINNED_SUFFIX}
                if billing_mode == "pin"
                else None
            )
            out.append(Rule(f.name, parse_scopes(f.scopes), billing_mode, BillingMatcher(), pins, f.enabled,
                            guard=(f.guard,) if f.guard else None))  # fmt: skip
            continue
        matcher = RegexMatcher.compile(f.pattern) if f.pattern else None
        guard = (f.guard,) if f.guard else None  # the table's literal; else derived from the pattern
        out.append(Rule(f.name, parse_scopes(f.scopes), str(f.action), matcher, f.value, f.enabled, guard))
    return out


def builtin_names() -> tuple[str, ...]:
    """The built-in presets (``resume`` covers ``resume.*``), in table order."""
    return tuple(dict.fromkeys(r.preset for r in builtin_rules()))


def switch(rules: Iterable[Rule], on: Iterable[str] = (), off: Iterable[str] = ()) -> list[Rule]:
    """Rules with the named rules or presets (``resume`` covers ``resume.*``) switched on or off."""
    on_set, off_set = set(on), set(off)
    out = []
    for r in rules:
        names = {r.name, r.preset}
        if names & off_set:
            r = replace(r, enabled=False)
        elif names & on_set:
            r = replace(r, enabled=True)
        out.append(r)
    return out


# --- building rules from data (TOML) -------------------------------------------------------------------


def make_rule(spec: Mapping[str, Any]) -> Rule:
    """A rule from a table of a rules file. Raises ValueError naming the problem."""
    known = {"name", "scope", "match", "action", "value", "enabled", "description"}
    if extra := set(spec) - known:
        raise ValueError(f"unknown key(s) {sorted(extra)}; allowed: {sorted(known)}")
    name = spec.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError("name must be a string of letters, digits, '_', '.', '-'")
    scope = spec.get("scope")
    scopes = (scope,) if isinstance(scope, str) else scope
    if not isinstance(scopes, list | tuple) or not scopes or not all(isinstance(s, str) for s in scopes):
        raise ValueError("scope must be a string or a non-empty list of strings")
    parsed = parse_scopes(scopes)
    action = spec.get("action")
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
    enabled = spec.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ValueError("enabled must be true or false")
    if not isinstance(spec.get("description", ""), str):  # a note for the file's reader, not kept
        raise ValueError("description must be a string")
    text_scopes = [s for s in scopes if s == "system" or s.startswith("messages:")]
    pattern = spec.get("match")
    if pattern is not None and not isinstance(pattern, str):
        raise ValueError("match must be a string (an RE2 regular expression)")
    matcher = RegexMatcher.compile(pattern) if pattern is not None else None
    if action == "sort" and scopes != ("tools",) and list(scopes) != ["tools"]:
        raise ValueError("action sort applies to scope 'tools' only")
    if "tools" in scopes and action not in ("sort", "drop"):
        raise ValueError("scope 'tools' takes action sort or drop")
    if "tools" in scopes and action == "drop" and matcher is None:
        raise ValueError("dropping tools needs 'match' (a regex on the tool name)")
    if text_scopes and matcher is None:
        raise ValueError(f"scope {text_scopes[0]!r} needs 'match' (a regex)")
    value = spec.get("value")
    if action in ("pin", "mask", "sticky") and matcher is not None:
        groups = set(getattr(matcher, "groups", ()))
        if isinstance(value, dict):
            if missing := groups - set(value):
                raise ValueError(f"value has no entry for group(s) {sorted(missing)}")
            if bad := [k for k, v in value.items() if not isinstance(v, str)]:
                raise ValueError(f"value for group(s) {bad} must be a string")
        elif value is not None and not isinstance(value, str):
            raise ValueError("value must be a string or a table of strings per named group")
    if action == "pin" and value is None:
        raise ValueError("action pin needs a 'value'")
    return Rule(name, parsed, action, matcher, value, enabled)


@dataclass(frozen=True)
class RuleSet:
    """User rules and built-in switches read from a rules file."""

    rules: tuple[Rule, ...] = ()
    on: frozenset[str] = frozenset()
    off: frozenset[str] = frozenset()


def load_rules_file(path: str | Path) -> RuleSet:
    """Read a TOML rules file: ``[builtins]`` switches and ``[[rule]]`` tables. Raises RuleError."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise RuleError(f"{path}: cannot read: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RuleError(f"{path}: not valid TOML: {e}") from None
    if extra := set(data) - {"builtins", "rule"}:
        raise RuleError(f"{path}: unknown table(s) {sorted(extra)}; expected [builtins] and [[rule]]")
    on: set[str] = set()
    off: set[str] = set()
    builtins = data.get("builtins", {})
    if not isinstance(builtins, dict):
        raise RuleError(f"{path}: [builtins] must be a table of name = true|false")
    for name, flag in builtins.items():
        if name not in builtin_names() and name not in {r.name for r in builtin_rules()}:
            raise RuleError(
                f"{path}: [builtins] {name!r}: unknown built-in; one of {', '.join(builtin_names())}"
            )
        if not isinstance(flag, bool):
            raise RuleError(f"{path}: [builtins] {name!r}: must be true or false")
        (on if flag else off).add(name)
    tables = data.get("rule", [])
    if not isinstance(tables, list):
        raise RuleError(f"{path}: 'rule' must be an array of tables ([[rule]])")
    rules: list[Rule] = []
    seen = set(builtin_names()) | {r.name for r in builtin_rules()}
    for i, table in enumerate(tables):
        label = (
            table.get("name")
            if isinstance(table, dict) and isinstance(table.get("name"), str)
            else f"#{i + 1}"
        )
        try:
            if not isinstance(table, dict):
                raise ValueError("must be a table")
            rule = make_rule(table)
        except ValueError as e:
            raise RuleError(f"{path}: rule {label!r}: {e}") from None
        if rule.name in seen:
            raise RuleError(f"{path}: rule {label!r}: name already used (by a built-in or an earlier rule)")
        seen.add(rule.name)
        rules.append(rule)
    return RuleSet(tuple(rules), frozenset(on), frozenset(off))


# --- JSON path patterns ------------------------------------------------------------------------------

_PATH_TOKEN = re.compile(r"\.?([A-Za-z0-9_$-]+)|\[(\*|\d+)\]")


def parse_path_pattern(pattern: str) -> tuple[str | int | None, ...]:
    """``a.b[*].c[0]`` -> ("a", "b", None, "c", 0); None is any array index. Raises ValueError."""
    tokens: list[str | int | None] = []
    pos = 0
    while pos < len(pattern):
        m = _PATH_TOKEN.match(pattern, pos)
        if m is None or (pos == 0 and pattern.startswith(".")):
            raise ValueError(f"bad path {pattern!r} at {pos}")
        if m.group(1) is not None:
            tokens.append(m.group(1))
        else:
            tokens.append(None if m.group(2) == "*" else int(m.group(2)))
        pos = m.end()
    if not tokens:
        raise ValueError("empty path")
    return tuple(tokens)


def expand_path(value: Any, pattern: Sequence[str | int | None], base: JsonPath = ()) -> Iterator[JsonPath]:
    """The concrete paths in `value` that a parsed path pattern names."""
    if not pattern:
        yield base
        return
    head, rest = pattern[0], pattern[1:]
    if isinstance(head, str):
        if isinstance(value, dict) and head in value:
            yield from expand_path(value[head], rest, (*base, head))
    elif isinstance(value, list):
        indices = range(len(value)) if head is None else [head] if 0 <= head < len(value) else []
        for i in indices:
            v = value[i]
            if rest and not isinstance(v, dict | list):  # nothing below a scalar (or an undecoded value)
                continue
            yield from expand_path(v, rest, (*base, i))


# --- applying rules -------------------------------------------------------------------------------------


class StickyMemory:
    """First values seen per (conversation, rule, group), bounded LRU; safe to share between flows."""

    def __init__(self, cap: int = STICKY_CAP) -> None:
        self.cap = cap
        self._values: OrderedDict[tuple[str, str, str], Any] = OrderedDict()
        self._lock = threading.Lock()

    def first(self, key: tuple[str, str, str], value: Any) -> Any:
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]
            self._values[key] = value
            if len(self._values) > self.cap:
                self._values.popitem(last=False)
            return value

    def clear(self) -> None:
        with self._lock:
            self._values.clear()

    def __len__(self) -> int:
        return len(self._values)


@dataclass
class Outcome:
    edits: list[Edit] = field(default_factory=list)
    fired: Counter[str] = field(default_factory=Counter)


def slot_scopes(rules: Iterable[Rule]) -> frozenset[str] | None:
    """The text-slot scopes the enabled rules read ("system", roles), so shapes need not list the rest;
    None when a rule reads every role."""
    out: set[str] = set()
    for r in rules:
        if not r.enabled or r.matcher is None or _has(r, "tools"):
            continue
        for s in r.scopes:
            if s.kind == "messages" and s.role == "*":
                return None
            if s.kind in ("system", "messages"):
                out.add(s.role or s.kind)
    return frozenset(out)


def _has(rule: Rule, kind: str) -> bool:
    return any(s.kind == kind for s in rule.scopes)


def _in_scope(rule: Rule, slot: TextSlot) -> bool:
    for s in rule.scopes:
        if s.kind == "system" and slot.scope == "system":
            return True
        if s.kind == "messages" and slot.scope != "system" and s.role in ("*", slot.scope):
            return True
    return False


def _replacement(rule: Rule, group: str, old: Any, session: str, sticky: StickyMemory) -> Any:
    if rule.action == "sticky":
        return sticky.first((session, rule.name, group), old)
    value = rule.value
    if isinstance(value, dict):
        value = value.get(group, value.get("", DEFAULT_MASK))
    if value is None:
        value = DEFAULT_MASK
    return value


def _edit_text(rule: Rule, text: str, lead: bool, session: str, sticky: StickyMemory) -> tuple[str, int]:
    """`text` after one rule, and how many matches changed it."""
    assert rule.matcher is not None
    pieces: list[str] = []
    pos = changed = 0
    for found in rule.matcher.find(text, lead):
        if rule.action == "drop":
            spans = [(found.start, found.end, "")]
        else:
            spans = [
                (t.start, t.end, _replacement(rule, t.group, text[t.start : t.end], session, sticky))
                for t in found.targets
            ]
        before = len(pieces)
        for start, end, new in spans:
            if start < pos:
                continue
            if new != text[start:end]:
                pieces.append(text[pos:start])
                pieces.append(new)
                pos = end
        changed += len(pieces) > before
    if not changed:
        return text, 0
    pieces.append(text[pos:])
    return "".join(pieces), changed


def apply(
    shape: Shape, rules: Sequence[Rule], session: str = "", sticky: StickyMemory | None = None
) -> Outcome:
    """The edits the enabled `rules` make to a request, and how often each rule fired."""
    sticky = sticky if sticky is not None else StickyMemory()
    out = Outcome()
    active = [r for r in rules if r.enabled]
    text_rules = [r for r in active if r.matcher is not None and r.action != "sort" and not _has(r, "tools")]
    leads: dict[JsonPath, bool] = {}  # per container: every text before this one is being removed
    for slot in shape.slots:
        container = (slot.block or slot.path)[:-1]
        lead = slot.lead or leads.get(container, False)
        rules_here = [r for r in text_rules if _in_scope(r, slot)]
        text = slot.text
        for _ in range(MAX_PASSES):  # until no rule changes the text: one rule may expose work for another
            before = text
            for rule in rules_here:
                text, n = _edit_text(rule, text, lead, session, sticky)
                out.fired[rule.name] += n
            if text == before:
                break
        removed = slot.scope == "system" and slot.block is not None and not text.strip() and text != slot.text
        leads[container] = lead and removed
        if text == slot.text:
            continue
        out.edits.append(
            Delete(slot.block) if removed and slot.block is not None else Replace(slot.path, text)
        )
    # Path rules, then tools rules, each on the body as the rules before it left it; their edits are mapped
    # back to the original body's indices (earlier rules may have deleted array elements).
    edited: tuple[int, Any] = (0, shape.body)  # the body as the first n edits leave it
    for kind in ("path", "tools"):
        for rule in active:
            for scope in rule.scopes:
                if scope.kind == kind:
                    if edited[0] != len(out.edits):
                        edited = (len(out.edits), apply_edits(shape.body, out.edits))
                    body = edited[1]
                    step = Outcome()
                    if kind == "tools":
                        _apply_tools_rule(rule, body, step)
                    else:
                        _apply_path_rule(rule, scope.pattern, body, session, sticky, step)
                    out.edits += [_in_original(e, out.edits) for e in step.edits]
                    out.fired.update(step.fired)
    # Moves last: they carry the text as the rules above left it (their edits inside a moved message or the
    # system prompt fall under the move's own edits, which jsonedit keeps instead).
    for rule in active:
        if rule.action == MOVE and shape.api in (Api.ANTHROPIC, Api.ANTHROPIC_COUNT):
            body = apply_edits(shape.body, out.edits) if out.edits else shape.body
            moved = move_inline_system(body)
            if moved:
                out.edits += [_in_original(e, out.edits) for e in moved]
                out.fired[rule.name] += sum(isinstance(e, Delete) for e in moved)
    out.fired = Counter({k: v for k, v in out.fired.items() if v})
    return out


def _original_path(path: JsonPath, edits: Sequence[Edit]) -> JsonPath:
    """`path` in the edited body, expressed in the original body's indices (undoing array deletions)."""
    deleted = {e.path for e in edits if isinstance(e, Delete)}
    if not deleted:
        return path
    out: list[Any] = []
    for key in path:
        if isinstance(key, int):
            prefix = tuple(out)
            gone = sorted(
                d[-1]
                for d in deleted
                if len(d) == len(prefix) + 1 and d[:-1] == prefix and isinstance(d[-1], int)
            )
            for g in gone:
                if g <= key:
                    key += 1
        out.append(key)
    return tuple(out)


def _in_original(edit: Edit, edits: Sequence[Edit]) -> Edit:
    path = _original_path(edit.path, edits)
    return Replace(path, edit.value) if isinstance(edit, Replace) else Delete(path)


def _apply_path_rule(
    rule: Rule,
    pattern: Sequence[str | int | None],
    body: Any,
    session: str,
    sticky: StickyMemory,
    out: Outcome,
) -> None:
    for path in list(expand_path(body, pattern)):
        old = body
        for k in path:
            old = old[k]
        if rule.action == "drop" and rule.matcher is None:
            out.edits.append(Delete(path))
            out.fired[rule.name] += 1
            continue
        if rule.matcher is not None:
            if not isinstance(old, str):
                continue
            new, n = _edit_text(rule, old, False, session, sticky)
        else:
            new = _replacement(rule, "", old, session, sticky)
            n = int(new != old)
        if n:
            out.edits.append(Replace(path, new))
            out.fired[rule.name] += n


def tool_sort_key(tool: Any) -> tuple[bool, str]:
    """Claude Code's own order: built-in tools by name, then MCP tools (``mcp__*``) by name."""
    name = tool_name(tool)
    return (name.startswith("mcp__"), name)


def _apply_tools_rule(rule: Rule, body: Any, out: Outcome) -> None:
    tools = body.get("tools")
    if not isinstance(tools, list):
        return
    if rule.action == "sort":
        ordered = sorted(tools, key=tool_sort_key)
        if ordered != tools:
            out.edits.append(Replace(("tools",), ordered))
            out.fired[rule.name] += 1
    elif rule.action == "drop" and rule.matcher is not None:
        for i, t in enumerate(tools):
            if rule.matcher.find(tool_name(t), False):
                out.edits.append(Delete(("tools", i)))
                out.fired[rule.name] += 1


# --- moving the first turn's inline system messages (action "move") ----------------------------------------


def _plain_texts(content: Any) -> list[str] | None:
    """The texts of a message content made of text only (a string, or text blocks); None otherwise."""
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        return None
    texts = []
    for block in content:
        if (
            not isinstance(block, dict)
            or block.get("type") != "text"
            or not isinstance(block.get("text"), str)
        ):
            return None
        texts.append(block["text"])
    return texts


def move_inline_system(body: Any) -> list[Edit]:
    """Edits that move the Anthropic request's inline ``role: "system"`` messages of the first turn (those
    before the first assistant message) to the end of ``system``, one text block per text, in order.

    Every later turn of a conversation repeats the first turn's messages, so each gets the same rewrite and
    the conversation stays append-only; a second application finds nothing to move. The texts are kept
    byte-identical (their ``cache_control`` markers, which no local server renders, are not carried); a
    string ``system`` becomes a one-block list in front of them. Nothing is moved (no edits) when the body
    is not that shape: no ``system`` string or list, a moved message holding anything but text, or no user
    message left first.
    """
    if not isinstance(body, dict):
        return []
    messages, system = body.get("messages"), body.get("system")
    if not isinstance(messages, list) or not isinstance(system, str | list):
        return []
    moved: list[int] = []
    blocks: list[dict[str, str]] = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") == "assistant":
            break
        if m.get("role") != "system":
            continue
        texts = _plain_texts(m.get("content"))
        if texts is None:
            return []
        moved.append(k)
        blocks += [{"type": "text", "text": t} for t in texts if t]
    rest = [m for k, m in enumerate(messages) if k not in moved]
    if not moved or not rest or not isinstance(rest[0], dict) or rest[0].get("role") != "user":
        return []
    head: list[Any] = (
        list(system) if isinstance(system, list) else [{"type": "text", "text": system}] * bool(system)
    )
    edits: list[Edit] = [Delete(("messages", k)) for k in moved]
    if blocks:
        edits.insert(0, Replace(("system",), head + blocks))
    return edits
