"""Who may talk to the agent API: ``web.allowed_networks`` and ``web.trusted_proxies``.

Only a trusted proxy's X-Forwarded-For is believed; the client is the right-most address in
that header that is not itself a trusted proxy, so a caller cannot forge its way in. A header
sent as several lines is one list (RFC 9110 §5.3): HAProxy's ``option forwardfor`` appends a
line of its own after whatever the client sent, and that last line is the one to believe.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def forwarded_for(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """Every X-Forwarded-For line of raw ASGI headers, combined in order; None if none."""
    lines = [value.decode("latin-1") for name, value in headers if name == b"x-forwarded-for"]
    return ", ".join(lines) if lines else None


def networks(cidrs: Iterable[str]) -> list[Network]:
    return [ipaddress.ip_network(cidr, strict=False) for cidr in cidrs]


def _within(address: str, nets: list[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]"))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in nets)


def client_address(peer: str | None, forwarded_for: str | None, trusted: list[Network]) -> str:
    """The address to judge: the peer, or, behind trusted proxies, the client they name."""
    if peer is None:
        return ""
    if not forwarded_for or not _within(peer, trusted):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _within(hop, trusted):
            return hop
    return hops[0] if hops else peer


def is_allowed(address: str, allowed: list[Network]) -> bool:
    return _within(address, allowed)
