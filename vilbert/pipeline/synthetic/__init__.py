"""The synthetic corpus, the synthetic memes task, caches of both, and the loopback test server. See README.md."""

from vilbert.pipeline.synthetic.caches import generate_synthetic, prepare_synthetic, scene_caches
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
    "generate_synthetic",
    "plan_outcomes",
    "prepare_synthetic",
    "random_shapes",
    "read_corpus",
    "render_scene",
    "scene_caches",
    "serve_in_background",
    "write_cc_tsv",
]
