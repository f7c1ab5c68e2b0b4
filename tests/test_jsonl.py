"""The JSONL log writer."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from stableprefix.mitm.jsonl import JsonlWriter


def test_jsonl_writer_appends_whole_lines_from_threads(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "log.jsonl"
    w = JsonlWriter(path)

    def work(n: int) -> None:
        for k in range(50):
            w.write({"n": n, "k": k, "t": "é"})

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 200 and all(json.loads(x)["t"] == "é" for x in lines)
    w2 = JsonlWriter(path)
    w2.write({"n": -1})
    w2.close()
    assert len(path.read_text().splitlines()) == 201  # appended, not truncated


def test_jsonl_writer_escapes_lone_surrogates(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    w = JsonlWriter(path)
    w.write({"tool_names": ["ok\ud800"], "t": "é"})
    w.close()
    line = path.read_text(encoding="utf-8").strip()
    assert line == '{"tool_names":["ok\\ud800"],"t":"\\u00e9"}'
    assert json.loads(line)["tool_names"] == ["ok\ud800"]
