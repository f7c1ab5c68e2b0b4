"""A real llama.cpp ``llama-server`` behind real mitmdump: start/stop, metrics, and the benchmark scenarios.

Shared by ``scripts/bench_llama.py`` (prints the tables) and ``tests/e2e/test_llama_e2e.py`` (asserts on
token counts), so both measure exactly the same thing. Nothing here imports mitmproxy; mitmdump runs as a
subprocess through `stableprefix.cli.process`.

The server is found through ``LLAMA_SERVER``/``LLAMA_MODEL``, else in the installer's cache
(``${STABLEPREFIX_CACHE:-~/.cache/stableprefix}/llama``); `install` runs
``scripts/install_llama_server.sh`` (idempotent, well under a second once built).

Token counts are deterministic (temperature 0, greedy, fixed prompts), so every criterion uses them; wall
times are noisy and only reported.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import time
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

from stableprefix.cli import process
from stableprefix.demo import samples
from tests.support.helpers import free_port
from tests.support.helpers import wait_until

MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALLER = Path(__file__).resolve().parents[2] / "scripts" / "install_llama_server.sh"
MESSAGES = "/v1/messages?beta=true"
CHAT = "/v1/chat/completions"
#: Server flags of every arm (the reference recipe); slots and the host-RAM cache vary per scenario.
BASE_FLAGS = ("-c", "8192", "-t", "2", "--metrics", "--slots", "--jinja", "--no-webui")


# --- finding and installing the server ----------------------------------------------------------


def cache_root() -> Path:
    base = os.environ.get("STABLEPREFIX_CACHE") or str(Path.home() / ".cache" / "stableprefix")
    return Path(base) / "llama"


def locate() -> tuple[Path, Path] | None:
    """(server, model) from LLAMA_SERVER/LLAMA_MODEL, else from the installer's cache; None if missing."""
    env_server, env_model = os.environ.get("LLAMA_SERVER"), os.environ.get("LLAMA_MODEL")
    server = Path(env_server) if env_server else cache_root() / "bin" / "llama-server"
    model = Path(env_model) if env_model else cache_root() / "model" / MODEL_NAME
    if server.is_file() and os.access(server, os.X_OK) and model.is_file():
        return server, model
    return None


def parse_install_output(stdout: str) -> tuple[Path, Path]:
    """The paths from the installer's last two stdout lines ``LLAMA_SERVER=…`` / ``LLAMA_MODEL=…``."""
    found: dict[str, str] = {}
    for line in stdout.strip().splitlines()[-2:]:
        key, sep, value = line.strip().partition("=")
        if sep and key in ("LLAMA_SERVER", "LLAMA_MODEL") and value:
            found[key] = value
    if set(found) != {"LLAMA_SERVER", "LLAMA_MODEL"}:
        raise ValueError(
            f"installer output does not end with LLAMA_SERVER=/LLAMA_MODEL= lines: {stdout[-300:]!r}"
        )
    return Path(found["LLAMA_SERVER"]), Path(found["LLAMA_MODEL"])


def install(installer: Path = INSTALLER, timeout: float = 1800.0) -> tuple[Path, Path]:
    """Run the installer (progress on our stderr) and return (server, model)."""
    if not installer.is_file():
        raise FileNotFoundError(f"{installer} not found (run from a checkout of stableprefix)")
    proc = subprocess.run(["bash", str(installer)], stdout=subprocess.PIPE, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{installer} failed with exit status {proc.returncode} (its messages are above)")
    return parse_install_output(proc.stdout)


# --- /metrics and usage -------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition → {name (with labels, if any): value}; comments and junk lines skipped."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "}" in line:
            name, _, rest = line.rpartition("}")
            name += "}"
        else:
            name, _, rest = line.partition(" ")
        fields = rest.split()
        if not name or not fields:
            continue
        try:
            out[name.strip()] = float(fields[0])
        except ValueError:
            continue
    return out


@dataclass(frozen=True)
class Usage:
    reused: int  # prompt tokens taken from the KV cache
    processed: int  # prompt tokens the server evaluated

    @property
    def prompt(self) -> int:
        return self.reused + self.processed


def usage_of(body: dict[str, Any]) -> Usage:
    """What the server reported for one non-streaming response of /v1/messages or /v1/chat/completions."""
    timings = body.get("timings")
    if isinstance(timings, dict) and "prompt_n" in timings:
        return Usage(int(timings.get("cache_n", 0)), int(timings["prompt_n"]))
    usage = body.get("usage")
    if isinstance(usage, dict) and "input_tokens" in usage:
        return Usage(int(usage.get("cache_read_input_tokens") or 0), int(usage["input_tokens"]))
    if isinstance(usage, dict) and "prompt_tokens" in usage:
        details = usage.get("prompt_tokens_details") or {}
        cached = int(details.get("cached_tokens") or 0)
        return Usage(cached, int(usage["prompt_tokens"]) - cached)
    raise ValueError(f"no usage in response: {json.dumps(body)[:300]}")


# --- processes ----------------------------------------------------------------------------------


def request(port: int, method: str, path: str, body: Any = None, timeout: float = 600.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request(method, path, data, {"content-type": "application/json"} if data is not None else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class LlamaServer:
    """One llama-server on 127.0.0.1 (free port), ready once /health answers 200, stopped by pid."""

    def __init__(self, server: Path, model: Path, slots: int = 1, cache_ram: int | None = 0,
                 extra: tuple[str, ...] = (), timeout: float = 120.0) -> None:  # fmt: skip
        self.port = free_port()
        self.args = [str(server), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                     *BASE_FLAGS, "-np", str(slots)]  # fmt: skip
        if cache_ram is not None:
            self.args += ["--cache-ram", str(cache_ram)]
        self.args += list(extra)
        self.child = process.Child(self.args, keep=2000)
        self.proc = self.child.proc

        def healthy() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"llama-server exited with {self.proc.returncode}:\n{self.output()[-3000:]}"
                )
            try:
                return request(self.port, "GET", "/health", timeout=5)[0] == 200
            except OSError:
                return False

        if not wait_until(healthy, timeout, interval=0.1):
            self.stop()
            raise RuntimeError(f"llama-server not healthy after {timeout:.0f} s:\n{self.output()[-3000:]}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.child.output()

    def metrics(self) -> dict[str, float]:
        status, data = request(self.port, "GET", "/metrics", timeout=30)
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}: {data[:200]!r}")
        return parse_metrics(data.decode())

    def processed_total(self) -> int:
        return int(self.metrics().get("llamacpp:prompt_tokens_total", 0))

    def tokens(self, text: str) -> int:
        status, data = request(self.port, "POST", "/tokenize", {"content": text, "add_special": False})
        if status != 200:
            raise RuntimeError(f"/tokenize answered {status}")
        return len(json.loads(data)["tokens"])

    def stop(self) -> int:
        """SIGTERM by pid, SIGKILL after 15 s; the exit status."""
        return self.child.stop(grace=15)

    def __enter__(self) -> LlamaServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_proxy(target: str, addon: bool, confdir: Path) -> process.Proxy:
    """Real mitmdump in reverse mode in front of `target`; bare (no addon) when `addon` is False."""
    args = process.command(
        mode=f"reverse:{target}", confdir=confdir, addon=addon, extra=["--set", "flow_detail=0"]
    )
    return process.Proxy(args, wait_for_addon=addon)


# --- request shapes -----------------------------------------------------------------------------


def to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic Messages body as a translating router (claude-code-router) sends it to
    /v1/chat/completions: the system blocks flattened into one system message (billing line first,
    joined with "\\n"), tools as functions, tool_use/tool_result as tool_calls/tool messages."""
    system = body.get("system") or []
    sys_text = system if isinstance(system, str) else "\n".join(b["text"] for b in system)
    messages: list[dict[str, Any]] = [{"role": "system", "content": sys_text}]
    for m in body["messages"]:
        content = m["content"]
        if isinstance(content, str):
            messages.append({"role": m["role"], "content": content})
            continue
        texts = [{"type": "text", "text": c["text"]} for c in content if c["type"] == "text"]
        if m["role"] == "assistant":
            out: dict[str, Any] = {"role": "assistant", "content": "\n".join(t["text"] for t in texts)}
            calls = [
                {"id": c["id"], "type": "function",
                 "function": {"name": c["name"], "arguments": json.dumps(c["input"])}}
                for c in content if c["type"] == "tool_use"
            ]  # fmt: skip
            if calls:
                out["tool_calls"] = calls
            messages.append(out)
            continue
        for c in content:
            if c["type"] == "tool_result":
                result = (
                    c["content"]
                    if isinstance(c["content"], str)
                    else "\n".join(x["text"] for x in c["content"])
                )
                messages.append({"role": "tool", "tool_call_id": c["tool_use_id"], "content": result})
        if texts:
            messages.append({"role": "user", "content": texts})
    out_body: dict[str, Any] = {
        "model": body["model"],
        "messages": messages,
        "max_tokens": body["max_tokens"],
        "temperature": body.get("temperature", 0),
        "stream": False,
    }
    if body.get("tools"):
        out_body["tools"] = [
            {"type": "function",
             "function": {"name": t["name"], "description": t["description"], "parameters": t["input_schema"]}}
            for t in body["tools"]
        ]  # fmt: skip
    return out_body


TITLE_SYSTEM = (
    "Analyze if this message indicates a new conversation topic. If it does, extract a 2-3 word title that "
    "captures the new topic. Format your response as a JSON object with two fields: 'isNewTopic' (boolean) "
    "and 'title' (string, or null if isNewTopic is false). Only include these fields, no other text."
)


def side_request(main: samples.Session, turn: int, max_tokens: int) -> dict[str, Any]:
    """Claude Code's short title/topic request (its own small system, no tools) after main turn `turn`."""
    return {
        "model": "claude-haiku-4-5",
        "system": [
            {
                "type": "text",
                "text": samples.billing_line(main.version, main.suffix, samples.cch_for(9000 + turn)),
            },
            {"type": "text", "text": TITLE_SYSTEM},
        ],
        "messages": [{"role": "user", "content": [{"type": "text", "text": f"{main.task} (step {turn})"}]}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": False,
    }


# --- scenarios ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """How big and how long the simulated sessions are."""

    turns: int = 4
    system_chars: int = 8000
    tool_count: int = 12
    result_chars: int = 500
    max_tokens: int = 2
    margin: int = 16  # tokens a "reprocess only what is new" turn may exceed the new tokens by

    def session(self, **kw: Any) -> samples.Session:
        return samples.Session(system_chars=self.system_chars, tool_count=self.tool_count,
                               result_chars=self.result_chars, max_tokens=self.max_tokens, **kw)  # fmt: skip

    def body(self, session: samples.Session, turn: int) -> dict[str, Any]:
        b = session.request(turn)
        b["temperature"] = 0
        return b


FULL = Sizes()
QUICK = Sizes(turns=2, system_chars=3000, tool_count=6, result_chars=300)
TEST = Sizes(turns=3, system_chars=3000, tool_count=6, result_chars=300)


@dataclass
class Step:
    """One request of one arm."""

    label: str
    thread: str  # requests of one thread extend each other ("main", "B", "side"…)
    api: str
    usage: Usage
    metrics_processed: int  # delta of llamacpp:prompt_tokens_total over this request
    seconds: float
    new: int | None = None  # tokens a perfect cache would have to process (None: not defined)
    note: str = ""


@dataclass
class Arm:
    addon: bool
    steps: list[Step] = field(default_factory=list)

    @property
    def name(self) -> str:
        return "addon" if self.addon else "bare"

    def step(self, label: str) -> Step:
        return next(s for s in self.steps if s.label == label)

    @property
    def processed(self) -> int:
        return sum(s.usage.processed for s in self.steps)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.steps)


@dataclass
class Result:
    key: str
    title: str
    arms: list[Arm]
    verdict: str = ""
    passed: bool | None = None  # None: a report, not a pass/fail criterion
    details: list[str] = field(default_factory=list)

    def arm(self, addon: bool) -> Arm:
        return next(a for a in self.arms if a.addon == addon)


class Runner:
    """Runs one arm: a fresh llama-server and a fresh mitmdump (with or without the addon) in front of it."""

    def __init__(self, server: Path, model: Path, workdir: Path, sizes: Sizes,
                 log: Callable[[str], None] = lambda _: None) -> None:  # fmt: skip
        self.server, self.model, self.workdir, self.sizes, self.log = server, model, workdir, sizes, log
        self._n = 0

    def arm(self, addon: bool, slots: int = 1, cache_ram: int | None = 0) -> ArmRun:
        self._n += 1
        return ArmRun(self, addon, slots, cache_ram, self.workdir / f"mitm{self._n}")


class ArmRun:
    def __init__(self, runner: Runner, addon: bool, slots: int, cache_ram: int | None, confdir: Path) -> None:
        self.runner, self.sizes = runner, runner.sizes
        self.arm = Arm(addon)
        self.llama = LlamaServer(runner.server, runner.model, slots=slots, cache_ram=cache_ram)
        try:
            self.proxy = start_proxy(self.llama.url, addon, confdir)
        except BaseException:
            self.llama.stop()
            raise
        self.last_prompt: dict[str, int] = {}

    def send(self, label: str, thread: str, path: str, body: dict[str, Any], new: int | None = None,
             new_thread: bool = False) -> Step:  # fmt: skip
        """POST through the proxy; `new` defaults to the growth of `thread` since its last request."""
        before = self.llama.processed_total()
        t0 = time.perf_counter()
        assert self.proxy.port is not None
        status, data = request(self.proxy.port, "POST", path, body)
        seconds = time.perf_counter() - t0
        if status != 200:
            raise RuntimeError(f"{label}: {path} answered {status}: {data[:500]!r}")
        usage = usage_of(json.loads(data))
        delta = self.llama.processed_total() - before
        if new is None and not new_thread and thread in self.last_prompt:
            new = usage.prompt - self.last_prompt[thread]
        self.last_prompt[thread] = usage.prompt
        api = "chat" if path.startswith(CHAT) else "messages"
        step = Step(label, thread, api, usage, delta, seconds, None if new is None else new)
        self.arm.steps.append(step)
        self.runner.log(
            f"  {self.arm.name:5} {label:14} prompt={usage.prompt:5} reused={usage.reused:5} "
            f"processed={usage.processed:5} metricsΔ={delta:5} {seconds:6.2f}s"
        )
        return step

    def close(self) -> None:
        try:
            self.proxy.stop()
        finally:
            self.llama.stop()

    def __enter__(self) -> ArmRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _incremental(step: Step, margin: int) -> bool:
    return step.new is not None and step.usage.processed <= step.new + margin


def _full(step: Step, margin: int) -> bool:
    """Reprocessed (nearly) the whole prompt: at most `margin` tokens (before the volatile byte) reused."""
    return step.usage.reused <= 2 * margin + 32


def scenario_router(r: Runner) -> Result:
    """1. /v1/chat/completions with the system blocks flattened into one message, cch changing per turn."""
    sz = r.sizes
    sess = sz.session()
    arms = []
    for addon in (True, False):
        with r.arm(addon) as run:
            for t in range(1, sz.turns + 1):
                run.send(f"turn {t}", "main", CHAT, to_chat(sz.body(sess, t)))
            arms.append(run.arm)
    res = Result("router", "1. router path: /v1/chat/completions, billing line flattened, cch changes", arms)
    later = lambda a: [s for s in a.steps if s.label != "turn 1"]  # noqa: E731
    with_ok = all(_incremental(s, sz.margin) for s in later(res.arm(True)))
    bare_full = all(_full(s, sz.margin) for s in later(res.arm(False)))
    res.passed = with_ok and bare_full
    res.details = [
        f"addon: turns >= 2 reprocess only the new tokens (+{sz.margin}): {'yes' if with_ok else 'NO'}",
        f"bare: turns >= 2 reprocess the whole prompt: {'yes' if bare_full else 'no (the server copes alone)'}",
    ]
    res.verdict = "PASS" if res.passed else "FAIL"
    return res


def scenario_messages(r: Runner) -> Result:
    """2. /v1/messages with cch changing per turn: the server's own normaliser copes; both arms must match."""
    sz = r.sizes
    sess = sz.session()
    arms = []
    for addon in (True, False):
        with r.arm(addon) as run:
            for t in range(1, sz.turns + 1):
                run.send(f"turn {t}", "main", MESSAGES, sz.body(sess, t))
            arms.append(run.arm)
    res = Result("messages", "2. direct /v1/messages, cch changes (server pins cch itself)", arms)
    oks = {a.name: all(_incremental(s, sz.margin) for s in a.steps if s.label != "turn 1") for a in arms}
    res.passed = all(oks.values())
    res.details = [f"{n}: turns >= 2 reprocess only the new tokens (+{sz.margin}): {'yes' if ok else 'NO'}"
                   for n, ok in oks.items()]  # fmt: skip
    res.verdict = "PASS (no regression)" if res.passed else "FAIL"
    return res


SECOND_TASK = "Add a --verbose flag to the command line tool and document it."
SUBAGENT_TASK = "Search the code base for every caller of parse_tokens and list them."


def scenario_new_conversation(r: Runner) -> Result:
    """3. Host-RAM cache on: conversation A, then a second conversation B and a subagent with other
    cc_version suffixes (same system+tools), then back to A."""
    sz = r.sizes
    a = sz.session(suffix="c39")
    b = sz.session(suffix="7e2", task=SECOND_TASK)
    sub = sz.session(suffix="d05", task=SUBAGENT_TASK)
    a_turns = max(2, sz.turns - 1)
    arms = []
    for addon in (True, False):
        with r.arm(addon, cache_ram=None) as run:  # None: the server's default host-RAM cache
            for t in range(1, a_turns + 1):
                run.send(f"A turn {t}", "A", MESSAGES, sz.body(a, t))
            for label, sess in (("B turn 1", b), ("subagent 1", sub)):
                # What a perfect cache processes: the differing task and what follows it.
                new = run.llama.tokens(sess.task) + 8
                run.send(label, label, MESSAGES, sz.body(sess, 1), new=new)
            run.send(f"A turn {a_turns + 1}", "A", MESSAGES, sz.body(a, a_turns + 1))
            arms.append(run.arm)
    res = Result("newconv", "3. new conversation + subagent after a first one (host-RAM cache on)", arms)
    firsts = ("B turn 1", "subagent 1")
    with_ok = all(_incremental(res.arm(True).step(lb), sz.margin) for lb in firsts)
    bare_full = all(_full(res.arm(False).step(lb), sz.margin) for lb in firsts)
    res.passed = with_ok and bare_full
    res.details = [
        f"addon: a new conversation/subagent reuses the shared system+tools prefix: {'yes' if with_ok else 'NO'}",
        f"bare: it reprocesses the whole prefix: {'yes' if bare_full else 'no (the server copes alone)'}",
    ]
    back = [res.arm(x).step(f"A turn {a_turns + 1}") for x in (True, False)]
    res.details.append(
        "back to A: "
        + ", ".join(f"{arm.name} processed {s.usage.processed}" for arm, s in zip(arms, back, strict=True))
    )
    res.verdict = "PASS" if res.passed else "FAIL"
    return res


def scenario_side(r: Runner) -> Result:
    """4. A title/topic side request after every main turn, on one slot and on two slots (/v1/messages)."""
    sz = r.sizes
    sess = sz.session()
    arms = []
    for slots in (1, 2):
        for addon in (True, False):
            with r.arm(addon, slots=slots, cache_ram=0) as run:
                for t in range(1, sz.turns + 1):
                    run.send(f"{slots}slot main {t}", "main", MESSAGES, sz.body(sess, t))
                    run.send(f"{slots}slot side {t}", "side", MESSAGES, side_request(sess, t, sz.max_tokens),
                             new_thread=True)  # fmt: skip
                arms.append(run.arm)
    # The four runs are reported as two arms per slot count: merge them per addon flag.
    merged = [Arm(addon, [s for a in arms if a.addon == addon for s in a.steps]) for addon in (True, False)]
    res = Result("side", "4. side request after every main turn: 1 slot vs 2 slots (/v1/messages)", merged)
    for slots in (1, 2):
        for arm in merged:
            mains = [s for s in arm.steps if s.label.startswith(f"{slots}slot main") and s.label[-2:] != " 1"]
            kept = all(_incremental(s, sz.margin) for s in mains)
            cost = sum(s.usage.processed for s in mains)
            res.details.append(
                f"{slots} slot(s), {arm.name}: main turns >= 2 processed {cost} tokens; "
                + ("main thread kept its cache" if kept else "the side request evicted the main thread")
            )
    res.verdict = "report"
    return res


SCENARIOS: dict[str, Callable[[Runner], Result]] = {
    "router": scenario_router,
    "messages": scenario_messages,
    "newconv": scenario_new_conversation,
    "side": scenario_side,
}


def iter_rows(res: Result) -> Iterator[tuple[str, Step, Step | None]]:
    """(label, addon step, bare step) in order."""
    bare = {s.label: s for s in res.arm(False).steps}
    for s in res.arm(True).steps:
        yield s.label, s, bare.get(s.label)
