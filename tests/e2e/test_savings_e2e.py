"""Savings are a counterfactual (issue 12, item 2): one session through real mitmdump, observing and
rewriting; the two reports give the same saving, within 10 %."""

from __future__ import annotations

from pathlib import Path

import pytest

from stableprefix.demo import replay
from stableprefix.report import readers

pytestmark = pytest.mark.e2e


def test_observe_and_active_savings_agree(tmp_path: Path) -> None:
    turns = replay.session_turns()
    observed = replay.run_arm(True, turns, tmp_path)
    active = replay.run_arm(False, turns, tmp_path)
    assert all(r["would_change"] == {"billing": 1} for r in observed)
    assert all(r["changed"] == {"billing": 1} for r in active)
    would = readers.read([tmp_path / "without.jsonl"], progress=False).totals()
    saved = readers.read([tmp_path / "with.jsonl"], progress=False).totals()
    assert saved.saved > 0 and would.would_save > 0
    assert abs(saved.saved - would.would_save) <= 0.1 * saved.saved, (saved.saved, would.would_save)
    # the characters behind them are the same comparison made from either side
    assert [r["saved_chars"] for r in observed] == [r["saved_chars"] for r in active]
    # and what observe mode says the rules would save is what the server lost without them: within the
    # conversation (measured: previous prompt minus reused) and at the second conversation's start
    lost = sum(would.client_tokens.values())
    assert would.cross_turns == 1 and would.client_turns == {"billing": 5}
    assert abs(would.would_save - lost) <= 0.1 * lost, (would.would_save, lost)
