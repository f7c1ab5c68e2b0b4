"""The addon as users run it: real mitmdump / mitmweb processes in front of a real HTTP(S) upstream."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stableprefix.cli import process
from stableprefix.demo.upstream import Upstream
from tests.conftest import MitmFactory
from tests.support.helpers import FIXTURES
from tests.support.helpers import post
from tests.support.helpers import tls_cert

pytestmark = pytest.mark.e2e


def expected_bytes(name: str) -> bytes:
    """What the upstream must receive: written down in tests/fixtures/forwarded/ (checked by test_fixtures)."""
    return (FIXTURES / "forwarded" / name).read_bytes()


def test_reverse_mode_rewrites_and_logs(mitm: MitmFactory, upstream: Upstream, tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    proxy = mitm("--set", f"stableprefix_log={log}", mode=f"reverse:{upstream.url}")
    assert proxy.port
    for name in ("cc_2_1_39_cch.json", "string_system.json", "inline_system_message.json"):
        status, _ = post(proxy.port, "/v1/messages?beta=true", (FIXTURES / name).read_bytes())
        assert status == 200
        got = upstream.received[-1]
        assert got.body == expected_bytes(name)
        assert got.headers["content-length"] == str(len(got.body))
        assert got.path == "/v1/messages?beta=true"
    # nothing to change: byte-identical
    raw = (FIXTURES / "header_in_user_and_tool.json").read_bytes()
    post(proxy.port, "/v1/messages", raw)
    assert upstream.received[-1].body == raw
    assert proxy.wait_for("changed billing=1")
    assert proxy.stop() == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["changed"] for r in records] == [{"billing": 1}, {"billing": 1}, {"billing": 2}, {}]
    assert all({"host", "path", "api", "rewritten", "changed", "prefix_hash"} <= set(r) for r in records)
    assert "You are Claude Code" not in log.read_text() and "cch=" not in log.read_text()


def test_gzip_request_stays_gzip_and_is_rewritten(mitm: MitmFactory, upstream: Upstream) -> None:
    proxy = mitm(mode=f"reverse:{upstream.url}")
    assert proxy.port
    post(proxy.port, "/v1/messages", (FIXTURES / "cc_2_1_39_cch.json").read_bytes(), gzip_body=True)
    got = upstream.received[-1]
    assert got.headers["content-encoding"] == "gzip"
    assert got.headers["content-length"] == str(len(got.body))
    assert gzip.decompress(got.body) == expected_bytes("cc_2_1_39_cch.json")


def test_passthrough_host_is_forwarded_unchanged(mitm: MitmFactory, upstream: Upstream) -> None:
    proxy = mitm("--set", "stableprefix_passthrough=127.0.0.*", mode=f"reverse:{upstream.url}")
    assert proxy.port
    raw = (FIXTURES / "cc_2_1_39_cch.json").read_bytes()
    post(proxy.port, "/v1/messages", raw)
    assert upstream.received[-1].body == raw
    assert proxy.wait_for("passthrough")


def test_malformed_body_is_forwarded_unchanged_with_one_warning(
    mitm: MitmFactory, upstream: Upstream
) -> None:
    proxy = mitm(mode=f"reverse:{upstream.url}")
    assert proxy.port
    raw = b'{"messages": [1, 2'
    post(proxy.port, "/v1/messages", raw)
    assert upstream.received[-1].body == raw
    assert proxy.wait_for("left /v1/messages unchanged")
    assert proxy.output().count("left /v1/messages unchanged") == 1


def test_observe_mode_hashes_without_rewriting(mitm: MitmFactory, upstream: Upstream) -> None:
    proxy = mitm("--set", "stableprefix_observe=true", mode=f"reverse:{upstream.url}")
    assert proxy.port
    raw = (FIXTURES / "cc_2_1_39_cch.json").read_bytes()
    post(proxy.port, "/v1/messages", raw)
    assert upstream.received[-1].body == raw
    assert proxy.wait_for("observe: would change billing=1")


def test_pin_mode_through_mitmdump(mitm: MitmFactory, upstream: Upstream) -> None:
    proxy = mitm("--set", "stableprefix_billing=pin", mode=f"reverse:{upstream.url}")
    assert proxy.port
    post(proxy.port, "/v1/messages", (FIXTURES / "cc_2_1_39_cch.json").read_bytes())
    body = json.loads(upstream.received[-1].body)
    assert (
        body["system"][0]["text"]
        == "x-anthropic-billing-header: cc_version=2.1.39.fff; cc_entrypoint=cli; cch=fffff;"
    )


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("stableprefix_billing=strip", "stableprefix_billing: 'strip' is not one of drop, pin, off"),
        ("stableprefix_passthrough=http://x", "stableprefix_passthrough: 'http://x'"),
        ("stableprefix_enable=weather", "stableprefix_enable: unknown rule 'weather'"),
        ("stableprefix_rules=/nonexistent/rules.toml", "/nonexistent/rules.toml: cannot read"),
        ("stableprefix_log=/proc/nope/log.jsonl", "stableprefix_log: cannot open"),
    ],
)
def test_bad_option_stops_startup_naming_it(tmp_path: Path, option: str, message: str) -> None:
    args = process.command(confdir=tmp_path, extra=["--set", option])
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert message in proc.stdout + proc.stderr


CLIENT = """
import sys, urllib.request
req = urllib.request.Request(sys.argv[1], data=open(sys.argv[2], "rb").read(),
                             headers={"content-type": "application/json"}, method="POST")
with urllib.request.urlopen(req, timeout=30) as resp:
    print(resp.status, resp.headers["content-type"], b"event: message_stop" in resp.read())
"""


def test_https_proxy_mode_with_trusted_mitmproxy_ca(tmp_path: Path) -> None:
    cert, key = tls_cert(tmp_path)
    confdir = tmp_path / "conf"
    with Upstream(certfile=str(cert), keyfile=str(key)) as up:
        args = process.command(
            confdir=confdir,
            extra=["--set", "flow_detail=0", "--set", f"ssl_verify_upstream_trusted_ca={cert}"],
        )
        with process.Proxy(args) as proxy:
            env = {
                **os.environ,
                "HTTPS_PROXY": f"http://127.0.0.1:{proxy.port}",
                "NO_PROXY": "",
                "no_proxy": "",
                "SSL_CERT_FILE": str(confdir / "mitmproxy-ca-cert.pem"),
            }
            url = f"https://127.0.0.1:{up.port}/v1/messages?beta=true"
            client = [sys.executable, "-c", CLIENT, url, str(FIXTURES / "cc_2_1_39_cch.json")]
            done = subprocess.run(client, env=env, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr + proxy.output()
            assert done.stdout.split() == ["200", "text/event-stream", "True"]  # the SSE answer came through
            assert proxy.wait_for("changed billing=1")
        assert up.received[-1].body == expected_bytes("cc_2_1_39_cch.json")


def test_mitmweb_loads_the_addon(mitm: MitmFactory, upstream: Upstream) -> None:
    port = _free_port()
    proxy = mitm(
        "--set", f"web_port={port}", "--set", "web_open_browser=false", "--set", "web_password=secret-token",
        mode=f"reverse:{upstream.url}", tool="mitmweb",
    )  # fmt: skip
    assert proxy.port
    post(proxy.port, "/v1/messages", (FIXTURES / "cc_2_1_39_cch.json").read_bytes())
    assert upstream.received[-1].body == expected_bytes("cc_2_1_39_cch.json")
    assert proxy.wait_for("changed billing=1")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_addon_loads_from_a_plain_checkout_without_the_package(tmp_path: Path, upstream: Upstream) -> None:
    """`-s addon/stableprefix/addon.py` from a copy of the tree that is not installed anywhere."""
    import shutil

    copy = tmp_path / "checkout" / "addon"
    shutil.copytree(
        Path(process.ADDON).parent, copy / "stableprefix", ignore=shutil.ignore_patterns("__pycache__")
    )
    with (copy / "stableprefix" / "__init__.py").open("a") as f:  # prove the copy is what gets imported
        f.write(
            "\nimport logging\nlogging.getLogger('stableprefix').warning('core loaded from ' + __file__)\n"
        )
    args = process.command(mode=f"reverse:{upstream.url}", confdir=tmp_path / "conf", addon=False)
    args += ["-s", str(copy / "stableprefix" / "addon.py"), "--set", "flow_detail=0"]
    env = {"PYTHONPATH": "", "PYTHONNOUSERSITE": "1"}
    with process.Proxy(args, env=env) as proxy:
        assert proxy.port
        post(proxy.port, "/v1/messages", (FIXTURES / "cc_2_1_39_cch.json").read_bytes())
        assert proxy.wait_for("changed billing=1")
        assert f"core loaded from {copy / 'stableprefix' / '__init__.py'}" in proxy.output()
    assert upstream.received[-1].body == expected_bytes("cc_2_1_39_cch.json")
