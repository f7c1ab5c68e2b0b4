"""The team gateway, measured: real routers in front of real llama-server replicas, with and without stableprefix.

    .venv/bin/python scripts/bench_gateway.py               # every arm (sglang-router and vllm-router)
    .venv/bin/python scripts/bench_gateway.py --quick       # sglang-router manual: with vs without
    .venv/bin/python scripts/bench_gateway.py --only sg-manual,sg-manual-sp -v

Runs scripts/install_llama_server.sh and scripts/install_routers.sh (no-ops once installed) unless the
LLAMA_SERVER/LLAMA_MODEL and SGLANG_ROUTER/VLLM_ROUTER variables are set. Each arm starts fresh replicas
(llama-server, SmolLM2-135M, one slot, its default host-RAM prompt cache), a fresh router and, for the
stableprefix arms, a fresh mitmdump with the addon (reverse mode in front of the router, the affinity header
on where the policy reads one), all on 127.0.0.1, then sends the same interleaved conversations to
/v1/chat/completions: a ~1k-token system prompt whose first line is Claude Code's billing header with a
different cch on every request, small turns, max_tokens 2, temperature 0. Requests go one at a time, so the
growth of each replica's llamacpp:prompt_tokens_total says which replica served a request and how many
prompt tokens it evaluated; the prompt size is the response's usage. All figures are server-reported token
counts (deterministic); the wall time is printed per arm for information only.

Exit status: 0 when every stableprefix arm with a session policy kept each conversation on one replica and
evaluated at most 30 % of the prompt while its direct twin evaluated over 90 %; 1 otherwise; 2 when the
installers fail.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # tests.support lives beside the package, not in it
    sys.path.insert(0, str(ROOT))

from tests.support import gateway as gw  # noqa: E402
from tests.support import llama as ls  # noqa: E402

MIN_GROUP = ("--assignment-mode", "min_group")
#: key -> the arm; "-sp" arms put stableprefix in front (with the affinity header where the policy reads one).
ARMS: dict[str, gw.Setup] = {
    "sg-cache": gw.Setup("sglang", "cache_aware", False),
    "sg-rr": gw.Setup("sglang", "round_robin", False),
    "sg-manual": gw.Setup("sglang", "manual", False, None, MIN_GROUP),
    "vllm-hash": gw.Setup("vllm", "consistent_hash", False),
    "sg-cache-sp": gw.Setup("sglang", "cache_aware", True),
    "sg-rr-sp": gw.Setup("sglang", "round_robin", True),
    "sg-manual-sp": gw.Setup("sglang", "manual", True, gw.SESSION_HEADER["sglang"], MIN_GROUP),
    "vllm-hash-sp": gw.Setup("vllm", "consistent_hash", True, gw.SESSION_HEADER["vllm"]),
}
QUICK = ("sg-manual", "sg-manual-sp")
#: stableprefix arm -> its direct twin, for the pass/fail criterion (session policies only)
CRITERIA = {"sg-manual-sp": "sg-manual", "vllm-hash-sp": "vllm-hash"}


def installed(script: str, keys: tuple[str, ...]) -> dict[str, str]:
    """Run an installer (progress on our stderr) and parse its KEY=path lines."""
    proc = subprocess.run(["bash", str(ROOT / "scripts" / script)], stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/{script} failed with exit status {proc.returncode}")
    found = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    missing = [k for k in keys if k not in found]
    if missing:
        raise RuntimeError(f"scripts/{script} printed no {', '.join(missing)}")
    return found


def tools() -> tuple[Path, Path, dict[str, Path]]:
    if not (os.environ.get("LLAMA_SERVER") and os.environ.get("LLAMA_MODEL")):
        os.environ.update(installed("install_llama_server.sh", ("LLAMA_SERVER", "LLAMA_MODEL")))
    if not (os.environ.get("SGLANG_ROUTER") and os.environ.get("VLLM_ROUTER")):
        os.environ.update(installed("install_routers.sh", ("SGLANG_ROUTER", "VLLM_ROUTER")))
    found = ls.locate()
    routers = {k: gw.locate_router(k) for k in gw.KINDS}
    if found is None or None in routers.values():
        raise RuntimeError("llama-server, its model or a router is not where the installers said")
    return found[0], found[1], {k: v for k, v in routers.items() if v is not None}


def row(key: str, res: gw.ArmResult, replicas: int, seconds: float) -> str:
    setup = ARMS[key]
    front = "stableprefix" + (f" + `{setup.header}`" if setup.header else "") if setup.addon else "none"
    policy = setup.policy + (" (min_group)" if "min_group" in setup.router_extra else "")
    spread = "/".join(str(n) for n in res.spread(replicas))
    unknown = sum(1 for s in res.served if s.replica is None)
    sticky = "yes" if res.sticky() else "no"
    return (f"| {key} | {setup.router}-router | {policy} | {front} | {res.processed:,} / {res.prompt:,} "
            f"| {res.share:.1%} | {spread}{f' (+{unknown} unclear)' if unknown else ''} | {sticky} "
            f"| {seconds:.0f} |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--only", default="", help=f"comma-separated arms: {','.join(ARMS)}")
    ap.add_argument("--conversations", type=int, default=4, help="interleaved conversations (default 4)")
    ap.add_argument("--turns", type=int, default=3, help="turns per conversation (default 3)")
    ap.add_argument("--replicas", type=int, default=2, help="llama-server replicas (default 2)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every request as it is served")
    args = ap.parse_args(argv)
    keys = [k for k in args.only.split(",") if k] or list(QUICK if args.quick else ARMS)
    unknown = [k for k in keys if k not in ARMS]
    if unknown:
        ap.error(f"unknown arm(s) {unknown}; known: {', '.join(ARMS)}")
    try:
        server, model, routers = tools()
    except RuntimeError as e:
        print(f"bench_gateway: {e}", file=sys.stderr)
        return 2
    workload = gw.Workload(conversations=args.conversations, turns=args.turns)
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if args.verbose else (lambda s: None)
    print(
        f"stableprefix as a team gateway: {args.replicas} llama-server replicas ({model.name}, 1 slot, "
        f"default host-RAM prompt cache) behind a router; {workload.conversations} interleaved "
        f"conversations x {workload.turns} turns on /v1/chat/completions, billing header first with a new "
        f"cch on every request, max_tokens {workload.max_tokens}. Tokens: the replicas' /metrics "
        "(evaluated) and the responses' usage (prompt).\n",
        flush=True,
    )
    lines = ["| arm | router | policy | in front | evaluated / prompt tokens | share | requests per replica "
             "| each conversation on one replica | wall s |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    print("\n".join(lines), flush=True)
    results: dict[str, gw.ArmResult] = {}
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
        for key in keys:
            setup = gw.Setup(**{**ARMS[key].__dict__, "replicas": args.replicas})
            print(f"... running {key}: {setup.label}", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            res = gw.run_arm(setup, server, model, routers[setup.router], workload, Path(tmp) / key, log)
            results[key] = res
            print(row(key, res, args.replicas, time.perf_counter() - t0), flush=True)
    verdicts = []
    for sp, direct in CRITERIA.items():
        if sp in results and direct in results:
            a, b = results[sp], results[direct]
            ok = a.sticky() and a.share <= 0.30 and b.share > 0.90
            verdicts.append(ok)
            print(f"\n{sp} vs {direct}: {'PASS' if ok else 'FAIL'} (sticky {a.sticky()}, "
                  f"{a.share:.1%} <= 30 % with stableprefix, {b.share:.1%} > 90 % without)")  # fmt: skip
    return 0 if all(verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
