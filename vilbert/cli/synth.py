"""`vilbert synth`: the synthetic corpus, the synthetic memes task, the loopback test server, and a vision
stream trained on labelled synthetic objects."""

from __future__ import annotations

import collections
import time
from pathlib import Path

import typer
from rich.progress import Progress

from vilbert.cli._options import CONFIG_OPTION, SET_OPTION, resolve_config
from vilbert.cli.console import console
from vilbert.errors import UsageError
from vilbert.pipeline.synthetic import ServerOptions, generate_corpus, generate_memes, serve_in_background
from vilbert.pipeline.synthetic.server import FAILURE_KINDS

synth_app = typer.Typer(help="Synthetic data: a captioned corpus, a memes task, a test server, vision weights.",
                        no_args_is_help=True)  # fmt: skip


@synth_app.command("corpus")
def corpus(
    n: int = typer.Option(..., "--n", help="Number of images."),
    out: Path = typer.Option(..., "--out", help="Output directory (absent or empty)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same bytes."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous corpus in --out."),
) -> None:
    """Generate N captioned shape images, corpus.jsonl and a CC-style cc.tsv."""
    start = time.perf_counter()
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("rendering", total=n)
        result = generate_corpus(out, n, seed, overwrite=overwrite,
                                 progress=lambda p: bar.update(task, completed=p["done"]))  # fmt: skip
    console.print(f"wrote {n} images to {result} in {time.perf_counter() - start:.1f} s "
                  f"(serve them with `vilbert synth serve {result}`)", soft_wrap=True)  # fmt: skip


@synth_app.command("memes")
def memes(
    n: int = typer.Option(..., "--n", help="Number of samples (rounded down to a multiple of 4)."),
    out: Path = typer.Option(..., "--out", help="Output directory (absent or empty)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same bytes."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a previous memes set in --out."),
) -> None:
    """Generate a Hateful-Memes-layout task whose label needs image and text together."""
    result = generate_memes(out, n, seed, overwrite=overwrite)
    counts = {s: sum(1 for _ in (result / f"{s}.jsonl").open()) for s in ("train", "dev_seen", "test_seen")}
    console.print(f"wrote {sum(counts.values())} memes to {result}: "
                  + ", ".join(f"{k} {v}" for k, v in counts.items()), soft_wrap=True)  # fmt: skip


@synth_app.command("serve")
def serve(
    corpus_dir: Path = typer.Argument(..., exists=True, help="A corpus made by `vilbert synth corpus`."),
    port: int = typer.Option(8765, "--port", help="Port on 127.0.0.1 (0: any free port)."),
    latency_ms: float = typer.Option(0.0, "--latency-ms", help="Delay before every response."),
    jitter_ms: float = typer.Option(0.0, "--jitter-ms", help="Extra random delay, up to this."),
    failure_rate: float = typer.Option(0.25, "--failure-rate", help="Fraction of images that fail (0-1)."),
    seed: int = typer.Option(0, "--seed", help="Chooses which URLs fail and how."),
    slow_first_byte_s: float = typer.Option(2.0, "--slow-first-byte-s", help="Delay of slow responses."),
    max_runtime_s: float = typer.Option(3600.0, "--max-runtime-s", help="Stop by itself after this long."),
    kinds: str = typer.Option(",".join(FAILURE_KINDS), "--kinds", help="Comma-separated failure kinds."),
    copies: int = typer.Option(1, "--copies", help="Also serve /copy/<k>/images/... for k < copies."),
    print_plan: bool = typer.Option(False, "--print-plan", help="Print which URLs fail and how, then serve."),
) -> None:
    """Serve a corpus on 127.0.0.1 with a planned, deterministic mix of failures."""
    try:
        options = ServerOptions(latency_ms=latency_ms, jitter_ms=jitter_ms, failure_rate=failure_rate,
                                seed=seed, slow_first_byte_s=slow_first_byte_s, max_runtime_s=max_runtime_s,
                                kinds=tuple(k.strip() for k in kinds.split(",") if k.strip()),
                                copies=copies)  # fmt: skip
    except ValueError as err:
        raise UsageError(str(err)) from err
    if not corpus_dir.is_dir():
        raise UsageError(f"{corpus_dir} is not a directory; make a corpus with "
                         "`vilbert synth corpus --n N --out DIR`")  # fmt: skip
    with serve_in_background(corpus_dir, options, port) as server:
        if print_plan:
            _print_plan(server.plan)
        # A benchmark starting this as a subprocess waits for this line.
        print(f"serving {server.base_url} ({len(server.plan)} URLs)", flush=True)
        try:
            server.wait()
        except KeyboardInterrupt:
            console.print("stopped")


@synth_app.command("vision")
def vision(
    out: Path = typer.Option(..., "--out", help="The weights file to write (.safetensors)."),
    preset: str = typer.Option("tiny", "--preset", help="Starting point whose model.vision is trained."),
    config_file: Path = CONFIG_OPTION,
    overrides: list[str] = SET_OPTION,
    images: int = typer.Option(3200, "--images", help="Labelled scenes to train on (+1/4 held out)."),
    steps: int = typer.Option(600, "--steps", help="Optimizer steps (batch 32)."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same images and weights."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out file."),
) -> None:
    """Train the config's vision stream on labelled one-object scenes (shape and colour) and write its weights,
    the offline stand-in for ImageNet weights: load them with --set model.vision.pretrained=OUT."""
    from vilbert.train.backbone import save_vision_weights, train_on_synthetic_objects

    config = resolve_config(preset, config_file, overrides)
    vision_config = config.model.vision
    if out.suffix != ".safetensors":
        raise UsageError(f"--out {out}: vision weights are written as .safetensors")
    if out.exists() and not overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it")
    if vision_config.pretrained is not None:
        raise UsageError(f"model.vision.pretrained={vision_config.pretrained!r}: this command trains from scratch")
    if images < 8 or steps < 1:
        raise UsageError(f"need --images >= 8 and --steps >= 1, got {images} and {steps}")
    console.print(f"training on {images} labelled one-shape scenes ({images // 4} held out), {steps} steps")
    result = train_on_synthetic_objects(vision_config, images=images, steps=steps,
                                        init_std=config.model.initializer_range, seed=seed)  # fmt: skip
    save_vision_weights(result.encoder, out)
    accuracy = ", ".join(f"{name} {value:.3f}" for name, value in result.accuracy.items())
    console.print(f"wrote {out} ({result.seconds:.0f} s); held-out accuracy: {accuracy}", soft_wrap=True)
    stem = f" --set model.vision.stem={vision_config.stem}" if vision_config.stem != "patch" else ""
    console.print(f"use it with: --set model.vision.pretrained={out}{stem} --set model.freeze=[vision]", soft_wrap=True)


def _print_plan(plan: dict) -> None:
    """One tab-separated line per URL that does not simply succeed (easy to grep), then the counts."""
    for outcome in plan.values():
        if outcome.kind != "ok":
            saved = "saved" if outcome.expect_saved else f"not-saved:{outcome.reason}"
            print(f"{outcome.path}\t{outcome.kind}\t{outcome.first_status or 'reset'}\t{saved}")
    counts = collections.Counter(o.kind for o in plan.values())
    print("plan: " + ", ".join(f"{kind} {count}" for kind, count in sorted(counts.items())), flush=True)


def register(app: typer.Typer) -> None:
    app.add_typer(synth_app, name="synth")
