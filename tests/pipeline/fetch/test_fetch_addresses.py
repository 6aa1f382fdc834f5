"""The address policy: a table against `is_global`, and every spelling of loopback and link-local
refused against real servers on 127.0.0.1 and [::1], directly and through a redirect, with the
servers' own request counters at zero."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from vilbert.pipeline.fetch import FetchOptions, NetworkOptions, fetch_cc, read_failures
from vilbert.pipeline.fetch.addresses import (
    AddressPolicy,
    RefusedAddress,
    checking_socket_factory,
    host_address,
)
from vilbert.pipeline.fetch.network import Downloader

from .fetch_helpers import BackgroundServer

POLICY = AddressPolicy()


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


IPV6 = _has_ipv6_loopback()

# ------------------------------------------------------------------------------ the policy table

REFUSED = {
    # RFC 6890 / IANA special-purpose IPv4 blocks that are not globally reachable
    "0.0.0.0": "unspecified",
    "0.1.2.3": "",  # the wording of is_private's blocks differs between Python versions: refused is what counts
    "10.1.2.3": "private",
    "100.64.0.1": "carrier-grade NAT",
    "100.127.255.254": "carrier-grade NAT",
    "127.0.0.1": "loopback",
    "127.255.255.254": "loopback",
    "169.254.0.1": "link-local",
    "172.16.0.1": "private",
    "172.31.255.255": "private",
    "192.0.0.1": "",
    "192.0.0.170": "",
    "192.0.2.1": "private",
    "192.168.0.1": "private",
    "198.18.0.1": "private",
    "198.51.100.1": "private",
    "203.0.113.1": "private",
    "224.0.0.1": "multicast",
    "239.255.255.250": "multicast",
    "240.0.0.1": "",
    "255.255.255.255": "",
    # cloud metadata services (Azure's wire server is a global address)
    "169.254.169.254": "metadata",
    "169.254.170.2": "metadata",
    "100.100.100.200": "metadata",
    "168.63.129.16": "metadata",
    "fd00:ec2::254": "metadata",
    # IPv6 special-purpose blocks
    "::": "unspecified",
    "::1": "loopback",
    "100::1": "",
    "2001:db8::1": "",
    "2001:2::1": "",
    "2001:10::1": "",
    "2001:20::1": "",  # ORCHIDv2: is_global on newer Pythons, refused with all of 2001::/23
    "fc00::1": "private",
    "fe80::1": "link-local",
    "fe80::1%eth0": "link-local",
    "fec0::1": "",
    "ff02::1": "multicast",
    "ff0e::1": "multicast",
    "64:ff9b:1::808:808": "",
    # IPv4 wrapped in IPv6: judged on the IPv4 address a packet ends up at
    "::ffff:127.0.0.1": "loopback address (127.0.0.1) wrapped as IPv4-mapped",
    "::ffff:169.254.169.254": "metadata address (instance metadata (AWS",
    "::ffff:10.0.0.1": "private address (10.0.0.1) wrapped as IPv4-mapped",
    "::ffff:0:127.0.0.1": "loopback address (127.0.0.1) wrapped as IPv4-translated",
    "::127.0.0.1": "loopback address (127.0.0.1) wrapped as IPv4-compatible",
    "::8.8.8.8": "",  # deprecated form: refused even around a global address
    "2002:7f00:1::": "loopback address (127.0.0.1) wrapped as 6to4",
    "2002:a9fe:a9fe::1": "(169.254.169.254) wrapped as 6to4",
    "2002:a00:1::": "private address (10.0.0.1) wrapped as 6to4",
    "64:ff9b::127.0.0.1": "loopback address (127.0.0.1) wrapped as NAT64",
    "64:ff9b::169.254.169.254": "(169.254.169.254) wrapped as NAT64",
    "2001:0:4136:e378:8000:63bf:3fff:fdd2": "Teredo",
}
ALLOWED = (
    "8.8.8.8",
    "1.1.1.1",
    "93.184.216.34",
    "100.63.255.255",
    "100.128.0.0",
    "172.15.255.255",
    "172.32.0.0",
    "192.169.0.1",
    "198.17.255.255",
    "198.20.0.0",
    "2001:4860:4860::8888",
    "2606:4700:4700::1111",
    "::ffff:8.8.8.8",
    "2002:808:808::1",
    "64:ff9b::8.8.8.8",
)


@pytest.mark.parametrize("address", sorted(REFUSED))
def test_policy_refuses_special_ranges_metadata_and_wrapped_forms(address: str) -> None:
    why = POLICY.refusal(address)
    assert why is not None and REFUSED[address] in why


@pytest.mark.parametrize("address", ALLOWED)
def test_policy_allows_global_addresses(address: str) -> None:
    assert POLICY.refusal(address) is None


EXTRAS = ("metadata", "multicast", "wrapped", "IETF", "site-local", "NAT64", "IPv4-compatible")


def test_the_policy_never_allows_more_than_is_global() -> None:
    """An allowlist: every address it lets through is `is_global`, and so is any IPv4 address it wraps;
    every `is_global` address it refuses is one of the documented extras."""
    for address in [*REFUSED, *ALLOWED]:
        ip = ipaddress.ip_address(address.split("%")[0])
        why = POLICY.refusal(address)
        if why is None:
            inner = (ip.ipv4_mapped or ip.sixtofour) if ip.version == 6 else None
            assert ip.is_global and (inner is None or inner.is_global), address
        elif ip.is_global:
            assert any(word in why for word in EXTRAS), (address, why)


HOST_SPELLINGS = {
    "127.1": "127.0.0.1",
    "0x7f.1": "127.0.0.1",
    "0x7f000001": "127.0.0.1",
    "2130706433": "127.0.0.1",
    "0177.0.0.1": "127.0.0.1",
    "017700000001": "127.0.0.1",
    "127.0.0.1.": "127.0.0.1",
    "localhost": "127.0.0.1",
    "localhost.": "127.0.0.1",
    "api.localhost": "127.0.0.1",
    "0": "0.0.0.0",
    "0xa9fea9fe": "169.254.169.254",
    "2852039166": "169.254.169.254",
    "::ffff:7f00:1": "::ffff:7f00:1",
    "fe80::1%25lo": "fe80::1",
    "example.com": None,
    "1.2.3.4.5": None,
    "999999999999": None,
}


@pytest.mark.parametrize("host", sorted(HOST_SPELLINGS))
def test_host_literals_are_read_as_the_os_reads_them(host: str) -> None:
    expected = HOST_SPELLINGS[host]
    assert host_address(host) == (None if expected is None else ipaddress.ip_address(expected))


@pytest.mark.parametrize(
    "spelling", ["１２７．０．０．１", "127。0。0。1", "127｡0｡0｡1", "①②⑦.⓪.⓪.①", "𝟭𝟮𝟳.0.0.1", "ⓛⓞⓒⓐⓛⓗⓞⓢⓣ", "LOCALHOST"]
)
def test_the_installed_yarl_folds_unicode_hosts_into_loopback(spelling: str) -> None:
    """Why the raw text is never judged: yarl (what aiohttp connects with) turns these into ASCII."""
    host = URL(f"http://{spelling}:81/x").raw_host
    assert host in ("127.0.0.1", "localhost") and host_address(host) == ipaddress.ip_address("127.0.0.1")


# ------------------------------------------------------------------------- real loopback servers


class Servers(BackgroundServer):
    """Targets on 127.0.0.1 and [::1] and a redirector on 127.0.0.2 (to `?u=URL`), each counting the
    requests it receives."""

    def __init__(self) -> None:
        super().__init__()
        self.target_hits = 0
        self.redirector_hits = 0

    def routes(self) -> list[tuple[str, object]]:
        hosts = [("127.0.0.1", self._target), ("127.0.0.2", self._redirect)]
        return hosts + [("::1", self._target)] if IPV6 else hosts

    async def _target(self, request: web.Request) -> web.Response:
        self.target_hits += 1
        return web.Response(body=b"\xff\xd8\xff" + b"x" * 100)

    async def _redirect(self, request: web.Request) -> web.Response:
        self.redirector_hits += 1
        raise web.HTTPFound(location=request.query["u"])


@pytest.fixture(scope="module")
def servers() -> Iterator[Servers]:
    with Servers() as s:
        yield s


def spellings(servers: Servers) -> dict[str, str]:
    """URL -> the address its refusal must name. IPv4-mapped forms reach the IPv4 listener."""
    v4, v6 = servers.ports["127.0.0.1"], servers.ports.get("::1", 1)
    urls = {
        f"http://{host}:{v4}/img.jpg": "127.0.0.1"
        for host in (
            "127.0.0.1",
            "127.1",
            "0x7f.1",
            "0x7F000001",
            "2130706433",
            "0177.0.0.1",
            "127.0.0.1.",
            "１２７．０．０．１",
            "127。0。0。1",
            "①②⑦.⓪.⓪.①",
            "𝟭𝟮𝟳.0.0.1",
            "LOCALHOST",
            "localhost.",
            "ⓛⓞⓒⓐⓛⓗⓞⓢⓣ",
            "[::ffff:127.0.0.1]",
            "[::FFFF:7F00:1]",
            "[2002:7f00:1::]",
            "[64:ff9b::7f00:1]",
            "[::127.0.0.1]",
        )  # fmt: skip
    }
    urls |= {f"http://{host}:{v4}/img.jpg": "0.0.0.0" for host in ("0", "0.0.0.0", "0x0")}
    urls |= {
        f"http://{host}:{v4}/latest/meta-data/": "169.254.169.254"
        for host in (
            "169.254.169.254",
            "0xa9fea9fe",
            "2852039166",
            "１６９．２５４．１６９．２５４",
            "[::ffff:169.254.169.254]",
            "[2002:a9fe:a9fe::]",
        )  # fmt: skip
    }
    urls[f"http://100.100.100.200:{v4}/latest/meta-data/"] = "100.100.100.200"
    urls[f"HTTP://[::ffff:a9fe:a9fe]:{v4}/"] = "169.254.169.254"
    if IPV6:
        urls |= {f"http://{host}:{v6}/img.jpg": "::1" for host in ("[::1]", "[0:0:0:0:0:0:0:1]", "[0::1]")}
    return urls


def fetch_all(urls: list[str], policy: AddressPolicy | None = None, **options) -> list:
    network = NetworkOptions(**{"timeout_s": 5.0, "retries": 0, **options})

    async def main() -> list:
        async with Downloader(network, policy) as downloader:
            return list(await asyncio.gather(*(downloader.get(u) for u in urls)))

    return asyncio.run(main())


def test_no_spelling_of_loopback_or_link_local_reaches_a_server(servers: Servers) -> None:
    urls = spellings(servers)
    before = servers.target_hits
    for got, (url, address) in zip(fetch_all(list(urls)), urls.items(), strict=True):
        assert got.reason == "private-address" and got.body is None, (url, got.reason, got.message)
        assert address in got.message and "--allow-private-networks" in got.message, (url, got.message)
    assert servers.target_hits == before == 0


def test_no_redirect_to_any_spelling_reaches_a_server(servers: Servers) -> None:
    """A first hop the policy allows (127.0.0.2, exempted for the test) redirects to each spelling."""
    urls = spellings(servers)
    redirector = f"http://127.0.0.2:{servers.ports['127.0.0.2']}/to"
    hops = [str(URL(redirector).with_query(u=url)) for url in urls]
    before = servers.redirector_hits
    results = fetch_all(hops, AddressPolicy.exempting(["127.0.0.2/32"]))
    for got, (url, address) in zip(results, urls.items(), strict=True):
        assert got.reason == "private-address" and address in got.message, (url, got.reason, got.message)
    assert servers.redirector_hits - before == len(urls), "every first hop was followed"
    assert servers.target_hits == 0


def test_the_spellings_do_reach_the_servers_when_private_networks_are_allowed() -> None:
    """The control: these spellings are live ways to the servers, so the refusals above are real.

    (aiohttp 3.14 itself rejects non-canonical IPv4 literals such as `0` or `127.1` as invalid URLs;
    the policy refuses them before aiohttp is asked, whatever its version does.)
    """
    with Servers() as own:
        v4 = own.ports["127.0.0.1"]
        hosts = ("１２７．０．０．１", "127。0。0。1", "①②⑦.⓪.⓪.①", "LOCALHOST", "[::ffff:127.0.0.1]")
        live = [f"http://{h}:{v4}/x" for h in hosts]
        if IPV6:
            live.append(f"http://[0:0:0:0:0:0:0:1]:{own.ports['::1']}/x")
        results = fetch_all(live, allow_private_networks=True)
        assert [r.reason for r in results] == [None] * len(live), [r.message for r in results]
        assert own.target_hits == len(live)


def test_every_socket_is_checked_where_it_connects(servers: Servers) -> None:
    """The socket factory alone (no URL check, no resolver) refuses a loopback connection in aiohttp."""
    factory = checking_socket_factory(POLICY)
    with pytest.raises(RefusedAddress, match="loopback"):
        factory((socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", 80)))
    factory((socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("8.8.8.8", 80))).close()

    async def main() -> BaseException:
        connector = aiohttp.TCPConnector(socket_factory=factory)
        async with aiohttp.ClientSession(connector=connector) as session:
            with pytest.raises(aiohttp.ClientConnectorError) as info:
                await session.get(f"http://127.0.0.1:{servers.ports['127.0.0.1']}/x")
        return info.value.os_error

    assert isinstance(asyncio.run(main()), RefusedAddress)
    assert servers.target_hits == 0


def test_a_fetch_run_records_each_refusal_as_a_private_address_row(servers: Servers, tmp_path: Path) -> None:
    urls = spellings(servers)
    tsv = tmp_path / "cc.tsv"
    tsv.write_text("".join(f"caption {i}\t{url}\n" for i, url in enumerate(urls)), encoding="utf-8")
    network = NetworkOptions(timeout_s=5.0, retries=0)
    report = fetch_cc(tsv, tmp_path / "out", FetchOptions(network=network, decode_workers=1))
    assert report["run"]["failed_by_reason"] == {"private-address": len(urls)} and report["run"]["saved"] == 0
    rows = sorted(read_failures(tmp_path / "out").to_pylist(), key=lambda r: r["line"])
    for row, address in zip(rows, urls.values(), strict=True):
        assert row["reason"] == "private-address" and address in row["message"] and not row["transient"]
    assert servers.target_hits == 0
