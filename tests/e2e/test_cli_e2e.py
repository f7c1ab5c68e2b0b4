"""The `stableprefix` console script as users run it: real subprocesses, real mitmdump, real upstreams."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mitmproxy.io import tnetstring
from mitmproxy.test import tflow

from stableprefix.cli import process
from stableprefix.demo import samples
from stableprefix.demo.upstream import Upstream
from tests.support.helpers import FIXTURES
from tests.support.helpers import post
from tests.support.helpers import tls_cert
from tests.support.helpers import wait_until

pytestmark = pytest.mark.e2e

SCRIPT = str(Path(sys.executable).with_name("stableprefix"))
BODY = FIXTURES / "cc_2_1_39_cch.json"
REPORT_FIXTURES = FIXTURES


FORWARDED = (FIXTURES / "forwarded" / BODY.name).read_bytes()  # checked by tests/test_fixtures.py


class Cli(process.Child):
    """`stableprefix ARGS` in the background; its output kept line by line."""

    def __init__(self, *args: str) -> None:
        super().__init__([SCRIPT, *args])

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:  # type: ignore[override]
        found: list[re.Match[str]] = []

        def seen() -> bool:
            ended = self.proc.poll() is not None
            if ended:
                self.drained(2)
            if m := re.search(pattern, self.output()):
                found.append(m)
            return bool(found) or ended

        wait_until(seen, timeout)
        if not found:
            raise AssertionError(f"{pattern!r} not in the output of stableprefix:\n{self.output()}")
        return found[0]

    def children(self) -> list[int]:
        """Pids of the processes this one started (mitmdump)."""
        out = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    stat = (d / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    out.append(int(d.name))
        return out

    def stop(self, grace: float = 20.0, sig: int = signal.SIGTERM) -> int:
        return super().stop(grace, sig)


@pytest.fixture
def clis() -> object:
    started: list[Cli] = []

    def start(*args: str) -> Cli:
        c = Cli(*args)
        started.append(c)
        return c

    yield start
    for c in started:
        c.stop(sig=signal.SIGKILL)


def gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            stat = Path(f"/proc/{pid}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                return True  # exited, not yet reaped
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.05)
    return False


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------------- run


def settings_block(output: str) -> dict:
    """The JSON snippet printed for ~/.claude/settings.json."""
    lines = output.splitlines()
    start = lines.index("  {")
    end = lines.index("  }", start)
    return json.loads("\n".join(lines[start : end + 1]))


def test_run_upstream_prints_settings_normalises_and_stops_on_ctrl_c(
    clis, upstream: Upstream, tmp_path: Path
) -> None:
    log = tmp_path / "log.jsonl"
    cli = clis(
        "run", "--upstream", upstream.url, "--port", "0", "--confdir", str(tmp_path / "conf"),
        "--log", str(log), "--", "--set", "flow_detail=0",
    )  # fmt: skip
    listen = cli.wait_for(r"listening at 127\.0\.0\.1:(\d+)\.")
    port = int(listen.group(1))
    assert port != 0
    cli.wait_for(r"CLAUDE_CODE_ATTRIBUTION_HEADER=0 is then unnecessary")
    out = cli.output()
    assert settings_block(out) == {"env": {"ANTHROPIC_BASE_URL": f"http://127.0.0.1:{port}"}}
    assert f"export ANTHROPIC_BASE_URL=http://127.0.0.1:{port}" in out
    assert f"--listen-host 127.0.0.1 --listen-port 0 --mode reverse:{upstream.url}" in out
    cli.wait_for("stableprefix active:")

    raw = BODY.read_bytes()
    status, _ = post(port, "/v1/messages?beta=true", raw)
    assert status == 200
    assert upstream.received[-1].body == FORWARDED  # billing block gone, everything else byte-equal
    cli.wait_for("changed billing=1")

    (child,) = cli.children()
    assert cli.stop(sig=signal.SIGINT) == 0  # Ctrl-C: forwarded to mitmdump, which shuts down cleanly
    assert gone(child)
    assert "stableprefix summary:" in cli.output()  # the addon's done() ran
    assert "Traceback" not in cli.output()
    (rec,) = [json.loads(x) for x in log.read_text().splitlines()]
    assert rec["changed"] == {"billing": 1} and rec["verdict"] == "first"

    done = run_cli("report", str(log))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("stableprefix report: 1 file, 1 request in 1 stream\n")


def test_run_passes_unknown_arguments_to_mitmdump_and_stops_on_sigterm(
    clis, upstream: Upstream, tmp_path: Path
) -> None:
    cli = clis(
        "run", "--upstream", upstream.url, "--port", "0", "--confdir", str(tmp_path / "conf"),
        "--set", "stableprefix_observe=true", "--set", "flow_detail=0",
    )  # fmt: skip
    port = int(cli.wait_for(r'"ANTHROPIC_BASE_URL": "http://127\.0\.0\.1:(\d+)"').group(1))
    cli.wait_for("stableprefix active: billing=drop observe=True")
    raw = BODY.read_bytes()
    post(port, "/v1/messages", raw)
    assert upstream.received[-1].body == raw  # observe mode reached the addon: nothing rewritten
    (child,) = cli.children()
    assert cli.stop(sig=signal.SIGTERM) == 0
    assert gone(child)


def test_run_web_starts_mitmweb(clis, upstream: Upstream, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        web_port = s.getsockname()[1]
    cli = clis(
        "run", "--upstream", upstream.url, "--port", "0", "--web", "--confdir", str(tmp_path / "conf"),
        "--set", f"web_port={web_port}", "--set", "web_open_browser=false", "--set", "web_password=t0ken",
    )  # fmt: skip
    port = int(cli.wait_for(r'"ANTHROPIC_BASE_URL": "http://127\.0\.0\.1:(\d+)"').group(1))
    cli.wait_for(rf"Web server listening at http://127\.0\.0\.1:{web_port}/")
    assert (
        Path(cli.output().splitlines()[0].split()[2]).name == "mitmweb"
    )  # "stableprefix: running .../mitmweb"
    raw = BODY.read_bytes()
    post(port, "/v1/messages", raw)
    assert upstream.received[-1].body == FORWARDED
    assert cli.stop() == 0


CLIENT = """
import sys, urllib.request
req = urllib.request.Request(sys.argv[1], data=open(sys.argv[2], "rb").read(),
                             headers={"content-type": "application/json"}, method="POST")
with urllib.request.urlopen(req, timeout=30) as resp:
    print(resp.status)
"""


def test_run_proxy_prints_proxy_and_ca_lines_that_work(clis, tmp_path: Path) -> None:
    cert, key = tls_cert(tmp_path)
    confdir = tmp_path / "fresh-conf"  # does not exist yet: the CA is created first
    with Upstream(certfile=str(cert), keyfile=str(key)) as up:
        cli = clis(
            "run", "--proxy", "--port", "0", "--confdir", str(confdir),
            "--", "--set", f"ssl_verify_upstream_trusted_ca={cert}", "--set", "flow_detail=0",
        )  # fmt: skip
        proxy_url = cli.wait_for(r"(?m)^HTTPS_PROXY=(http://127\.0\.0\.1:\d+)$").group(1)
        ca = Path(cli.wait_for(r"(?m)^NODE_EXTRA_CA_CERTS=(.+)$").group(1))
        assert ca == confdir / "mitmproxy-ca-cert.pem" and ca.is_file()
        assert ca.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
        cli.wait_for("stableprefix active:")
        env = {
            **os.environ,
            "HTTPS_PROXY": proxy_url,  # exactly what was printed
            "NO_PROXY": "",
            "no_proxy": "",
            "SSL_CERT_FILE": str(ca),  # Python's equivalent of NODE_EXTRA_CA_CERTS
        }
        client = [sys.executable, "-c", CLIENT, f"https://127.0.0.1:{up.port}/v1/messages", str(BODY)]
        done = subprocess.run(client, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr + cli.output()
        assert done.stdout.split() == ["200"]
        assert up.received[-1].body == FORWARDED
        assert cli.stop() == 0


def test_run_port_in_use_fails_with_a_clear_line(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        done = run_cli(
            "run", "--upstream", "http://127.0.0.1:9", "--port", str(port), "--confdir", str(tmp_path / "c")
        )  # fmt: skip
    assert done.returncode == 1
    assert "address already in use" in done.stdout
    assert (
        done.stderr.splitlines()[-1]
        == "stableprefix: mitmdump exited with status 1 before listening (see its output above)"
    )
    assert "Traceback" not in done.stdout + done.stderr


def test_run_warns_when_mitmproxy_skips_the_addon(clis, tmp_path: Path) -> None:
    cli = clis(
        "run", "--upstream", "http://127.0.0.1:9", "--port", "0", "--confdir", str(tmp_path / "conf"),
        "--set", "stableprefix_observe=yes",  # does not parse as a bool: mitmproxy drops the script silently
    )  # fmt: skip
    cli.wait_for("ANTHROPIC_BASE_URL")
    cli.wait_for("the addon did not report itself active", timeout=60)
    assert cli.stop() == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--upstream", "ftp://x"],
            "stableprefix: --upstream: 'ftp://x' is not an http:// or https:// URL with a host",
        ),
        (
            ["--upstream", "http://x", "--port", "70000"],
            "argument --port: 70000 is not a port number (0-65535)",
        ),
        ([], "one of the arguments --upstream --proxy is required"),
    ],
)
def test_run_bad_arguments_exit_2(args: list[str], message: str) -> None:
    done = run_cli("run", *args)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].endswith(message)
    assert "Traceback" not in done.stderr


# ------------------------------------------------------------------------------------------------- report


def test_report_on_a_plain_mitmdump_recording(tmp_path: Path, upstream: Upstream) -> None:
    """Traffic recorded without the addon (`mitmdump -w`) is fingerprinted offline, in observe mode."""
    flows = tmp_path / "session.flows"
    args = process.command(
        mode=f"reverse:{upstream.url}", confdir=tmp_path / "conf", addon=False,
        extra=["--set", "flow_detail=0", "-w", str(flows)],
    )  # fmt: skip
    session = samples.Session()
    with process.Proxy(args, wait_for_addon=False) as proxy:
        assert proxy.port
        for turn in (1, 2, 3):
            body = session.request(turn)
            body["stream"] = turn == 3  # the last answer arrives as SSE, as Claude Code asks
            status, _ = post(proxy.port, "/v1/messages?beta=true", body)
            assert status == 200
        post(
            proxy.port,
            "/v1/messages/count_tokens",
            {"model": "m", "messages": [{"role": "user", "content": "foo"}]},
        )
        post(proxy.port, "/health", b"{}")  # not an LLM request: ignored
    assert flows.stat().st_size > 0

    done = run_cli("report", str(flows))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.startswith("stableprefix report: 1 file, 4 requests in 2 streams\n"), out
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+\d\s+main\s", line)]
    assert [(r[0], r[2]) for r in rows] == [("1", "first"), ("2", "changed"), ("3", "changed")]
    assert all("billing" in r and "would:" in r for r in rows[1:])  # cause billing; the rule would fire
    assert all(r[4].startswith("system[0]@") for r in rows[1:])
    assert "~" not in rows[2][6]  # turn 3 was answered as SSE: its usage was read from the recorded stream
    assert "  observe mode: rules would rewrite 3 requests (billing=3)" in out
    assert "  server reported: reused " in out  # the recorded responses' usage, the SSE one included

    check = run_cli("report", "--check", str(flows))
    assert check.returncode == 1
    lines = check.stdout.splitlines()
    assert len(lines) == 2 and all(
        re.search(r"session\.flows flow [23]: main turn [23] .* \(cause billing\)", x) for x in lines
    ), lines

    page = tmp_path / "r.html"
    assert run_cli("report", str(flows), "--html", str(page)).returncode == 0
    assert page.read_text().count("<svg") == 1


@pytest.mark.parametrize(("fixture", "code"), [("report_session.jsonl", 1), ("report_clean.jsonl", 0)])
def test_report_check_exit_status(fixture: str, code: int) -> None:
    done = run_cli("report", "--check", str(REPORT_FIXTURES / fixture))
    assert done.returncode == code
    if code:
        assert [x.split(": main turn")[0] for x in done.stdout.splitlines()] == [
            f"{REPORT_FIXTURES / fixture}:4",
            f"{REPORT_FIXTURES / fixture}:9",
        ]
    else:
        assert done.stdout.startswith("ok: 3 main-thread requests")


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    missing = tmp_path / "missing.jsonl"
    notjson = tmp_path / "log.jsonl"
    good = (REPORT_FIXTURES / "report_clean.jsonl").read_text()
    bad_line = good.count("\n") + 1
    notjson.write_text(good + "{oops\n")
    garbage = tmp_path / "garbage.flows"
    garbage.write_bytes(b"4711:" + os.urandom(64))
    future = tmp_path / "future.flows"
    state = tflow.ttcpflow().get_state()
    state["version"] = 99
    with future.open("wb") as fo:
        tnetstring.dump(state, fo)
    return {
        "missing": (missing, f"stableprefix: {missing}: cannot read: No such file or directory"),
        "not JSON": (
            notjson,
            f"stableprefix: {notjson}:{bad_line}: line is not JSON (Expecting property name enclosed",
        ),
        "garbage flows": (
            garbage,
            f"stableprefix: {garbage}: not a readable mitmproxy flow file (Invalid data format)",
        ),
        "other version": (future, f"stableprefix: {future} flow 1: skipped: mitmproxy "),
    }


@pytest.mark.parametrize("case", ["missing", "not JSON", "garbage flows", "other version"])
def test_report_bad_input_exits_2_with_one_line(case: str, tmp_path: Path) -> None:
    path, line = _bad_inputs(tmp_path)[case]
    done = run_cli("report", str(path))
    assert done.returncode == 2
    err = done.stderr.splitlines()
    assert len(err) == 1 and err[0].startswith(line), err
    assert "Traceback" not in done.stdout + done.stderr
    if case == "not JSON":  # the readable lines are still reported
        assert "stableprefix report: 1 file, 5 requests in 2 streams" in done.stdout
    if case == "other version":
        assert "cannot read files with flow format version 99" in err[0]


def test_report_bad_input_wins_over_check(tmp_path: Path) -> None:
    path, _ = _bad_inputs(tmp_path)["not JSON"]
    assert run_cli("report", "--check", str(path)).returncode == 2


# ------------------------------------------------------------------------------------------------- demo, help


def test_demo_prints_hashes_then_the_report(tmp_path: Path) -> None:
    page = tmp_path / "demo.html"
    done = run_cli("demo", "--html", str(page), timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "with the addon:    1 distinct prefix hash in 6 requests" in out
    assert "=== stableprefix report: Without the addon (observe mode: nothing rewritten) ===" in out
    assert "=== stableprefix report: With the addon ===" in out
    without, with_ = out.split("=== stableprefix report: With the addon ===")
    # every later turn lost its prefix to billing, and so did B1 against conversation A (issue 12)
    assert re.search(r"billing +5 +~?[\d,]+ ", without)
    assert "turns after the first of their stream: 4 (append-only 4, changed 0)" in with_
    assert page.read_text().count("<svg") == 4


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        ([], ["run", "report", "demo", "quick start"]),
        (
            ["run"],
            [
                "--upstream URL",
                "--proxy",
                "--port",
                "--listen-host",
                "--web",
                "--log",
                "--confdir",
                "-- MITMPROXY ARG",
            ],
        ),
        (["report"], ["--html OUT", "--check", "--progress", "exit status", "mitmdump -w"]),
        (["demo"], ["--html OUT", "Exit status 0"]),
    ],
)
def test_help_of_every_command(args: list[str], needles: list[str]) -> None:
    done = run_cli(*args, "--help")
    assert done.returncode == 0
    for n in needles:
        assert n in done.stdout, n


# ------------------------------------------------------------------------------------------------- big input

RUSAGE_WRAPPER = """
import resource, subprocess, sys
code = subprocess.run(sys.argv[1:]).returncode
print("maxrss_kb", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "rc", code)
"""


def write_big_flow_file(path: Path, flows: int, body_bytes: int) -> None:
    """`flows` recorded Anthropic requests of about `body_bytes` each, in mitmproxy's own flow format."""
    from mitmproxy import http
    from mitmproxy import io as mio

    session = samples.Session(result_chars=4000)
    turn = (len(samples.body_of_size(body_bytes)["messages"]) + 1) // 2
    answer = json.dumps({"usage": {"input_tokens": 100, "cache_read_input_tokens": 250_000}}).encode()
    with path.open("wb") as fo:
        writer = mio.FlowWriter(fo)
        for i in range(flows):
            raw = json.dumps(session.request(turn + i)).encode()
            req = http.Request.make(
                "POST",
                "http://127.0.0.1:8080/v1/messages",
                raw,
                http.Headers(content_type="application/json"),
            )
            resp = http.Response.make(200, answer, http.Headers(content_type="application/json"))
            writer.add(tflow.tflow(req=req, resp=resp))


def test_report_streams_a_large_flow_file_with_progress_on_a_terminal(tmp_path: Path) -> None:
    import pty

    big = tmp_path / "big.flows"
    write_big_flow_file(big, flows=150, body_bytes=1_000_000)
    size_mb = big.stat().st_size / 1e6
    assert size_mb > 150
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", RUSAGE_WRAPPER, SCRIPT, "report", str(big)],
        stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    os.close(slave)
    terminal = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO: the terminal's last writer is gone
            break
        if not chunk:
            break
        terminal += chunk
    os.close(master)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0
    *report_lines, last = out.splitlines()
    assert "stableprefix report: 1 file, 150 requests in 1 stream" in report_lines
    _, rss_kb, _, rc = last.split()
    assert rc == "0"
    # one flow at a time: the peak stays far below the file's size (mitmproxy + Python alone take ~50 MB)
    assert int(rss_kb) / 1000 < 120, f"peak RSS {int(rss_kb) / 1000:.0f} MB for a {size_mb:.0f} MB file"
    shown = terminal.decode(errors="replace")
    assert re.search(rf"reading {re.escape(str(big))}: [\d,.]+/[\d,.]+ MB \d+%, [\d,]+ flows", shown), shown
    assert shown.endswith("\r\x1b[K")  # the progress line is cleared at the end
