"""Benchmark stableprefix against a real llama-server: with and without the addon, per scenario and turn.

    .venv/bin/python scripts/bench_llama.py            # the full run (~2 minutes on 2 cores)
    .venv/bin/python scripts/bench_llama.py --quick    # a short run
    .venv/bin/python scripts/bench_llama.py --only router,newconv
    .venv/bin/python scripts/bench_llama.py --real-client   # the real Claude Code CLI, two conversations

Runs scripts/install_llama_server.sh (a no-op once built) unless LLAMA_SERVER and LLAMA_MODEL are set, then
for every scenario and arm starts a fresh llama-server and a fresh mitmdump (reverse mode, with the addon or
bare) on 127.0.0.1, replays Claude-Code-shaped sessions and prints Markdown tables. Token counts come from
the responses (reused/processed) and from /metrics (llamacpp:prompt_tokens_total deltas); they are
deterministic and decide pass/fail. Wall times are noisy and shown as ratios bare/addon.
Exit status: 0 when every scenario with a criterion passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the harness lives in tests/support

from stableprefix.cli import process  # noqa: E402
from tests.support import llama as ls  # noqa: E402
from tests.support.helpers import make_repo  # noqa: E402


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs (nproc), {cpu}{mem}"


def ratio(bare: float, addon: float) -> str:
    return f"{bare / addon:.1f}x" if addon > 0 else "-"


def table(res: ls.Result) -> list[str]:
    out = [
        f"### {res.title}",
        "",
        "| step | addon: reused / processed (/metrics Δ) | bare: reused / processed (/metrics Δ) "
        "| new tokens | wall addon / bare (s) | wall bare/addon |",
        "|---|---|---|---|---|---|",
    ]
    for label, a, b in ls.iter_rows(res):
        cells = [label, f"{a.usage.reused:,} / {a.usage.processed:,} ({a.metrics_processed:,})"]
        if b is not None:
            cells.append(f"{b.usage.reused:,} / {b.usage.processed:,} ({b.metrics_processed:,})")
        else:
            cells.append("-")
        cells.append("-" if a.new is None else f"{a.new:,}")
        if b is not None:
            cells += [f"{a.seconds:.2f} / {b.seconds:.2f}", ratio(b.seconds, a.seconds)]
        else:
            cells += [f"{a.seconds:.2f} / -", "-"]
        out.append("| " + " | ".join(cells) + " |")
    add, bare = res.arm(True), res.arm(False)
    out.append(
        f"| **total** | **{add.processed:,}** processed | **{bare.processed:,}** processed | "
        f"| {add.seconds:.1f} / {bare.seconds:.1f} | **{ratio(bare.seconds, add.seconds)}** |"
    )
    out.append("")
    out += [f"- {d}" for d in res.details]
    out.append(f"- **{res.verdict}**")
    out.append("")
    return out


# --- real client: the real Claude Code CLI ------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
CAP_SCRIPT = ROOT / "tests" / "support" / "cap_max_tokens.py"
CLAUDE_INSTALLER = ROOT / "scripts" / "install_claude_code.sh"
#: SmolLM2's 8k training context is too small for Claude Code's ~4.4k-token prompt plus its answer budget
REAL_CLIENT_FLAGS = ("-c", "32768", "--override-kv", "llama.context_length=int:32768")
#: two conversations with different first prompts, three turns each (`--continue` after the first)
REAL_PROMPTS = (
    ("Say hello to the project.", "Now say goodbye.", "Thank you."),
    ("What does app.py print?", "And what is in README.md?", "Thanks."),
)


def claude_bin() -> Path:
    """CLAUDE_BIN, else what scripts/install_claude_code.sh prints (a no-op once installed)."""
    if env := os.environ.get("CLAUDE_BIN"):
        return Path(env)
    out = subprocess.run(["bash", str(CLAUDE_INSTALLER)], capture_output=True, text=True, check=True).stdout
    return Path(out.strip().splitlines()[-1].removeprefix("CLAUDE_BIN="))


@dataclass
class RealRow:
    label: str  # conversation letter, turn number, and the request's index within that CLI run
    cls: str
    verdict: str
    reused: int
    prompt: int
    metrics: int | None  # /metrics delta of the whole CLI run (on its first request's row)
    exit: int


def real_client_arm(server: Path, model: Path, claude: Path, repo: Path, work: Path, addon: bool,
                    turns: int, log: Callable[[str], None]) -> tuple[list[RealRow], int]:  # fmt: skip
    """One arm: fresh llama-server, mitmdump (addon active, or in observe mode: bytes unchanged, figures
    recorded) with the max_tokens cap, the CLI's conversations; the rows and the system prompt's tokens."""
    name = "addon" if addon else "observe"
    home, records, flows = work / f"home-{name}", work / f"{name}.jsonl", work / f"{name}.mitm"
    home.mkdir()
    extra = ["--set", "flow_detail=0", "--set", f"stableprefix_log={records}", "-w", str(flows)]
    if not addon:
        extra += ["--set", "stableprefix_observe=true"]
    rows: list[RealRow] = []
    with ls.LlamaServer(server, model, extra=REAL_CLIENT_FLAGS) as llama:
        args = process.command(mode=f"reverse:{llama.url}", confdir=work / f"conf-{name}",
                               extra=[*extra, "-s", str(CAP_SCRIPT)])  # fmt: skip
        with process.Proxy(args) as proxy:
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "ANTHROPIC_API_KEY": "dummy",
                   "ANTHROPIC_BASE_URL": proxy.url, "DISABLE_AUTOUPDATER": "1"}  # fmt: skip
            seen = 0
            for conv, prompts in zip("AB", REAL_PROMPTS, strict=True):
                for turn, prompt in enumerate(prompts[:turns], 1):
                    before = llama.processed_total()
                    cmd = [str(claude), "-p", prompt, "--output-format", "json"]
                    cmd += ["--continue"] if turn > 1 else []
                    log(f"{name} {conv}{turn}: claude -p {prompt!r}")
                    done = subprocess.run(
                        cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=1800
                    )
                    delta = llama.processed_total() - before
                    recs = _records(records, seen, proxy)
                    seen += len(recs)
                    for i, r in enumerate(recs):
                        rows.append(RealRow(f"{conv}{turn}" + (f".{i + 1}" if len(recs) > 1 else ""),
                                            str(r.get("class")), str(r.get("verdict")), int(r.get("cached_tokens") or 0),
                                            int(r.get("prompt_tokens") or 0), delta if i == 0 else None,
                                            done.returncode))  # fmt: skip
                    if done.returncode != 0:
                        log(f"claude exited {done.returncode}: {done.stdout[-500:]} {done.stderr[-500:]}")
            system_tokens = _system_tokens(flows, llama)
    return rows, system_tokens


def _records(path: Path, seen: int, proxy: process.Proxy, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The records written since the first `seen` ones (the proxy writes each when its response ends)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) > seen or time.monotonic() > deadline:
            return [json.loads(line) for line in lines[seen:]]
        time.sleep(0.1)


def _system_tokens(flows: Path, llama: ls.LlamaServer) -> int:
    """Tokens of the system text of the last request llama-server received (as the proxy forwarded it)."""
    from mitmproxy import http as mhttp
    from mitmproxy import io as mio

    with flows.open("rb") as f:
        reqs = [fl.request for fl in mio.FlowReader(f).stream() if isinstance(fl, mhttp.HTTPFlow)]
    body = json.loads([r for r in reqs if r.method == "POST"][-1].get_content() or b"")
    text = "".join(b["text"] for b in body["system"])  # the template joins the system blocks
    return llama.tokens(text)


def real_client(turns: int, log: Callable[[str], None]) -> tuple[list[str], bool]:
    """The real CLI, two conversations, with and without the addon: per request the tokens the server
    reused and processed; PASS criteria on token counts."""
    found = ls.locate()
    server, model = found if found is not None else ls.install()
    claude = claude_bin()
    version = subprocess.run([str(claude), "--version"], capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="bench-claude-") as tmp:
        work = Path(tmp)
        repo = make_repo(work)
        with_rows, sys_tokens = real_client_arm(server, model, claude, repo, work, True, turns, log)
        without_rows, _ = real_client_arm(server, model, claude, repo, work, False, turns, log)
    out = [
        f"### Real client: Claude Code {version}, two conversations of {turns} turns (`claude -p`, `--continue`)",
        "",
        f"llama-server {' '.join(REAL_CLIENT_FLAGS)}, one slot, --cache-ram 0; max_tokens capped by "
        f"{CAP_SCRIPT.relative_to(ROOT)}; 'without' = the addon in observe mode (bytes unchanged, figures "
        "recorded). Figures per request from the server's own usage; /metrics Δ per CLI run.",
        "",
        "| request | class | verdict | with addon: reused / prompt (processed) | without: reused / prompt (processed) "
        "| /metrics Δ with / without |",
        "|---|---|---|---|---|---|",
    ]
    wo = {r.label: r for r in without_rows}
    for r in with_rows:
        o = wo.get(r.label)
        cells = [r.label, r.cls, r.verdict, f"{r.reused:,} / {r.prompt:,} ({r.prompt - r.reused:,})"]
        cells.append(f"{o.reused:,} / {o.prompt:,} ({o.prompt - o.reused:,})" if o else "-")
        m_o = o.metrics if o and o.metrics is not None else None
        cells.append(f"{r.metrics if r.metrics is not None else '-'} / {m_o if m_o is not None else '-'}")
        out.append("| " + " | ".join(cells) + " |")
    proc_with = sum(r.prompt - r.reused for r in with_rows)
    proc_without = sum(r.prompt - r.reused for r in without_rows)
    out.append(f"| **total processed** | | | **{proc_with:,}** | **{proc_without:,}** | |")
    out.append("")
    checks: list[tuple[str, bool]] = []
    ok_exit = all(r.exit == 0 for r in with_rows + without_rows)
    checks.append(("every CLI run exited 0", ok_exit))
    b1 = next((r for r in with_rows if r.label in ("B1", "B1.1")), None)
    checks.append(
        (f"with the addon, B1 (another first prompt) reused {b1.reused if b1 else '?'} >= the system prompt's "
         f"{sys_tokens} tokens as the server tokenises it", b1 is not None and b1.reused >= sys_tokens)
    )  # fmt: skip
    later = [r for r in with_rows + without_rows if r.label[1] != "1"]
    checks.append(
        ("within a conversation every later turn reused >= 90 % of its prompt (both arms)",
         all(r.reused >= 0.9 * r.prompt for r in later))
    )  # fmt: skip
    out += [f"- {'PASS' if ok else 'FAIL'}: {what}" for what, ok in checks]
    out.append(f"- processed without / with the addon: {proc_without:,} / {proc_with:,}")
    out.append("")
    return out, all(ok for _, ok in checks)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer turns, a smaller prefix")
    ap.add_argument("--only", default="", help=f"comma-separated scenarios: {','.join(ls.SCENARIOS)}")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every request as it is sent")
    ap.add_argument("--real-client", action="store_true",
                    help="only the real Claude Code CLI scenario (CLAUDE_BIN or scripts/install_claude_code.sh)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.real_client:
        say = (lambda s: print(s, file=sys.stderr, flush=True)) if args.verbose else (lambda s: None)
        t0 = time.perf_counter()
        print(f"stableprefix vs llama-server, real client, on {machine()}\n", flush=True)
        lines, passed = real_client(2 if args.quick else 3, say)
        print("\n".join(lines) + f"\ntotal run time {time.perf_counter() - t0:.0f} s", flush=True)
        return 0 if passed else 1
    only = [s for s in args.only.split(",") if s] or list(ls.SCENARIOS)
    unknown = [s for s in only if s not in ls.SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario(s) {unknown}; known: {', '.join(ls.SCENARIOS)}")

    if os.environ.get("LLAMA_SERVER") and os.environ.get("LLAMA_MODEL"):
        found = ls.locate()
        if found is None:
            print(
                "LLAMA_SERVER / LLAMA_MODEL do not point at an executable and a model file", file=sys.stderr
            )
            return 2
        server, model = found
    else:
        server, model = ls.install()

    sizes = ls.QUICK if args.quick else ls.FULL
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.verbose else (lambda s: None)
    t0 = time.perf_counter()
    lines = [
        f"stableprefix vs llama-server ({'quick' if args.quick else 'full'} run) on {machine()}",
        f"server: {server} -c 8192 -t 2 --jinja; model: {model.name}; "
        f"{sizes.turns} turns, system {sizes.system_chars} chars, {sizes.tool_count} tools, "
        f"max_tokens {sizes.max_tokens}, temperature 0; margin {sizes.margin} tokens",
        "",
    ]
    print("\n".join(lines), flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-llama-") as tmp:
        runner = ls.Runner(server, model, Path(tmp), sizes, log)
        for key in only:
            print(f"... running {key}", file=sys.stderr, flush=True)
            res = ls.SCENARIOS[key](runner)
            results.append(res)
            print("\n".join(table(res)), flush=True)
    summary = ["### Summary", "", "| scenario | processed addon | processed bare | wall bare/addon | verdict |",
               "|---|---|---|---|---|"]  # fmt: skip
    for res in results:
        add, bare = res.arm(True), res.arm(False)
        summary.append(
            f"| {res.title.split(':')[0]} | {add.processed:,} | {bare.processed:,} "
            f"| {ratio(bare.seconds, add.seconds)} | {res.verdict} |"
        )
    summary.append("")
    summary.append(f"total run time {time.perf_counter() - t0:.0f} s")
    print("\n".join(summary), flush=True)
    return 0 if all(r.passed is not False for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
