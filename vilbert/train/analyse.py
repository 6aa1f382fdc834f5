"""What the cross-modal layers learned: pooled-stream similarity per layer, and retrieval.

    cache split -> N pairs (a seeded sample of rows) + a fixed derangement of them
      -> before the cross stack (the streams' first tokens entering the first cross layer, through the
       same poolers) and after every cross layer: cos(pooled_text, pooled_vision) of the aligned pairs
       (caption i with image i) and of the mismatched pairs (caption i with image perm[i]); the gap
       between the two, and each layer's gap minus the before row's
      -> M x M alignment scores (caption i with image j, the alignment head's logit margin)
         -> recall@1/5/10 image->text and text->image (chance: k / M)

The thesis measured the mean similarity of aligned pairs only, which cannot tell alignment from a
constant offset (the poolers end in a ReLU, so every cosine is >= 0). The mismatched pairs are the
control: a model that aligns the modalities scores aligned pairs higher than mismatched ones, so the
gap is positive; an untrained model's gap is about zero. The report carries the standard error of the
gap (of the per-pair differences) to say what "about zero" means.

The "before" row is the second control. The image-text contrastive task (ITC, with
`model.itc_projection=poolers`) trains the poolers' Linear maps on exactly those unimodal first tokens,
so a gap there is made before any co-attention; a cross layer's own contribution is its gap minus that
one (`gap_vs_before`), not its gap.

Cost: the similarity is 2N forward passes; retrieval is M^2 (every caption with every image through
the whole model, batched), so `retrieval_pairs` stays small for big models.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vilbert.cache import CacheReader
from vilbert.model import ViLBERT
from vilbert.train.distributed import resolve_device
from vilbert.train.loading import load_model
from vilbert.train.pixels import PixelNormalizer, pixel_normalizer
from vilbert.train.scoring import binary_scores, retrieval_recall
from vilbert.train.splits import open_cache

__all__ = [
    "BEFORE",
    "LayerSimilarity",
    "AnalysisReport",
    "fixed_derangement",
    "PairSet",
    "load_pairs",
    "layer_similarity",
    "alignment_score_matrix",
    "analyse_model",
    "analyse",
    "plot_analysis",
]

Progress = Callable[[dict[str, Any]], None]
RECALL_KS = (1, 5, 10)


BEFORE = "before"
"""The `kind` of the row measured on the streams entering the first cross layer."""


@dataclass(frozen=True, kw_only=True)
class LayerSimilarity:
    """Mean cosine similarity of the pooled streams after one cross layer (or before the first: `kind`
    `before`, `layer` -1)."""

    layer: int
    kind: str
    aligned: float
    mismatched: float
    gap: float
    """aligned - mismatched."""
    gap_stderr: float
    """Standard error of the mean per-pair difference (aligned_i - mismatched_i)."""
    gap_vs_before: float = 0.0
    """gap - the `before` row's gap: what this layer adds to the gap the unimodal streams already have."""
    gap_vs_before_stderr: float = 0.0
    """Standard error of that change (of the per-pair differences of differences)."""


@dataclass(frozen=True, kw_only=True)
class AnalysisReport:
    """Everything `analyse` measured; `to_dict()` is the JSON report."""

    checkpoint: str
    data: str
    pairs: int
    retrieval_pairs: int
    seed: int
    layers: list[LayerSimilarity]
    retrieval: dict[str, float]
    before: LayerSimilarity | None = None
    """The same measure on the unimodal first tokens (the streams entering the first cross layer) through
    the same poolers: the gap that exists before any co-attention."""
    chance: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fixed_derangement(n: int, seed: int = 0) -> np.ndarray:
    """A seeded random cyclic permutation of `range(n)` (Sattolo's algorithm): `perm[i] != i` for all i.

    Raises:
        ValueError: For n < 2, which has no derangement.
    """
    if n < 2:
        raise ValueError(f"a derangement needs at least 2 items, got {n}")
    rng = np.random.default_rng(seed)
    perm = np.arange(n)
    for i in range(n - 1, 0, -1):
        j = int(rng.integers(i))  # j < i: the result is a single n-cycle
        perm[i], perm[j] = perm[j], perm[i]
    return perm


@dataclass(frozen=True)
class PairSet:
    """N caption/image pairs held on the device: `input_ids`/`attention_mask` `(N, T)`, `pixels`
    `(N, 3, H, W)` as stored (normalized per batch), and the cache rows they came from."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixels: torch.Tensor
    rows: np.ndarray

    def __len__(self) -> int:
        return int(self.rows.shape[0])


def load_pairs(reader: CacheReader, n: int, *, seed: int = 0, device: torch.device | str = "cpu") -> PairSet:
    """`min(n, len(reader))` rows: all of them, or a seeded sample in row order."""
    total = len(reader)
    rows = np.arange(total) if n >= total else np.sort(np.random.default_rng(seed).choice(total, n, replace=False))
    columns = reader.gather(rows)
    ids = torch.from_numpy(columns["input_ids"].astype(np.int64)).to(device)
    lengths = torch.from_numpy(columns["num_tokens"].astype(np.int64)).to(device)
    mask = (torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]).long()
    return PairSet(ids, mask, torch.from_numpy(columns["pixels"]).to(device), rows)


def _forward(
    model: ViLBERT, pairs: PairSet, text: torch.Tensor, image: torch.Tensor, normalizer: PixelNormalizer, **kwargs: Any
) -> Any:
    pixels = normalizer.model_input(pairs.pixels[image])
    return model(pairs.input_ids[text], pairs.attention_mask[text], pixels, **kwargs)


@torch.no_grad()
def layer_similarity(
    model: ViLBERT, pairs: PairSet, normalizer: PixelNormalizer, *, seed: int = 0, batch_size: int = 64
) -> tuple[LayerSimilarity, list[LayerSimilarity]]:
    """The cosine similarity of the pooled streams for aligned and mismatched pairs: before the cross
    stack (the unimodal first tokens through the same poolers), and after each cross layer."""
    n = len(pairs)
    perm = torch.from_numpy(fixed_derangement(n, seed)).to(pairs.input_ids.device)
    kinds = (BEFORE, *model.config.cross.pattern)
    aligned = torch.zeros(len(kinds), n, dtype=torch.float64)  # row 0: before the cross stack
    mismatched = torch.zeros_like(aligned)
    for start in range(0, n, batch_size):
        text = torch.arange(start, min(start + batch_size, n), device=perm.device)
        for images, out in ((text, aligned), (perm[text], mismatched)):
            result = _forward(model, pairs, text, images, normalizer, output_layers=True)
            before = (
                model.text_pooler(result.unimodal_text_tokens),
                model.vision_pooler(result.unimodal_vision_tokens),
            )
            for row, (pooled_text, pooled_vision) in enumerate([before, *result.layer_pooled]):
                cos = F.cosine_similarity(pooled_text.float(), pooled_vision.float(), dim=-1, eps=1e-8)
                out[row, start : start + len(text)] = cos.double().cpu()
    diff = aligned - mismatched  # (1 + L, N)
    change = diff - diff[:1]  # each row's per-pair gap minus the before row's
    rows = [
        LayerSimilarity(
            layer=i - 1,
            kind=kinds[i],
            aligned=float(aligned[i].mean()),
            mismatched=float(mismatched[i].mean()),
            gap=float(diff[i].mean()),
            gap_stderr=_stderr(diff[i]),
            gap_vs_before=float(change[i].mean()),
            gap_vs_before_stderr=_stderr(change[i]),
        )
        for i in range(len(kinds))
    ]
    return rows[0], rows[1:]


def _stderr(values: torch.Tensor) -> float:
    return float(values.std(unbiased=True) / math.sqrt(len(values))) if len(values) > 1 else 0.0


@torch.no_grad()
def alignment_score_matrix(
    model: ViLBERT,
    pairs: PairSet,
    normalizer: PixelNormalizer,
    *,
    batch_size: int = 256,
    progress: Progress | None = None,
) -> torch.Tensor:
    """`(M, M)` alignment scores: entry `[i, j]` is caption i with image j (logit margin)."""
    m = len(pairs)
    device = pairs.input_ids.device
    images_per_batch = max(1, min(m, batch_size))
    texts_per_batch = max(1, batch_size // images_per_batch)
    scores = torch.empty(m, m, dtype=torch.float32)
    for t0 in range(0, m, texts_per_batch):
        texts = torch.arange(t0, min(t0 + texts_per_batch, m), device=device)
        for i0 in range(0, m, images_per_batch):
            images = torch.arange(i0, min(i0 + images_per_batch, m), device=device)
            text_idx = texts.repeat_interleave(len(images))  # (t*i,): caption-major
            image_idx = images.repeat(len(texts))
            out = _forward(model, pairs, text_idx, image_idx, normalizer)
            margin = binary_scores(model.alignment_logits(out).float()).cpu()
            scores[t0 : t0 + len(texts), i0 : i0 + len(images)] = margin.view(len(texts), len(images))
        if progress is not None:
            progress({"kind": "retrieval", "done": min(t0 + texts_per_batch, m), "total": m})
    return scores


def analyse_model(
    model: ViLBERT,
    reader: CacheReader,
    *,
    pairs: int = 1000,
    retrieval_pairs: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    checkpoint: str = "",
    progress: Progress | None = None,
) -> AnalysisReport:
    """Layer similarity on `pairs` pairs and retrieval on the first `retrieval_pairs` of them
    (default: the same number) of `reader`, with the model in eval mode (restored afterwards)."""
    device = torch.device(device)
    normalizer = pixel_normalizer(reader, model, device)
    pair_set = load_pairs(reader, pairs, seed=seed, device=device)
    if len(pair_set) < 2:
        raise ValueError(f"the analysis needs at least 2 pairs; {reader.paths[0]} has {len(reader)} rows")
    m = min(retrieval_pairs or len(pair_set), len(pair_set))
    was_training = model.training
    model.eval()
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            before, layers = layer_similarity(model, pair_set, normalizer, seed=seed, batch_size=batch_size)
            if progress is not None:
                progress({"kind": "similarity", "layers": len(layers)})
            subset = PairSet(
                pair_set.input_ids[:m], pair_set.attention_mask[:m], pair_set.pixels[:m], pair_set.rows[:m]
            )
            scores = alignment_score_matrix(model, subset, normalizer, batch_size=4 * batch_size, progress=progress)
    finally:
        model.train(was_training)
    return AnalysisReport(
        checkpoint=checkpoint,
        data=str(reader.paths[0]),
        pairs=len(pair_set),
        retrieval_pairs=m,
        seed=seed,
        layers=layers,
        before=before,
        retrieval=retrieval_recall(scores, RECALL_KS),
        chance={f"r{k}": min(k / m, 1.0) for k in RECALL_KS},
    )


def analyse(
    checkpoint: str | Path,
    data: str | Path,
    *,
    pairs: int = 1000,
    retrieval_pairs: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    device: str = "auto",
    progress: Progress | None = None,
) -> AnalysisReport:
    """`analyse_model` for the model of a checkpoint (any kind `load_model` reads) on a cache split."""
    dev = resolve_device(device)
    loaded = load_model(checkpoint, dev)
    return analyse_model(
        loaded.model,
        open_cache(data),
        pairs=pairs,
        retrieval_pairs=retrieval_pairs,
        seed=seed,
        batch_size=batch_size,
        device=dev,
        checkpoint=str(loaded.path),
        progress=progress,
    )


def plot_analysis(report: AnalysisReport, path: str | Path) -> Path:
    """A PNG: similarity before the cross stack and per cross layer (aligned, mismatched, gap +- 2 s.e.),
    and recall@k vs chance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    rows = ([report.before] if report.before is not None else []) + list(report.layers)
    x = np.arange(len(rows))
    labels = [s.kind if s.kind == BEFORE else f"{s.layer}:{s.kind}" for s in rows]
    left.plot(x, [s.aligned for s in rows], "o-", label="aligned")
    left.plot(x, [s.mismatched for s in rows], "s--", label="mismatched")
    gap = left.twinx()
    gap.bar(
        x,
        [s.gap for s in rows],
        yerr=[2 * s.gap_stderr for s in rows],
        alpha=0.3,
        color=["tab:gray" if s.kind == BEFORE else "tab:green" for s in rows],
        label="gap",
    )
    gap.axhline(0.0, color="tab:green", linewidth=0.8)
    gap.set_ylabel("gap (aligned - mismatched)")
    left.set_xticks(x, labels)
    left.set_xlabel("cross layer (before: the streams entering the first)")
    left.set_ylabel("mean cosine(pooled text, pooled image)")
    left.set_title(f"pooled-stream similarity, {report.pairs} pairs")
    left.legend(loc="upper left", fontsize=8)
    ks = list(RECALL_KS)
    width = 0.38
    right.bar(np.arange(len(ks)) - width / 2, [report.retrieval[f"i2t_r{k}"] for k in ks], width, label="image->text")
    right.bar(np.arange(len(ks)) + width / 2, [report.retrieval[f"t2i_r{k}"] for k in ks], width, label="text->image")
    right.plot(np.arange(len(ks)), [report.chance[f"r{k}"] for k in ks], "k_", markersize=20, label="chance")
    right.set_xticks(np.arange(len(ks)), [f"R@{k}" for k in ks])
    right.set_ylim(0, 1)
    right.set_title(f"retrieval by the alignment head, {report.retrieval_pairs} pairs")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
