"""Test helpers, written once: fixtures on disk, a POST, polling with a deadline, free ports, records."""

from __future__ import annotations

import datetime
import gzip
import http.client
import ipaddress
import json
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def load_fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


def wait_until(check: Callable[[], Any], timeout: float = 60.0, interval: float = 0.05) -> bool:
    """Poll `check` until it is true or `timeout` seconds have passed; its last value, as a bool.
    Deadlines are generous: on a loaded machine a slow pass must not read as a failure."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval)
    return bool(check())


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL log (none while the file does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def free_port() -> int:
    """A port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(port: int, path: str, body: bytes | dict[str, Any], headers: dict[str, str] | None = None,
         gzip_body: bool = False) -> tuple[int, bytes]:  # fmt: skip
    """POST to 127.0.0.1:`port` on a fresh connection; (status, response body)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    hdrs = {"content-type": "application/json", **(headers or {})}
    if gzip_body:
        data = gzip.compress(data)
        hdrs["content-encoding"] = "gzip"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", path, data, hdrs)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def tls_cert(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (subjectAltName IP:127.0.0.1) and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "upstream.pem", tmp_path / "upstream.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_file, key_file


def assert_only_deleted(sent: bytes, forwarded: bytes, gone: bytes = b"x-anthropic-billing-header") -> bytes:
    """Check, without the code under test, that `forwarded` is `sent` with spans deleted and nothing else
    (no byte inserted or replaced), that `gone` was among them and is no longer there; the deleted bytes."""
    n = len(forwarded)
    head = 0
    while head < n and sent[head] == forwarded[head]:
        head += 1
    tail = 0
    while tail < n - head and sent[len(sent) - 1 - tail] == forwarded[n - 1 - tail]:
        tail += 1
    middle, pool = forwarded[head : n - tail], sent[head : len(sent) - tail]
    deleted, pos = bytearray(), 0
    for byte in middle:  # greedy: `middle` must be a subsequence of `pool`
        found = pool.find(bytes([byte]), pos)
        assert found >= 0, "bytes were inserted or replaced"
        deleted += pool[pos:found]
        pos = found + 1
    deleted += pool[pos:]
    assert gone in deleted and gone not in forwarded, "the expected span was not what went"
    json.loads(forwarded)  # still a JSON document
    return bytes(deleted)


def make_repo(root: Path) -> Path:
    """A small git repository under `root` for the real Claude Code CLI to work in."""
    repo = root / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.email=dev@example.com", "-c", "user.name=dev", "-c", "init.defaultBranch=main"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    (repo / "README.md").write_text("# demo\n\nA small project.\n")
    (repo / "app.py").write_text("print('hello')\n")
    subprocess.run([*git, "add", "."], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-qm", "init"], cwd=repo, check=True)
    return repo
