"""stableprefix: keep LLM prompt prefixes byte-stable so local model servers reuse their KV cache.

Commands:
  run      start mitmdump (or mitmweb) with the addon, in front of your model server or as an HTTPS proxy
  report   explain, per conversation, what broke the prompt cache (JSONL log or mitmproxy flow file)
  demo     replay an embedded Claude-Code-shaped session through mitmdump, then report on it
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

from stableprefix import __version__ as VERSION
from stableprefix.cli import process

DEFAULT_PORT = 8787
DEFAULT_CONFDIR = "~/.mitmproxy"
ADDON_GRACE_SECONDS = 5.0

QUICKSTART = """\
quick start:
  stableprefix run --upstream http://127.0.0.1:8080     # in front of llama-server, vLLM, Ollama ...
  (paste the printed "env" lines into ~/.claude/settings.json, use Claude Code, then)
  stableprefix report ~/stableprefix.jsonl --html report.html

'stableprefix COMMAND --help' describes each command.
"""

RUN_DESCRIPTION = """\
Start mitmproxy with the stableprefix addon loaded and print what to paste into Claude Code's settings.

--upstream URL  reverse mode: stableprefix listens on 127.0.0.1:PORT and forwards every request to URL
                (your local model server). Claude Code uses ANTHROPIC_BASE_URL=http://127.0.0.1:PORT.
--proxy         regular mode: an HTTP(S) proxy for HTTPS_PROXY. The mitmproxy CA is created in the confdir
                first if needed, and its path is printed for NODE_EXTRA_CA_CERTS.

A --listen-host beyond this machine (0.0.0.0, a LAN address) needs access control: --allow-clients CIDR[,CIDR]
and/or --proxyauth USER:PASS (passed through to mitmdump); regular mode there always needs --proxyauth.
--force-open skips the check in reverse mode. See docs/team.md for a team gateway in front of a router.

mitmdump runs in the foreground; Ctrl-C (or SIGTERM) stops it. Arguments this command does not know, and
everything after '--', go to mitmdump/mitmweb unchanged, e.g. --set stableprefix_enable=date,
--set stableprefix_observe=true, -w flows.mitm, --set ssl_verify_upstream_trusted_ca=ca.pem.
Addon options: stableprefix_billing=drop|pin|off, stableprefix_passthrough, stableprefix_observe,
stableprefix_log, stableprefix_rules, stableprefix_enable, stableprefix_disable (see README);
stableprefix_affinity_header, stableprefix_affinity_side, stableprefix_affinity_override (docs/team.md).
Note: ~/.mitmproxy/config.yaml overrides --set; a --set value an addon option cannot parse makes mitmproxy
skip the addon silently: this command warns when the addon does not report itself active.
"""

RUN_EPILOG = """\
examples:
  stableprefix run --upstream http://127.0.0.1:8080
  stableprefix run --upstream http://127.0.0.1:8080 --log ~/stableprefix.jsonl --web
  stableprefix run --proxy --port 8787 -- --set connection_strategy=lazy
  stableprefix run --upstream http://127.0.0.1:8080 --port 0    # any free port; the real one is printed
"""

REPORT_DESCRIPTION = """\
Explain, per conversation stream, where and why the prompt prefix changed and what it cost.

FILE is the addon's JSONL log (--set stableprefix_log=FILE, or 'stableprefix run --log FILE'), a flow file
saved by 'mitmdump -w FILE' (with or without the addon: requests are fingerprinted offline), or a HAR file;
the kind is detected from the content. Large flow files are read one flow at a time; a progress line is
shown on a terminal.

For every stream (main thread, subagent, side requests) a table of turns: class, verdict (first,
append-only, changed), messages kept, where the prompt first differed and the cause (billing, date,
git_status, reminder, thinking_dropped, tool_result_cleared, tools, params, cache_markers_only, unknown),
tokens the server reused/of the prompt, tokens lost to a client-side change, the server-side miss class and
the rules that fired. Then totals: tokens reprocessed because of client-side changes by cause with what to
do about each, server-side misses, and what the rules saved (or would save, for traffic recorded without
them). '~' marks estimates (4 characters per token).

exit status: 0 report written; 1 with --check when a main-thread turn lost its prefix to a client-side
change (with --cross also when a conversation's first request lost a prefix shared with an earlier one to a
cause a built-in rule removes); 2 when a file is missing or unreadable, a log line is not JSON, or a flow
file cannot be read (one line per problem on stderr, naming the file and line or flow; everything readable
is still reported). --json prints one JSON document instead of the text (docs/report-json.md).
"""

REPORT_EPILOG = """\
examples:
  stableprefix report ~/stableprefix.jsonl
  mitmdump --mode reverse:http://127.0.0.1:8080 -p 8787 -w session.mitm     # record without the addon
  stableprefix report session.mitm --html report.html
  stableprefix report --check ~/stableprefix.jsonl && echo "prefix stable"
  stableprefix report --check --cross ~/stableprefix.jsonl     # conversation starts too
  stableprefix report --json ~/stableprefix.jsonl > report.json  # schema: docs/report-json.md
"""

DEMO_DESCRIPTION = """\
Replay an embedded, realistic Claude-Code-shaped session (3-block system with a per-request cch, 20 tools,
growing history, a subagent in between) through real mitmdump to a built-in upstream on 127.0.0.1, once
with the addon observing only and once with it rewriting; print the prefix hash per request for both, then
the report of both logs. Exit status 0 when the hashes stay identical with the addon and differ on every
request without it.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stableprefix",
        description=__doc__.split("\n\n", 1)[0],
        epilog=QUICKSTART,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"stableprefix {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, help: str, description: str, epilog: str = "", **kw: Any
    ) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help,
            description=description,
            epilog=epilog,
            allow_abbrev=False,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            **kw,
        )

    run = command(
        "run",
        "start mitmdump/mitmweb with the addon (reverse proxy or HTTPS_PROXY) and print the settings",
        RUN_DESCRIPTION,
        RUN_EPILOG,
        usage="stableprefix run (--upstream URL | --proxy) [--port PORT] [--listen-host HOST] [--web]\n"
        "                        [--allow-clients CIDR[,CIDR]] [--force-open]\n"
        "                        [--log FILE] [--confdir DIR] [MITMPROXY ARG ...] [-- MITMPROXY ARG ...]",
    )
    mode = run.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--upstream", metavar="URL", help="reverse mode in front of this server (http or https)"
    )
    mode.add_argument("--proxy", action="store_true", help="regular mode, for HTTPS_PROXY")
    run.add_argument(
        "--port",
        type=port_number,
        default=DEFAULT_PORT,
        help=f"port to listen on (default {DEFAULT_PORT}; 0 = any free port, printed once listening)",
    )
    run.add_argument(
        "--listen-host",
        default="127.0.0.1",
        metavar="HOST",
        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)",
    )
    run.add_argument(
        "--allow-clients",
        metavar="CIDR[,CIDR]",
        help="answer 403 to clients outside these networks (e.g. 10.1.0.0/16,192.168.5.0/24); with a "
        "--listen-host beyond loopback, this or --proxyauth is required",
    )
    run.add_argument(
        "--force-open",
        action="store_true",
        help="listen beyond loopback in reverse mode without --proxyauth or --allow-clients (anyone who "
        "reaches the port may use your model server)",
    )
    run.add_argument("--web", action="store_true", help="run mitmweb (browser UI) instead of mitmdump")
    run.add_argument(
        "--log", metavar="FILE", help="append one JSON record per request to FILE (for 'stableprefix report')"
    )
    run.add_argument(
        "--confdir",
        default=DEFAULT_CONFDIR,
        metavar="DIR",
        help=f"mitmproxy's configuration directory, where its CA lives (default {DEFAULT_CONFDIR})",
    )

    rep = command(
        "report",
        "per-stream report of what broke the prompt cache, from a JSONL log or a flow file",
        REPORT_DESCRIPTION,
        REPORT_EPILOG,
    )
    rep.add_argument("files", nargs="+", metavar="FILE", help="JSONL log, mitmproxy flow file or HAR file")
    rep.add_argument(
        "--html", metavar="OUT", help="also write a self-contained HTML page with a chart per stream to OUT"
    )
    rep.add_argument(
        "--check",
        action="store_true",
        help="print only the main-thread turns that lost their prefix to a client-side change "
        "(one line each); exit 1 if there is any, else 0",
    )
    rep.add_argument(
        "--cross",
        action="store_true",
        help="with --check: also fail on a conversation's first request (main or subagent) that lost the prefix "
        "it shares with an earlier conversation to a cause a built-in rule removes (e.g. billing)",
    )
    rep.add_argument(
        "--json",
        action="store_true",
        help="print the report as one JSON document (schema: docs/report-json.md) instead of text",
    )
    rep.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show a progress line while reading (default: only on a terminal)",
    )

    demo = command(
        "demo",
        "replay an embedded Claude-Code-shaped session through mitmdump, without and with the addon",
        DEMO_DESCRIPTION,
    )
    demo.add_argument("--html", metavar="OUT", help="also write the report page of both runs to OUT")
    return parser


def port_number(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0-65535)")
    return port


def err(message: str) -> None:
    print(f"stableprefix: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- run


def client_host(listen_host: str) -> str:
    """The address a client on this machine uses to reach the listener."""
    if listen_host in ("", "0.0.0.0", "*"):
        return "127.0.0.1"
    if listen_host == "::":
        return "[::1]"
    return f"[{listen_host}]" if ":" in listen_host else listen_host


def confdir_from(extra: list[str], default: str) -> tuple[Path, bool]:
    """The confdir mitmproxy will use: a `--set confdir=...` passed through wins. (path, passed through?)"""
    found: str | None = None
    for i, a in enumerate(extra):
        if a == "--set" and i + 1 < len(extra) and extra[i + 1].startswith("confdir="):
            found = extra[i + 1].split("=", 1)[1]
        elif a.startswith("--set=confdir="):
            found = a.split("=", 2)[2]
    return Path(found or default).expanduser(), found is not None


def ensure_ca(confdir: Path) -> Path:
    """mitmproxy's CA certificate in `confdir`, created the way mitmproxy creates it when missing."""
    from mitmproxy.certs import CertStore

    CertStore.from_store(confdir, "mitmproxy", 2048)
    return confdir / "mitmproxy-ca-cert.pem"


def reverse_instructions(url: str, upstream: str) -> list[str]:
    return f"""
stableprefix: listening at {url}, forwarding to {upstream}
Add this to ~/.claude/settings.json (merge into an existing "env"):

  {{
    "env": {{
      "ANTHROPIC_BASE_URL": "{url}"
    }}
  }}

or, for one shell: export ANTHROPIC_BASE_URL={url}
CLAUDE_CODE_ATTRIBUTION_HEADER=0 is then unnecessary: stableprefix removes the per-request billing
header on the way, so your Claude Code settings can stay as they are.
""".split("\n")


def proxy_instructions(url: str, ca: Path) -> list[str]:
    return f"""
stableprefix: HTTP(S) proxy listening at {url}
Start Claude Code with these two variables (or put them in the "env" of ~/.claude/settings.json):

HTTPS_PROXY={url}
NODE_EXTRA_CA_CERTS={ca}

NODE_EXTRA_CA_CERTS makes Claude Code trust mitmproxy's CA. Requests to Anthropic's own API
(api.anthropic.com) are only observed, never rewritten; point ANTHROPIC_BASE_URL at your https
model server or gateway to have them normalised.
""".split("\n")


class Supervisor:
    """Runs mitmproxy in the foreground: relays its output, forwards Ctrl-C/SIGTERM, prints the settings."""

    def __init__(self, cmd: list[str], instructions: Any) -> None:
        self.cmd = cmd
        self.instructions = instructions  # port -> lines
        self.child: process.Child | None = None
        self.announced = False
        self.addon_seen = False
        self._out = threading.Lock()
        self._timer: threading.Timer | None = None

    def say(self, lines: list[str] | str) -> None:
        text = "\n".join(lines) if isinstance(lines, list) else lines
        with self._out:
            try:
                sys.stdout.write(text + "\n")
                sys.stdout.flush()
            except (BrokenPipeError, ValueError):
                pass

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        if self.child is not None and self.child.proc.poll() is None:
            os.kill(self.child.pid, signal.SIGTERM if signum == signal.SIGHUP else signum)

    def _warn_no_addon(self) -> None:
        if not self.addon_seen:
            err(
                "the addon did not report itself active: mitmproxy skips a script silently when a --set value "
                "for one of its options does not parse (e.g. stableprefix_observe=yes); check the options"
            )

    def _line(self, line: str) -> None:
        """Relay one line of mitmproxy's output; once it listens, print the settings to paste."""
        self.say(line)
        if process.READY_MARK in line:
            self.addon_seen = True
        if not self.announced and "Web server" not in line and (m := process.LISTEN_RE.search(line.rstrip())):
            self.announced = True
            self.say(self.instructions(int(m.group(1))))
            if not self.addon_seen:
                self._timer = threading.Timer(ADDON_GRACE_SECONDS, self._warn_no_addon)
                self._timer.daemon = True
                self._timer.start()

    def run(self) -> int:
        try:
            # own process group: Ctrl-C reaches only us, and we stop mitmproxy once, cleanly
            self.child = process.Child(
                self.cmd, self._line, {"PYTHONUNBUFFERED": "1"}, own_group=True, keep=200
            )
        except OSError as e:
            err(f"cannot start {self.cmd[0]}: {e.strerror or e}")
            return 2
        handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {s: signal.signal(s, self._forward) for s in handled}
        try:
            code = self.child.proc.wait()
            self.child.drained()
        finally:
            if self._timer:
                self._timer.cancel()
            self.child.stop()
            for s, h in previous.items():
                signal.signal(s, h)
        if code < 0:  # killed by a signal: report it the way a shell does
            code = 128 - code
        if not self.announced:
            err(f"{Path(self.cmd[0]).name} exited with status {code} before listening (see its output above)")
            return code or 1
        return code


class UsageError(Exception):
    """A bad argument value: one line, exit status 2."""


def plan(args: argparse.Namespace, extra: list[str]) -> tuple[list[str], Any]:
    """The mitmproxy command line and the function printing the settings for the port it listens on.

    For --proxy, mitmproxy's CA is created in the confdir first if missing. Raises UsageError.
    """
    if args.upstream:
        u = urlsplit(args.upstream)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise UsageError(f"--upstream: {args.upstream!r} is not an http:// or https:// URL with a host")
    confdir, passed = confdir_from(extra, args.confdir)
    ca: Path | None = None
    if args.proxy:
        try:
            ca = ensure_ca(confdir)
        except (OSError, ValueError) as e:
            why = getattr(e, "strerror", None) or e
            raise UsageError(f"cannot create or read mitmproxy's CA in {confdir}: {why}") from None
    opts: list[str] = access_options(args, extra)
    if args.log:
        opts += ["--set", f"stableprefix_log={Path(args.log).expanduser()}"]
    try:
        cmd = process.command(
            tool="mitmweb" if args.web else "mitmdump",
            mode=f"reverse:{args.upstream}" if args.upstream else "regular",
            port=args.port,
            listen_host=args.listen_host,
            confdir=None if passed else confdir,
            extra=[*opts, *extra],
        )
    except FileNotFoundError as e:
        raise UsageError(str(e)) from None
    host = client_host(args.listen_host)

    def instructions(port: int) -> list[str]:
        url = f"http://{host}:{port}"
        return proxy_instructions(url, ca) if ca is not None else reverse_instructions(url, args.upstream)

    return cmd, instructions


def proxyauth_from(extra: list[str]) -> str | None:
    """The proxyauth value passed through to mitmproxy (--proxyauth X, --set proxyauth=X), if any."""
    found: str | None = None
    for i, a in enumerate(extra):
        nxt = extra[i + 1] if i + 1 < len(extra) else ""
        if a == "--proxyauth" and nxt:
            found = nxt
        elif a.startswith("--proxyauth="):
            found = a.split("=", 1)[1]
        elif a == "--set" and nxt.startswith("proxyauth="):
            found = nxt.split("=", 1)[1]
        elif a.startswith("--set=proxyauth="):
            found = a.split("=", 2)[2]
    return found or None


def access_options(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The mitmproxy options for --allow-clients; refuses (UsageError) a listener beyond loopback without
    access control: regular mode there always needs proxyauth (else an open proxy to any host), reverse mode
    needs proxyauth or --allow-clients unless --force-open."""
    from stableprefix.core import access

    opts: list[str] = []
    allow = getattr(args, "allow_clients", None)
    if allow is not None:
        try:
            networks = access.parse_networks([allow])
        except ValueError as e:
            raise UsageError(f"--allow-clients: {e}") from None
        if not networks:
            raise UsageError("--allow-clients: no network given")
        opts += ["--set", f"stableprefix_allow_clients={','.join(str(n) for n in networks)}"]
    if access.is_loopback_host(args.listen_host):
        return opts
    auth = proxyauth_from(extra)
    authed = auth is not None and auth != "any"  # "any" accepts every user/password: no control
    where = f"--listen-host {args.listen_host} opens stableprefix beyond this machine"
    if args.proxy and not authed:
        raise UsageError(
            f"{where}: regular (HTTPS_PROXY) mode there needs --proxyauth USER:PASS (or @htpasswd-file); "
            "without it anyone reaching the port has an open proxy to any host (--force-open does not apply)"
        )
    if not authed and allow is None and not getattr(args, "force_open", False):
        raise UsageError(
            f"{where}: add access control, --allow-clients CIDR[,CIDR] (e.g. your team's subnet) and/or "
            "--proxyauth USER:PASS (or @htpasswd-file), or say --force-open to serve anyone who reaches it"
        )
    return opts


def cmd_run(args: argparse.Namespace, extra: list[str]) -> int:
    try:
        cmd, instructions = plan(args, extra)
    except UsageError as e:
        err(str(e))
        return 2
    err(f"running {shlex.join(cmd)}")
    return Supervisor(cmd, instructions).run()


# ---------------------------------------------------------------------------------------------- report


def cmd_report(args: argparse.Namespace) -> int:
    from stableprefix.report import readers
    from stableprefix.report import text as report_text

    rep = readers.read(args.files, progress=args.progress)
    for p in rep.problems:
        err(str(p))
    code = 0
    if args.html:
        from stableprefix.report.html import render_html

        try:
            Path(args.html).write_text(render_html([("", rep)]), encoding="utf-8")
        except OSError as e:
            err(f"{args.html}: cannot write: {e.strerror or e}")
            return 2
        err(f"wrote {args.html}")
    try:
        if args.json:
            import json

            from stableprefix.report import jsondoc

            doc = jsondoc.document(rep)
            if args.check:
                lines = report_text.check_lines(rep, cross=args.cross)
                doc["check"] = {"cross": args.cross, "failed": lines}
                code = 1 if lines else 0
            json.dump(doc, sys.stdout, ensure_ascii=False, indent=1)
            sys.stdout.write("\n")
        elif args.check:
            lines = report_text.check_lines(rep, cross=args.cross)
            for line in lines:
                print(line)
            if not lines:
                mains = sum(1 for t in rep.turns() if t.cls == "main")
                print(f"ok: {mains} main-thread request{'s' if mains != 1 else ''}, none lost its prefix "
                      "to a client-side change")  # fmt: skip
                if not mains:
                    err("no main-thread requests in the input: nothing was checked")
            code = 1 if lines else 0
        else:
            sys.stdout.write(report_text.render_text(rep))
        sys.stdout.flush()
    except BrokenPipeError:
        pass
    return 2 if rep.problems else code


# ---------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    after: list[str] = []
    if argv[:1] == ["run"] and "--" in argv:
        i = argv.index("--")
        argv, after = argv[:i], argv[i + 1 :]
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command != "run" and unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        if args.command == "run":
            return cmd_run(args, [*unknown, *after])
        if args.command == "report":
            return cmd_report(args)
        if args.command == "demo":
            from stableprefix.demo import replay as demo

            return demo.main(html=args.html)
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
