"""DNS failures are their own reason (`dns-error`), counted in the report: names under `.invalid` (RFC 6761:
never resolve) through the system's real resolver, with the address policy on and off."""

from __future__ import annotations

import asyncio
import concurrent.futures
import socket

import aiohttp
import pytest

from vilbert.pipeline.fetch import fetch_cc, read_failures
from vilbert.pipeline.fetch.network import Downloader, NetworkOptions, classify_client_error

from .fetch_helpers import loopback_options
from .tls_support import ImageServer


@pytest.fixture(scope="module", autouse=True)
def _resolver_fails_fast() -> None:
    """The system resolver must answer "no such name" for `.invalid` quickly; offline machines whose resolver
    only times out cannot show a DNS failure apart from a timeout, and skip (saying so)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        probe = pool.submit(socket.getaddrinfo, "vilbert-probe.invalid", 80)
        try:
            probe.result(timeout=3)
        except socket.gaierror as err:
            if err.errno == socket.EAI_NONAME:
                return
            pytest.skip(f"the system resolver answers .invalid with {err}, not 'no such name'")
        except concurrent.futures.TimeoutError:
            pytest.skip("the system resolver takes over 3 s to fail a .invalid name (offline without a resolver)")
    pytest.skip("the system resolver resolved a .invalid name")


@pytest.mark.parametrize("allow_private", [True, False], ids=["policy-off", "policy-on"])
def test_a_name_that_does_not_exist_is_a_dns_error_left_for_a_rerun(allow_private: bool) -> None:
    async def main():
        options = NetworkOptions(allow_private_networks=allow_private, retries=2, backoff_s=0.01, timeout_s=5)
        async with Downloader(options) as downloader:
            return await downloader.get("http://images.vilbert-test.invalid/a.jpg")

    result = asyncio.run(main())
    assert result.reason == "dns-error" and "no such host images.vilbert-test.invalid" in result.message
    assert result.attempts == 1 and result.transient, "not retried in the run (same answer), retried by a rerun"


def test_a_temporary_resolver_failure_is_retried() -> None:
    err = aiohttp.ClientConnectorDNSError(_key("cdn.example"), socket.gaierror(socket.EAI_AGAIN, "try again"))
    failure = classify_client_error(err)
    assert (failure.reason, failure.transient, failure.retry) == ("dns-error", True, True)


def _key(host: str):
    from aiohttp.client_reqrep import ConnectionKey

    return ConnectionKey(host, 80, False, True, None, None, None)


def test_fetch_counts_dns_failures_as_their_own_reason(tmp_path) -> None:
    with ImageServer() as server:
        tsv = tmp_path / "list.tsv"
        lines = [f"ok {i}\thttp://127.0.0.1:{server.port}/img-{i}.jpg" for i in range(5)]
        lines += [f"gone {i}\thttp://host-{i}.vilbert-test.invalid/img.jpg" for i in range(3)]
        tsv.write_text("\n".join(lines) + "\n")
        report = fetch_cc(tsv, tmp_path / "out", loopback_options())
    assert report["run"]["saved"] == 5
    assert report["run"]["failed_by_reason"] == {"dns-error": 3} == report["total"]["failed_by_reason"]
    assert report["total"]["retried_by_a_rerun"] == 3
    failures = read_failures(tmp_path / "out").to_pylist()
    assert sorted(f["line"] for f in failures) == [6, 7, 8]
    assert all(f["transient"] and f["attempts"] == 1 for f in failures)
