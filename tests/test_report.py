"""The offline report over hand-written JSONL fixtures (tests/fixtures/report_*.jsonl): exact figures.

The fixtures' numbers are chosen so every figure can be checked by hand (4 characters per token):

report_session.jsonl, stream a1b2... (main), prompt = system 4000 + tools 8000 + messages:
  1 first        messages 400                      12,400 chars   server 0/3,100
  2 append-only  400+200+600                       13,200         server 3,100/3,300   reusable 12,400
  3 changed      +200+800 = 2,200                  14,200         server 770/3,550     reusable 3,080 (system[2]@1480)
                 lost: (13,200 - 3,080) / 4 = 2,530 (git_status)
  4 append-only  +200+600 = 3,000                  15,000         server 3,550/3,750   reusable 14,200
  5 changed      3,480                             15,480         server 3,100/3,870   reusable 12,400
                 lost: (15,000 - 12,400) / 4 = 650 (thinking_dropped)
  6 append-only  4,480                             16,480         server 100/4,120     reusable 15,480
                 server-side: 15,480 / 4 - 100 = 3,770
stream 5ub5... (subagent): 1 first 2000+4000+800 = 6,800 (server 0/1,700); 2 changed at tools, reusable 5,000:
  lost (6,800 - 5,000) / 4 = 450 (tools), no server figures.
side: 400+0+200 = 600 (server 0/150); count_tokens: 0+8000+40 = 8,040 -> ~2,010.
Server totals: cached 0+3,100+770+3,550+3,100+100+0+0 = 10,620 of 3,100+3,300+3,550+3,750+3,870+4,120+1,700+150
= 23,540 (45.1%). Rules saved (billing rewrote 7; saved_by on turns 2 and 4): 12,348 and 14,148 characters,
scaled by the server's tokens per character (3,300/13,200 and 3,750/15,000): 3,087 + 3,537 = 6,624.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from mitmproxy import io as mio
from mitmproxy import tcp
from mitmproxy.io import tnetstring
from mitmproxy.test import tflow

from stableprefix.cli import main as cli
from stableprefix.core import volatile
from stableprefix.report import model as report
from stableprefix.report import readers
from stableprefix.report import text as report_text
from stableprefix.report.html import LOST
from stableprefix.report.html import REUSED
from stableprefix.report.html import render_html

FIX = Path(__file__).parent / "fixtures"
SESSION = FIX / "report_session.jsonl"
OBSERVE = FIX / "report_observe.jsonl"
CLEAN = FIX / "report_clean.jsonl"
OLD = FIX / "report_old.jsonl"
BAD = FIX / "report_bad.jsonl"


def lines_of(text: str) -> list[str]:
    return text.splitlines()


def test_session_main_stream_table_exact() -> None:
    text = report_text.render_text(readers.read([SESSION], progress=False))
    lines = lines_of(text)
    i = lines.index(
        f"stream a1b2c3d4e5f6 · main · 6 requests · session 0b1c2d3e4f50 · host 127.0.0.1 · from {SESSION}:1"
    )
    assert lines[i + 1 : i + 8] == [
        "  #  class  verdict      msgs kept  diverged at             cause             reused/prompt  allowed   lost  miss                       rules",
        "  1  main   first                -  -                       -                       0/3,100        -      -  -                          billing=1",
        "  2  main   append-only        1/3  -                       -                   3,100/3,300   ~3,100      -  -                          billing=1",
        "  3  main   changed            0/5  system[2]@1480          git_status            770/3,550     ~770  2,530  client                     billing=1",
        "  4  main   append-only        5/7  -                       -                   3,550/3,750   ~3,550      -  -                          billing=1",
        "  5  main   changed            1/9  messages[1].content[0]  thinking_dropped    3,100/3,870   ~3,100    650  client                     billing=1",
        "  6  main   append-only       9/11  -                       -                     100/4,120   ~3,870      -  server (side-interleaved)  billing=1",
    ]


def test_session_subagent_and_side_tables() -> None:
    lines = lines_of(report_text.render_text(readers.read([SESSION], progress=False)))
    assert (
        "  2  subagent  changed        0/3  tools (added mcp__x)  tools  ~1,250/~2,000   ~1,250  ~450  unknown  -"
        in lines
    )
    assert "side requests and token counts: 2 requests in 2 streams" in lines
    assert (
        "  51de51de51de  1  side          first            -  -            -              0/150        -     -  -     -"
        in lines
    )
    assert (
        "  c0c0c0c0c0c0  1  count_tokens  -                -  -            -           -/~2,010        -     -  -     -"
        in lines
    )


def test_session_totals_exact() -> None:
    text = report_text.render_text(readers.read([SESSION], progress=False))
    totals = text[text.index("totals\n") :].splitlines()
    assert totals[:10] == [
        "totals",
        "  requests: 10 (main 6, subagent 2, side 1, count_tokens 1)",
        "  turns after the first of their stream: 6 (append-only 3, changed 3)",
        "  server reported: reused 10,620 of 23,540 prompt tokens (45.1%) on 8 requests",
        "  reprocessed because the client changed the prefix: ~3,630 tokens on 3 turns",
        "    cause             turns  tokens  what to do",
        "    git_status            1   2,530  " + volatile.remedy("git_status"),
        "    thinking_dropped      1     650  " + volatile.remedy("thinking_dropped"),
        "    tools                 1    ~450  " + volatile.remedy("tools"),
        "  reprocessed although the prefix was kept (server-side): ~3,770 tokens on 1 turn",
    ]
    assert "  side requests interleaved with a stream: 1" in totals
    assert (
        "  rules rewrote 7 requests (billing=7); prefix shared only because of the rewrite: ~6,624 tokens on "
        "2 requests" in totals
    )


def test_totals_object() -> None:
    t = readers.read([SESSION], progress=False).totals()
    assert (t.requests, t.later_turns, t.append_only, t.changed) == (10, 6, 3, 3)
    assert (t.server_requests, t.server_cached, t.server_prompt) == (8, 10_620, 23_540)
    assert dict(t.client_tokens) == {"git_status": 2530, "thinking_dropped": 650, "tools": 450}
    assert (t.server_turns, t.server_tokens) == (1, 3770)
    assert (t.rewritten, t.saved, t.saved_turns) == (7, 6_624, 2)
    assert (t.observed, t.would_save) == (0, 0)


def test_observe_mode_would_save() -> None:
    # saved_by: 12,348 / 4 = 3,087 and 13,148 / 4 = 3,287 (no server figures): what the billing rule keeps
    text = report_text.render_text(readers.read([OBSERVE], progress=False))
    assert (
        "  2  main   changed        0/3  system[0]@52  billing     ~13/~3,300      ~13  ~3,087  -     would: billing=1"
        in text
    )
    assert (
        "  observe mode: rules would rewrite 3 requests (billing=3) and save ~6,374 tokens on 2 requests"
        in text
    )
    assert "  reprocessed because the client changed the prefix: ~6,374 tokens on 2 turns" in text


def test_check_lines_exact() -> None:
    assert report_text.check_lines(readers.read([SESSION], progress=False)) == [
        f"{SESSION}:4: main turn 3 of stream a1b2c3d4e5f6 lost its prefix at system[2]@1480 (cause git_status), "
        "2,530 tokens reprocessed",
        f"{SESSION}:9: main turn 5 of stream a1b2c3d4e5f6 lost its prefix at messages[1].content[0] "
        "(cause thinking_dropped), 650 tokens reprocessed",
    ]


def test_check_ignores_cache_markers_and_subagents() -> None:
    # clean: append-only and a cache-markers-only change on main; a date change on a subagent only
    rep = readers.read([CLEAN], progress=False)
    assert report_text.check_lines(rep) == []
    assert dict(rep.totals().client_tokens) == {"date": 1700}  # (2000 + 4000 + 800) / 4, nothing reusable


@pytest.mark.parametrize(("path", "code"), [(SESSION, 1), (OBSERVE, 1), (CLEAN, 0)])
def test_cli_check_exit_status(path: Path, code: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["report", "--check", str(path)]) == code
    out = capsys.readouterr().out.splitlines()
    if code:
        assert len(out) == 2 and all("lost its prefix" in line for line in out)
    else:
        assert out == ["ok: 3 main-thread requests, none lost its prefix to a client-side change"]


def test_cli_report_prints_the_report(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["report", str(SESSION)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("stableprefix report: 1 file, 10 requests in 4 streams\n")
    assert captured.err == ""


def test_old_log_without_stream_fields() -> None:
    rep = readers.read([OLD], progress=False)
    text = report_text.render_text(rep)
    assert rep.problems == []
    assert (
        "this log has no verdicts (written before stableprefix tracked streams): sizes and rules only" in text
    )
    assert "stream (no id in the log) · ? · 1 request · session 5e55 · host 127.0.0.1" in text
    assert report_text.check_lines(rep) == []


def test_bad_lines_are_named_and_the_rest_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["report", str(BAD)]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"stableprefix: {BAD}:2: line is not JSON (Expecting ',' delimiter: line 1 column 46 (char 45))",
        f"stableprefix: {BAD}:5: line is JSON but not an object (list)",
    ]
    assert "stableprefix report: 1 file, 3 requests in 1 stream" in captured.out
    assert "~3,287" in captured.out  # line 6, after both bad lines, still analysed


def test_many_bad_lines_are_summarised(tmp_path: Path) -> None:
    f = tmp_path / "log.jsonl"
    f.write_text("{nope\n" * 8)
    rep = readers.read([f], progress=False)
    assert [str(p) for p in rep.problems][-1] == f"{f}: 3 more lines skipped (not JSON objects)"
    assert len(rep.problems) == readers.MAX_PROBLEMS_PER_FILE + 1


def test_missing_file_and_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.jsonl"
    assert cli.main(["report", str(missing), str(CLEAN)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"stableprefix: {missing}: cannot read: No such file or directory"]
    assert cli.main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.splitlines() == [f"stableprefix: {tmp_path}: cannot read: Is a directory"]


def test_unknown_content(tmp_path: Path) -> None:
    f = tmp_path / "x.bin"
    f.write_bytes(b"\x89PNG\r\n\x1a\n0000")
    rep = readers.read([f], progress=False)
    assert [str(p) for p in rep.problems] == [
        f"{f}: not a stableprefix JSONL log, a mitmproxy flow file or a HAR file "
        "(it starts with b'\\x89PNG\\r\\n\\x1a\\n0000')"
    ]


def test_empty_file_is_no_error(tmp_path: Path) -> None:
    f = tmp_path / "empty.jsonl"
    f.write_bytes(b"")
    rep = readers.read([f], progress=False)
    assert rep.problems == [] and rep.totals().requests == 0


def test_detection_by_content_not_extension(tmp_path: Path) -> None:
    f = tmp_path / "session.mitm"  # a JSONL log under a flow-file name
    f.write_bytes(SESSION.read_bytes())
    assert readers.read([f], progress=False).totals().requests == 10


def test_garbage_flow_file(tmp_path: Path) -> None:
    f = tmp_path / "flows"
    f.write_bytes(b"12345:this is not a tnetstring at all")
    rep = readers.read([f], progress=False)
    assert [str(p) for p in rep.problems] == [
        f"{f}: not a readable mitmproxy flow file (Invalid data format)"
    ]


def _tcp_flow_state() -> dict:
    return tflow.ttcpflow().get_state()


def test_flow_file_truncated_after_a_good_flow(tmp_path: Path) -> None:
    f = tmp_path / "flows"
    with f.open("wb") as fo:
        mio.FlowWriter(fo).add(tflow.ttcpflow())  # a TCP flow: read, not an LLM request
        fo.write(b"99999:{truncated")
    rep = readers.read([f], progress=False)
    assert [str(p) for p in rep.problems] == [
        f"{f} flow 2: not a readable mitmproxy flow file from here on (Invalid data format)"
    ]


def test_flow_file_from_another_mitmproxy_version(tmp_path: Path) -> None:
    f = tmp_path / "flows"
    state = _tcp_flow_state()
    state["version"] = 99
    with f.open("wb") as fo:
        for _ in range(3):
            tnetstring.dump(state, fo)
        mio.FlowWriter(fo).add(tcp.TCPFlow(tflow.tclient_conn(), tflow.tserver_conn()))  # readable, read on
    rep = readers.read([f], progress=False)
    from mitmproxy import version

    assert [str(p) for p in rep.problems] == [
        f"{f} flow 1: skipped: {version.MITMPROXY} cannot read files with flow format version 99, please update "
        "mitmproxy (and 2 more flows like it)"
    ]


def test_records_completed_by_a_later_line(tmp_path: Path) -> None:
    first, *_ = (json.loads(x) for x in SESSION.read_text().splitlines())
    evidence = {"id": first["id"], "cached_tokens": 42, "prompt_tokens": 3100}
    partial = {k: v for k, v in first.items() if k not in ("cached_tokens", "prompt_tokens")}
    f = tmp_path / "log.jsonl"
    f.write_text(json.dumps(partial) + "\n" + json.dumps(evidence) + "\n")
    rep = readers.read([f], progress=False)
    (turn,) = rep.turns()
    assert turn.reused() == (42, False)


def test_progress_on_request(capsys: pytest.CaptureFixture[str]) -> None:
    readers.read([SESSION], progress=True)
    err = capsys.readouterr().err
    assert f"reading {SESSION}:" in err and err.endswith("\r\033[K")


def test_html_is_self_contained_with_a_chart_per_thread() -> None:
    page = render_html([("", readers.read([SESSION], progress=False))])
    assert page.count("<svg") == 2  # main and subagent; side requests get a table only
    lowered = page.lower()
    for needle in ("<script", "<link", " src=", "href=", "url(", "@import"):
        assert needle not in lowered
    # bars: git_status and thinking_dropped (main), tools (subagent); one legend swatch per chart
    assert len(re.findall(rf'<rect [^>]*height="[0-9.]+" fill="{LOST}"', page)) == 3 + 2
    assert f'fill="{REUSED}"' in page
    assert "2,530" in page and "45.1%" in page


def test_html_escapes_what_it_shows(tmp_path: Path) -> None:
    rec = json.loads(SESSION.read_text().splitlines()[0])
    rec["host"] = "<script>alert(1)</script>"
    rec["diverged_at"] = "<b>"
    f = tmp_path / "log.jsonl"
    f.write_text(json.dumps(rec) + "\n")
    page = render_html([("", readers.read([f], progress=False))])
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_cli_html_written(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.html"
    assert cli.main(["report", str(SESSION), "--html", str(out)]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert capsys.readouterr().err == f"stableprefix: wrote {out}\n"
    assert cli.main(["report", str(SESSION), "--html", str(tmp_path / "no" / "dir.html")]) == 2
    assert "cannot write" in capsys.readouterr().err


def _recorded_session(turns: int = 3) -> list:
    """HTTP flows as plain `mitmdump -w` records them: Claude-Code-shaped requests, Anthropic usage answers."""
    from mitmproxy import http

    from stableprefix.demo import samples

    session = samples.Session()
    flows = []
    for turn in range(1, turns + 1):
        raw = json.dumps(session.request(turn)).encode()
        usage = {"usage": {"input_tokens": 1000, "cache_read_input_tokens": 25 * turn}}
        req = http.Request.make("POST", "http://127.0.0.1:8080/v1/messages?beta=true", raw,
                                http.Headers(content_type="application/json"))  # fmt: skip
        resp = http.Response.make(
            200, json.dumps(usage).encode(), http.Headers(content_type="application/json")
        )
        flows.append(tflow.tflow(req=req, resp=resp))
    health = http.Request.make("GET", "http://127.0.0.1:8080/health")
    flows.append(tflow.tflow(req=health, resp=http.Response.make(200, b"ok")))  # not an LLM request
    return flows


def _assert_billing_story(rep: report.Report, name: Path) -> None:
    assert rep.problems == []
    turns = list(rep.turns())
    assert [(t.cls, t.verdict, t.cause) for t in turns] == [
        ("main", "first", None), ("main", "changed", "billing"), ("main", "changed", "billing"),
    ]  # fmt: skip
    assert [t.where for t in turns] == [f"{name} flow 1", f"{name} flow 2", f"{name} flow 3"]
    assert [t.reused() for t in turns] == [(25, False), (50, False), (75, False)]  # the recorded usage
    assert all(t.rules() == ({"billing": 1}, True) for t in turns)  # observe mode: would fire
    t = rep.totals()
    lost = sum(t.client_tokens.values())  # measured: previous prompt minus reused
    assert lost > 0 and abs(t.would_save - lost) <= 0.1 * lost  # the counterfactual, estimated


def test_flow_file_is_analysed_offline(tmp_path: Path) -> None:
    f = tmp_path / "session.mitm"
    with f.open("wb") as fo:
        writer = mio.FlowWriter(fo)
        for flow in _recorded_session():
            writer.add(flow)
    _assert_billing_story(readers.read([f], progress=False), f)


def test_har_file_is_analysed_offline(tmp_path: Path) -> None:
    from mitmproxy.addons.savehar import SaveHar

    f = tmp_path / "session.har"
    f.write_text(json.dumps(SaveHar().make_har(_recorded_session()), indent=2))
    _assert_billing_story(readers.read([f], progress=False), f)


RECORD_FIELDS = (
    "ts", "id", "host", "path", "api", "rewritten", "changed", "would_change", "passthrough", "session",
    "error", "chain", "system_chars", "tools_chars", "message_chars", "stream", "class", "verdict",
    "common_prefix_messages", "diverged_at", "tools_changed", "cause", "reusable_chars", "reusable_tokens_est",
    "status", "cached_tokens", "prompt_tokens", "evidence", "miss", "interleaved_side",
)  # fmt: skip


def test_any_field_values_never_break_the_report() -> None:
    """Logs from other versions or edited by hand: whatever a field holds, the report renders."""
    from hypothesis import HealthCheck
    from hypothesis import given
    from hypothesis import settings
    from hypothesis import strategies as st

    json_values = st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(10**12), 10**12)
        | st.floats(allow_nan=False)
        | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
        max_leaves=10,
    )
    record = st.dictionaries(st.sampled_from(RECORD_FIELDS), json_values, max_size=len(RECORD_FIELDS))
    stream_ids = st.sampled_from(["s1", "s2"])

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(st.tuples(record, stream_ids), max_size=6))
    def check(recs: list[tuple[dict, str]]) -> None:
        rep = report.Report()
        for i, (rec, sid) in enumerate(recs):
            rep.add({**rec, "stream": sid} if i % 2 else rec, f"f:{i + 1}", "f")
        report_text.render_text(rep)
        report_text.check_lines(rep)
        render_html([("", rep)])

    check()


# --- estimates count only what the server renders (issue 12, item 6) ------------------------------------------


def _rec(**kw: object) -> dict[str, object]:
    base = {"v": 2, "state": "answered", "stream": "s1", "class": "main", "status": 200, "host": "h",
            "system_chars": 8000, "tools_chars": 31500}  # fmt: skip
    return {**base, **kw}


def test_a_loss_is_scaled_by_the_servers_prompt_size(tmp_path: Path) -> None:
    """SmolLM2's template drops the 31,500 characters of tools: the server counted 2,023 tokens for a prompt
    of 40,000 characters. The loss of a client-side change is scaled by the server's 2,023/40,000 tokens per
    character (not 4 characters per token: ~9,975), and measured when the server reported its reuse."""
    log = tmp_path / "t.jsonl"
    rows = [
        _rec(id="a", verdict="first", message_chars=[500], prompt_tokens=2023, cached_tokens=None),
        _rec(id="b", verdict="changed", cause="unknown", diverged_at="messages[0].content[0]",
             message_chars=[500, 300, 200], reusable_chars=100, prompt_tokens=2100, cached_tokens=None),
        _rec(id="c", verdict="changed", cause="unknown", diverged_at="messages[0].content[0]",
             message_chars=[500, 300, 200, 200], reusable_chars=100, prompt_tokens=2150, cached_tokens=40),
    ]  # fmt: skip
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    turns = list(readers.read([log], progress=False).turns())
    assert turns[1].lost() == (round((40000 - 100) * 2023 / 40000), True)  # 2,018, an estimate
    assert turns[2].lost() == (2100 - 40, False)  # measured: previous prompt minus reused now
    assert turns[0].prompt() == (2023, False)
    text = report_text.render_text(readers.read([log], progress=False))
    assert "~2,018" in text and "~9,975" not in text and " 2,060 " in text


def test_a_cross_conversation_miss_is_counted_with_its_cause(tmp_path: Path) -> None:
    """The second conversation's first request: billing suffix differs at system[0]@46; 40,000 characters
    (system + tools) would be shared were it equal; the server counted 10,000 tokens for the 40,400-character
    prompt and reused 12: ~40,000 * 10,000/40,400 - 12 = ~9,889 tokens reprocessed for billing."""
    log = tmp_path / "t.jsonl"
    rows = [
        _rec(id="a", stream="s1", verdict="first", message_chars=[400], prompt_tokens=10_000, cached_tokens=0),
        _rec(id="b", stream="s2", verdict="first", message_chars=[400], prompt_tokens=10_000, cached_tokens=12,
             nearest_stream="s1", diverged_at="system[0]@46", cause="billing", reusable_chars=46,
             shareable_chars=39_500 + 500),
    ]  # fmt: skip
    for r in rows:
        r["system_chars"], r["tools_chars"] = 8_500, 31_500
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rep = readers.read([log], progress=False)
    t = rep.totals()
    expected = round(40_000 * 10_000 / 40_400) - 12
    assert (dict(t.client_turns), dict(t.client_tokens), t.cross_turns) == (
        {"billing": 1},
        {"billing": expected},
        1,
    )
    text = report_text.render_text(rep)
    assert f"~{expected:,}" in text and "(1 of them a conversation's first request)" in text
    assert report_text.check_lines(rep) == []  # --check keeps its meaning: within-stream changes only
