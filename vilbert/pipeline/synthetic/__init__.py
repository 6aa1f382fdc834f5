"""The synthetic corpus, the synthetic memes task and the loopback test server. See README.md."""

from vilbert.pipeline.synthetic.captions import describe
from vilbert.pipeline.synthetic.corpus import DEFAULT_BASE_URL, generate_corpus, read_corpus, write_cc_tsv
from vilbert.pipeline.synthetic.memes import generate_memes
from vilbert.pipeline.synthetic.scenes import Shape, random_shapes, render_scene
from vilbert.pipeline.synthetic.server import (
    FAILURE_KINDS,
    Outcome,
    ServerHandle,
    ServerOptions,
    plan_outcomes,
    serve_in_background,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "FAILURE_KINDS",
    "Outcome",
    "ServerHandle",
    "ServerOptions",
    "Shape",
    "describe",
    "generate_corpus",
    "generate_memes",
    "plan_outcomes",
    "random_shapes",
    "read_corpus",
    "render_scene",
    "serve_in_background",
    "write_cc_tsv",
]
