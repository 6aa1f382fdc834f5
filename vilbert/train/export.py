"""Export a run so that others can load it: the model with what it needs to be fed, and each stream alone.

    RUN (run dir: newest checkpoint; or a step-*.pt) + the cache it trained on
        -> OUT/model.safetensors, config.json (model_type "vilbert", vilbert_version)  ViLBERT.from_pretrained
           OUT/tokenizer.json             the cache's tokenizer: the vocabulary the weights index
           OUT/preprocessor_config.json   pixel normalization (mean/std) and image size
           OUT/README.md                  model card: preset, data, steps, the run's final metrics
        -> optionally a transformers BERT directory (the text stream) and a timm file (the vision stream)

Nothing here prints: `export_run` returns an `ExportResult` that the CLI renders.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vilbert import __version__
from vilbert.cache import Manifest, is_cache, read_manifest
from vilbert.config import PRESETS, ModelConfig
from vilbert.errors import UsageError
from vilbert.model import ViLBERT
from vilbert.model.export import save_text_as_bert, save_vision_as_timm
from vilbert.train.checkpoint import find_checkpoint, load_checkpoint, model_from_checkpoint
from vilbert.train.metrics import read_metrics

__all__ = ["ExportResult", "export_run", "PREPROCESSOR_NAME", "EXPORT_TOKENIZER_NAME"]

EXPORT_TOKENIZER_NAME = "tokenizer.json"
PREPROCESSOR_NAME = "preprocessor_config.json"


@dataclass(frozen=True, kw_only=True)
class ExportResult:
    """What `export_run` wrote.

    Attributes:
        directory: The export directory (`ViLBERT.from_pretrained(directory)`).
        checkpoint: The checkpoint file it came from.
        cache: The cache whose tokenizer it carries.
        bert_directory: The text stream as a transformers BERT directory, when asked for.
        timm_file: The vision stream as a timm safetensors file, when asked for.
        timm_name: The timm model name to create for `timm_file`.
        timm_kwargs: The `timm.create_model` keyword arguments that fit `timm_file`.
    """

    directory: Path
    checkpoint: Path
    cache: Path
    bert_directory: Path | None = None
    timm_file: Path | None = None
    timm_name: str = ""
    timm_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


def export_run(
    run: str | Path,
    out: str | Path,
    *,
    cache: str | Path | None = None,
    text_as_bert: str | Path | None = None,
    vision_as_timm: str | Path | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Export a run's newest checkpoint (or a given checkpoint file) with its tokenizer and normalization.

    Args:
        run: A run directory or a checkpoint file.
        out: The export directory; must be empty or missing unless `overwrite`.
        cache: The cache the run trained on (default: the `data` its checkpoint records), for its tokenizer.
        text_as_bert: Also write the text stream here as a transformers `BertModel` directory.
        vision_as_timm: Also write the vision stream to this safetensors file for timm.
        overwrite: Write into a non-empty `out` (and over existing stream exports).

    Raises:
        CheckpointError: No checkpoint, or one without model weights and config.
        UsageError: `out` (or a stream target) already holds files, or the cache cannot be found or does not
            belong to the model (another vocabulary).
    """
    checkpoint = find_checkpoint(run)
    state = load_checkpoint(checkpoint)
    model = model_from_checkpoint(state)
    manifest, cache_dir = _find_cache(cache, state, model.config)
    out = Path(out)
    for target in (out, text_as_bert, vision_as_timm):
        if target is not None:
            _refuse_existing(Path(target), overwrite)

    model.save_pretrained(out)
    shutil.copyfile(cache_dir / manifest.tokenizer_file, out / EXPORT_TOKENIZER_NAME)
    (out / PREPROCESSOR_NAME).write_text(json.dumps(_preprocessor_config(model, manifest), indent=2) + "\n")
    timm_kwargs: dict[str, Any] = {}
    if text_as_bert is not None:
        save_text_as_bert(model.text, text_as_bert)
        shutil.copyfile(cache_dir / manifest.tokenizer_file, Path(text_as_bert) / EXPORT_TOKENIZER_NAME)
    if vision_as_timm is not None:
        timm_kwargs = save_vision_as_timm(model.vision, vision_as_timm)
    result = ExportResult(
        directory=out,
        checkpoint=checkpoint,
        cache=cache_dir,
        bert_directory=Path(text_as_bert) if text_as_bert is not None else None,
        timm_file=Path(vision_as_timm) if vision_as_timm is not None else None,
        timm_name=model.config.vision.timm_name,
        timm_kwargs=timm_kwargs,
    )
    (out / "README.md").write_text(_model_card(model, state, manifest, result))
    return result


def _find_cache(cache: str | Path | None, state: dict[str, Any], config: ModelConfig) -> tuple[Manifest, Path]:
    """The cache to take the tokenizer from (a cache, or a root whose `train` split is one), checked against
    the model's vocabulary."""
    given = cache is not None
    if not given and not state.get("data"):
        raise UsageError(f"{state['path']} records no cache; pass the cache the run trained on with --cache DIR")
    root = Path(cache if given else state["data"])
    candidates = [root, root / "train", *sorted(p for p in root.iterdir() if p.is_dir())] if root.is_dir() else []
    found = next((p for p in candidates if is_cache(p)), None)
    if found is None:
        origin = "--cache" if given else f"the data path {state['path']} records"
        raise UsageError(
            f"no cache at {root} ({origin}); the export carries the cache's tokenizer, so pass the cache the run "
            "trained on with --cache DIR"
        )
    manifest = read_manifest(found)
    if manifest.vocab_size != config.text.vocab_size:
        raise UsageError(
            f"the cache {found} has a vocabulary of {manifest.vocab_size} tokens, the model "
            f"{config.text.vocab_size}: not the cache it trained on; pass that one with --cache DIR"
        )
    return manifest, found


def _refuse_existing(target: Path, overwrite: bool) -> None:
    busy = target.is_file() or (target.is_dir() and any(target.iterdir()))
    if busy and not overwrite:
        raise UsageError(f"{target} already exists and is not empty; pass --overwrite to write over it")


def _preprocessor_config(model: ViLBERT, manifest: Manifest) -> dict[str, Any]:
    """How pixels must be prepared for the model, in the keys Hugging Face image processors use."""
    size = model.config.vision.image_size
    return {
        "image_mean": list(model.image_mean),
        "image_std": list(model.image_std),
        "size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_processor_type": "ViTImageProcessor",
        "vilbert": {
            "image_size": size,
            "layout": "CHW RGB",
            "resize": "shorter side to image_size (antialiased), then center crop",
            "cache_pixel_dtype": manifest.pixel_dtype,
            "max_len": manifest.max_len,
        },
    }


def _preset_of(config: ModelConfig) -> str | None:
    """The preset whose model `config` is, up to the vocabulary, the encoders' weight sources and the
    normalization (which the cache and the weights decide), or None for a custom model."""

    def shape(model: ModelConfig) -> ModelConfig:
        text = dataclasses.replace(model.text, vocab_size=1, pad_token_id=0, pretrained=None)
        vision = dataclasses.replace(model.vision, pretrained=None, image_mean=None, image_std=None)
        return dataclasses.replace(model, text=text, vision=vision)

    own = shape(config)
    return next((name for name, make in PRESETS.items() if shape(make().model) == own), None)


def _model_card(model: ViLBERT, state: dict[str, Any], manifest: Manifest, result: ExportResult) -> str:
    config = model.config
    counts = model.parameter_report()["all"]
    preset = _preset_of(config)
    lines = [
        "---",
        "library_name: vilbert",
        "tags: [vilbert, vision-language, multimodal]",
        "---",
        "",
        f"# ViLBERT ({preset or 'custom'})",
        "",
        f"Exported by vilbert {__version__} from `{result.checkpoint}` "
        f"({state.get('format', 'checkpoint')}, step {state.get('step')}, epoch {state.get('epoch')}).",
        "",
        "## Model",
        "",
        f"- preset: {f'`{preset}`' if preset else 'none (custom model config; see config.json)'}",
        f"- text stream: BERT, {config.text.num_layers} layers, width {config.text.hidden_size}, "
        f"vocabulary {config.text.vocab_size} (tokenizer.json)",
        f"- vision stream: timm `{config.vision.timm_name}`, {config.vision.num_layers} blocks, width "
        f"{config.vision.hidden_size}, {config.vision.image_size}px, patch {config.vision.patch_size}",
        f"- cross layers: {', '.join(config.cross.pattern)} (width {config.cross.hidden_size})",
        f"- parameters: {counts['total']:,}",
        f"- pixels: RGB scaled to [0, 1], normalized with mean {list(model.image_mean)} and std "
        f"{list(model.image_std)} (preprocessor_config.json)",
        "",
        "## Data",
        "",
        f"- cache: `{result.cache}` (split `{manifest.split}`, {manifest.num_rows:,} rows, captions up to "
        f"{manifest.max_len} tokens)",
        f"- built by: `{manifest.command}`",
        "",
        "## Final metrics",
        "",
        *_metric_lines(result.checkpoint, state),
        "",
        "## Use",
        "",
        "```python",
        "from vilbert.model import ViLBERT",
        f'model = ViLBERT.from_pretrained("{result.directory}")',
        "```",
    ]
    if result.bert_directory is not None:
        lines += ["", "Text stream alone (transformers):", "", "```python", "from transformers import BertModel"]
        lines += [f'bert = BertModel.from_pretrained("{result.bert_directory}", add_pooling_layer=False)', "```"]
    if result.timm_file is not None:
        kwargs = ", ".join(f"{k}={v!r}" for k, v in result.timm_kwargs.items())
        lines += ["", "Vision stream alone (timm):", "", "```python", "import timm"]
        lines += [
            f'vit = timm.create_model("{result.timm_name}", pretrained=True, '
            f'pretrained_cfg_overlay=dict(file="{result.timm_file}"), {kwargs})',
            "```",
        ]
    return "\n".join(lines) + "\n"


_NOT_QUALITY = frozenset(
    {"kind", "step", "epoch", "lr", "grad_norm", "samples_per_s", "step_time_s", "data_wait_s", "data_wait_frac",
     "peak_mem_mb"}
)  # fmt: skip
"""Keys of a metrics record that describe the run's machinery, not the model (metrics.jsonl keeps them)."""


def _metric_lines(checkpoint: Path, state: dict[str, Any]) -> list[str]:
    """The last record of each kind (train, eval, ...) up to the checkpoint's step, as a table of the model's
    losses and accuracies."""
    metrics = checkpoint.parent.parent / "metrics.jsonl"
    if not metrics.is_file():
        return [f"(no metrics.jsonl beside {checkpoint.parent})"]
    step = state.get("step")
    last: dict[str, dict[str, Any]] = {}
    for record in read_metrics(metrics):
        if step is None or record.get("step", 0) <= step:
            last[str(record.get("kind", "train"))] = record
    if not last:
        return [f"(no records in {metrics})"]
    lines = ["| kind | step | metric | value |", "| --- | --- | --- | --- |"]
    for kind, record in last.items():
        for key, value in record.items():
            if key not in _NOT_QUALITY and isinstance(value, (int, float)):
                lines.append(f"| {kind} | {record.get('step')} | {key} | {value:.4g} |")
    return lines
