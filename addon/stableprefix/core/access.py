"""Who may use a gateway: the client-address allowlist (``stableprefix_allow_clients``), and what counts as a
loopback listen address. Pure: no mitmproxy, no sockets.

mitmproxy filters client addresses only coarsely (``block_global`` kills connections from public addresses,
``block_private`` from private ones); ``allow_hosts``/``ignore_hosts`` match the *server*. A team gateway
opened to a network names the client networks it serves; everything else is answered 403 and never
forwarded. The allowlist is exact: loopback clients are allowed only when a listed network holds them.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    """Networks from CIDR strings (a bare address is a /32 or /128); items may hold several, comma-separated.

    Raises ValueError naming the first value that is not an address or network.
    """
    out: list[Network] = []
    for value in values:
        for item in value.split(","):
            text = item.strip()
            try:
                out.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise ValueError(f"{text!r} is not an IP network (e.g. 10.0.0.0/8, 192.168.1.20)") from None
    return tuple(out)


def client_address(peer: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client's address from a peername host (IPv6 scope id dropped, IPv4-mapped IPv6 unwrapped)."""
    try:
        address = ipaddress.ip_address(peer.rsplit("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_allowed(peer: str, networks: tuple[Network, ...]) -> bool:
    """True when `peer` lies in one of `networks` (an unparsable peer is not allowed)."""
    address = client_address(peer)
    return address is not None and any(address in n for n in networks)


def is_loopback_host(host: str) -> bool:
    """True when a listen address reaches this machine only: 127.0.0.0/8, ::1 or ``localhost``.

    Anything else (0.0.0.0, ::, an interface address, any other host name) opens the listener beyond it.
    """
    text = host.strip().strip("[]")
    if text.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(text.rsplit("%", 1)[0]).is_loopback
    except ValueError:
        return False
