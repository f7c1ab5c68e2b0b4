"""Drive a full-screen terminal program (the Claude Code TUI) under a pseudo-terminal, in pure Python.

`Terminal` starts the program in its own session with a new pty as its stdin, stdout and stderr, reads everything it draws on a thread, answers the few terminal queries a
real terminal would (cursor position, device attributes) so the program does not wait on them, types text
as a user would, and stops the program by pid. `screen_text` strips the escape sequences, for looking up
what the program printed.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import struct
import subprocess
import termios
import threading
import time
from pathlib import Path

# CSI ... final byte, OSC ... BEL/ST, other two-byte escapes, and lone control characters except newline.
_ESCAPES = re.compile(
    rb"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[P^_][^\x1b]*\x1b\\|\x1b[@-Z\\-_]"
    rb"|\x1b[()][0-9A-Za-z]|[\x00-\x09\x0b-\x1f\x7f]"
)
# Queries a terminal answers: cursor position (DSR 6), primary device attributes (DA1).
_CPR = b"\x1b[6n"
_DA1 = (b"\x1b[c", b"\x1b[0c")


_FORWARD = re.compile(rb"\x1b\[(\d*)C")  # cursor forward n: how Ink draws the spaces between words


def screen_text(raw: bytes) -> str:
    """What a program drew: cursor-forward moves as spaces, other escape sequences and control characters
    removed (so the words drawn on one line read as they show)."""
    spaced = _FORWARD.sub(lambda m: b" " * int(m.group(1) or 1), raw)
    return _ESCAPES.sub(b"", spaced).decode("utf-8", "replace")


def _squeezed(text: str) -> str:
    return "".join(text.split())


class Terminal:
    """A program running under a pty of `cols` x `rows`; its output collected on a thread."""

    def __init__(
        self, args: list[str], cwd: Path, env: dict[str, str], cols: int = 120, rows: int = 40
    ) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        self._master = master
        self._raw = bytearray()
        self._lock = threading.Lock()
        try:
            self.proc = subprocess.Popen(
                args, cwd=cwd, env=env, stdin=slave, stdout=slave, stderr=slave, start_new_session=True
            )
        finally:
            os.close(slave)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self._master, 65536)
            except OSError:  # EIO once the program has closed the pty
                return
            if not chunk:
                return
            with self._lock:
                self._raw += chunk
            self._answer(chunk)

    def _answer(self, chunk: bytes) -> None:
        replies = b""
        if _CPR in chunk:
            replies += b"\x1b[1;1R"
        if any(q in chunk for q in _DA1):
            replies += b"\x1b[?62;22c"
        if replies:
            self._write(replies)

    def _write(self, data: bytes) -> None:
        try:
            os.write(self._master, data)
        except OSError:
            pass

    @property
    def raw(self) -> bytes:
        with self._lock:
            return bytes(self._raw)

    def text(self, since: int = 0) -> str:
        """The screen text drawn since byte offset `since` of the raw output."""
        return screen_text(self.raw[since:])

    def shows(self, needle: str, since: int = 0) -> bool:
        """Whether `needle` was drawn since byte offset `since`, compared without whitespace: a TUI redraws
        only the cells that changed, so the spaces of a line may come in any order or not at all."""
        return _squeezed(needle) in _squeezed(self.text(since))

    def wait_for(self, needle: str, timeout: float = 60.0, since: int = 0) -> bool:
        """True once `shows(needle, since)` (False on timeout or once the program has exited)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.shows(needle, since):
                return True
            if self.proc.poll() is not None:
                self._thread.join(2)
                return self.shows(needle, since)
            time.sleep(0.1)
        return False

    def type(self, text: str, enter: bool = True) -> None:
        """Type `text` as keystrokes, then Enter (a carriage return) after a pause, as a user would."""
        for ch in text:
            self._write(ch.encode())
            time.sleep(0.01)
        if enter:
            time.sleep(0.5)
            self._write(b"\r")

    def stop(self, grace: float = 10.0) -> int:
        """SIGTERM by pid, SIGKILL after `grace` seconds; the exit status. Closes the pty."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
        code = self.proc.wait()
        self._thread.join(2)
        try:
            os.close(self._master)
        except OSError:
            pass
        return code
