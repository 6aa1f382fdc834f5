"""Which addresses fetch may connect to: globally routable ones only, whatever the spelling.

The policy is an allowlist: `ipaddress`'s `is_global`, judged on the IPv4 address a wrapped IPv6
form reaches (IPv4-mapped `::ffff:0:0/96`, IPv4-translated `::ffff:0:0:0/96`, IPv4-compatible
`::/96`, 6to4 `2002::/16`, NAT64 `64:ff9b::/96`, Teredo `2001::/32`), minus what `is_global`
lets through on some Python versions but no image host lives on (multicast, deprecated site-local
`fec0::/10`, the IETF protocol block `2001::/23`, local-use NAT64 `64:ff9b:1::/48`), minus cloud
metadata services, one of which (Azure's 168.63.129.16) is a global address.

`host_address` says what a URL's host connects to when it is a literal in any spelling the
operating system accepts (`127.1`, `0x7f.1`, `2130706433`, `0177.0.0.1`, a trailing dot) or a
`localhost` name (RFC 6761: loopback whatever the resolver says); yarl has
already folded Unicode forms (full-width digits, ideographic full stops, circled digits) into ASCII
by then, so the caller passes yarl's host, never the raw text. Names are judged by the resolver on
every address they resolve to, and every socket is judged again on the address it connects to.
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import aiohttp
from aiohttp.abc import AbstractResolver

__all__ = [
    "METADATA_ADDRESSES",
    "AddressPolicy",
    "RefusedAddress",
    "CheckingResolver",
    "checking_socket_factory",
    "host_address",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

METADATA_ADDRESSES: dict[str, str] = {
    "169.254.169.254": "instance metadata (AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle)",
    "169.254.170.2": "AWS ECS task metadata",
    "169.254.0.23": "Tencent Cloud metadata",
    "100.100.100.200": "Alibaba Cloud metadata",
    "168.63.129.16": "Azure wire server",
    "192.0.0.192": "Oracle Cloud metadata",
    "fd00:ec2::254": "AWS instance metadata over IPv6",
}
"""Cloud metadata services, refused by name in the message (all but Azure's are also non-global)."""

_METADATA = {ipaddress.ip_address(a): what for a, what in METADATA_ADDRESSES.items()}
_ALSO_REFUSED = tuple(
    (ipaddress.ip_network(net), what)
    for net, what in (
        ("::/96", "an IPv4-compatible (deprecated) address"),
        ("fec0::/10", "a site-local (deprecated) address"),
        ("2001::/23", "an IETF protocol address"),
        ("64:ff9b:1::/48", "a local-use NAT64 address"),
    )
)
_SHARED = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")
_COMPATIBLE = ipaddress.ip_network("::/96")
# What inet_aton (and so getaddrinfo) reads as an IPv4 address: 1-4 parts, each decimal, octal or hex.
_LEGACY_IPV4 = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+)){0,3}", re.IGNORECASE)


def host_address(host: str) -> IPAddress | None:
    """The address a URL host connects to if it is an address literal in any spelling; None for a name.

    Args:
        host: The host as the HTTP client will use it (yarl's `URL.raw_host`: IDNA-encoded, lower case,
            IPv6 without brackets).
    """
    text = host[:-1] if host.endswith(".") else host
    if text == "localhost" or text.endswith(".localhost"):  # RFC 6761: always loopback, resolver or not
        return ipaddress.IPv4Address("127.0.0.1")
    try:
        return ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        pass
    if _LEGACY_IPV4.fullmatch(text):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(text))
        except OSError:
            return None  # e.g. a part out of range: not an address, and not resolvable either
    return None


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 form wraps (where a packet to it ends up), and the form's name."""
    if ip.ipv4_mapped is not None:
        return "IPv4-mapped", ip.ipv4_mapped
    if ip.sixtofour is not None:
        return "6to4", ip.sixtofour
    if ip.teredo is not None:
        return "Teredo", ip.teredo[1]
    last32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _NAT64:
        return "NAT64", last32
    if ip in _TRANSLATED:
        return "IPv4-translated", last32
    if ip in _COMPATIBLE and int(ip) > 1:  # :: and ::1 are themselves
        return "IPv4-compatible", last32
    return None


def _kind(ip: IPAddress) -> str:
    for attribute, what in (
        ("is_loopback", "a loopback address"),
        ("is_unspecified", "an unspecified address (0.0.0.0 and :: reach this machine)"),
        ("is_link_local", "a link-local address"),
        ("is_multicast", "a multicast address"),
    ):
        if getattr(ip, attribute):
            return what
    if ip in _SHARED:
        return "a shared (carrier-grade NAT) address"
    if ip.is_private:
        return "a private address"
    return "not a globally routable address"


@dataclass(frozen=True)
class AddressPolicy:
    """The default address policy; `exempt` networks are allowed anyway (the addresses of the proxy a user
    chose, and tests; there is no per-network exception on the command line)."""

    exempt: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(default=())

    @classmethod
    def exempting(cls, networks: Iterable[str]) -> AddressPolicy:
        return cls(tuple(ipaddress.ip_network(n) for n in networks))

    def refusal(self, address: str | IPAddress) -> str | None:
        """Why connecting to `address` is refused (naming any wrapped IPv4 address), or None.

        Args:
            address: An IP address, optionally with an IPv6 zone (`fe80::1%eth0`).
        """
        ip = ipaddress.ip_address(address.split("%", 1)[0]) if isinstance(address, str) else address
        if any(ip in net for net in self.exempt if net.version == ip.version):
            return None
        if ip in _METADATA:
            return f"a cloud metadata address ({_METADATA[ip]})"
        if isinstance(ip, ipaddress.IPv6Address) and (wrapped := _embedded_ipv4(ip)) is not None:
            form, inner = wrapped
            why = self.refusal(inner)
            if why is not None:
                return f"{why} ({inner}) wrapped as {form}"
        if not ip.is_global:
            return _kind(ip)
        if ip.is_multicast:  # is_global says True for some multicast scopes
            return _kind(ip)
        for net, what in _ALSO_REFUSED:
            if ip.version == net.version and ip in net:
                return what
        return None


# ------------------------------------------------------------------ enforcement in the connector


class CheckingResolver(AbstractResolver):
    """The default resolver, refusing names with any address the policy refuses."""

    def __init__(self, policy: AddressPolicy) -> None:
        self._inner = aiohttp.DefaultResolver()
        self._policy = policy

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
        infos = await self._inner.resolve(host, port, family)
        for info in infos:
            why = self._policy.refusal(info["host"])
            if why is not None:
                raise RefusedAddress(host, info["host"], why)
        return infos

    async def close(self) -> None:
        await self._inner.close()


class RefusedAddress(OSError):
    """A destination the policy refuses; an OSError so aiohttp wraps it (in `ClientConnectorError`)."""

    def __init__(self, host: str, address: str, why: str) -> None:
        super().__init__(errno.EACCES, f"refused {host} ({address}): {why}")
        self.host, self.address, self.why = host, address, why


def checking_socket_factory(policy: AddressPolicy) -> Callable[[tuple], socket.socket]:
    """aiohttp's `socket_factory`: every socket is judged on the address it is about to connect to."""

    def make(addr_info: tuple) -> socket.socket:
        family, kind, proto, _, sockaddr = addr_info
        why = policy.refusal(sockaddr[0])
        if why is not None:
            raise RefusedAddress(sockaddr[0], sockaddr[0], why)
        return socket.socket(family, kind, proto)

    return make
