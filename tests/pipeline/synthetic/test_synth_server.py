"""The test server answers every URL of the TSV as planned (checked with a real HTTP client)."""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from urllib.parse import urlsplit

import aiohttp
import pytest

from vilbert.cli.app import main as cli_main
from vilbert.pipeline.synthetic import (
    FAILURE_KINDS,
    ServerHandle,
    ServerOptions,
    plan_outcomes,
    serve_in_background,
    write_cc_tsv,
)

OPTIONS = ServerOptions(failure_rate=0.3, seed=0, slow_first_byte_s=0.3, max_runtime_s=120)
CLIENT_DEADLINE_S = 1.5  # > slow_first_byte_s: slow first bytes succeed, endless/stalled bodies time out


async def _fetch(session: aiohttp.ClientSession, url: str) -> dict:
    """A correct client: 3 attempts for 5xx/429/resets (waiting Retry-After), follows redirects,
    a total deadline per attempt, complete bodies only, images only, honours X-Robots-Tag: noai."""
    first, reason = "unset", None
    for _ in range(3):
        try:
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=CLIENT_DEADLINE_S)) as r:
                if first == "unset":
                    first = r.history[0].status if r.history else r.status
                if r.status == 429:
                    await asyncio.sleep(float(r.headers["Retry-After"]))
                    reason = "http-429"
                    continue
                if r.status >= 500:
                    reason = f"http-{r.status}"
                    continue
                if r.status != 200:
                    return {"first": first, "saved": False, "reason": f"http-{r.status}"}
                if "noai" in r.headers.get("X-Robots-Tag", ""):
                    return {"first": first, "saved": False, "reason": "opt-out"}
                body = await r.read()
                if not r.content_type.startswith("image/"):
                    return {"first": first, "saved": False, "reason": "not-an-image"}
                return {"first": first, "saved": True, "reason": None, "body": body}
        except asyncio.TimeoutError:
            return {"first": 200 if first == "unset" else first, "saved": False, "reason": "timeout"}
        except aiohttp.ClientPayloadError:
            return {"first": first, "saved": False, "reason": "truncated"}
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
            first = None if first == "unset" else first
            reason = "connection-reset"
    return {"first": first, "saved": False, "reason": reason}


async def _fetch_all(urls: list[str]) -> list[dict]:
    async with aiohttp.ClientSession() as session:
        return await asyncio.gather(*(_fetch(session, url) for url in urls))


def test_plan_is_deterministic_and_covers_every_kind(synth_corpus):
    plan = plan_outcomes(synth_corpus, OPTIONS)
    assert plan == plan_outcomes(synth_corpus, OPTIONS)
    assert plan != plan_outcomes(synth_corpus, replace(OPTIONS, seed=1))
    tsv_paths = {urlsplit(line.split("\t")[1]).path for line in (synth_corpus / "cc.tsv").read_text().splitlines()}
    assert set(plan) == tsv_paths
    counts = collections.Counter(o.kind for o in plan.values())
    assert set(counts) == {"ok", "missing", *FAILURE_KINDS}
    assert sum(counts[k] for k in FAILURE_KINDS) == round(0.3 * 60)
    assert {o.kind for o in plan_outcomes(synth_corpus, replace(OPTIONS, failure_rate=0)).values()} == {"ok", "missing"}
    only = plan_outcomes(synth_corpus, replace(OPTIONS, kinds=("html", "redirect")))
    assert {o.kind for o in only.values()} == {"ok", "missing", "html", "redirect"}
    with pytest.raises(ValueError, match="valid: "):
        ServerOptions(kinds=("nope",))


def test_every_url_of_the_tsv_is_answered_as_planned(synth_corpus, tmp_path):
    start = time.perf_counter()
    with serve_in_background(synth_corpus, OPTIONS) as server:
        tsv = write_cc_tsv(synth_corpus, server.base_url, tmp_path / "cc.tsv")
        urls = [line.split("\t")[1] for line in tsv.read_text().splitlines()]
        results = asyncio.run(_fetch_all(urls))
        attempts = server.attempts
    assert time.perf_counter() - start < 15
    for url, got in zip(urls, results, strict=True):
        outcome = server.plan[urlsplit(url).path]
        assert (got["saved"], got["reason"], got["first"]) == (
            outcome.expect_saved,
            outcome.reason,
            outcome.first_status,
        ), (url, outcome)
        if got["saved"]:
            assert got["body"] == (synth_corpus / "images" / outcome.file).read_bytes()
        if outcome.kind == "server-error-then-ok":
            assert attempts[outcome.path] == outcome.failures_before_ok + 1


def test_latency_and_stop_with_endless_bodies_in_flight(synth_corpus):
    options = replace(OPTIONS, latency_ms=150, jitter_ms=50, kinds=("endless",), failure_rate=1.0)
    server = ServerHandle(synth_corpus, options).start()
    path = next(iter(p for p, o in server.plan.items() if o.kind == "endless"))
    received = []

    def hang_on() -> None:
        with urllib.request.urlopen(server.base_url + path, timeout=30) as response:
            while chunk := response.read(64):
                received.append(chunk)

    readers = [threading.Thread(target=hang_on, daemon=True) for _ in range(3)]
    for reader in readers:
        reader.start()
    time.sleep(1.0)
    assert received, "an endless body trickles bytes"
    start = time.perf_counter()
    server.stop()
    assert time.perf_counter() - start < 3
    assert not server._thread.is_alive()
    for reader in readers:
        reader.join(5)
        assert not reader.is_alive()


def test_latency_is_applied(synth_corpus):
    options = replace(OPTIONS, latency_ms=200, failure_rate=0)
    with serve_in_background(synth_corpus, options) as server:
        path = next(p for p, o in server.plan.items() if o.kind == "ok")
        start = time.perf_counter()
        with urllib.request.urlopen(server.base_url + path, timeout=5) as response:
            assert response.status == 200
        assert time.perf_counter() - start >= 0.2


def test_server_stops_by_itself_after_max_runtime(synth_corpus):
    with serve_in_background(synth_corpus, replace(OPTIONS, max_runtime_s=0.5)) as server:
        assert server.wait(10)


def test_cli_serve_prints_its_url_and_serves(synth_corpus):
    env = {**os.environ, "COLUMNS": "200"}
    process = subprocess.Popen(
        [sys.executable, "-m", "vilbert", "synth", "serve", str(synth_corpus), "--port", "0",
         "--max-runtime-s", "60", "--failure-rate", "0", "--print-plan"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        lines = []
        while not (line := process.stdout.readline()).startswith("serving "):
            assert line, process.stderr.read()
            lines.append(line)
        assert any("\tmissing\t404\tnot-saved:http-404" in line for line in lines)
        base_url = line.split()[1]
        assert base_url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{base_url}/images/000000.png", timeout=10) as response:
            assert response.read() == (synth_corpus / "images" / "000000.png").read_bytes()
    finally:
        process.terminate()
        process.wait(10)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["synth", "serve", "{tmp}"], "is not a synthetic corpus"),
        (["synth", "serve", "{corpus}", "--failure-rate", "1.5"], "failure_rate must be in [0, 1]"),
        (["synth", "serve", "{corpus}", "--kinds", "ok,html"], "valid: not-found"),
        (["synth", "corpus", "--n", "2", "--out", "{corpus}"], "exists and is not empty; pass --overwrite"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(args, fragment, synth_corpus, tmp_path, capsys):
    args = [a.format(tmp=tmp_path, corpus=synth_corpus) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err and len([line for line in err.splitlines() if line.strip()]) == 1, err


def test_copies_multiply_the_urls_not_the_images(synth_corpus, tmp_path):
    options = replace(OPTIONS, copies=3, failure_rate=0.5)
    with serve_in_background(synth_corpus, options) as server:
        tsv = write_cc_tsv(synth_corpus, server.base_url, tmp_path / "cc.tsv", copies=3)
        paths = [urlsplit(line.split("\t")[1]).path for line in tsv.read_text().splitlines()]
        assert len(paths) == 3 * len(plan_outcomes(synth_corpus, OPTIONS)) == len(set(paths))
        assert set(paths) == set(server.plan)
        kinds = collections.defaultdict(set)
        for outcome in server.plan.values():
            kinds[outcome.file].add(outcome.kind)
        assert any(len(k) > 1 for k in kinds.values()), "copies of one image get their own outcomes"
        copy = next(p for p, o in server.plan.items() if p.startswith("/copy/2/") and o.kind == "redirect")
        with urllib.request.urlopen(server.base_url + copy, timeout=5) as response:
            expected = (synth_corpus / "images" / server.plan[copy].file).read_bytes()
            assert response.read() == expected


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make a test certificate")
def test_serves_https_on_several_loopback_hosts(synth_corpus, tmp_path):
    """The benchmark's setup: one port on 127.0.0.1 and 127.0.0.2, TLS with a certificate for both."""
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1,IP:127.0.0.2"],
        check=True, capture_output=True,
    )  # fmt: skip
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))
    options = replace(OPTIONS, failure_rate=0)
    hosts = ("127.0.0.1", "127.0.0.2")
    with serve_in_background(synth_corpus, options, hosts=hosts, ssl_context=server_context) as server:
        assert server.base_url == f"https://127.0.0.1:{server.port}"
        path = next(p for p, o in server.plan.items() if o.kind == "ok")
        for host in hosts:
            url = f"https://{host}:{server.port}{path}"
            with urllib.request.urlopen(url, timeout=5, context=client_context) as response:
                assert response.status == 200 and response.read()[:3] in (b"\xff\xd8\xff", b"\x89PN")
        with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
            urllib.request.urlopen(f"https://127.0.0.1:{server.port}{path}", timeout=5)  # not trusted by default
