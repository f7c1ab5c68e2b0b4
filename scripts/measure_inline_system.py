"""The rule ``inline_system`` measured with the real Claude Code CLI on a real llama-server (issue 12, item 7).

    eval "$(bash scripts/install_llama_server.sh)"; export LLAMA_SERVER LLAMA_MODEL
    eval "$(bash scripts/install_claude_code.sh)"; export CLAUDE_BIN
    .venv/bin/python scripts/measure_inline_system.py

Three arms, each on a fresh one-slot llama-server (``--cache-ram 0``): mitmdump without the addon, with the addon
(default rules), and with the addon and ``stableprefix_enable=inline_system``. Each arm runs the conversations of
``scripts/cross_conversation.py``: ``claude -p "Say hello to the project."``, ``... "Now say goodbye." --continue``,
then a new conversation ``claude -p "What does app.py print?"``. Printed per request: the prompt tokens and the
tokens reused, as llama-server reported them in its response (usage/timings), side by side; and each answer's
start, to judge whether the model still answers (SmolLM2-135M answers nonsense in every arm).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.support
sys.path.insert(0, str(ROOT / "scripts"))  # cross_conversation

import cross_conversation as cc  # noqa: E402

from stableprefix.cli import process  # noqa: E402
from stableprefix.core import evidence  # noqa: E402
from tests.support import llama as ls  # noqa: E402

#: Loaded last: keeps a copy of each /v1/messages request as forwarded and of its response (streamed or not).
RECORDER = """
import os
from mitmproxy import http
OUT = os.environ["MEASURE_DIR"]
def _name(flow):
    n = flow.metadata.get("measure_n")
    if n is None:
        n = len([f for f in os.listdir(OUT) if f.endswith(".req")])
        flow.metadata["measure_n"] = n
    return os.path.join(OUT, "%04d" % n)
def request(flow):
    if flow.request.method == "POST" and "/v1/messages" in flow.request.path:
        with open(_name(flow) + ".req", "wb") as fo:
            fo.write(flow.request.path.encode() + b"\\n" + (flow.request.content or b""))
def responseheaders(flow):
    if "measure_n" not in flow.metadata or flow.response is None:
        return
    inner = flow.response.stream if callable(flow.response.stream) else None
    if inner is None and not flow.response.stream:
        return
    path = _name(flow) + ".resp"
    def tee(data):
        if inner is not None:
            out = inner(data)
            data = out if isinstance(out, bytes) else b"".join(out)
        with open(path, "ab") as fo:
            fo.write(data)
        return data
    flow.response.stream = tee
def response(flow):
    if "measure_n" in flow.metadata and flow.response is not None and flow.response.content:
        with open(_name(flow) + ".resp", "wb") as fo:
            fo.write(flow.response.content)
"""

ARMS: tuple[tuple[str, list[str] | None], ...] = (
    ("no addon", None),
    ("addon (default rules)", []),
    ("addon + inline_system", ["inline_system"]),
)


def arm(rules: list[str] | None, bin_: str, root: Path) -> list[dict[str, Any]]:
    """One arm; per CLI run, its /v1/messages requests with the server's figures, and the answer."""
    root.mkdir()
    (home := root / "home").mkdir()
    (rec := root / "rec").mkdir()
    repo = cc.make_repo(root)
    (root / "rec.py").write_text(RECORDER)
    server = ls.LlamaServer(Path(os.environ["LLAMA_SERVER"]), Path(os.environ["LLAMA_MODEL"]), slots=1)
    runs: list[dict[str, Any]] = []
    os.environ["MEASURE_DIR"] = str(rec)
    try:
        extra = ["--set", "flow_detail=0", "-s", str(cc.CAP_SCRIPT), "-s", str(root / "rec.py")]
        for name in rules or []:
            extra += ["--set", f"stableprefix_enable={name}"]
        args = process.command(mode=f"reverse:{server.url}", confdir=root / "conf", addon=rules is not None,
                               extra=extra)  # fmt: skip
        with process.Proxy(args, wait_for_addon=rules is not None, env=cc.CAP_ENV) as proxy:
            for p in cc.PROMPTS:
                before = len(list(rec.glob("*.req")))
                answer = cc.claude(bin_, proxy.url, home, repo, *p)
                runs.append({"prompt": " ".join(p), "answer": answer, "first": before})
    finally:
        server.stop()
    reqs = sorted(rec.glob("*.req"))
    for i, run in enumerate(runs):
        last = runs[i + 1]["first"] if i + 1 < len(runs) else len(reqs)
        run["requests"] = []
        for req in reqs[run["first"] : last]:
            path, _, body = req.read_bytes().partition(b"\n")
            resp = req.with_suffix(".resp")
            ev = evidence.from_body(resp.read_bytes() if resp.exists() else None)
            run["requests"].append({"path": path.decode(), "bytes": len(body),
                                    "prompt": ev.prompt_tokens if ev else None,
                                    "reused": ev.cached_tokens if ev else None})  # fmt: skip
    return runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--claude", default=os.environ.get("CLAUDE_BIN", ""), help="the claude binary")
    args = ap.parse_args()
    if not args.claude or not Path(args.claude).is_file():
        print("set CLAUDE_BIN (or --claude) to the Claude Code binary", file=sys.stderr)
        return 2
    results: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="stableprefix-inline-") as tmp:
        for i, (name, rules) in enumerate(ARMS):
            results[name] = arm(rules, args.claude, Path(tmp) / f"arm{i}")
    print(
        "tokens reused / prompt tokens, as llama-server reported them (first /v1/messages request of each run)"
    )
    print(f"{'run':<40}" + "".join(f"{name:>26}" for name in results))
    for k, p in enumerate(cc.PROMPTS):
        cells = []
        for runs in results.values():
            r = runs[k]["requests"][0] if runs[k]["requests"] else {}
            cells.append(f"{r.get('reused')}/{r.get('prompt')}" if r else "-")
        print(f"{' '.join(p)[:39]:<40}" + "".join(f"{c:>26}" for c in cells))
    print("answers (start):")
    for name, runs in results.items():
        for run in runs:
            print(f"  {name:<24} {run['prompt'][:30]:<32} {run['answer'][:70]!r}")
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
