"""Stress the concurrency end-to-end test: N runs of 32 concurrent SSE conversations, then one of 64.

    .venv/bin/python scripts/stress_concurrency.py [--runs 20] [--load 2]

Each run is a fresh pytest process (real mitmdump with the addon, the built-in upstream). `--load K`
keeps K CPU-bound processes busy for the whole time, as another job on the machine would. It also
measures, in process, how long the request hook's analysis holds mitmproxy's event loop for the same
request bodies. Exit status 1 when any run failed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST = "tests/e2e/test_concurrency_e2e.py"


def burn(stop_at: float) -> None:
    while time.monotonic() < stop_at:
        sum(i * i for i in range(10_000))


def run_once(conversations: int) -> tuple[bool, str]:
    env = {**os.environ, "STABLEPREFIX_CONVERSATIONS": str(conversations)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", TEST]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = [line for line in done.stdout.splitlines() if line.strip()][-1:] or ["(no output)"]
    reason = next((ln for ln in done.stdout.splitlines() if ln.startswith("E ")), "")
    return done.returncode == 0, f"{tail[0]} {reason}".strip()


def hook_times() -> list[float]:
    """Milliseconds `Analyzer.request` takes for each request of the 32 conversations, in turn order."""
    sys.path.insert(0, str(ROOT))
    from stableprefix.core.analyzer import Analyzer
    from tests.e2e.test_concurrency_e2e import TURNS
    from tests.e2e.test_concurrency_e2e import conversation

    analyzer = Analyzer()
    bodies = [conversation(i) for i in range(32)]
    out = []
    for turn in range(TURNS):
        for i, raws in enumerate(bodies):
            t0 = time.perf_counter()
            analyzer.request(
                "POST", "127.0.0.1", "/v1/messages", raws[turn], {"x-claude-code-session-id": f"c{i}"}
            )
            out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20, help="runs with 32 conversations (default 20)")
    ap.add_argument("--load", type=int, default=2, help="CPU-bound processes running meanwhile (default 2)")
    args = ap.parse_args()
    plan = [32] * args.runs + [64]
    stop_at = time.monotonic() + 3600
    burners = [multiprocessing.Process(target=burn, args=(stop_at,), daemon=True) for _ in range(args.load)]
    for p in burners:
        p.start()
    failures = 0
    try:
        for n, conversations in enumerate(plan, start=1):
            t0 = time.monotonic()
            ok, tail = run_once(conversations)
            failures += not ok
            print(f"run {n:2}/{len(plan)}: {conversations} conversations: {'ok  ' if ok else 'FAIL'} "
                  f"{time.monotonic() - t0:5.1f} s  {tail}", flush=True)  # fmt: skip
    finally:
        for p in burners:
            p.terminate()
            p.join()
    times = hook_times()
    print(f"request analysis per request (in process, 96 requests of ~30 KB): median "
          f"{statistics.median(times):.2f} ms, max {max(times):.2f} ms")  # fmt: skip
    print(f"stress: {len(plan)} runs, {failures} failures (load: {args.load} busy processes)")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
