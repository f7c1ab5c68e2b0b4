"""core.access: the client allowlist and what counts as a loopback listener."""

from __future__ import annotations

import ipaddress

import pytest

from stableprefix.core.access import client_allowed
from stableprefix.core.access import is_loopback_host
from stableprefix.core.access import parse_networks


def test_parse_networks_accepts_lists_commas_and_bare_addresses() -> None:
    nets = parse_networks(["10.1.0.0/16, 192.168.5.7", "fd00::/8"])
    assert nets == (
        ipaddress.ip_network("10.1.0.0/16"),
        ipaddress.ip_network("192.168.5.7/32"),
        ipaddress.ip_network("fd00::/8"),
    )
    assert parse_networks(["10.1.2.3/16"]) == (ipaddress.ip_network("10.1.0.0/16"),)  # host bits dropped
    assert parse_networks([]) == ()


@pytest.mark.parametrize("bad", ["10.0.0.0/33", "ten", "", "10.0.0.0/8,", "gpu-box", "1.2.3.4.5"])
def test_parse_networks_names_the_bad_value(bad: str) -> None:
    with pytest.raises(ValueError, match="is not an IP network"):
        parse_networks([bad])


@pytest.mark.parametrize(
    ("peer", "allowed"),
    [
        ("10.1.2.3", True),
        ("10.2.0.1", False),
        ("::ffff:10.1.9.9", True),  # IPv4-mapped, as a dual-stack listener reports it
        ("fd00::1%eth0", True),  # scope id dropped
        ("fe80::1", False),
        ("127.0.0.1", False),  # loopback is not implicitly allowed
        ("not-an-address", False),
        ("", False),
    ],
)
def test_client_allowed(peer: str, allowed: bool) -> None:
    assert client_allowed(peer, parse_networks(["10.1.0.0/16", "fd00::/8"])) is allowed


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("LOCALHOST", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("*", False),
        ("192.168.1.20", False),
        ("gpu-box.lan", False),
        ("localhost.evil.example", False),
    ],
)
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback
