"""Start and stop real mitmdump / mitmweb processes with the addon loaded (demo, CLI, tests, benchmarks).

A `Proxy` listens on 127.0.0.1 with a free port unless told otherwise, is ready once mitmproxy prints its
``listening at`` line and the addon has logged that it is active (mitmproxy silently skips a script whose
option fails to parse, so readiness waits for the addon's own line), keeps draining its output, and is
stopped by pid with SIGTERM (which runs the addon's ``done``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

ADDON = Path(__file__).resolve().parents[1] / "addon.py"  # the `-s` entry: a shim for the mitm face
LISTEN_RE = re.compile(r"listening at (?:\*|\[[^\]]*\]|[\w.:-]+?):(\d+)\.?\s*$")
WEB_RE = re.compile(r"Web server listening at https?://[^:/]+:(\d+)")
READY_MARK = "stableprefix active:"


def executable(tool: str) -> str:
    """The mitmdump/mitmweb next to this Python (the venv), else the one on PATH."""
    here = Path(sys.executable).parent / tool
    if here.exists():
        return str(here)
    found = shutil.which(tool)
    if found is None:
        raise FileNotFoundError(f"{tool} not found next to {sys.executable} or on PATH")
    return found


def terminate(proc: subprocess.Popen[Any], grace: float = 10.0, sig: int = signal.SIGTERM) -> int:
    """Stop a process we started: `sig` (SIGTERM) by pid, SIGKILL after `grace` seconds; its exit status."""
    if proc.poll() is None:
        os.kill(proc.pid, sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
    return proc.wait()


class Child:
    """A process we started, its output (stdout and stderr) read line by line on a thread: kept (the last
    `keep` lines) and handed to `on_line`; stopped by pid. The one way this project supervises a process
    (mitmproxy for the CLI, the demo and the tests; llama-server and routers for the tests)."""

    def __init__(
        self,
        args: list[str],
        on_line: Callable[[str], None] | None = None,
        env: dict[str, str] | None = None,
        own_group: bool = False,
        keep: int = 20_000,
    ) -> None:
        self.args = args
        self.lines: deque[str] = deque(maxlen=keep)
        self._on_line = on_line
        self._lock = threading.Lock()
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            errors="replace",
            env={**os.environ, **(env or {})},
            process_group=0 if own_group else None,
        )
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            with self._lock:
                self.lines.append(line)
            if self._on_line is not None:
                self._on_line(line)

    def output(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float = 60.0) -> bool:
        """True once `text` appears in the output (False when the time is up or the process ended)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return True
            if self.proc.poll() is not None:
                self._thread.join(2)
                return text in self.output()
            time.sleep(0.05)
        return False

    def drained(self, timeout: float = 5.0) -> None:
        """Wait until the output has been read to its end (after the process exited)."""
        self._thread.join(timeout)

    def stop(self, grace: float = 10.0, sig: int = signal.SIGTERM) -> int:
        """`sig` by pid, SIGKILL after `grace` seconds; the exit status, once the output is read."""
        code = terminate(self.proc, grace, sig)
        self.drained()
        return code


def command(
    tool: str = "mitmdump",
    mode: str | None = None,
    port: int = 0,
    listen_host: str = "127.0.0.1",
    confdir: str | Path | None = None,
    addon: bool = True,
    extra: list[str] | tuple[str, ...] = (),
) -> list[str]:
    """The argument list that starts mitmproxy the way stableprefix runs it."""
    args = [executable(tool), "--listen-host", listen_host, "--listen-port", str(port)]
    if mode:
        args += ["--mode", mode]
    if confdir is not None:
        args += ["--set", f"confdir={confdir}"]
    if addon:
        args += ["-s", str(ADDON)]
    return args + list(extra)


class Proxy:
    """A running mitmdump or mitmweb subprocess, ready once it listens and the addon said it is active."""

    def __init__(
        self,
        args: list[str],
        wait_for_addon: bool = True,
        timeout: float = 90.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.args = args
        self.port: int | None = None
        self.web_port: int | None = None
        self._ready = threading.Event()
        self._addon_seen = not wait_for_addon
        self.child = Child(args, on_line=self._line, env=env)
        if not wait_until_set(self._ready, self.child, timeout) or self.port is None or not self._addon_seen:
            self.stop()
            raise RuntimeError("mitmproxy did not become ready:\n" + "\n".join(list(self.child.lines)[-40:]))

    @property
    def pid(self) -> int:
        return self.child.pid

    @property
    def proc(self) -> subprocess.Popen[str]:
        return self.child.proc

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def lines(self) -> list[str]:
        return list(self.child.lines)

    def _line(self, line: str) -> None:
        if self.port is None and (m := LISTEN_RE.search(line)) and "Web server" not in line:
            self.port = int(m.group(1))
        if self.web_port is None and (w := WEB_RE.search(line)):
            self.web_port = int(w.group(1))
        if READY_MARK in line:
            self._addon_seen = True
        if self.port is not None and self._addon_seen:
            self._ready.set()

    def output(self) -> str:
        return self.child.output()

    def wait_for(self, text: str, timeout: float = 60.0) -> bool:
        """True once `text` appears in the output."""
        return self.child.wait_for(text, timeout)

    def stop(self) -> int:
        """SIGTERM by pid (runs `done`), SIGKILL after 10 s; the exit status."""
        return self.child.stop()

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_until_set(event: threading.Event, child: Child, timeout: float) -> bool:
    """Wait for `event`, but not past the end of `child`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if event.wait(0.1):
            return True
        if child.proc.poll() is not None:
            child.drained()
            return event.is_set()
    return event.is_set()
