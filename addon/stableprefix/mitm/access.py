"""The client-address allowlist of a gateway opened to a network (option ``stableprefix_allow_clients``).

A request (or CONNECT) from an address outside the listed networks is answered 403 before anything is sent
upstream; one warning per address. Loaded with the stableprefix addon; off (everyone allowed) by default.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from mitmproxy import ctx
from mitmproxy import exceptions
from mitmproxy import http

from stableprefix.core import access

logger = logging.getLogger("stableprefix")
WARNED_CAP = 1024  # addresses remembered for the once-per-address warning


class ClientAllowlist:
    """Answers 403 to clients outside ``stableprefix_allow_clients`` (when set); never forwards them."""

    def __init__(self) -> None:
        self.networks: tuple[access.Network, ...] | None = None  # None: the option is off
        self._warned: set[str] = set()

    def load(self, loader: Any) -> None:
        loader.add_option(
            "stableprefix_allow_clients",
            Sequence[str],
            [],
            "Client networks allowed to use this proxy (CIDR, e.g. 10.1.0.0/16; repeat the option or "
            "separate with commas). Others are answered 403 and nothing is forwarded. Empty: no check. "
            "Loopback clients need a listed network too (127.0.0.1/32).",
        )

    def configure(self, updated: set[str]) -> None:
        if "stableprefix_allow_clients" in updated:
            values = list(ctx.options.stableprefix_allow_clients)
            try:
                networks = access.parse_networks(values)
            except ValueError as e:
                raise exceptions.OptionsError(f"stableprefix_allow_clients: {e}") from None
            self.networks = networks if networks else None
            self._warned.clear()

    def _refuse(self, flow: http.HTTPFlow) -> None:
        if self.networks is None or flow.response is not None:  # off, or proxyauth already answered
            return
        peer = str(flow.client_conn.peername[0]) if flow.client_conn.peername else ""
        if access.client_allowed(peer, self.networks):
            return
        flow.response = http.Response.make(
            403,
            b"stableprefix: this client address is not allowed (stableprefix_allow_clients)\n",
            {"content-type": "text/plain; charset=utf-8"},
        )
        if peer not in self._warned and len(self._warned) < WARNED_CAP:
            self._warned.add(peer)
            logger.warning(f"stableprefix: refused client {peer}: not in stableprefix_allow_clients")

    def http_connect(self, flow: http.HTTPFlow) -> None:
        self._refuse(flow)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self._refuse(flow)
