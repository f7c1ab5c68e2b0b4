"""Shared fixtures: a recording upstream, real mitmdump processes, request helpers."""

from __future__ import annotations

import gzip
import http.client
import json
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stableprefix import launch
from stableprefix.upstream import Upstream

FIXTURES = Path(__file__).parent / "fixtures"


def load_fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream() as up:
        yield up


MitmFactory = Callable[..., launch.Proxy]


@pytest.fixture
def mitm(tmp_path: Path) -> Iterator[MitmFactory]:
    """Start real mitmdump processes (free port, temp confdir, addon loaded); all stopped by pid at the end."""
    started: list[launch.Proxy] = []

    def start(*extra: str, mode: str | None = None, tool: str = "mitmdump", addon: bool = True,
              wait_for_addon: bool | None = None) -> launch.Proxy:  # fmt: skip
        args = launch.command(
            tool=tool, mode=mode, confdir=tmp_path / f"conf{len(started)}", addon=addon,
            extra=["--set", "flow_detail=0", *extra],
        )  # fmt: skip
        proxy = launch.Proxy(args, wait_for_addon=addon if wait_for_addon is None else wait_for_addon)
        started.append(proxy)
        return proxy

    yield start
    for p in started:
        p.stop()


def post(port: int, path: str, body: bytes | dict[str, Any], headers: dict[str, str] | None = None,
         gzip_body: bool = False) -> tuple[int, bytes]:  # fmt: skip
    """POST to 127.0.0.1:`port` on a fresh connection; (status, response body)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    hdrs = {"content-type": "application/json", **(headers or {})}
    if gzip_body:
        data = gzip.compress(data)
        hdrs["content-encoding"] = "gzip"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, data, hdrs)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()
