"""`vilbert fetch cc|urls`: download an image-text URL list into Arrow image shards."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from vilbert.cli.console import ProgressDisplay, console
from vilbert.errors import UsageError
from vilbert.pipeline.fetch import FetchOptions, NetworkOptions, fetch_cc, fetch_url_table, tls_context
from vilbert.pipeline.fetch.network import DEFAULT_USER_AGENT
from vilbert.pipeline.fetch.proxies import ProxyChoice
from vilbert.pipeline.fetch.run import WEB_MAX_PIXELS

fetch_app = typer.Typer(help="Download image-text URL lists into Arrow image shards.", no_args_is_help=True)

TSV = typer.Option(
    ..., "--tsv", exists=True, dir_okay=False, help="Conceptual Captions TSV: caption<TAB>url, no header."
)
URL_TABLE = typer.Option(
    ..., "--input", exists=True, dir_okay=False, help="A TSV/CSV/JSONL/Parquet list (.gz for text ones)."
)
OUT = typer.Option(..., "--out", help="Output directory; rerun the same command to resume.")
SIZE = typer.Option(224, "--image-size", help="Side of the saved square images.")
MODE = typer.Option("center-crop", "--resize-mode", help="center-crop, pad or stretch.")
QUALITY = typer.Option(90, "--quality", help="JPEG quality of the saved images (1-100).")
IN_FLIGHT = typer.Option(NetworkOptions.max_in_flight, "--max-in-flight", help="Requests open at once.")
PER_HOST = typer.Option(NetworkOptions.per_host, "--per-host", help="Requests open at once to one host (0: no limit).")
TIMEOUT = typer.Option(10.0, "--timeout", help="Deadline of a whole request (connect, redirects, body), s.")
CONNECT = typer.Option(5.0, "--connect-timeout", help="Connect timeout, s.")
RETRIES = typer.Option(2, "--retries", help="Retries of transient failures (timeouts, resets, 5xx, 429).")
MAX_BYTES = typer.Option(16 * 1024 * 1024, "--max-bytes", help="Byte cap per response.")
USER_AGENT = typer.Option(DEFAULT_USER_AGENT, "--user-agent", help="User-Agent header.")
PRIVATE = typer.Option(
    False, "--allow-private-networks", help="Also fetch from non-global addresses: loopback, private, metadata."
)
MAX_PIXELS = typer.Option(WEB_MAX_PIXELS, "--max-pixels", help="Larger images are refused unread (too-large).")
BODY_MEMORY = typer.Option(
    0, "--max-body-memory", help="Bytes of bodies held at once (0: a quarter of free memory, at most 1 GiB)."
)
OPT_OUT = typer.Option("noai,noimageai", "--opt-out-tokens", help="X-Robots-Tag tokens that opt out ('' ignores).")
RETRY_FAILED = typer.Option(False, "--retry-failed", help="Also retry permanent failures of earlier runs.")
SHARD_INDEX = typer.Option(0, "--shard-index", help="This machine's share of the list: 0..num-shards-1.")
NUM_SHARDS = typer.Option(1, "--num-shards", help="Machines sharing the list (line % N == index).")
WORKERS = typer.Option(0, "--workers", help="Decode threads/processes (0: cores + 2 threads, 1 process/core).")
DECODE_IN = typer.Option("thread", "--decode-in", help="Decode in 'thread's or 'process'es.")
CA_BUNDLE = typer.Option(
    None, "--ca-bundle", help="PEM file of CA certificates to trust for https instead of the system's (SSL_CERT_FILE)."
)
PROXY = typer.Option(
    None, "--proxy", help="Forward proxy, http://[user:pass@]host:port (default: HTTPS_PROXY/HTTP_PROXY, NO_PROXY)."
)
ROWS_PER_PART = typer.Option(1000, "--rows-per-part", help="Rows per output part (a crash loses at most one).")


def _options(size, mode, quality, max_in_flight, per_host, timeout, connect_timeout, retries, max_bytes,
             user_agent, allow_private, opt_out, retry_failed, shard_index, num_shards, workers, decode_in,
             rows_per_part, max_pixels, max_body_memory, ca_bundle, proxy) -> FetchOptions:  # fmt: skip
    try:
        network = NetworkOptions(
            max_in_flight=max_in_flight,
            per_host=per_host,
            timeout_s=timeout,
            connect_timeout_s=connect_timeout,
            retries=retries,
            max_bytes=max_bytes,
            user_agent=user_agent,
            allow_private_networks=allow_private,
            max_body_memory=max_body_memory,
            ca_bundle=None if ca_bundle is None else str(ca_bundle),
            proxy=proxy or None,
            opt_out_tokens=tuple(t.strip() for t in opt_out.split(",") if t.strip()),
        )
        tls_context(network.ca_bundle)  # a missing or bad bundle fails here, before anything is written
        ProxyChoice.from_environment(network.proxy)  # and so does a proxy URL that is not one
        return FetchOptions(
            size=size,
            mode=mode,
            quality=quality,
            shard_index=shard_index,
            num_shards=num_shards,
            retry_failed=retry_failed,
            decode_workers=workers,
            decode_in=decode_in,
            rows_per_part=rows_per_part,
            max_pixels=max_pixels,
            network=network,
        )
    except ValueError as err:
        raise UsageError(str(err)) from err


@fetch_app.command("cc")
def cc(
    tsv: Path = TSV,
    out: Path = OUT, size: int = SIZE, mode: str = MODE, quality: int = QUALITY, max_in_flight: int = IN_FLIGHT,
    per_host: int = PER_HOST, timeout: float = TIMEOUT, connect_timeout: float = CONNECT, retries: int = RETRIES,
    max_bytes: int = MAX_BYTES, user_agent: str = USER_AGENT, allow_private_networks: bool = PRIVATE,
    opt_out_tokens: str = OPT_OUT, retry_failed: bool = RETRY_FAILED, shard_index: int = SHARD_INDEX,
    num_shards: int = NUM_SHARDS, decode_workers: int = WORKERS, decode_in: str = DECODE_IN,
    rows_per_part: int = ROWS_PER_PART, max_pixels: int = MAX_PIXELS, max_body_memory: int = BODY_MEMORY,
    ca_bundle: Path = CA_BUNDLE, proxy: str = PROXY,
) -> None:  # fmt: skip
    """Download a Conceptual Captions TSV into Arrow image shards, a failures table and a report."""
    options = _options(size, mode, quality, max_in_flight, per_host, timeout, connect_timeout, retries, max_bytes,
                       user_agent, allow_private_networks, opt_out_tokens, retry_failed, shard_index, num_shards,
                       decode_workers, decode_in, rows_per_part, max_pixels, max_body_memory, ca_bundle,
                       proxy)  # fmt: skip
    _run(lambda progress: fetch_cc(tsv, out, options, progress=progress))


@fetch_app.command("urls")
def urls(
    input_path: Path = URL_TABLE,
    url_col: str = typer.Option("url", "--url-col", help="Column with the URL."),
    caption_col: str = typer.Option("caption", "--caption-col", help="Column with the caption ('' for none)."),
    input_format: str = typer.Option("auto", "--format", help="auto, tsv, csv, jsonl or parquet."),
    out: Path = OUT, size: int = SIZE, mode: str = MODE, quality: int = QUALITY, max_in_flight: int = IN_FLIGHT,
    per_host: int = PER_HOST, timeout: float = TIMEOUT, connect_timeout: float = CONNECT, retries: int = RETRIES,
    max_bytes: int = MAX_BYTES, user_agent: str = USER_AGENT, allow_private_networks: bool = PRIVATE,
    opt_out_tokens: str = OPT_OUT, retry_failed: bool = RETRY_FAILED, shard_index: int = SHARD_INDEX,
    num_shards: int = NUM_SHARDS, decode_workers: int = WORKERS, decode_in: str = DECODE_IN,
    rows_per_part: int = ROWS_PER_PART, max_pixels: int = MAX_PIXELS, max_body_memory: int = BODY_MEMORY,
    ca_bundle: Path = CA_BUNDLE, proxy: str = PROXY,
) -> None:  # fmt: skip
    """Download a table of URLs (and captions) into Arrow image shards."""
    options = _options(size, mode, quality, max_in_flight, per_host, timeout, connect_timeout, retries, max_bytes,
                       user_agent, allow_private_networks, opt_out_tokens, retry_failed, shard_index, num_shards,
                       decode_workers, decode_in, rows_per_part, max_pixels, max_body_memory, ca_bundle,
                       proxy)  # fmt: skip
    _run(lambda progress: fetch_url_table(input_path, out, options, fmt=input_format, url_col=url_col,
                                          caption_col=caption_col or None, progress=progress))  # fmt: skip


def _run(job) -> None:
    with ProgressDisplay("fetch", unit="urls") as display:
        report = job(lambda p: display.update(p["done"], info=_describe(p)))
    _summary(report)


def _describe(p: dict) -> str:
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(p["by_reason"].items(), key=lambda kv: -kv[1])[:5])
    return (f"{p['saved']} saved, {p['failed']} failed ({p['success_rate']:.0%} ok), {p['images_per_s']:.0f} images/s, "
            f"{p['in_flight']} in flight" + (f" | {reasons}" if reasons else ""))  # fmt: skip


def _summary(report: dict) -> None:
    run, total = report["run"], report["total"]
    table = Table(title=f"fetch -> {report['out']}", show_header=True)
    table.add_column("")
    table.add_column("this run", justify="right")
    table.add_column("all runs", justify="right")
    table.add_row("saved", str(run["saved"]), str(total["saved"]))
    table.add_row("failed", str(run["failed"]), str(total["failed"]))
    reasons = sorted(set(run["failed_by_reason"]) | set(total["failed_by_reason"]))
    for reason in reasons:
        table.add_row(f"  {reason}", str(run["failed_by_reason"].get(reason, 0)),
                      str(total["failed_by_reason"].get(reason, 0)))  # fmt: skip
    table.add_row("skipped (done before)", str(run["skipped_already_done"]), "")
    table.add_row("images/s", f"{run['images_per_s']:.1f}", "")
    table.add_row("duration", f"{run['duration_s']:.1f} s", "")
    console.print(table)
    if run["malformed_lines"]:
        shown = ", ".join(map(str, run["malformed_lines"][:20]))
        console.print(f"malformed lines skipped: {shown}" + (" ..." if len(run["malformed_lines"]) > 20 else ""))
    if total["retried_by_a_rerun"]:
        console.print(f"{total['retried_by_a_rerun']} transient failures: rerun the same command to retry them")


def register(app: typer.Typer) -> None:
    app.add_typer(fetch_app, name="fetch")
