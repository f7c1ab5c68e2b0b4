"""Scenarios 1 and 3 of scripts/bench_llama.py in small form, against a real llama-server behind real mitmdump.

Needs the server built by scripts/install_llama_server.sh (or LLAMA_SERVER/LLAMA_MODEL). Outside CI the
test is skipped when it is missing; with CI=true it fails. Only token counts are asserted.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support import llama as ls

pytestmark = [pytest.mark.e2e, pytest.mark.llama, pytest.mark.timeout(600)]

SIZES = ls.TEST
MARGIN = SIZES.margin


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ls.Runner]:
    found = ls.locate()
    if found is None:
        msg = (
            f"llama-server not found (LLAMA_SERVER/LLAMA_MODEL unset and nothing in {ls.cache_root()}); "
            "build it with: bash scripts/install_llama_server.sh"
        )
        if in_ci():
            pytest.fail(msg + " (CI=true: the installer must run before pytest)", pytrace=False)
        pytest.skip(msg)
    server, model = found
    # Every ArmRun stops its llama-server and mitmdump by pid when its `with` block ends.
    yield ls.Runner(server, model, tmp_path_factory.mktemp("llama"), SIZES)


def describe(res: ls.Result) -> str:
    return "\n".join(
        f"{label:12} addon reused={a.usage.reused} processed={a.usage.processed} new={a.new} | "
        + (f"bare reused={b.usage.reused} processed={b.usage.processed}" if b else "")
        for label, a, b in ls.iter_rows(res)
    )


def test_router_path_turns_reprocess_only_new_tokens(runner: ls.Runner) -> None:
    res = ls.scenario_router(runner)
    info = describe(res)
    addon, bare = res.arm(True), res.arm(False)
    assert len(addon.steps) == len(bare.steps) == SIZES.turns
    for step in addon.steps + bare.steps:
        assert step.metrics_processed == step.usage.processed, info  # /metrics agrees with the response
    for step in addon.steps[1:]:
        assert step.new is not None and step.new > 0, info
        assert step.usage.processed <= step.new + MARGIN, f"addon {step.label} reprocessed the prefix\n{info}"
        assert step.usage.reused >= addon.steps[0].usage.prompt - MARGIN, info
    for step in bare.steps[1:]:
        # cch sits in the first line: only the tokens before it can be reused.
        assert step.usage.reused < 100, (
            f"bare {step.label} reused the prefix: the server copes alone?\n{info}"
        )
        assert step.usage.processed > bare.steps[0].usage.prompt - 100, info
    assert res.passed, info


def test_new_conversation_reuses_shared_system_prefix(runner: ls.Runner) -> None:
    res = ls.scenario_new_conversation(runner)
    info = describe(res)
    addon, bare = res.arm(True), res.arm(False)
    for label in ("B turn 1", "subagent 1"):
        a, b = addon.step(label), bare.step(label)
        assert a.new is not None and a.new < 60, info
        # With the addon the new conversation reuses everything up to its own task text.
        assert a.usage.processed <= a.new + MARGIN, f"addon {label} reprocessed the shared prefix\n{info}"
        assert a.usage.reused >= a.usage.prompt - a.new - MARGIN, info
        # Without it the differing cc_version suffix (first line) forces the whole prefix again.
        assert b.usage.reused < 100, f"bare {label} reused the prefix: the server copes alone?\n{info}"
        assert b.usage.processed > b.usage.prompt - 100, info
    # Within conversation A, turn 2 is incremental in both arms (/v1/messages: the server pins cch).
    for arm in (addon, bare):
        step = arm.step("A turn 2")
        assert step.new is not None and step.usage.processed <= step.new + MARGIN, info
    assert res.passed, info
