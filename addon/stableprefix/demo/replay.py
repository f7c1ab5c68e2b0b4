"""The embedded default: replay a Claude-Code-shaped session through real mitmdump, without and with the addon.

Both arms run real mitmdump in reverse mode in front of the built-in upstream on 127.0.0.1; the arm
"without" loads the addon in observe mode (hash and log, rewrite nothing), so the prefix hashes printed
for it are those of the bytes the client sent.
"""

from __future__ import annotations

import http.client
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stableprefix.cli import process
from stableprefix.demo import samples
from stableprefix.demo.upstream import Upstream


@dataclass
class Turn:
    label: str
    body: dict[str, Any]


def session_turns() -> list[Turn]:
    """Conversation A over five turns (cch changes per request), with a subagent B starting in between."""
    a = samples.Session(suffix="c39")
    b = samples.Session(suffix="e91", task="Search the code base for callers of parse().")
    turns = [Turn(f"A{t}", a.request(t)) for t in range(1, 4)]
    turns.append(Turn("B1", b.request(1)))
    turns += [Turn(f"A{t}", a.request(t)) for t in range(4, 6)]
    return turns


def post(port: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, json.dumps(body).encode(), {"content-type": "application/json"})
        resp = conn.getresponse()
        return json.loads(resp.read())
    finally:
        conn.close()


def run_arm(observe: bool, turns: list[Turn], workdir: Path) -> list[dict[str, Any]]:
    """Send every turn through mitmdump; the addon's records with the upstream's usage added."""
    log = workdir / ("without.jsonl" if observe else "with.jsonl")
    extra = ["--set", "flow_detail=0", "--set", f"stableprefix_log={log}"]
    if observe:
        extra += ["--set", "stableprefix_observe=true"]
    with Upstream() as up:
        args = process.command(mode=f"reverse:{up.url}", confdir=workdir / "conf", extra=extra)
        with process.Proxy(args) as proxy:
            assert proxy.port is not None
            usages = [post(proxy.port, "/v1/messages?beta=true", t.body).get("usage", {}) for t in turns]
    records = [json.loads(line) for line in log.read_text().splitlines()]
    for rec, usage in zip(records, usages, strict=True):
        rec["usage"] = usage
    return records


def main(html: str | None = None) -> int:
    """Run both arms, print the hash table and the report of both logs; `html`: also write the page."""
    from stableprefix.report import readers
    from stableprefix.report import text as report_text
    from stableprefix.report.html import render_html

    turns = session_turns()
    with tempfile.TemporaryDirectory(prefix="stableprefix-demo-") as tmp:
        without = run_arm(True, turns, Path(tmp))
        with_ = run_arm(False, turns, Path(tmp))
        reports = [
            (
                "Without the addon (observe mode: nothing rewritten)",
                readers.read([Path(tmp) / "without.jsonl"]),
            ),
            ("With the addon", readers.read([Path(tmp) / "with.jsonl"])),
        ]
    print("Replaying a Claude-Code-shaped session (3-block system, cch changing per request, 20 tools,")
    print("growing history; B1 is a subagent with another cc_version suffix) through real mitmdump.")
    print("reused = prompt tokens the built-in upstream's one-slot prefix cache could reuse (simulated).\n")
    print(
        f"{'turn':<5} {'prefix hash without':<20} {'prefix hash with':<20} {'reused without':>15} {'reused with':>13}"
    )
    for t, a, b in zip(turns, without, with_, strict=True):
        ua, ub = a["usage"], b["usage"]
        total_a = ua.get("cache_read_input_tokens", 0) + ua.get("input_tokens", 0)
        total_b = ub.get("cache_read_input_tokens", 0) + ub.get("input_tokens", 0)
        print(
            f"{t.label:<5} {a['prefix_hash'][:12]:<20} {b['prefix_hash'][:12]:<20} "
            f"{ua.get('cache_read_input_tokens', 0):>6,}/{total_a:<8,} {ub.get('cache_read_input_tokens', 0):>6,}/{total_b:<6,}"
        )
    distinct_without = len({r["prefix_hash"] for r in without})
    distinct_with = len({r["prefix_hash"] for r in with_})
    print(f"\nwithout the addon: {distinct_without} distinct prefix hashes in {len(turns)} requests")
    print(
        f"with the addon:    {distinct_with} distinct prefix hash{'es' if distinct_with != 1 else ''} "
        f"in {len(turns)} requests (rules fired: {sorted({k for r in with_ for k in r['changed']})})"
    )
    for title, rep in reports:
        print(f"\n=== stableprefix report: {title} ===")
        print(report_text.render_text(rep), end="")
    if html:
        try:
            Path(html).write_text(render_html(reports, title="stableprefix demo report"), encoding="utf-8")
        except OSError as e:
            print(f"stableprefix: {html}: cannot write: {e.strerror or e}", file=sys.stderr)
            return 2
        print(f"\nwrote {html}")
    return 0 if distinct_with == 1 and distinct_without == len(turns) else 1
