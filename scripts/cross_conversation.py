"""Two real Claude Code conversations with different first prompts, through mitmdump with the addon in observe
mode and then rewriting, to a real llama-server (one slot, restarted between the arms); prints both reports.

    eval "$(bash scripts/install_llama_server.sh)"; export LLAMA_SERVER LLAMA_MODEL
    CLAUDE_BIN=~/.cache/stableprefix/claude-code/2.1.332/node_modules/@anthropic-ai/claude-code-linux-x64/claude \\
        .venv/bin/python scripts/cross_conversation.py [--keep DIR]

Conversation 1: ``claude -p "Say hello to the project."`` then ``claude -p "Now say goodbye." --continue``;
conversation 2: ``claude -p "What does app.py print?"``. What to look for (issue 12): in observe mode the
second conversation's first request names ``billing`` (the per-conversation ``cc_version`` suffix) with its
cost in tokens; rewriting, the report's saving equals (within 10 %) what observe mode says the rules would
save. The token counts are llama-server's own (timings/usage), deterministic for a given model and CLI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.support, run as a script

from stableprefix.cli import process  # noqa: E402
from stableprefix.report import jsondoc  # noqa: E402
from stableprefix.report import readers  # noqa: E402
from stableprefix.report import text as report_text  # noqa: E402
from tests.support import llama as ls  # noqa: E402
from tests.support.helpers import make_repo  # noqa: E402

#: A small model rambles until max_tokens (Claude Code asks for 32,000; llama-server's -n does not cap a request's
#: max_tokens) and Claude Code asks a capped answer to continue: the benchmark's mitmproxy script, loaded after
#: the addon, lowers max_tokens (not part of the prompt) to 24 here and reports the capped stop as end_turn.
CAP_SCRIPT = Path(__file__).resolve().parent.parent / "tests" / "support" / "cap_max_tokens.py"
CAP_ENV = {"STABLEPREFIX_CAP_MAX_TOKENS": "24"}

PROMPTS = [
    ("Say hello to the project.",),
    ("Now say goodbye.", "--continue"),
    ("What does app.py print?",),
]


def claude(bin_: str, url: str, home: Path, repo: Path, prompt: str, *extra: str) -> str:
    """One ``claude -p`` run through `url`; its answer's text."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "ANTHROPIC_BASE_URL": url,
           "ANTHROPIC_API_KEY": "dummy", "DISABLE_AUTOUPDATER": "1"}  # fmt: skip
    args = [bin_, "-p", prompt, "--output-format", "json", *extra]
    proc = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"claude exited {proc.returncode}: {proc.stdout[-1000:]} {proc.stderr[-1000:]}")
    return str(json.loads(proc.stdout).get("result", ""))


def arm(observe: bool, bin_: str, work: Path) -> Path:
    """One arm: a fresh llama-server, mitmdump with the addon, the three CLI runs; the JSONL log's path."""
    name = "observe" if observe else "active"
    root = work / name
    root.mkdir()
    home = root / "home"
    home.mkdir()
    repo = make_repo(root)
    log = root / "log.jsonl"
    server = ls.LlamaServer(Path(os.environ["LLAMA_SERVER"]), Path(os.environ["LLAMA_MODEL"]), slots=1)
    try:
        extra = ["--set", "flow_detail=0", "--set", f"stableprefix_log={log}", "-w", str(root / "flows.mitm"),
                 "-s", str(CAP_SCRIPT)]  # fmt: skip
        if observe:
            extra += ["--set", "stableprefix_observe=true"]
        args = process.command(mode=f"reverse:{server.url}", confdir=root / "conf", extra=extra)
        with process.Proxy(args, env=CAP_ENV) as proxy:
            for p in PROMPTS:
                claude(bin_, proxy.url, home, repo, *p)
    finally:
        server.stop()
    return log


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--claude", default=os.environ.get("CLAUDE_BIN", ""), help="the claude binary")
    ap.add_argument("--keep", metavar="DIR", help="copy the logs and flow files here")
    args = ap.parse_args()
    if not args.claude or not Path(args.claude).is_file():
        print("set CLAUDE_BIN (or --claude) to the Claude Code binary", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="stableprefix-cross-") as tmp:
        work = Path(tmp)
        logs = {"observe": arm(True, args.claude, work), "active": arm(False, args.claude, work)}
        docs: dict[str, Any] = {}
        for name, log in logs.items():
            rep = readers.read([log], progress=False)
            print(f"=== stableprefix report ({name} mode) ===")
            print(report_text.render_text(rep))
            docs[name] = jsondoc.document(rep)["totals"]
            flows = readers.read([log.parent / "flows.mitm"], progress=False)
            print(f"=== stableprefix report of the flow file ({name} mode) ===")
            print(report_text.render_text(flows))
        if args.keep:
            dest = Path(args.keep)
            dest.mkdir(parents=True, exist_ok=True)
            for name in logs:
                for f in ("log.jsonl", "flows.mitm"):
                    shutil.copy(work / name / f, dest / f"{name}_{f}")
    observe_rules, active_rules = docs["observe"]["rules"], docs["active"]["rules"]
    print(json.dumps({"observe": {"would_save": observe_rules["would_save"],
                                  "reprocessed_by_cause": docs["observe"]["reprocessed_by_cause"]},
                      "active": {"saved": active_rules["saved"]}}, indent=1))  # fmt: skip
    would = (observe_rules["would_save"] or {}).get("tokens", 0)
    saved = (active_rules["saved"] or {}).get("tokens", 0)
    agree = saved > 0 and abs(saved - would) <= 0.1 * saved
    print(
        f"saved (active) {saved:,} vs would save (observe) {would:,}: {'within' if agree else 'NOT within'} 10 %"
    )
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
