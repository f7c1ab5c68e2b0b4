"""`stableprefix report --html` renders: a screenshot in headless Chromium (Debian's package, installed by
scripts/install_chromium.sh) is decoded here (PNG, pure Python) and must show the chart's colours.

Without chromium the tests are skipped, except under CI (``CI`` or ``STABLEPREFIX_REQUIRE_CHROMIUM`` set),
where they fail. Set ``STABLEPREFIX_KEEP_SCREENSHOTS=DIR`` to keep the PNGs for a look.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path

import pytest

from stableprefix.report.html import LOST
from stableprefix.report.html import REPROCESSED
from stableprefix.report.html import REUSED

pytestmark = pytest.mark.e2e

SCRIPT = str(Path(sys.executable).with_name("stableprefix"))
FIXTURES = Path(__file__).parent.parent / "fixtures"
WIDTH, HEIGHT = 1200, 900
# flags that work on these machines (no sandbox as root, no background network on a closed network)
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        message = "chromium is not installed: run scripts/install_chromium.sh"
        if os.environ.get("CI") or os.environ.get("STABLEPREFIX_REQUIRE_CHROMIUM"):
            pytest.fail(message)
        pytest.skip(message)
    return exe


def screenshot(page: Path, tmp_path: Path, name: str) -> Path:
    png = tmp_path / f"{name}.png"
    cmd = [
        chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}",
        f"--screenshot={png}", f"--window-size={WIDTH},{HEIGHT}", page.resolve().as_uri(),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0 and png.is_file(), done.stderr[-2000:]
    if keep := os.environ.get("STABLEPREFIX_KEEP_SCREENSHOTS"):
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(png, Path(keep) / png.name)
    return png


def decode_png(data: bytes) -> tuple[int, int, list[tuple[int, int, int]]]:
    """(width, height, RGB pixels) of an 8-bit, non-interlaced RGB or RGBA PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, []
    width = height = depth = color = interlace = 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat.append(chunk)
        elif kind == b"IEND":
            break
    assert depth == 8 and interlace == 0 and color in (2, 6), (depth, color, interlace)
    bpp = 3 if color == 2 else 4
    raw = zlib.decompress(b"".join(idat))
    stride = width * bpp
    prev = bytearray(stride)
    pixels: list[tuple[int, int, int]] = []
    i = 0
    for _ in range(height):
        kind, line = raw[i], bytearray(raw[i + 1 : i + 1 + stride])
        i += 1 + stride
        if kind == 1:  # Sub
            for x in range(bpp, stride):
                line[x] = (line[x] + line[x - bpp]) & 0xFF
        elif kind == 2:  # Up
            for x in range(stride):
                line[x] = (line[x] + prev[x]) & 0xFF
        elif kind == 3:  # Average
            for x in range(stride):
                left = line[x - bpp] if x >= bpp else 0
                line[x] = (line[x] + ((left + prev[x]) >> 1)) & 0xFF
        elif kind == 4:  # Paeth
            for x in range(stride):
                a = line[x - bpp] if x >= bpp else 0
                b = prev[x]
                c = prev[x - bpp] if x >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[x] = (line[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        else:
            assert kind == 0, f"bad PNG filter {kind}"
        pixels += [(line[x], line[x + 1], line[x + 2]) for x in range(0, stride, bpp)]
        prev = line
    return width, height, pixels


def rgb(hex_colour: str) -> tuple[int, int, int]:
    h = hex_colour.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def near(colours: Counter[tuple[int, int, int]], target: tuple[int, int, int], tol: int = 6) -> int:
    """Pixels within `tol` per channel of `target` (colour management may nudge a value or two)."""
    return sum(
        n for c, n in colours.items() if all(abs(x - y) <= tol for x, y in zip(c, target, strict=True))
    )


def test_report_page_renders_with_its_chart(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    done = subprocess.run(
        [SCRIPT, "report", str(FIXTURES / "report_session.jsonl"), "--html", str(page)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    png = screenshot(page, tmp_path, "report_session")
    width, height, pixels = decode_png(png.read_bytes())
    assert (width, height) == (WIDTH, HEIGHT)
    colours = Counter(pixels)
    assert len(colours) > 200  # text (anti-aliased), cards, tables, chart: far from blank
    background = colours.most_common(1)[0][1]
    assert background < 0.9 * WIDTH * HEIGHT
    # the main stream's chart is on the first screen: its bars in their exact colours
    assert near(colours, rgb(REUSED)) > 5000  # turns 2, 3, 4, 5 reused most of their prompt
    assert near(colours, rgb(LOST)) > 2000  # turns 3 (git_status) and 5 (thinking_dropped)
    assert near(colours, rgb(REPROCESSED)) > 2000  # turn 1 and the server-side miss of turn 6


def test_blank_page_is_told_apart(tmp_path: Path) -> None:
    """The checks above can fail: an empty page has one colour and none of the chart's."""
    page = tmp_path / "blank.html"
    page.write_text("<!DOCTYPE html><html><body style='background:#fff'></body></html>")
    width, height, pixels = decode_png(screenshot(page, tmp_path, "blank").read_bytes())
    colours = Counter(pixels)
    assert (width, height) == (WIDTH, HEIGHT)
    assert len(colours) <= 2
    assert near(colours, rgb(REUSED)) == 0 and near(colours, rgb(LOST)) == 0
