"""fetch: URL list -> download -> decode -> resize -> Arrow image parts + failures + report.

See README.md beside this file for the mental model, the output layout and the failure policy.
"""

from vilbert.pipeline.fetch.inputs import INPUT_FORMATS, BadLine, UrlRow, read_cc_tsv, read_url_table
from vilbert.pipeline.fetch.network import DEFAULT_USER_AGENT, NetworkOptions, tls_context
from vilbert.pipeline.fetch.reader import count_fetched, iter_fetched, read_failures
from vilbert.pipeline.fetch.run import FetchOptions, fetch_cc, fetch_rows, fetch_url_table
from vilbert.pipeline.fetch.shards import FAILURE_SCHEMA, IMAGE_SCHEMA, sample_key

__all__ = [
    "DEFAULT_USER_AGENT",
    "FAILURE_SCHEMA",
    "IMAGE_SCHEMA",
    "INPUT_FORMATS",
    "BadLine",
    "FetchOptions",
    "NetworkOptions",
    "UrlRow",
    "count_fetched",
    "fetch_cc",
    "fetch_rows",
    "fetch_url_table",
    "iter_fetched",
    "read_cc_tsv",
    "read_failures",
    "read_url_table",
    "sample_key",
    "tls_context",
]
