from __future__ import annotations

from pathlib import Path

import pytest

from stableprefix.cli import process


def test_command_binds_loopback_and_loads_the_addon(tmp_path: Path) -> None:
    args = process.command(
        mode="reverse:http://127.0.0.1:8080", port=8787, confdir=tmp_path, extra=["--set", "x=1"]
    )
    assert args[0].endswith("mitmdump")
    assert args[1:5] == ["--listen-host", "127.0.0.1", "--listen-port", "8787"]
    assert args[args.index("--mode") + 1] == "reverse:http://127.0.0.1:8080"
    assert args[args.index("-s") + 1] == str(process.ADDON) and process.ADDON.exists()
    assert f"confdir={tmp_path}" in args and args[-2:] == ["--set", "x=1"]
    assert "-s" not in process.command(addon=False)


@pytest.mark.parametrize(
    ("line", "port"),
    [
        ("[08:50:22.032] HTTP(S) proxy listening at 127.0.0.1:55409.", 55409),
        ("[..] reverse proxy to http://127.0.0.1:40381 listening at 127.0.0.1:60771.", 60771),
        ("[..] HTTP(S) proxy listening at *:8080.", 8080),
        ("[..] HTTP(S) proxy listening at [::1]:9000.", 9000),
    ],
)
def test_listen_line(line: str, port: int) -> None:
    m = process.LISTEN_RE.search(line)
    assert m is not None and int(m.group(1)) == port


@pytest.mark.e2e
def test_proxy_waits_for_the_addon_and_stops_by_pid(tmp_path: Path) -> None:
    with process.Proxy(process.command(confdir=tmp_path)) as proxy:
        assert proxy.port and process.READY_MARK in proxy.output()
        pid = proxy.pid
    assert proxy.proc.returncode == 0
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text().lower()


@pytest.mark.e2e
def test_proxy_reports_a_script_that_never_became_active(tmp_path: Path) -> None:
    # mitmproxy skips a script whose --set value fails to parse; readiness must not pretend otherwise
    args = process.command(confdir=tmp_path, extra=["--set", "stableprefix_observe=yes"])
    with pytest.raises(RuntimeError, match="did not become ready"):
        process.Proxy(args, timeout=8)


def test_terminate_kills_what_ignores_sigterm() -> None:
    import subprocess
    import sys
    import time

    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "up"
    start = time.monotonic()
    assert process.terminate(proc, grace=0.5) == -9
    assert time.monotonic() - start < 5
