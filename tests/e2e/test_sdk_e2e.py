"""The official Python SDKs (anthropic, openai) through a real mitmdump with the addon to the built-in upstream.

Each SDK parses every answer, streaming and not, and the usage the SDK parsed equals the server evidence the
addon wrote into its JSONL record.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from stableprefix.cli import process
from stableprefix.demo import samples
from stableprefix.demo.upstream import Upstream
from tests.conftest import MitmFactory

pytestmark = pytest.mark.e2e

HEADER = samples.billing_line(suffix="3f1", cch=None)
SYSTEM_TEXT = "You are a careful assistant. " * 40


def records(log: Path, n: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The first `n` records of the addon's JSONL log, waiting until they are written."""
    deadline = time.monotonic() + timeout
    while True:
        lines = log.read_text().splitlines() if log.exists() else []
        if len(lines) >= n or time.monotonic() > deadline:
            return [json.loads(line) for line in lines]
        time.sleep(0.05)


def proxy_with_log(mitm: MitmFactory, upstream: Upstream, tmp_path: Path) -> tuple[process.Proxy, Path]:
    log = tmp_path / "log.jsonl"
    proxy = mitm("--set", f"stableprefix_log={log}", mode=f"reverse:{upstream.url}")
    assert proxy.port
    return proxy, log


def upstream_bodies(upstream: Upstream) -> list[dict[str, Any]]:
    return [json.loads(r.decoded()) for r in upstream.received]


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_sdk_parses_every_answer_and_usage_equals_the_record(
    mitm: MitmFactory, upstream: Upstream, tmp_path: Path, stream: bool
) -> None:
    proxy, log = proxy_with_log(mitm, upstream, tmp_path)
    client = anthropic.Anthropic(base_url=proxy.url, api_key="dummy", max_retries=0, timeout=30)
    system: Any = [{"type": "text", "text": HEADER}, {"type": "text", "text": SYSTEM_TEXT}]
    messages: list[Any] = [{"role": "user", "content": "Say hello."}]
    parsed = []
    msg: Any
    for turn in range(2):
        if stream:
            with client.messages.stream(
                model="claude-sonnet-4-5", max_tokens=64, system=system, messages=messages
            ) as s:
                deltas = [e.delta.text for e in s if e.type == "content_block_delta" and e.delta.type == "text_delta"]  # fmt: skip
                msg = s.get_final_message()
            assert "".join(deltas) == "ok done"
        else:
            msg = client.messages.create(
                model="claude-sonnet-4-5", max_tokens=64, system=system, messages=messages
            )
        assert msg.type == "message" and msg.role == "assistant" and msg.stop_reason == "end_turn"
        assert msg.model == "claude-sonnet-4-5"
        assert [(b.type, getattr(b, "text", None)) for b in msg.content] == [("text", "ok done")]
        parsed.append(msg.usage)
        messages += [
            {"role": "assistant", "content": "ok done"},
            {"role": "user", "content": f"More {turn}."},
        ]

    recs = records(log, 2)
    assert len(recs) == 2
    for usage, rec in zip(parsed, recs, strict=True):
        assert rec["changed"] == {"billing": 1}
        assert rec["evidence"] == "anthropic-usage"
        assert usage.cache_read_input_tokens == rec["cached_tokens"]
        prompt = usage.input_tokens + (usage.cache_read_input_tokens or 0)
        assert prompt + (usage.cache_creation_input_tokens or 0) == rec["prompt_tokens"]
        assert usage.output_tokens >= 1
    assert parsed[0].cache_read_input_tokens == 0 < (parsed[1].cache_read_input_tokens or 0)
    # the upstream got the bodies without the header
    assert [b["system"] for b in upstream_bodies(upstream)] == [system[1:], system[1:]]


def test_anthropic_sdk_parses_a_streamed_tool_use(mitm: MitmFactory, tmp_path: Path) -> None:
    call = {"type": "tool_use", "name": "Bash", "input": {"command": "ls -la", "description": "List files"}}
    with Upstream(replier=lambda path, body: [{"type": "text", "text": "Let me look."}, call]) as up:
        proxy, log = proxy_with_log(mitm, up, tmp_path)
        client = anthropic.Anthropic(base_url=proxy.url, api_key="dummy", max_retries=0, timeout=30)
        kwargs: Any = {"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "List."}]}
        with client.messages.stream(**kwargs) as s:
            streamed = s.get_final_message()
        plain = client.messages.create(**kwargs)
    for msg in (streamed, plain):
        assert msg.stop_reason == "tool_use"
        text, tool = msg.content
        assert isinstance(text, anthropic.types.TextBlock) and text.text == "Let me look."
        assert isinstance(tool, anthropic.types.ToolUseBlock)
        assert tool.name == "Bash" and tool.input == call["input"]
        assert tool.id.startswith("toolu_")
    recs = records(log, 2)
    assert [r["evidence"] for r in recs] == ["anthropic-usage"] * 2


@pytest.mark.parametrize("stream", [False, True])
def test_openai_chat_sdk_parses_every_answer_and_usage_equals_the_record(
    mitm: MitmFactory, upstream: Upstream, tmp_path: Path, stream: bool
) -> None:
    proxy, log = proxy_with_log(mitm, upstream, tmp_path)
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="dummy", max_retries=0, timeout=30)
    messages: list[Any] = [
        {"role": "system", "content": HEADER + "\n" + SYSTEM_TEXT},
        {"role": "user", "content": "Say hello."},
    ]
    parsed = []
    for turn in range(2):
        if stream:
            chunks = list(
                client.chat.completions.create(
                    model="local", messages=messages, stream=True, stream_options={"include_usage": True}
                )
            )
            assert all(c.object == "chat.completion.chunk" and c.model == "local" for c in chunks)
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "ok done"
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
            assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
            usage = chunks[-1].usage
        else:
            done = client.chat.completions.create(model="local", messages=messages)
            assert done.object == "chat.completion" and done.choices[0].finish_reason == "stop"
            assert done.choices[0].message.content == "ok done"
            usage = done.usage
        assert usage is not None
        parsed.append(usage)
        messages += [
            {"role": "assistant", "content": "ok done"},
            {"role": "user", "content": f"More {turn}."},
        ]

    recs = records(log, 2)
    assert len(recs) == 2
    for usage, rec in zip(parsed, recs, strict=True):
        assert rec["changed"] == {"billing": 1}
        assert rec["evidence"] is not None
        assert usage.prompt_tokens == rec["prompt_tokens"]
        assert usage.prompt_tokens_details is not None
        assert usage.prompt_tokens_details.cached_tokens == rec["cached_tokens"]
    assert parsed[0].prompt_tokens_details and parsed[0].prompt_tokens_details.cached_tokens == 0
    assert parsed[1].prompt_tokens_details and (parsed[1].prompt_tokens_details.cached_tokens or 0) > 0
    assert upstream_bodies(upstream)[0]["messages"][0]["content"] == SYSTEM_TEXT


@pytest.mark.parametrize("stream", [False, True])
def test_openai_responses_sdk_parses_every_answer_and_usage_equals_the_record(
    mitm: MitmFactory, upstream: Upstream, tmp_path: Path, stream: bool
) -> None:
    proxy, log = proxy_with_log(mitm, upstream, tmp_path)
    client = openai.OpenAI(base_url=proxy.url + "/v1", api_key="dummy", max_retries=0, timeout=30)
    instructions = HEADER + "\n" + SYSTEM_TEXT
    items: list[Any] = [{"role": "user", "content": "Say hello."}]
    parsed = []
    for turn in range(2):
        if stream:
            events = list(
                client.responses.create(model="local", instructions=instructions, input=items, stream=True)
            )
            kinds = [e.type for e in events]
            assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
            assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "ok done"
            assert [e.sequence_number for e in events] == list(range(len(events)))
            final = events[-1].response  # type: ignore[union-attr]
        else:
            final = client.responses.create(model="local", instructions=instructions, input=items)
        assert final.status == "completed" and final.output_text == "ok done"
        assert final.usage is not None
        parsed.append(final.usage)
        items += [{"role": "assistant", "content": "ok done"}, {"role": "user", "content": f"More {turn}."}]

    recs = records(log, 2)
    assert len(recs) == 2
    for usage, rec in zip(parsed, recs, strict=True):
        assert rec["changed"] == {"billing": 1}
        assert rec["evidence"] == "openai-usage"
        assert usage.input_tokens == rec["prompt_tokens"]
        assert usage.input_tokens_details.cached_tokens == rec["cached_tokens"]
    assert parsed[0].input_tokens_details.cached_tokens == 0 < parsed[1].input_tokens_details.cached_tokens
    assert upstream_bodies(upstream)[0]["instructions"] == SYSTEM_TEXT
