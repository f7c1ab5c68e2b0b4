"""A team gateway, for real: N llama-server replicas behind a real router, stableprefix (or nothing) in front.

Shared by ``scripts/bench_gateway.py`` (prints the table) and ``tests/e2e/test_gateway_e2e.py`` (asserts on
token counts), so both measure exactly the same thing. The routers come from ``scripts/install_routers.sh``
(``SGLANG_ROUTER``/``VLLM_ROUTER``, else the installer's cache); the replicas from
``tests/support/llama.py``.

The workload: interleaved Claude-Code-shaped conversations as a translating router sends them to
``/v1/chat/completions`` (the system blocks flattened into one system message whose first line is the
billing header, its ``cch`` different on every request). Requests are sent one at a time, so the growth of
each replica's own ``llamacpp:prompt_tokens_total`` over a request says which replica served it and how many
prompt tokens it evaluated; the response's usage gives the prompt size. Token counts are deterministic.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

from stableprefix.cli import process
from stableprefix.demo import samples
from tests.support import llama as ls
from tests.support.helpers import free_port

SGLANG_ROUTER_VERSION = "0.3.2"
VLLM_ROUTER_VERSION = "0.1.17"
INSTALLER = Path(__file__).resolve().parents[2] / "scripts" / "install_routers.sh"
KINDS = ("sglang", "vllm")
#: The header each router's session policy reads (sglang-router --policy manual; vllm-router consistent_hash).
SESSION_HEADER = {"sglang": "x-smg-routing-key", "vllm": "x-session-id"}
TASKS = (
    "Find why the parser drops the last token and fix it.",
    "Add a --verbose flag to the command line tool and document it.",
    "Write unit tests for the date formatting helpers.",
    "Rename the config loader module and update every import.",
)


# --- finding the routers ------------------------------------------------------------------------------


def locate_router(kind: str) -> Path | None:
    """The router executable from SGLANG_ROUTER/VLLM_ROUTER, else from the installer's cache; None if absent."""
    env = os.environ.get("SGLANG_ROUTER" if kind == "sglang" else "VLLM_ROUTER")
    if env:
        path = Path(env)
    else:
        base = Path(os.environ.get("STABLEPREFIX_CACHE") or Path.home() / ".cache" / "stableprefix")
        name, version = ("sglang-router", SGLANG_ROUTER_VERSION) if kind == "sglang" else (
            "vllm-router", VLLM_ROUTER_VERSION)  # fmt: skip
        path = base / "routers" / f"{name}-{version}" / "bin" / name
    return path if path.is_file() and os.access(path, os.X_OK) else None


# --- processes ----------------------------------------------------------------------------------------


class Router:
    """A real sglang-router or vllm-router on 127.0.0.1 (free ports, metrics on loopback), stopped by pid."""

    def __init__(self, kind: str, exe: Path, workers: list[str], policy: str,
                 extra: tuple[str, ...] = (), timeout: float = 60.0) -> None:  # fmt: skip
        if kind not in KINDS:
            raise ValueError(f"router kind {kind!r} is not one of {', '.join(KINDS)}")
        self.kind, self.policy = kind, policy
        self.port, metrics_port = free_port(), free_port()
        head = [str(exe), "launch"] if kind == "sglang" else [str(exe)]
        level = "warn" if kind == "sglang" else "warning"
        self.args = [*head, "--host", "127.0.0.1", "--port", str(self.port), "--worker-urls", *workers,
                     "--policy", policy, "--prometheus-host", "127.0.0.1", "--prometheus-port",
                     str(metrics_port), "--log-level", level, *extra]  # fmt: skip
        self.log = tempfile.NamedTemporaryFile("w+", prefix=f"{kind}-router-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{kind}-router exited with {self.proc.returncode}:\n{self.output()[-3000:]}"
                )
            if self.healthy_workers() == len(workers):  # /health answers 200 before the workers register
                break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"{kind}-router did not register {len(workers)} healthy workers in {timeout:.0f} s:\n"
                    f"{self.output()[-3000:]}"
                )
            time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy_workers(self) -> int:
        """Workers the router lists as healthy (GET /workers, both routers); 0 while it is not up."""
        try:
            status, data = ls.request(self.port, "GET", "/workers", timeout=5)
            workers = json.loads(data).get("workers", []) if status == 200 else []
        except (OSError, ValueError, AttributeError):
            return 0
        return sum(1 for w in workers if isinstance(w, dict) and w.get("is_healthy") is True)

    def output(self) -> str:
        try:
            return Path(self.log.name).read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> int:
        code = process.terminate(self.proc, grace=10)
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)
        return code


# --- the workload -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """Interleaved conversations: turn 1 of each, then turn 2 of each, ... (as a team's members work)."""

    conversations: int = 4
    turns: int = 3
    system_chars: int = 3000  # with the identity block and the tools: a ~1k-token system prompt
    tool_count: int = 4
    result_chars: int = 200
    max_tokens: int = 2

    def session(self, c: int) -> samples.Session:
        return samples.Session(suffix=f"{c + 1:x}a{c + 7:x}", task=TASKS[c % len(TASKS)],
                               system_chars=self.system_chars, tool_count=self.tool_count,
                               result_chars=self.result_chars, max_tokens=self.max_tokens)  # fmt: skip

    def requests(self) -> list[tuple[int, int, dict[str, Any]]]:
        """(conversation, turn, /v1/chat/completions body) in sending order; every cch differs."""
        out = []
        for t in range(1, self.turns + 1):
            for c in range(self.conversations):
                body = self.session(c).request(t, cch_seed=c + 1)
                body["temperature"] = 0
                out.append((c, t, ls.to_chat(body)))
        return out


@dataclass(frozen=True)
class Served:
    """One request as the replicas saw it."""

    conversation: int
    turn: int
    replica: int | None  # the replica whose prompt_tokens_total grew (None: neither or both)
    prompt: int  # prompt tokens (response usage)
    processed: int  # prompt tokens evaluated (sum of the replicas' /metrics growth)
    headers_sent: dict[str, str] = field(default_factory=dict)


@dataclass
class ArmResult:
    router: str
    policy: str
    addon: bool
    header: str | None
    served: list[Served] = field(default_factory=list)

    @property
    def processed(self) -> int:
        return sum(s.processed for s in self.served)

    @property
    def prompt(self) -> int:
        return sum(s.prompt for s in self.served)

    @property
    def share(self) -> float:
        return self.processed / self.prompt if self.prompt else 0.0

    def replicas_of(self, conversation: int) -> set[int | None]:
        return {s.replica for s in self.served if s.conversation == conversation}

    def spread(self, replicas: int) -> list[int]:
        """Requests per replica."""
        return [sum(1 for s in self.served if s.replica == r) for r in range(replicas)]

    def sticky(self) -> bool:
        """Every conversation's requests all landed on one replica."""
        convs = {s.conversation for s in self.served}
        return all(len(self.replicas_of(c)) == 1 and None not in self.replicas_of(c) for c in convs)


def post(port: int, path: str, body: dict[str, Any], timeout: float = 600.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, json.dumps(body).encode(), {"content-type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@dataclass(frozen=True)
class Setup:
    router: str  # sglang | vllm
    policy: str
    addon: bool
    header: str | None = None  # the affinity header stableprefix sets (None: none)
    router_extra: tuple[str, ...] = ()
    replicas: int = 2
    slots: int = 1
    cache_ram: int | None = None  # None: llama-server's default host-RAM prompt cache

    @property
    def label(self) -> str:
        front = f"stableprefix + {self.header}" if self.addon and self.header else (
            "stableprefix" if self.addon else "none (direct)")  # fmt: skip
        return f"{self.router}-router {self.policy}, front: {front}"


def run_arm(setup: Setup, server: Path, model: Path, router_exe: Path, workload: Workload, confdir: Path,
            log: Callable[[str], None] = lambda _: None) -> ArmResult:  # fmt: skip
    """Fresh replicas, a fresh router, stableprefix (or nothing) in front; send the workload; stop all by pid."""
    result = ArmResult(setup.router, setup.policy, setup.addon, setup.header)
    reps: list[ls.LlamaServer] = []
    router: Router | None = None
    proxy: process.Proxy | None = None
    try:
        for _ in range(setup.replicas):
            reps.append(ls.LlamaServer(server, model, slots=setup.slots, cache_ram=setup.cache_ram))
        router = Router(setup.router, router_exe, [r.url for r in reps], setup.policy, setup.router_extra)
        port = router.port
        if setup.addon:
            opts = ["--set", "flow_detail=0"]
            if setup.header:
                opts += ["--set", f"stableprefix_affinity_header={setup.header}"]
            args = process.command(mode=f"reverse:{router.url}", confdir=confdir, extra=opts)
            proxy = process.Proxy(args)
            assert proxy.port is not None
            port = proxy.port
        for conv, turn, body in workload.requests():
            before = [r.processed_total() for r in reps]
            status, data = post(port, ls.CHAT, body)
            if status != 200:
                raise RuntimeError(f"conversation {conv} turn {turn}: {status} {data[:300]!r}")
            grew = [r.processed_total() - b for r, b in zip(reps, before, strict=True)]
            usage = ls.usage_of(json.loads(data))
            hit = [i for i, g in enumerate(grew) if g > 0]
            served = Served(conv, turn, hit[0] if len(hit) == 1 else None, usage.prompt, sum(grew))
            result.served.append(served)
            log(f"  {setup.label}: conv {conv} turn {turn} -> replica {served.replica} "
                f"prompt={served.prompt} processed={served.processed}")  # fmt: skip
    finally:
        if proxy is not None:
            proxy.stop()
        if router is not None:
            router.stop()
        for r in reps:
            r.stop()
    return result
