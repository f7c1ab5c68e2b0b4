"""Benchmark stableprefix against a real llama-server: with and without the addon, per scenario and turn.

    .venv/bin/python scripts/bench_llama.py            # the full run (~2 minutes on 2 cores)
    .venv/bin/python scripts/bench_llama.py --quick    # a short run
    .venv/bin/python scripts/bench_llama.py --only router,newconv

Runs scripts/install_llama_server.sh (a no-op once built) unless LLAMA_SERVER and LLAMA_MODEL are set, then
for every scenario and arm starts a fresh llama-server and a fresh mitmdump (reverse mode, with the addon or
bare) on 127.0.0.1, replays Claude-Code-shaped sessions and prints Markdown tables. Token counts come from
the responses (reused/processed) and from /metrics (llamacpp:prompt_tokens_total deltas); they are
deterministic and decide pass/fail. Wall times are noisy and shown as ratios bare/addon.
Exit status: 0 when every scenario with a criterion passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from tests.support import llama as ls


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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer turns, a smaller prefix")
    ap.add_argument("--only", default="", help=f"comma-separated scenarios: {','.join(ls.SCENARIOS)}")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every request as it is sent")
    args = ap.parse_args(argv)
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
