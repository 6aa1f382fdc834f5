"""Helpers for fetch tests: options for a fast loopback run, reading parts back."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa

from vilbert.pipeline.fetch import FetchOptions, NetworkOptions
from vilbert.pipeline.fetch.shards import list_parts
from vilbert.pipeline.synthetic import ServerOptions

CORPUS_SIZE = 240
"""Six blocks of 40: every file variant, and with failure_rate 0.3 every failure kind, several times."""
SERVER = ServerOptions(failure_rate=0.3, slow_first_byte_s=0.5, retry_after_s=1, max_runtime_s=600)
DEADLINE_S = 2.0


def loopback_options(**kwargs) -> FetchOptions:
    network = NetworkOptions(allow_private_networks=True, timeout_s=DEADLINE_S, backoff_s=0.05, connect_timeout_s=2.0)
    return FetchOptions(**{"rows_per_part": 40, "network": network, **kwargs})


def saved_rows(*out_dirs: Path) -> list[dict]:
    """Every row of every complete image part, without the JPEG bytes (duplicates kept)."""
    rows = []
    for out in out_dirs:
        for _, path in list_parts(out, "images"):
            table = pa.ipc.open_file(pa.memory_map(str(path))).read_all().drop_columns(["jpeg"])
            rows += table.to_pylist()
    return rows


def url_path(url: str) -> str:
    return urlsplit(url).path
