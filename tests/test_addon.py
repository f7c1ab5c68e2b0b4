"""The mitmproxy face, with mitmproxy.test helpers: options, rewriting, records at response, SSE, commands."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mitmproxy import exceptions
from mitmproxy import hooks
from mitmproxy import http
from mitmproxy.addons import proxyserver
from mitmproxy.test import taddons
from mitmproxy.test import tflow

from stableprefix.core.record import BEFORE_KEY
from stableprefix.core.record import META_KEY
from stableprefix.demo import samples
from stableprefix.mitm import addon as addon_mod
from stableprefix.mitm.access import ClientAllowlist
from stableprefix.mitm.addon import StablePrefix
from tests.support.helpers import read_records as records

FIXTURES = Path(__file__).parent / "fixtures"
SESSION = samples.Session()
URL = "http://127.0.0.1:8080/v1/messages?beta=true"


def make_flow(
    body: bytes | dict[str, Any], url: str = URL, headers: dict[str, str] | None = None
) -> http.HTTPFlow:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    hdrs = http.Headers(content_type="application/json")
    for k, v in (headers or {}).items():
        hdrs[k] = v
    req = http.Request.make("POST", url, raw, hdrs)
    return tflow.tflow(req=req)


def answer(
    f: http.HTTPFlow, body: bytes | dict[str, Any], ctype: str = "application/json", status: int = 200
) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    f.response = http.Response.make(status, raw, {"content-type": ctype})


def sse_started(a: StablePrefix) -> http.HTTPFlow:
    """A first turn through `a` whose streamed (SSE) answer has begun: its response headers are in."""
    f = make_flow(SESSION.request(1))
    a.request(f)
    answer(f, b"", ctype="text/event-stream")
    a.responseheaders(f)
    return f


def usage(cached: int, fresh: int) -> dict[str, Any]:
    return {"type": "message", "usage": {"input_tokens": fresh, "cache_read_input_tokens": cached}}


@contextlib.contextmanager
def logging_to(tmp_path: Path) -> Iterator[tuple[StablePrefix, Path, Any]]:
    """A configured addon writing its records to ``tmp_path/log.jsonl``: (addon, log path, test context)."""
    log = tmp_path / "log.jsonl"
    a = StablePrefix()
    with taddons.context(a) as tctx:
        tctx.configure(a, stableprefix_log=str(log))
        yield a, log, tctx


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "stableprefix" and r.levelno == logging.WARNING
    ]


def infos(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "stableprefix" and r.levelno == logging.INFO]


# --- options (issue 2) -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("stableprefix_billing", "bogus", "stableprefix_billing: 'bogus' is not one of drop, pin, off"),
        (
            "stableprefix_passthrough",
            ["api.example.com/v1"],
            "stableprefix_passthrough: 'api.example.com/v1'",
        ),
        ("stableprefix_passthrough", [""], "stableprefix_passthrough: ''"),
        ("stableprefix_passthrough", [" host"], "stableprefix_passthrough: ' host'"),
        ("stableprefix_passthrough", ["user@host"], "stableprefix_passthrough: 'user@host'"),
        ("stableprefix_passthrough", ["host:443"], "stableprefix_passthrough: 'host:443'"),
        ("stableprefix_enable", ["nosuchrule"], "stableprefix_enable: unknown rule 'nosuchrule'"),
        ("stableprefix_disable", ["billingx"], "stableprefix_disable: unknown rule 'billingx'"),
        ("stableprefix_rules", "/nonexistent/rules.toml", "/nonexistent/rules.toml: cannot read"),
        ("stableprefix_affinity_header", "x session", "stableprefix_affinity_header: 'x session' is not"),
        ("stableprefix_affinity_header", "Authorization", "stableprefix_affinity_header: 'Authorization'"),
        ("stableprefix_affinity_side", "sometimes", "stableprefix_affinity_side: 'sometimes' is not one of"),
    ],
)
def test_bad_option_values_raise_naming_option_and_value(option: str, value: Any, message: str) -> None:
    a = StablePrefix()
    with taddons.context(a) as tctx:
        with pytest.raises(exceptions.OptionsError) as e:
            tctx.configure(a, **{option: value})
        assert message in str(e.value)


def test_invalid_rules_files(tmp_path: Path) -> None:
    a = StablePrefix()
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("[builtins\n")
    bad_rule = tmp_path / "rule.toml"
    bad_rule.write_text('[[rule]]\nname = "x"\nscope = "system"\naction = "explode"\nmatch = "a"\n')
    with taddons.context(a) as tctx:
        with pytest.raises(exceptions.OptionsError, match="not valid TOML"):
            tctx.configure(a, stableprefix_rules=str(bad_toml))
        with pytest.raises(exceptions.OptionsError, match="rule 'x': unknown action 'explode'"):
            tctx.configure(a, stableprefix_rules=str(bad_rule))
        assert tctx.options.stableprefix_rules is None  # rolled back


def test_unopenable_log_path(tmp_path: Path) -> None:
    a = StablePrefix()
    with taddons.context(a) as tctx:
        with pytest.raises(exceptions.OptionsError, match=f"stableprefix_log: cannot open '{tmp_path}'"):
            tctx.configure(a, stableprefix_log=str(tmp_path))  # a directory
        blocker = tmp_path / "file"
        blocker.write_text("x")
        with pytest.raises(exceptions.OptionsError, match="stableprefix_log: cannot open"):
            tctx.configure(a, stableprefix_log=str(blocker / "log.jsonl"))


def test_running_line_names_settings(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    caplog.set_level(logging.INFO)
    a = StablePrefix()
    with taddons.context(a) as tctx:
        tctx.configure(
            a, stableprefix_billing="pin", stableprefix_observe=True, stableprefix_log=str(tmp_path / "l")
        )
        a.running()
    assert infos(caplog) == [
        f"stableprefix active: billing=pin observe=True rules on: billing; passthrough: api.anthropic.com, "
        f"*.anthropic.com; log: {tmp_path / 'l'}"
    ]


def test_stream_large_bodies_warns(caplog: pytest.LogCaptureFixture) -> None:
    a = StablePrefix()
    with taddons.context(a, proxyserver.Proxyserver()) as tctx:
        tctx.configure(a, stream_large_bodies="1m")
    assert any("stream_large_bodies is set" in w for w in warnings(caplog))


# --- request rewriting (issue 2) -------------------------------------------------------------------------


def test_billing_dropped_and_record_written_once_at_response(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with logging_to(tmp_path) as (a, log, tctx):
        body = SESSION.request(1)
        f = make_flow(body)
        a.request(f)
        sent = json.loads(f.request.content or b"")
        assert sent["system"] == body["system"][1:]
        assert f.request.headers["content-length"] == str(len(f.request.raw_content or b""))
        assert records(log) == [] and infos(caplog) == []  # nothing yet: the response completes the record
        a.drain()  # the analysis runs off the forwarding path; its results reach the flow afterwards
        assert records(log) == [] and infos(caplog) == []
        assert f.comment == "stableprefix: main first"
        assert f.metadata[BEFORE_KEY]["changes"][0]["path"] == "system[0]"
        answer(f, usage(0, 8000))
        a.responseheaders(f)
        assert f.response is not None and f.response.stream is False  # JSON: not streamed
        a.response(f)
        a.response(f)  # a second call does not write twice
        a.drain()
    (r,) = records(log)
    assert r == f.metadata[META_KEY]
    assert (r["id"], r["changed"], r["class"], r["verdict"]) == (f.id, {"billing": 1}, "main", "first")
    assert (r["status"], r["cached_tokens"], r["prompt_tokens"], r["evidence"], r["miss"]) == (
        200,
        0,
        8000,
        "anthropic-usage",
        None,
    )
    assert infos(caplog) == [
        f"stableprefix: main {r['prefix_hash'][:12]} first 1 msgs, server reused 0/8,000 "
        "(anthropic-messages, changed billing=1)"
    ]
    assert "Find why" not in log.read_text()


def test_nothing_to_change_forwards_identical_bytes() -> None:
    a = StablePrefix()
    with taddons.context(a) as tctx:
        tctx.configure(a, stableprefix_billing="off")
        raw = b'{"model":"m",  "max_tokens": 1.0e3, "system":"S \\u00e9", "messages":[{"role":"user","content":"hi"}]}'
        f = make_flow(raw)
        a.request(f)
        assert f.request.raw_content == raw
        a.drain()
        assert f.metadata[META_KEY]["rewritten"] is False


def test_passthrough_host_is_never_rewritten() -> None:
    a = StablePrefix()
    with taddons.context(a):
        raw = json.dumps(SESSION.request(1)).encode()
        f = make_flow(raw, url="https://api.anthropic.com/v1/messages")
        a.request(f)
        assert f.request.raw_content == raw
        a.drain()
        rec = f.metadata[META_KEY]
        assert rec["passthrough"] is True and rec["changed"] == {} and rec["class"] == "main"


def test_custom_passthrough_glob() -> None:
    a = StablePrefix()
    with taddons.context(a) as tctx:
        tctx.configure(a, stableprefix_passthrough=["*.internal"])
        raw = json.dumps(SESSION.request(1)).encode()
        f = make_flow(raw, url="http://llm.internal/v1/messages")
        a.request(f)
        assert f.request.raw_content == raw
        g = make_flow(raw, url="https://api.anthropic.com/v1/messages")
        a.request(g)
        assert g.request.raw_content != raw  # no longer a passthrough host


def test_observe_mode_rewrites_nothing() -> None:
    a = StablePrefix()
    with taddons.context(a) as tctx:
        tctx.configure(a, stableprefix_observe=True)
        raw = json.dumps(SESSION.request(1)).encode()
        f = make_flow(raw)
        a.request(f)
        assert f.request.raw_content == raw
        a.drain()
        rec = f.metadata[META_KEY]
        assert rec["would_change"] == {"billing": 1} and rec["changed"] == {} and rec["rewritten"] is False
        assert f.metadata[BEFORE_KEY] == {"rules": {}, "changes": []}


def test_gzip_body_reencoded_with_correct_length() -> None:
    a = StablePrefix()
    with taddons.context(a):
        body = SESSION.request(1)
        f = make_flow(b"")
        f.request.headers["content-encoding"] = "gzip"
        f.request.raw_content = gzip.compress(json.dumps(body).encode())
        f.request.headers["content-length"] = str(len(f.request.raw_content))
        a.request(f)
        assert f.request.headers["content-encoding"] == "gzip"
        raw = f.request.raw_content or b""
        assert f.request.headers["content-length"] == str(len(raw))
        assert json.loads(gzip.decompress(raw))["system"] == body["system"][1:]


def test_non_live_answered_and_other_flows_are_skipped() -> None:
    a = StablePrefix()
    with taddons.context(a):
        raw = json.dumps(SESSION.request(1)).encode()
        f = make_flow(raw)
        f.live = False
        a.request(f)
        assert f.request.raw_content == raw and META_KEY not in f.metadata
        answer(f, usage(0, 10))
        a.response(f)
        a.drain()
        assert META_KEY not in f.metadata
        g = tflow.tflow(req=http.Request.make("GET", "http://127.0.0.1/v1/messages"))
        a.request(g)
        h = make_flow(raw, url="http://127.0.0.1/v1/models")
        a.request(h)
        a.drain()
        assert META_KEY not in g.metadata and META_KEY not in h.metadata


def test_malformed_body_forwarded_unchanged_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with logging_to(tmp_path) as (a, log, tctx):
        raw = b'{"model": "m", "messages": [oops'
        f = make_flow(raw)
        a.request(f)
        assert f.request.raw_content == raw
        answer(f, b'{"error": "bad request"}', status=400)
        a.response(f)
        a.drain()
    assert len(warnings(caplog)) == 1 and "left /v1/messages unchanged" in warnings(caplog)[0]
    assert infos(caplog) == []
    (r,) = records(log)
    assert r["status"] == 400 and "error" in r and "stream" not in r
    assert f.comment == ""


def test_undecodable_content_encoding_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    a = StablePrefix()
    with taddons.context(a):
        f = make_flow(b"")
        f.request.headers["content-encoding"] = "gzip"
        f.request.raw_content = b"not gzip at all"
        a.request(f)
        assert f.request.raw_content == b"not gzip at all"
    assert len(warnings(caplog)) == 1 and "cannot decode body" in warnings(caplog)[0]


def test_streamed_request_body_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    a = StablePrefix()
    with taddons.context(a):
        f = make_flow(SESSION.request(1))
        f.request.stream = True
        a.request(f)
        assert "streamed" in f.metadata[META_KEY]["error"] and f.metadata[META_KEY]["rewritten"] is False
    assert len(warnings(caplog)) == 1 and "streamed" in warnings(caplog)[0]


def test_undecodable_body_gets_a_record_like_other_bad_bodies(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with logging_to(tmp_path) as (a, log, tctx):
        f = make_flow(SESSION.request(1))
        f.request.headers["content-encoding"] = "gzip"  # the body is not gzip
        raw_before = f.request.raw_content
        a.request(f)
        f.response = http.Response.make(200, b"{}", {"content-type": "application/json"})
        a.response(f)
        a.drain()
        assert f.request.raw_content == raw_before
    (record,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert record["error"] == "cannot decode body (Content-Encoding 'gzip')" and record["status"] == 200
    assert len(warnings(caplog)) == 1


def test_count_tokens(tmp_path: Path) -> None:
    with logging_to(tmp_path) as (a, log, tctx):
        raw = (FIXTURES / "count_tokens_no_system.json").read_bytes()
        f = make_flow(raw, url="http://127.0.0.1:8080/v1/messages/count_tokens?beta=true")
        a.request(f)
        assert f.request.raw_content == raw
        answer(f, {"input_tokens": 1234})
        a.response(f)
        a.drain()
    (r,) = records(log)
    assert (r["api"], r["class"], r["verdict"], r["miss"], r["status"]) == (
        "anthropic-count-tokens",
        "count_tokens",
        None,
        None,
        200,
    )
    assert f.comment == "stableprefix: count_tokens" and not f.marked


def test_rules_file_reload_and_broken_edit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    rules = tmp_path / "rules.toml"
    rules.write_text("[builtins]\nbilling = false\n")
    a = StablePrefix()
    with taddons.context(a) as tctx:
        tctx.configure(a, stableprefix_rules=str(rules))
        raw = json.dumps(SESSION.request(1)).encode()
        f = make_flow(raw)
        a.request(f)
        assert f.request.raw_content == raw
        rules.write_text("[builtins]\nbilling = true\n")
        os.utime(rules, (time.time() + 5, time.time() + 5))
        a._rules_checked = 0.0
        g = make_flow(raw)
        a.request(g)
        assert g.request.raw_content != raw
        rules.write_text("[builtins\n")
        os.utime(rules, (time.time() + 10, time.time() + 10))
        for _ in range(2):
            a._rules_checked = 0.0
            a._rules_mtime = None
            h = make_flow(raw)
            a.request(h)
            assert h.request.raw_content != raw  # previous rules kept
    assert len([w for w in warnings(caplog) if "keeping the previous rules" in w]) == 1
    assert any("reloaded" in i for i in infos(caplog))


# --- issue 4: verdicts, evidence, SSE, marks, commands ------------------------------------------------------


def test_turns_get_verdicts_marks_and_comments(tmp_path: Path) -> None:
    with logging_to(tmp_path) as (a, log, tctx):
        flows = []
        for k, body in enumerate([SESSION.request(1), SESSION.request(2), SESSION.request(3)]):
            if k == 2:
                body["messages"][0]["content"][0]["text"] = body["messages"][0]["content"][0]["text"].replace(
                    "2026-11-29", "2026-11-30"
                )
            f = make_flow(body)
            a.request(f)
            answer(f, usage(7900, 100) if k == 1 else usage(0, 8000))
            a.response(f)
            flows.append(f)
        a.drain()
    r = records(log)
    assert [x["verdict"] for x in r] == ["first", "append-only", "changed"]
    assert (r[2]["diverged_at"], r[2]["cause"], r[2]["miss"]) == ("messages[0].content[0]", "date", "client")
    assert [f.marked for f in flows] == ["", "", ":warning:"]
    assert flows[2].comment == "stableprefix: main changed at messages[0].content[0] (date); client-side miss"
    assert flows[1].comment == "stableprefix: main append-only"
    assert len({x["stream"] for x in r}) == 1


def sse_events() -> list[bytes]:
    data = (FIXTURES / "div_anthropic_sse.txt").read_bytes()
    return [data[i : i + 17] for i in range(0, len(data), 17)]


def test_sse_response_streams_unchanged_and_is_parsed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with logging_to(tmp_path) as (a, log, tctx):
        body = SESSION.request(1)
        body["stream"] = True
        f = make_flow(body)
        a.request(f)
        answer(f, b"", ctype="text/event-stream; charset=utf-8")
        a.responseheaders(f)
        assert f.response is not None
        tee = f.response.stream
        assert callable(tee)
        chunks = sse_events()
        out = [tee(c) for c in chunks]
        assert out == chunks  # every chunk passes through unchanged, at once
        a.drain()
        assert records(log) == []
        assert tee(b"") == b""
        f.response.content = None  # streamed bodies are not stored
        a.response(f)
        a.drain()
    (r,) = records(log)
    assert (r["cached_tokens"], r["prompt_tokens"], r["evidence"], r["status"]) == (
        18204,
        18230,
        "anthropic-usage",
        200,
    )
    assert "server reused 18,204/18,230" in infos(caplog)[0]


def test_sse_chains_an_existing_stream_callable() -> None:
    a = StablePrefix()
    with taddons.context(a):
        f = make_flow(SESSION.request(1))
        a.request(f)
        answer(f, b"", ctype="text/event-stream")
        assert f.response is not None
        f.response.stream = lambda chunk: chunk.upper()
        a.responseheaders(f)
        assert f.response.stream(b"data: x\n") == b"DATA: X\n"


def test_sse_not_set_for_unhandled_flows() -> None:
    a = StablePrefix()
    with taddons.context(a):
        f = tflow.tflow(req=http.Request.make("GET", "http://127.0.0.1/events"))
        answer(f, b"", ctype="text/event-stream")
        a.responseheaders(f)
        assert f.response is not None and f.response.stream is False


def test_error_hook_writes_the_record(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with logging_to(tmp_path) as (a, log, tctx):
        f = make_flow(SESSION.request(1))
        a.request(f)
        f.error = tflow.terr()
        a.error(f)
        a.error(f)
        a.drain()
    (r,) = records(log)
    # no response started: mitmproxy answers the client 502, and the record and the warning say so
    assert r["status"] == 502 and r["error"] == "no response: error; the proxy answered 502"
    assert r["miss"] is None
    assert warnings(caplog)[-1].endswith(
        "first 1 msgs, no response: error; the proxy answered 502 (anthropic-messages, changed billing=1)"
    )


def test_client_that_left_gets_no_status(tmp_path: Path) -> None:
    with logging_to(tmp_path) as (a, log, tctx):
        f = make_flow(SESSION.request(1))
        a.request(f)
        f.error = tflow.terr("Client disconnected.")
        a.error(f)
        a.drain()
    (r,) = records(log)
    assert r["status"] is None and r["error"] == "no response: Client disconnected."


def test_interrupted_sse_keeps_the_evidence_seen(tmp_path: Path) -> None:
    with logging_to(tmp_path) as (a, log, tctx):
        f = sse_started(a)
        assert f.response is not None and callable(f.response.stream)
        data = (FIXTURES / "div_anthropic_sse.txt").read_bytes()
        f.response.stream(data[: data.index(b"event: content_block_start")])
        f.error = tflow.terr("connection reset")
        a.error(f)
        a.drain()
    (r,) = records(log)
    assert (r["status"], r["cached_tokens"], r["prompt_tokens"]) == (200, 18204, 18230)
    assert r["error"] == "response interrupted: connection reset"


def test_interleaved_side_request_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    a = StablePrefix()
    side = {
        "model": "claude-haiku-4-5",
        "max_tokens": 512,
        "system": [{"type": "text", "text": "Generate a concise title."}],
        "messages": [{"role": "user", "content": "hello"}],
        "metadata": SESSION.request(1)["metadata"],
    }
    with taddons.context(a):
        for k, body in enumerate([SESSION.request(1), side, SESSION.request(2), side, SESSION.request(3)]):
            f = make_flow(body)
            a.request(f)
            answer(f, usage(5, 9000) if k else usage(0, 9000))
            a.response(f)
            a.drain()
            assert f.marked == ""
    notes = [w for w in warnings(caplog) if "side requests" in w]
    assert len(notes) == 1 and "--parallel" in notes[0] and "--cache-ram" in notes[0]


def test_commands_summary_and_reset(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    a = StablePrefix()
    with taddons.context(a) as tctx:
        for k in (1, 2):
            f = make_flow(SESSION.request(k))
            a.request(f)
            answer(f, usage(1000 * (k - 1), 8000))
            a.response(f)
        text = tctx.master.commands.execute("stableprefix.summary")
        assert text.splitlines()[0] == "stableprefix summary: 1 stream(s)"
        assert (
            "2 requests, append-only 1/1 (100%), server misses 1, server reused 1,000/17,000 tokens" in text
        )
        assert "stableprefix summary: 1 stream(s)" in infos(caplog)
        tctx.master.commands.execute("stableprefix.reset")
        assert (
            tctx.master.commands.execute("stableprefix.summary") == "stableprefix summary: no requests seen"
        )
        f = make_flow(SESSION.request(3))
        a.request(f)
        a.drain()
        assert f.metadata[META_KEY]["verdict"] == "first"


def test_done_logs_summary_and_flushes_pending(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with logging_to(tmp_path) as (a, log, tctx):
        f = make_flow(SESSION.request(1))
        a.request(f)
        a.done()
    (r,) = records(log)
    assert r["status"] is None and r["error"] == "no response: proxy shut down before the response"
    assert any(i.startswith("  main ") and "1 requests" in i for i in infos(caplog))


def test_log_context_option() -> None:
    a = StablePrefix()
    with taddons.context(a) as tctx:
        tctx.configure(a, stableprefix_log_context=True)
        a.request(make_flow(SESSION.request(2)))
        body = SESSION.request(3)
        body["system"][2]["text"] = body["system"][2]["text"].replace("M src/app.py", "M src/cli.py")
        f = make_flow(body)
        a.request(f)
        a.drain()
        ctx = f.metadata[META_KEY]["context"]
        assert set(ctx) == {"old", "new"} and "cli" not in json.dumps(ctx)


def test_internal_error_fails_open_with_one_warning_per_request(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    a = StablePrefix()

    def boom(*args: Any, **kw: Any) -> Any:
        raise RuntimeError("bug")

    with taddons.context(a):
        monkeypatch.setattr(a.analyzer, "forward", boom)
        raw = json.dumps(SESSION.request(1)).encode()
        for _ in range(2):
            f = make_flow(raw)
            a.request(f)
            assert f.request.raw_content == raw and META_KEY not in f.metadata
    assert warnings(caplog) == ["stableprefix: internal error (RuntimeError); traffic passes unchanged"] * 2


def test_flow_metadata_is_serialisable() -> None:
    from mitmproxy.io import tnetstring

    a = StablePrefix()
    with taddons.context(a):
        f = make_flow(SESSION.request(1))
        a.request(f)
        answer(f, usage(0, 10))
        a.response(f)
        a.drain()
        tnetstring.dumps(f.get_state())


def test_entry_script_loads_and_registers_view() -> None:
    from mitmproxy import contentviews

    with taddons.context() as tctx:
        mod = tctx.script(str(Path(addon_mod.__file__)))
        assert isinstance(mod.addons[0], mod.StablePrefix)
    assert "stableprefix" in contentviews.registry


# --- issue 13: the analysis off the forwarding path ---------------------------------------------------------


class _Updates:
    """Records the flows of every `update` hook (what mitmweb listens to)."""

    def __init__(self) -> None:
        self.flows: list[str] = []

    def update(self, flows: Any) -> None:
        self.flows.extend(f.id for f in flows)


async def test_request_hook_returns_before_the_analysis_and_the_loop_gets_the_result(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    a = StablePrefix()
    updates = _Updates()
    with taddons.context(a, updates) as tctx:
        tctx.configure(a, stableprefix_log=str(log))
        body = SESSION.request(1)
        f = make_flow(body)
        a.worker.submit(lambda: time.sleep(0.3))  # the worker is busy: the analysis has to wait
        assert a.request(f) is None
        # the bytes are already changed, the analysis has not run yet
        assert json.loads(f.request.content or b"")["system"] == body["system"][1:]
        assert f.comment == "" and META_KEY not in f.metadata
        answer(f, usage(0, 8000))
        a.response(f)  # returns at once too: the record is completed in the worker
        assert records(log) == []
        deadline = time.monotonic() + 10
        while not records(log) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # the loop runs the results the worker posts; no drain() here
        (r,) = records(log)
        assert f.comment == "stableprefix: main first" and f.metadata[META_KEY] == r
        assert f.metadata[BEFORE_KEY]["changes"][0]["path"] == "system[0]"
        assert updates.flows.count(f.id) == 2  # once for the analysis, once for the completed record


async def test_no_update_hook_is_triggered_when_no_addon_listens(monkeypatch: pytest.MonkeyPatch) -> None:
    """mitmdump has no view: the flow updates skip the trip through every addon."""
    triggered: list[Any] = []
    a = StablePrefix()
    with taddons.context(a) as tctx:
        monkeypatch.setattr(tctx.master.addons, "trigger", triggered.append)
        f = make_flow(SESSION.request(1))
        a.request(f)
        answer(f, usage(0, 8000))
        a.response(f)
        a.drain()
        assert f.comment.startswith("stableprefix:")
        assert not [e for e in triggered if isinstance(e, hooks.UpdateHook)]
        updates = _Updates()
        tctx.master.addons.add(updates)  # a listener comes: it is told from now on
        g = make_flow(SESSION.request(2))
        a.request(g)
        answer(g, usage(0, 8000))
        a.response(g)
        a.drain()
        assert [e for e in triggered if isinstance(e, hooks.UpdateHook)]


def test_turns_queued_back_to_back_are_analysed_in_arrival_order(tmp_path: Path) -> None:
    with logging_to(tmp_path) as (a, log, tctx):
        flows = [make_flow(SESSION.request(k)) for k in range(1, 7)]
        for f in flows:  # all requests first, then all responses: nothing waits for the worker
            a.request(f)
        for f in reversed(flows):
            answer(f, usage(0, 8000))
            a.response(f)
        a.drain()
    r = records(log)
    assert [x["id"] for x in r] == [f.id for f in reversed(flows)]  # written in completion order
    assert sorted((len(x["chain"]), x["verdict"]) for x in r) == [(1, "first")] + [
        (n, "append-only") for n in (3, 5, 7, 9, 11)
    ]


def test_analysis_error_fails_open_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    log = tmp_path / "log.jsonl"
    a = StablePrefix()

    def boom(*args: Any, **kw: Any) -> Any:
        raise RuntimeError("bug")

    with taddons.context(a) as tctx:
        tctx.configure(a, stableprefix_log=str(log))
        monkeypatch.setattr(a.analyzer, "analyse", boom)
        body = SESSION.request(1)
        f = make_flow(body)
        a.request(f)
        assert json.loads(f.request.content or b"")["system"] == body["system"][1:]  # forwarded as decided
        answer(f, usage(0, 10))
        a.response(f)
        a.drain()
        assert META_KEY not in f.metadata
    assert warnings(caplog) == ["stableprefix: internal error (RuntimeError); traffic passes unchanged"]
    assert records(log) == []


def test_done_waits_for_queued_analyses(tmp_path: Path) -> None:
    with logging_to(tmp_path) as (a, log, tctx):
        f = make_flow(SESSION.request(1))
        a.request(f)
        answer(f, usage(0, 10))
        a.response(f)
        g = make_flow(SESSION.request(2))
        a.request(g)  # never answered
        a.done()
    r = records(log)
    assert [x["id"] for x in r] == [f.id, g.id]
    assert r[0]["status"] == 200 and r[1]["error"] == "no response: proxy shut down before the response"


async def test_a_left_alone_flow_gets_its_record_on_the_loop(tmp_path: Path) -> None:
    with logging_to(tmp_path) as (a, log, tctx):
        f = make_flow(SESSION.request(1))
        f.request.stream = True  # the only flow: left alone, never analysed
        a.request(f)
        answer(f, usage(0, 10))
        a.response(f)
        deadline = time.monotonic() + 10
        while not records(log) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
    (r,) = records(log)
    assert r["status"] == 200 and "streamed" in r["error"]


# --- the affinity header (issue 14) ----------------------------------------------------------------------


def side_body(turn: int) -> dict[str, Any]:
    """Claude Code's short title request: small system, no tools, small max_tokens (class side)."""
    return {
        "model": "claude-haiku-4-5",
        "system": [{"type": "text", "text": samples.billing_line("2.1.37", "c39", samples.cch_for(turn))},
                   {"type": "text", "text": "Give this conversation a 2-3 word title."}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": f"step {turn}"}]}],
        "max_tokens": 32,
    }  # fmt: skip


def no_session(body: dict[str, Any]) -> dict[str, Any]:
    """The body without metadata.user_id (as a translating router or another client sends it)."""
    return {k: v for k, v in body.items() if k != "metadata"}


def sent(a: StablePrefix, body: dict[str, Any], headers: dict[str, str] | None = None,
         url: str = URL) -> http.HTTPFlow:  # fmt: skip
    f = make_flow(body, url=url, headers=headers)
    a.request(f)
    a.drain()  # the record is completed off the forwarding path
    return f


def test_affinity_header_off_by_default() -> None:
    a = StablePrefix()
    with taddons.context(a):
        f = sent(a, SESSION.request(1), {"x-claude-code-session-id": "s-1"})
        assert "x-smg-routing-key" not in f.request.headers and "x-session-id" not in f.request.headers
        assert "affinity" not in f.metadata[META_KEY]


def test_affinity_header_one_key_per_conversation() -> None:
    a = StablePrefix()
    with taddons.context(a) as tctx:
        tctx.configure(a, stableprefix_affinity_header="x-smg-routing-key")
        one = [sent(a, SESSION.request(t), {"x-claude-code-session-id": "session-one"}) for t in (1, 2, 3)]
        two = sent(a, SESSION.request(1), {"x-claude-code-session-id": "session-two"})
        keys = [f.request.headers["x-smg-routing-key"] for f in one]
        assert len(set(keys)) == 1 and re.fullmatch(r"[0-9a-f]{16}", keys[0])
        assert two.request.headers["x-smg-routing-key"] != keys[0]
        assert [f.metadata[META_KEY]["affinity"] for f in one] == keys
        assert "session-one" not in keys[0]
        # The body is still normalised as before; the header is the only addition.
        assert json.loads(one[0].request.content or b"")["system"] == SESSION.request(1)["system"][1:]


def test_affinity_header_without_session_follows_the_stream() -> None:
    a = StablePrefix()
    other = samples.Session(task="Add a --verbose flag to the command line tool and document it.")
    with taddons.context(a) as tctx:
        tctx.configure(a, stableprefix_affinity_header="x-session-id")
        a1, b1, a2, b2 = (
            sent(a, no_session(s.request(t))) for s, t in ((SESSION, 1), (other, 1), (SESSION, 2), (other, 2))
        )
        key = lambda f: f.request.headers["x-session-id"]  # noqa: E731
        assert key(a1) == key(a2) and key(b1) == key(b2) and key(a1) != key(b1)
        assert a1.metadata[META_KEY]["stream"] == a2.metadata[META_KEY]["stream"]


@pytest.mark.parametrize("mode", ["separate", "same", "none"])
def test_affinity_side_modes(mode: str) -> None:
    a = StablePrefix()
    hdr = {"x-claude-code-session-id": "session-one"}
    with taddons.context(a) as tctx:
        tctx.configure(a, stableprefix_affinity_header="x-smg-routing-key", stableprefix_affinity_side=mode)
        main = sent(a, SESSION.request(1), hdr)
        side = sent(a, side_body(1), hdr)
        count = sent(a, SESSION.request(2), hdr, url="http://127.0.0.1:8080/v1/messages/count_tokens")
        assert (side.metadata[META_KEY]["class"], count.metadata[META_KEY]["class"]) == (
            "side",
            "count_tokens",
        )
        main_key = main.request.headers["x-smg-routing-key"]
        got = [f.request.headers.get("x-smg-routing-key") for f in (side, count)]
        if mode == "same":
            assert got == [main_key, main_key]
        elif mode == "none":
            assert got == [None, None]
        else:
            assert None not in got and main_key not in got and got[0] != got[1]


def test_client_affinity_header_left_alone_unless_override() -> None:
    a = StablePrefix()
    with taddons.context(a) as tctx:
        tctx.configure(a, stableprefix_affinity_header="x-session-id")
        f = sent(a, SESSION.request(1), {"X-Session-ID": "team-chose-this"})
        assert f.request.headers.get_all("x-session-id") == ["team-chose-this"]
        assert f.metadata[META_KEY]["affinity"] == "client"
        tctx.configure(a, stableprefix_affinity_override=True)
        g = sent(a, SESSION.request(1), {"X-Session-ID": "team-chose-this"})
        (value,) = g.request.headers.get_all("x-session-id")
        assert value != "team-chose-this" and value == g.metadata[META_KEY]["affinity"]


def test_affinity_header_not_on_passthrough_observe_or_unreadable_bodies() -> None:
    a = StablePrefix()
    with taddons.context(a) as tctx:
        tctx.configure(a, stableprefix_affinity_header="x-session-id")
        f = sent(a, SESSION.request(1), url="https://api.anthropic.com/v1/messages")
        bad = make_flow(b'{"model": "m", "messages": [', url=URL)
        a.request(bad)
        assert "x-session-id" not in f.request.headers and "x-session-id" not in bad.request.headers
        tctx.configure(a, stableprefix_observe=True)
        g = sent(a, SESSION.request(1))
        assert "x-session-id" not in g.request.headers


# --- the client allowlist (issue 14) ---------------------------------------------------------------------


def from_peer(flow: http.HTTPFlow, ip: str) -> http.HTTPFlow:
    flow.client_conn.peername = (ip, 40000)
    return flow


def test_allow_clients_option_must_hold_networks() -> None:
    a = ClientAllowlist()
    with taddons.context(a) as tctx:
        with pytest.raises(exceptions.OptionsError, match="stableprefix_allow_clients: '10.0.0.0/33' is not"):
            tctx.configure(a, stableprefix_allow_clients=["10.0.0.0/33"])


def test_allow_clients_answers_403_outside_the_networks(caplog: pytest.LogCaptureFixture) -> None:
    a = ClientAllowlist()
    with taddons.context(a) as tctx:
        f = from_peer(make_flow(SESSION.request(1)), "10.9.0.1")
        a.requestheaders(f)
        assert f.response is None  # off by default
        tctx.configure(a, stableprefix_allow_clients=["10.1.0.0/16", "192.168.5.0/24"])
        inside = from_peer(make_flow(SESSION.request(1)), "192.168.5.40")
        a.requestheaders(inside)
        assert inside.response is None
        for _ in range(2):
            outside = from_peer(make_flow(SESSION.request(1)), "10.9.0.1")
            a.requestheaders(outside)
            assert outside.response is not None and outside.response.status_code == 403
        connect = from_peer(
            tflow.tflow(req=http.Request.make("CONNECT", "http://example.com:443/")), "8.8.8.8"
        )
        a.http_connect(connect)
        assert connect.response is not None and connect.response.status_code == 403
    assert warnings(caplog) == [
        "stableprefix: refused client 10.9.0.1: not in stableprefix_allow_clients",
        "stableprefix: refused client 8.8.8.8: not in stableprefix_allow_clients",
    ]


def test_allow_clients_keeps_a_proxyauth_answer() -> None:
    a = ClientAllowlist()
    with taddons.context(a) as tctx:
        tctx.configure(a, stableprefix_allow_clients=["10.1.0.0/16"])
        f = from_peer(make_flow(SESSION.request(1)), "8.8.8.8")
        answer(f, b"auth required", status=407)
        a.requestheaders(f)
        assert f.response is not None and f.response.status_code == 407


def test_entry_script_registers_the_allowlist() -> None:
    assert [type(x).__name__ for x in addon_mod.addons] == ["StablePrefix", "ClientAllowlist"]


# --- the event loop's share of a flow (issue 13: small flows beside a 5 MB request) ----------------------


def test_sse_copy_is_parsed_in_the_worker_not_in_the_tee(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed: list[int] = []
    real_feed = addon_mod.SSEFeed.feed

    def counting_feed(self: Any, chunk: bytes) -> None:
        parsed.append(len(chunk))
        real_feed(self, chunk)

    monkeypatch.setattr(addon_mod.SSEFeed, "feed", counting_feed)
    with logging_to(tmp_path) as (a, log, tctx):
        f = sse_started(a)
        assert f.response is not None and callable(f.response.stream)
        chunks = sse_events()
        assert [f.response.stream(c) for c in chunks] == chunks
        assert parsed == []  # the event loop only kept the chunks
        f.response.content = None
        a.response(f)
        a.drain()
    assert sum(parsed) == sum(len(c) for c in chunks)
    (r,) = records(log)
    assert (r["cached_tokens"], r["prompt_tokens"], r["evidence"]) == (18204, 18230, "anthropic-usage")


def test_a_long_sse_copy_is_parsed_as_it_comes_past_the_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(addon_mod._DeferredFeed, "LIMIT", 100)
    with logging_to(tmp_path) as (a, log, tctx):
        f = make_flow(SESSION.request(1))
        a.request(f)
        # gzip-encoded, as a server may send it: the encoding is taken at responseheaders
        answer(f, b"", ctype="text/event-stream")
        assert f.response is not None
        f.response.headers["content-encoding"] = "gzip"
        a.responseheaders(f)
        data = gzip.compress((FIXTURES / "div_anthropic_sse.txt").read_bytes())
        feed, tee = a._entries[f.id].feed, f.response.stream
        assert feed is not None and callable(tee)
        for i in range(0, len(data), 17):
            tee(data[i : i + 17])
            assert sum(map(len, feed._chunks)) <= 100 + 17  # kept bytes stay bounded
        del f.response.headers["content-encoding"]  # a later change does not matter any more
        f.response.content = None
        a.response(f)
        a.drain()
    (r,) = records(log)
    assert (r["cached_tokens"], r["prompt_tokens"], r["evidence"]) == (18204, 18230, "anthropic-usage")


async def test_worker_results_share_one_wake_up_of_the_loop() -> None:
    a = StablePrefix()
    a._loop = asyncio.get_running_loop()
    runs: list[int] = []
    real_run_ready = a._run_ready

    def counting_run_ready() -> None:
        runs.append(len(a._ready))
        real_run_ready()

    a._run_ready = counting_run_ready  # type: ignore[method-assign]
    done: list[int] = []

    def post_all() -> None:
        for i in range(50):
            a._post(lambda i=i: done.append(i))

    t = threading.Thread(target=post_all)
    t.start()
    t.join()  # the loop is blocked here: every result waits for one wake-up
    await asyncio.sleep(0.01)
    assert done == list(range(50)) and runs == [50]
    # a result posted while the loop runs the results wakes it again
    a._post(lambda: a._post(lambda: done.append(99)))
    await asyncio.sleep(0.01)
    assert done[-1] == 99 and len(runs) == 3


def test_update_hook_only_when_an_addon_listens() -> None:
    a = StablePrefix()
    with taddons.context(a, proxyserver.Proxyserver()) as tctx:
        manager = tctx.master.addons
        assert not addon_mod._update_listeners(manager)  # Proxyserver's async update() is not a listener
        updates = _Updates()
        manager.add(updates)
        assert addon_mod._update_listeners(manager)
        f = make_flow(SESSION.request(1))
        a.request(f)
        answer(f, usage(0, 8000))
        a.response(f)
        a.drain()
        assert updates.flows.count(f.id) == 2
