"""Shared fixtures: a recording upstream, real mitmdump processes, request helpers."""

from __future__ import annotations

import datetime
import gzip
import http.client
import ipaddress
import json
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from stableprefix.cli import process
from stableprefix.demo.upstream import Upstream

FIXTURES = Path(__file__).parent / "fixtures"


def load_fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    with Upstream() as up:
        yield up


MitmFactory = Callable[..., process.Proxy]


@pytest.fixture
def mitm(tmp_path: Path) -> Iterator[MitmFactory]:
    """Start real mitmdump processes (free port, temp confdir, addon loaded); all stopped by pid at the end."""
    started: list[process.Proxy] = []

    def start(*extra: str, mode: str | None = None, tool: str = "mitmdump", addon: bool = True,
              wait_for_addon: bool | None = None) -> process.Proxy:  # fmt: skip
        args = process.command(
            tool=tool, mode=mode, confdir=tmp_path / f"conf{len(started)}", addon=addon,
            extra=["--set", "flow_detail=0", *extra],
        )  # fmt: skip
        proxy = process.Proxy(args, wait_for_addon=addon if wait_for_addon is None else wait_for_addon)
        started.append(proxy)
        return proxy

    yield start
    for p in started:
        p.stop()


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
