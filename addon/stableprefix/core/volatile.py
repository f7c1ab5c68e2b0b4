"""The one table of what is known to change in a prompt between requests.

Each `Field` says where the item may appear, how it is found (a literal guard every occurrence contains,
and a pattern), the built-in rule that removes or pins it (its action, whether it is on by default), the
cause tag the divergence code names, and the remedy the report prints. The rules (`rules.builtin_rules`),
the fingerprint's cause tagging (`fingerprint`), the divergence causes (`streams`) and the report all read
this table at call time: a new volatile field is one new entry here, nothing else.

Structural causes (tools, params, thinking blocks, compaction) have no pattern and no text rule; they are
here for their remedy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Field:
    """A known volatile item, and what stableprefix does about it."""

    name: str  # the cause tag, and the built-in rule's name (``preset.part`` names group rules)
    remedy: str  # what to do when it cost a prefix (the report's "what to do")
    scopes: tuple[str, ...] = ()  # where the built-in rule looks (see rules.make_rule for the forms)
    guard: str | None = None  # a literal every occurrence contains: a fast test before any pattern
    detect: str | None = None  # Python regex that finds it in a text, for cause tagging (masked hashes)
    pattern: str | None = None  # RE2 pattern the built-in rule edits (None: a matcher of its own)
    action: str | None = None  # the built-in rule's action (None: a cause only, no rule)
    value: Any = None  # what `pin` writes: a string, or named group -> string
    enabled: bool = False  # on by default
    costs: bool = True  # False: the canonical form ignores the change, so no prefix is lost


FIELDS: tuple[Field, ...] = (
    Field(
        "billing",
        "run through stableprefix (rule billing, on by default); not for passthrough hosts",
        scopes=("system",),
        guard="x-anthropic-billing-header",
        detect=r"\A[ \t]*x-anthropic-billing-header:[^\r\n]*(?:\r?\n)*",
        action="drop",  # billing.py holds its grammar; stableprefix_billing=pin|off changes the action
        enabled=True,
    ),
    Field(
        "date",
        "--set stableprefix_enable=date (keeps the first date of a session)",
        scopes=("messages:user", "system"),
        guard="Today's date",
        detect=r"(?<=Today's date is )\d{4}-\d{2}-\d{2}|(?<=Today's date: )\d{4}-\d{2}-\d{2}",
        pattern=r"Today's date(?: is|:) (?P<date>\d{4}-\d{2}-\d{2})",
        action="sticky",
    ),
    Field(
        "git_status",
        "CLAUDE_CODE_DISABLE_GIT_INSTRUCTIONS=1, or --set stableprefix_enable=git_status",
        scopes=("system",),
        guard="gitStatus: This is the git status",
        detect=r"gitStatus: This is the git status at the start of the conversation\.[\s\S]*\Z",
        pattern=r"\n*gitStatus: This is the git status at the start of the conversation\.(?s:.*)\z",
        action="drop",
    ),
    Field(
        "reminder",
        "a <system-reminder> block in the history changed (CLAUDE.md, skills, MCP tools edited)",
        guard="<system-reminder>",
        detect=r"<system-reminder>[\s\S]*?</system-reminder>",
    ),
    Field(
        "env_block",
        "--set stableprefix_enable=env_block (pins the working directory and OS version lines)",
        scopes=("system",),
        # Claude Code 2.1.332 writes them as a list (" - Primary working directory: ..."), older ones bare
        pattern=r"(?m)^(?: - )?(?:(?:Primary )?[Ww]orking directory: (?P<cwd>.*)|OS Version: (?P<os>.*))$",
        action="pin",
        value={"cwd": "/workspace", "os": "unknown"},
    ),
    Field(
        "resume.hook",
        "--set stableprefix_enable=resume (resumed sessions)",
        scopes=("messages:user",),
        pattern=r"SessionStart:resume hook success:",
        action="pin",
        value="SessionStart:startup hook success:",
    ),
    Field(
        "resume.session_id",
        "--set stableprefix_enable=resume (resumed sessions)",
        scopes=("messages:user",),
        pattern=r"\n?<session-id>[^<]*</session-id>",
        action="drop",
    ),
    Field(
        "resume.last_active",
        "--set stableprefix_enable=resume (resumed sessions)",
        scopes=("messages:user",),
        pattern=r"\nLast active:[^\n]*",
        action="drop",
    ),
    Field(
        "tools",
        "the tool list changed (MCP server (dis)connected, permissions); "
        "--set stableprefix_enable=tool_order if only the order changes",
    ),
    Field("tool_order", "--set stableprefix_enable=tool_order", scopes=("tools",), action="sort"),
    Field(
        "user_id",
        "--set stableprefix_enable=user_id",
        scopes=("path:metadata.user_id",),
        action="pin",
        value="stableprefix",
    ),
    Field(
        "cache_markers_only",
        "only cache_control markers moved: servers do not render them, nothing to do",
        costs=False,
    ),
    Field(
        "cache_control",
        "--set stableprefix_enable=cache_control (for servers that reject the markers)",
        scopes=(
            "path:system[*].cache_control",
            "path:messages[*].content[*].cache_control",
            "path:tools[*].cache_control",
        ),
        action="drop",
    ),
    Field(
        "inline_system",
        "--set stableprefix_enable=inline_system (moves the first turn's inline system messages, Claude Code's "
        "environment block, to the end of the system prompt: a new conversation then shares it)",
        scopes=("system",),
        guard="system",  # the key every request it can change holds (a quoted role cannot be a guard)
        action="move",  # rules.move_inline_system: Anthropic Messages only
    ),
    Field(
        "thinking_dropped",
        "thinking blocks left the history: the template renders them only after the last user turn; "
        "on hybrid/SWA models raise llama-server --ctx-checkpoints",
    ),
    Field(
        "tool_result_cleared", "history compaction (/compact, micro-compact): by design, nothing to rewrite"
    ),
    Field("params", "model, thinking or effort changed (/model, /effort, ultrathink)"),
    Field(
        "system",
        "another system prompt than the nearest earlier conversation's (a subagent or another agent or "
        "project): by design; the part before it is shared",
        costs=False,
    ),
    Field(
        "conversation",
        "a new conversation: its messages differ from the nearest earlier one's; what precedes them is shared",
        costs=False,
    ),
    Field("unknown", "see 'diverged at' for the first differing place"),
)


def fields() -> tuple[Field, ...]:
    """The table as it is now (read at call time, so a test or a fork can extend it)."""
    return FIELDS


def rule_fields() -> list[Field]:
    """The fields that are built-in rules, in table order."""
    return [f for f in FIELDS if f.action is not None]


_DETECTORS: dict[int, tuple[tuple[str, str, re.Pattern[str]], ...]] = {}


def detectors() -> tuple[tuple[str, str, re.Pattern[str]], ...]:
    """(name, guard, compiled pattern) of every field found in text, most specific first."""
    key = id(FIELDS)
    found = _DETECTORS.get(key)
    if found is None:
        found = tuple((f.name, f.guard, re.compile(f.detect)) for f in FIELDS if f.detect and f.guard)
        _DETECTORS.clear()
        _DETECTORS[key] = found
    return found


def text_causes() -> tuple[str, ...]:
    """Causes explained by a masked hash, in the order they are tried."""
    return tuple(name for name, _, _ in detectors())


def remedy(cause: str) -> str:
    return next((f.remedy for f in FIELDS if f.name == cause), "-")


def rule_for_cause(cause: str) -> str | None:
    """The built-in rule (preset) that removes exactly this cause, if there is one."""
    return next((f.name.split(".")[0] for f in FIELDS if f.name == cause and f.action and f.detect), None)


def costs(cause: str) -> bool:
    """False for a change the canonical form ignores (nothing lost)."""
    return next((f.costs for f in FIELDS if f.name == cause), True)
