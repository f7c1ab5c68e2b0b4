"""The console script's argument handling: what `stableprefix run` would start, and what it prints.

The processes themselves are started in tests/e2e/test_cli_e2e.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from stableprefix.cli import main as cli
from stableprefix.cli import process


def parse(*argv: str) -> tuple[argparse.Namespace, list[str]]:
    args = list(argv)
    after: list[str] = []
    if "--" in args:
        i = args.index("--")
        args, after = args[:i], args[i + 1 :]
    ns, unknown = cli.build_parser().parse_known_args(args)
    return ns, [*unknown, *after]


def test_plan_reverse_mode(tmp_path: Path) -> None:
    ns, extra = parse(
        "run", "--upstream", "http://127.0.0.1:8080", "--confdir", str(tmp_path), "--log", "~/sp.jsonl",
        "--set", "stableprefix_enable=date", "--", "-w", "flows", "--set", "flow_detail=0",
    )  # fmt: skip
    cmd, instructions = cli.plan(ns, extra)
    assert cmd == [
        process.executable("mitmdump"),
        "--listen-host", "127.0.0.1", "--listen-port", "8787",
        "--mode", "reverse:http://127.0.0.1:8080",
        "--set", f"confdir={tmp_path}",
        "-s", str(process.ADDON),
        "--set", f"stableprefix_log={Path('~/sp.jsonl').expanduser()}",
        "--set", "stableprefix_enable=date", "-w", "flows", "--set", "flow_detail=0",
    ]  # fmt: skip
    lines = instructions(8787)
    block = "\n".join(lines[lines.index("  {") : lines.index("  }") + 1])
    assert json.loads(block) == {"env": {"ANTHROPIC_BASE_URL": "http://127.0.0.1:8787"}}
    assert any("CLAUDE_CODE_ATTRIBUTION_HEADER=0 is then unnecessary" in x for x in lines)


def test_plan_web_and_listen_host(tmp_path: Path) -> None:
    ns, extra = parse("run", "--upstream", "https://gpu-box:8443", "--web", "--listen-host", "0.0.0.0",
                      "--port", "9000", "--confdir", str(tmp_path), "--force-open")  # fmt: skip
    cmd, instructions = cli.plan(ns, extra)
    assert cmd[0] == process.executable("mitmweb")
    assert cmd[1:5] == ["--listen-host", "0.0.0.0", "--listen-port", "9000"]
    assert '      "ANTHROPIC_BASE_URL": "http://127.0.0.1:9000"' in instructions(9000)


def test_plan_proxy_mode_creates_the_ca_first(tmp_path: Path) -> None:
    confdir = tmp_path / "new" / "conf"
    ns, extra = parse("run", "--proxy", "--port", "0", "--confdir", str(confdir))
    cmd, instructions = cli.plan(ns, extra)
    ca = confdir / "mitmproxy-ca-cert.pem"
    assert ca.read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    assert (confdir / "mitmproxy-ca.pem").is_file()  # the key mitmproxy will sign with
    assert "--mode" in cmd and cmd[cmd.index("--mode") + 1] == "regular"
    lines = instructions(41234)
    assert "HTTPS_PROXY=http://127.0.0.1:41234" in lines
    assert f"NODE_EXTRA_CA_CERTS={ca}" in lines


def test_plan_proxy_reuses_an_existing_ca(tmp_path: Path) -> None:
    ns, extra = parse("run", "--proxy", "--confdir", str(tmp_path))
    cli.plan(ns, extra)
    before = (tmp_path / "mitmproxy-ca-cert.pem").read_bytes()
    cli.plan(ns, extra)
    assert (tmp_path / "mitmproxy-ca-cert.pem").read_bytes() == before


def test_plan_confdir_passed_through_wins(tmp_path: Path) -> None:
    ns, extra = parse("run", "--proxy", "--set", f"confdir={tmp_path / 'mine'}")
    cmd, instructions = cli.plan(ns, extra)
    assert [a for a in cmd if a.startswith("confdir=")] == [f"confdir={tmp_path / 'mine'}"]
    assert f"NODE_EXTRA_CA_CERTS={tmp_path / 'mine' / 'mitmproxy-ca-cert.pem'}" in instructions(1)


def test_plan_rejects_a_bad_upstream() -> None:
    ns, extra = parse("run", "--upstream", "127.0.0.1:8080")
    with pytest.raises(cli.UsageError, match="is not an http:// or https:// URL with a host"):
        cli.plan(ns, extra)


def test_plan_ca_in_an_unwritable_place(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    ns, extra = parse("run", "--proxy", "--confdir", str(blocker / "conf"))
    with pytest.raises(cli.UsageError, match="cannot create or read mitmproxy's CA"):
        cli.plan(ns, extra)


@pytest.mark.parametrize(
    ("extra", "found"),
    [
        ([], None),
        (["--set", "confdir=/x"], "/x"),
        (["--set=confdir=/y"], "/y"),
        (["--set", "flow_detail=0", "--set", "confdir=/a", "--set", "confdir=/b"], "/b"),
    ],
)
def test_confdir_from(extra: list[str], found: str | None) -> None:
    path, passed = cli.confdir_from(extra, "/default")
    assert (str(path), passed) == ((found, True) if found else ("/default", False))


@pytest.mark.parametrize(
    ("host", "client"),
    [("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "127.0.0.1"), ("", "127.0.0.1"), ("::", "[::1]"),
     ("::1", "[::1]"), ("10.1.2.3", "10.1.2.3")],
)  # fmt: skip
def test_client_host(host: str, client: str) -> None:
    assert cli.client_host(host) == client


@pytest.mark.parametrize("bad", ["-1", "65536", "http"])
def test_port_must_be_a_port(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["run", "--upstream", "http://x", "--port", bad])
    assert e.value.code == 2
    assert "argument --port" in capsys.readouterr().err


def test_unknown_arguments_only_pass_through_for_run(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["report", "x.jsonl", "--set", "a=b"])
    assert e.value.code == 2
    assert "unrecognized arguments: --set a=b" in capsys.readouterr().err


def test_upstream_and_proxy_exclude_each_other(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["run", "--upstream", "http://x", "--proxy"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_run_bad_upstream_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--upstream", "ftp://host"]) == 2
    assert capsys.readouterr().err == (
        "stableprefix: --upstream: 'ftp://host' is not an http:// or https:// URL with a host\n"
    )


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("stableprefix ")


# --- safe to open (issue 14) -----------------------------------------------------------------------------


def refused(*argv: str) -> str:
    ns, extra = parse(*argv)
    with pytest.raises(cli.UsageError) as e:
        cli.plan(ns, extra)
    return str(e.value)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "10.0.0.5", "gpu-box.lan", ""])
def test_open_reverse_listener_needs_access_control(host: str, tmp_path: Path) -> None:
    msg = refused(
        "run", "--upstream", "http://127.0.0.1:8080", "--listen-host", host, "--confdir", str(tmp_path)
    )
    assert f"--listen-host {host} opens stableprefix beyond this machine" in msg
    assert "--allow-clients" in msg and "--proxyauth" in msg and "--force-open" in msg


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"])
def test_loopback_listener_needs_nothing(host: str, tmp_path: Path) -> None:
    ns, extra = parse("run", "--upstream", "http://127.0.0.1:8080", "--listen-host", host,
                      "--confdir", str(tmp_path))  # fmt: skip
    cmd, _ = cli.plan(ns, extra)
    assert not any(a.startswith("stableprefix_allow_clients") for a in cmd)


@pytest.mark.parametrize(
    "control",
    [
        ("--proxyauth", "alice:secret"),
        ("--proxyauth=@/etc/stableprefix.htpasswd",),
        ("--set", "proxyauth=alice:secret"),
        ("--", "--set", "proxyauth=alice:secret"),
        ("--allow-clients", "10.1.0.0/16"),
        ("--force-open",),
    ],
)
def test_open_reverse_listener_with_access_control(control: tuple[str, ...], tmp_path: Path) -> None:
    ns, extra = parse("run", "--upstream", "http://127.0.0.1:8080", "--listen-host", "0.0.0.0",
                      "--confdir", str(tmp_path), *control)  # fmt: skip
    cmd, _ = cli.plan(ns, extra)
    assert cmd[1:3] == ["--listen-host", "0.0.0.0"]
    if "--allow-clients" in control:
        i = cmd.index("stableprefix_allow_clients=10.1.0.0/16")
        assert cmd[i - 1] == "--set"
    else:
        for arg in control:
            if arg not in ("--", "--force-open"):
                assert arg in cmd  # passed through to mitmdump unchanged


def test_proxyauth_any_is_no_access_control(tmp_path: Path) -> None:
    msg = refused("run", "--upstream", "http://127.0.0.1:8080", "--listen-host", "0.0.0.0",
                  "--confdir", str(tmp_path), "--set", "proxyauth=any")  # fmt: skip
    assert "add access control" in msg


@pytest.mark.parametrize(
    "control",
    [(), ("--force-open",), ("--allow-clients", "10.0.0.0/8"), ("--proxyauth", "any"),
     ("--allow-clients", "10.0.0.0/8", "--force-open")],
)  # fmt: skip
def test_open_regular_mode_needs_proxyauth_always(control: tuple[str, ...], tmp_path: Path) -> None:
    msg = refused("run", "--proxy", "--listen-host", "0.0.0.0", "--confdir", str(tmp_path), *control)
    assert "regular (HTTPS_PROXY) mode there needs --proxyauth" in msg and "open proxy" in msg


def test_open_regular_mode_with_proxyauth(tmp_path: Path) -> None:
    ns, extra = parse("run", "--proxy", "--listen-host", "0.0.0.0", "--confdir", str(tmp_path),
                      "--proxyauth", "alice:secret", "--allow-clients", "10.0.0.0/8,192.168.0.0/16")  # fmt: skip
    cmd, _ = cli.plan(ns, extra)
    assert "--proxyauth" in cmd and "stableprefix_allow_clients=10.0.0.0/8,192.168.0.0/16" in cmd


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "ten", "10.0.0.0/8,", "gpu-box"])
def test_allow_clients_must_be_networks(bad: str, tmp_path: Path) -> None:
    msg = refused(
        "run", "--upstream", "http://127.0.0.1:8080", "--allow-clients", bad, "--confdir", str(tmp_path)
    )
    assert msg.startswith("--allow-clients: ") and "is not an IP network" in msg


def test_run_refusal_is_one_line_and_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["run", "--upstream", "http://127.0.0.1:8080", "--listen-host", "0.0.0.0"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "opens stableprefix beyond this machine" in err
