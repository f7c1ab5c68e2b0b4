"""Shared fixtures: a recording upstream, real mitmdump processes, request helpers."""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path

import pytest

from stableprefix.cli import process
from stableprefix.demo.upstream import Upstream


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream() as up:
        yield up


MitmFactory = Callable[..., process.Proxy]


@pytest.fixture
def mitm(tmp_path: Path) -> Iterator[MitmFactory]:
    """Start real mitmdump processes (free port, temp confdir, addon loaded); all stopped by pid at the end."""
    started: list[process.Proxy] = []

    def start(*extra: str, mode: str | None = None, tool: str = "mitmdump", addon: bool = True,
              wait_for_addon: bool | None = None) -> process.Proxy:  # fmt: skip
        args = process.command(
            tool=tool, mode=mode, confdir=tmp_path / f"conf{len(started)}", addon=addon,
            extra=["--set", "flow_detail=0", *extra],
        )  # fmt: skip
        proxy = process.Proxy(args, wait_for_addon=addon if wait_for_addon is None else wait_for_addon)
        started.append(proxy)
        return proxy

    yield start
    for p in started:
        p.stop()
