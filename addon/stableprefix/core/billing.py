"""The grammar of Claude Code's attribution ("billing") header and the spans a rule may change in it.

Claude Code builds the line as
``x-anthropic-billing-header: cc_version=<semver>.<fp>; cc_entrypoint=<ep>;[ cch=<5hex>;][ cc_workload=<w>;]``
(every pair ends with ``;``; unknown ``key=value;`` pairs may follow). It is its own ``system`` block on the
wire; translators glue it to the next system text with nothing, ``\\n`` or ``\\n\\n`` in between.
All patterns here are anchored at the start of a text, so nothing later in a prompt can match.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

#: The literal every header holds: a body without it (and without escapes) needs no parse for this rule.
GUARD = "x-anthropic-billing-header"
_PAIRS = r"(?:[ \t]*[A-Za-z0-9_-]+=[^;\r\n]*;)*"
_LINE = r"[ \t]*" + GUARD + ":" + _PAIRS + r"[ \t]*(?:\r?\n)*"
#: A header line plus the line breaks that join it to the text after it; used with .match(text, pos),
#: so it is anchored where a header may start (the start of a text, or the end of a header before it).
HEADER = re.compile(_LINE)
_PAIR = re.compile(r"[ \t]*(?P<key>[A-Za-z0-9_-]+)=(?P<value>[^;\r\n]*);")
_VERSION = re.compile(r"\d+\.\d+\.\d+")

#: What `pin` writes: llama.cpp (b8906+) pins cch to the same bytes, so both layers agree.
PINNED_CCH = "fffff"
PINNED_SUFFIX = "fff"


@dataclass(frozen=True, slots=True)
class Header:
    """A billing header found at the start of a text."""

    end: int  # one past the header and its trailing line breaks
    fields: dict[str, str]
    volatile: tuple[
        tuple[int, int, str], ...
    ]  # (start, end, constant) of the cch value and the version suffix


def find(text: str, start: int = 0) -> Header | None:
    """The billing header that begins exactly at `start` (default: the start of `text`), if there is one."""
    m = HEADER.match(text, start)
    if m is None:
        return None
    fields: dict[str, str] = {}
    volatile: list[tuple[int, int, str]] = []
    pos = text.index(":", start, m.end()) + 1
    while (p := _PAIR.match(text, pos, m.end())) is not None:
        key, value = p.group("key"), p.group("value")
        fields.setdefault(key, value)
        if key == "cch":
            volatile.append((*p.span("value"), PINNED_CCH))
        elif key == "cc_version":
            v = _VERSION.match(value)
            if v and len(value) > v.end() + 1 and value[v.end()] == ".":  # 2.1.39.c39: pin "c39"
                volatile.append((p.start("value") + v.end() + 1, p.end("value"), PINNED_SUFFIX))
        pos = p.end()
    return Header(m.end(), fields, tuple(volatile))


def find_all(text: str) -> list[Header]:
    """The billing headers stacked at the start of `text` (usually one; translators may glue two)."""
    out: list[Header] = []
    while (h := find(text, out[-1].end if out else 0)) is not None and h.end > (out[-1].end if out else 0):
        out.append(h)
    return out


def is_whole(text: str) -> bool:
    """True when `text` is nothing but billing headers (a block Claude Code sends on its own)."""
    found = find_all(text)
    return bool(found) and not text[found[-1].end :].strip()
