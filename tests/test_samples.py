from __future__ import annotations

import json

from stableprefix.core import billing
from stableprefix.demo import samples


def test_session_requests_grow_and_only_cch_changes_in_the_prefix() -> None:
    s = samples.Session()
    one, two = s.request(1), s.request(2)
    assert len(two["messages"]) == len(one["messages"]) + 2
    assert one["system"][1:] == two["system"][1:] and one["tools"] == two["tools"]
    h1, h2 = one["system"][0]["text"], two["system"][0]["text"]
    assert billing.is_whole(h1) and billing.is_whole(h2) and h1 != h2
    assert s.request(2) == two  # deterministic


def test_no_cch_and_suffix_variants() -> None:
    line = samples.Session(with_cch=False, suffix="e91").request(1)["system"][0]["text"]
    assert line == "x-anthropic-billing-header: cc_version=2.1.39.e91; cc_entrypoint=cli;"
    assert samples.billing_line(cch=None, workload="cron").endswith("cc_entrypoint=cli; cc_workload=cron;")


def test_realistic_sizes() -> None:
    body = samples.Session().request(1)
    assert 7500 <= len(body["system"][2]["text"]) <= 9000
    assert len(body["tools"]) == 20 and body["tools"][-1]["name"].startswith("mcp__")
    assert "Today's date is 2026-11-29." in body["messages"][0]["content"][0]["text"]


def test_body_of_size() -> None:
    for target in (10_000, 100_000):
        size = len(json.dumps(samples.body_of_size(target)))
        assert target <= size <= target * 1.5
