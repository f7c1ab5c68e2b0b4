"""The addon's options parsed into `pipeline.Settings` by pure functions, once per change.

`configure()` and the rules-file reload both call `settings_from`; a bad value raises `ValueError` naming
the option and the value, which the addon turns into mitmproxy's `OptionsError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stableprefix.core import pipeline
from stableprefix.core import rules as rulelib

RULE_OPTIONS = frozenset(
    {"stableprefix_billing", "stableprefix_rules", "stableprefix_enable", "stableprefix_disable"}
)
SETTINGS_OPTIONS = RULE_OPTIONS | {"stableprefix_passthrough", "stableprefix_observe"}


def passthrough_hosts(hosts: Sequence[str]) -> tuple[str, ...]:
    """The passthrough host globs, checked: a host name or glob each, no scheme, port or path."""
    for host in hosts:
        if not host or any(c in host for c in " /:@") or host != host.strip():
            raise ValueError(
                f"stableprefix_passthrough: {host!r} is not a host name or glob (e.g. *.anthropic.com)"
            )
    return tuple(hosts)


def build_rules(
    billing: str, rules_file: str | None, enable: Sequence[str], disable: Sequence[str]
) -> list[rulelib.Rule]:
    """The rule list the options describe: built-ins, the rules file's switches and rules, then the
    enable/disable options. Raises ValueError (RuleError) naming what is wrong."""
    if billing not in rulelib.BILLING_MODES:
        raise ValueError(
            f"stableprefix_billing: {billing!r} is not one of {', '.join(rulelib.BILLING_MODES)}"
        )
    rules = rulelib.builtin_rules(billing)
    user = rulelib.load_rules_file(rules_file) if rules_file else rulelib.RuleSet()
    rules = rulelib.switch(rules, user.on, user.off) + list(user.rules)
    known = {r.name for r in rules} | {r.preset for r in rules} | {"billing"}
    for option, names in (("stableprefix_enable", enable), ("stableprefix_disable", disable)):
        for name in names:
            if name not in known:
                raise ValueError(f"{option}: unknown rule {name!r}; known: {', '.join(sorted(known))}")
    return rulelib.switch(rules, enable, disable)


def settings_from(opts: Any) -> pipeline.Settings:
    """Settings from an object with the ``stableprefix_*`` option attributes (mitmproxy's ``ctx.options``)."""
    rules = build_rules(
        opts.stableprefix_billing,
        opts.stableprefix_rules,
        opts.stableprefix_enable,
        opts.stableprefix_disable,
    )
    return pipeline.Settings(
        rules=tuple(rules),
        observe=bool(opts.stableprefix_observe),
        passthrough=passthrough_hosts(opts.stableprefix_passthrough),
    )
