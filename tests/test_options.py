"""Options parsed into settings, without mitmproxy: the values, and errors that name option and value."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from stableprefix.mitm import options


def opts(**kw: Any) -> SimpleNamespace:
    base: dict[str, Any] = dict(
        stableprefix_billing="drop", stableprefix_rules=None, stableprefix_enable=[], stableprefix_disable=[],
        stableprefix_observe=False, stableprefix_passthrough=["api.anthropic.com"],
    )  # fmt: skip
    return SimpleNamespace(**{**base, **kw})


def test_defaults() -> None:
    s = options.settings_from(opts())
    assert [r.name for r in s.rules if r.enabled] == ["billing"]
    assert (s.observe, s.passthrough) == (False, ("api.anthropic.com",))


def test_enable_disable_and_pin() -> None:
    s = options.settings_from(opts(stableprefix_enable=["date", "resume"], stableprefix_billing="pin"))
    on = {r.name: r.action for r in s.rules if r.enabled}
    assert on == {"billing": "pin", "date": "sticky", "resume.hook": "pin", "resume.session_id": "drop",
                  "resume.last_active": "drop"}  # fmt: skip
    s = options.settings_from(opts(stableprefix_billing="off", stableprefix_observe=True))
    assert [r.name for r in s.rules if r.enabled] == [] and s.observe is True


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"stableprefix_billing": "remove"}, "stableprefix_billing: 'remove' is not one of drop, pin, off"),
        ({"stableprefix_enable": ["nope"]}, "stableprefix_enable: unknown rule 'nope'"),
        ({"stableprefix_disable": ["nope"]}, "stableprefix_disable: unknown rule 'nope'"),
        ({"stableprefix_passthrough": ["https://x"]}, "stableprefix_passthrough: 'https://x' is not a host"),
    ],
)
def test_errors_name_the_option_and_value(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")):
        options.settings_from(opts(**kw))


def test_rules_file_rules_join_and_switch(tmp_path: Path) -> None:
    f = tmp_path / "rules.toml"
    f.write_text('[builtins]\ndate = true\n\n[[rule]]\nname = "ticket"\nscope = "system"\n'
                 'match = "TICKET-\\\\d+"\naction = "drop"\n', encoding="utf-8")  # fmt: skip
    s = options.settings_from(opts(stableprefix_rules=str(f), stableprefix_disable=["billing"]))
    assert [r.name for r in s.rules if r.enabled] == ["date", "ticket"]
    f.write_text("[[rule]]\nname = 1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=str(f)):
        options.settings_from(opts(stableprefix_rules=str(f)))
