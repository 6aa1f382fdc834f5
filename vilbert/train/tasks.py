"""The three pretraining tasks: their inputs for one batch, and their losses and accuracies.

One step runs one joint forward pass, as ViLBERT does: the text carries the AP swap and the MLM
masks, the image carries the MIM mask. MIM adds a second forward pass of the unmasked image (the
target view) for its rows. Each task uses `<task>_batch_size` rows of the (shuffled) batch: MIM the
last ones, every other task the first ones. So with sub-batches AP and ITC see whole images, and MIM
spends its second forward pass on rows whose caption is their own.

- **MLM**: cross-entropy at masked positions through the tied vocabulary head; accuracy = argmax hit.
- **AP**: cross-entropy of `model.alignment_logits` (index 1 = aligned); accuracy = argmax hit.
- **MIM** (contrastive, ConMIM-style): projected, L2-normalized patch representations of the masked
  view (queries) against those of the unmasked view (keys) of the same image; InfoNCE with
  temperature tau where the positive of the patch at position p is the target patch at p and the
  negatives are the image's other patches (`mim_negatives=image`), or also every patch of the other MIM
  rows' images (`batch`). Queries at `masked` positions (default), `unmasked` ones (the thesis) or
  `all`. Top-1 = the positive scores highest (chance: 1/P, or 1/(R*P) with `batch`). Both views carry
  the same position embeddings, so with `image` negatives position alone can find the positive;
  `mim_content_top1` asks what only content can answer: among the R images' target patches at the
  query's own position, is its own image's the best (chance: 1/R)?
- **ITC** (image-text contrastive, ALBEF): the first tokens of both streams as they enter the cross
  stack, through the poolers' Linear maps and L2-normalized (`model.contrastive_embeddings`), so ITC
  aligns the pooled space the AP head multiplies in; symmetric InfoNCE over the aligned rows among the
  first `itc_batch_size`, each caption against every image of those rows and back. Accuracy = in-batch
  retrieval top-1, averaged over both directions (chance: 1/rows). No extra forward pass, no extra
  parameters. With `itc_token_weight > 0` a token-level term (FILIP) is added: caption i scores image j
  by the mean over its tokens of each token's best cosine among image j's patches (same maps, same
  rows, same temperature), a second symmetric InfoNCE; the accuracy stays the global term's.
  From scratch, AP alone sits at chance: its head multiplies two pooled vectors, which carry nothing
  that agrees between caption and image until both streams have learned to encode what the other
  one shows, so its gradient starts near zero. ITC rewards exactly that agreement, with a whole
  batch of negatives per caption.

Losses are means over each task's items; `TaskOutput.sums` holds loss sums, hit counts and item
counts, so means over steps, batches or ranks are exact (`summarize`).

Evaluation adds `ap_whole_acc` (`whole_caption_alignment`): the alignment head as a classifier of
held-out pairs with their whole captions. `ap_acc` is measured on the task's own inputs, whose captions
carry the MLM masks (with `mlm_probability=0.3`, 30% of the words that tell two captions apart are
hidden), so it understates what the head tells apart.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vilbert.config import PretrainConfig
from vilbert.train.masking import IGNORE_INDEX, SpecialTokens, mask_patches, mask_tokens, mismatch_captions
from vilbert.train.pixels import PixelNormalizer, augment_images

__all__ = [
    "TaskBatch",
    "TaskOutput",
    "build_task_batch",
    "PretrainObjective",
    "summarize",
    "whole_caption_alignment",
    "token_similarity",
    "ACCURACY_NAMES",
]

ACCURACY_NAMES = {"mlm": "mlm_acc", "ap": "ap_acc", "mim": "mim_top1", "itc": "itc_acc"}


@dataclass
class TaskBatch:
    """One batch's model inputs and task targets, all on the device.

    Attributes:
        input_ids: `(B, T)` int64, after the AP swap and MLM masking.
        attention_mask: `(B, T)` int64, 1 at real tokens of the caption each row received.
        pixels: `(B, 3, H, W)` float, normalized.
        image_mask: `(B, P)` bool (True = masked patch) when MIM is on, else None.
        mlm_labels: `(B, T)` int64 with `IGNORE_INDEX` at unselected positions, or None.
        ap_labels: `(B_ap,)` int64 for the first B_ap rows (1 aligned, 0 not), or None.
        aligned: `(B,)` bool, False where a row got another row's caption.
        mim_rows: How many trailing rows MIM uses (0 when off).
        itc_rows: How many leading rows ITC draws its aligned pairs from (0 when off).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixels: torch.Tensor
    image_mask: torch.Tensor | None
    mlm_labels: torch.Tensor | None
    ap_labels: torch.Tensor | None
    aligned: torch.Tensor
    mim_rows: int
    itc_rows: int = 0


@dataclass
class TaskOutput:
    """`loss`: the weighted total to backpropagate; `sums`: detached `<task>_loss_sum`,
    `<task>_correct`, `<task>_count` per active task."""

    loss: torch.Tensor
    sums: dict[str, torch.Tensor]


def _rows(config: PretrainConfig, task: str, batch_size: int) -> int:
    """How many rows `task` uses in a batch of `batch_size` (0: the task is off or cannot run)."""
    if task not in config.tasks:
        return 0
    rows = min(getattr(config, f"{task}_batch_size") or batch_size, batch_size)
    return 0 if task in ("ap", "itc") and rows < 2 else rows  # a one-row batch (an epoch's last) has no other


def build_task_batch(
    pixels: torch.Tensor,
    input_ids: torch.Tensor,
    num_tokens: torch.Tensor,
    *,
    config: PretrainConfig,
    special: SpecialTokens,
    vocab_size: int,
    num_patches: int,
    normalizer: PixelNormalizer,
    generator: torch.Generator,
) -> TaskBatch:
    """Build every task's inputs from a plain cache batch, on its device, from `generator` only.

    Order of draws (fixed, so a generator state fixes the result): augmentation, AP, MLM, MIM.
    """
    b, t = input_ids.shape
    dev = input_ids.device
    pixels = _model_pixels(pixels, config, normalizer, generator)
    ids, lengths = input_ids.long(), num_tokens.long()
    aligned = torch.ones(b, dtype=torch.bool, device=dev)
    ap_labels = None
    if (n_ap := _rows(config, "ap", b)) > 0:
        source, ap_labels = mismatch_captions(n_ap, generator=generator, device=dev)
        ids, lengths = ids.clone(), lengths.clone()
        ids[:n_ap], lengths[:n_ap] = ids[:n_ap][source], lengths[:n_ap][source]  # the donor's caption and length
        aligned[:n_ap] = ap_labels.bool()
    mlm_labels = None
    if (n_mlm := _rows(config, "mlm", b)) > 0:
        ids, mlm_labels = _mask_text(ids, n_mlm, aligned, config, special, vocab_size, generator)
    image_mask = None
    if (n_mim := _rows(config, "mim", b)) > 0:
        image_mask = mask_patches(b, num_patches, config.mim_mask_ratio, generator=generator, device=dev)
        image_mask[: b - n_mim] = False  # MIM takes the last rows
    attention_mask = (torch.arange(t, device=dev)[None, :] < lengths[:, None]).long()
    n_itc = _rows(config, "itc", b)
    return TaskBatch(ids, attention_mask, pixels, image_mask, mlm_labels, ap_labels, aligned, n_mim, n_itc)


def _model_pixels(
    pixels: torch.Tensor, config: PretrainConfig, normalizer: PixelNormalizer, generator: torch.Generator
) -> torch.Tensor:
    if not config.augment:
        return normalizer.model_input(pixels)
    images = augment_images(
        normalizer.unit(pixels),
        generator=generator,
        crop_scale=config.augment_crop_scale,
        flip_probability=config.augment_flip,
        jitter=config.augment_jitter,
    )
    return normalizer.normalize(images)


def _mask_text(
    ids: torch.Tensor,
    rows: int,
    aligned: torch.Tensor,
    config: PretrainConfig,
    special: SpecialTokens,
    vocab_size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MLM on the first `rows` rows (labels only on the aligned ones with `align_only_for_mlm_mim`).

    Every MLM row is corrupted, aligned or not: corrupting only the aligned rows would let the alignment
    head read the AP label off the [MASK] tokens instead of comparing caption and image.
    """
    masked, labels = mask_tokens(
        ids, special=special, vocab_size=vocab_size, generator=generator, probability=config.mlm_probability
    )
    corrupt = torch.arange(ids.shape[0], device=ids.device) < rows
    keep = corrupt & aligned if config.align_only_for_mlm_mim else corrupt
    ids = torch.where(corrupt[:, None], masked, ids)
    return ids, torch.where(keep[:, None], labels, torch.full_like(labels, IGNORE_INDEX))


class PretrainObjective(nn.Module):
    """The model plus its pretraining losses: `forward(TaskBatch) -> TaskOutput`.

    One module so that DDP sees a single forward per backward (the MIM target view included).

    Args:
        model: A `vilbert.model.ViLBERT` (its heads `mlm_logits`, `alignment_logits`, `mim_projection`).
        config: The task settings (tasks, weights, MIM positions, temperature, stop-gradient).
    """

    def __init__(self, model: nn.Module, config: PretrainConfig) -> None:
        super().__init__()
        self.model = model
        self.config = config

    def forward(self, batch: TaskBatch) -> TaskOutput:
        out = self.model(batch.input_ids, batch.attention_mask, batch.pixels, image_mask=batch.image_mask)
        losses: dict[str, torch.Tensor] = {}
        sums: dict[str, torch.Tensor] = {}
        if batch.mlm_labels is not None:
            losses["mlm"] = self._mlm(out, batch.mlm_labels, sums)
        if batch.ap_labels is not None:
            losses["ap"] = self._ap(out, batch.ap_labels, sums)
        if batch.mim_rows > 0:
            losses["mim"] = self._mim(out, batch, sums)
        if batch.itc_rows > 0:
            losses["itc"] = self._itc(out, batch, sums)
        total = sum(getattr(self.config, f"{task}_weight") * loss for task, loss in losses.items())
        return TaskOutput(loss=total, sums=sums)

    def _mlm(self, out, labels: torch.Tensor, sums: dict[str, torch.Tensor]) -> torch.Tensor:
        selected = labels != IGNORE_INDEX
        targets = labels[selected]  # (M,)
        logits = self.model.mlm_logits(out.text[selected]).float()  # (M, V)
        return _record(sums, "mlm", logits, targets, fallback=out.text)

    def _ap(self, out, labels: torch.Tensor, sums: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = self.model.alignment_logits(out)[: labels.shape[0]].float()  # (B_ap, 2)
        return _record(sums, "ap", logits, labels, fallback=out.pooled_text)

    def _mim(self, out, batch: TaskBatch, sums: dict[str, torch.Tensor]) -> torch.Tensor:
        rows = slice(batch.input_ids.shape[0] - batch.mim_rows, None)  # the last mim_rows rows
        queries = self.model.mim_projection(out.vision[rows, 1:])  # (R, P, d): patches, CLS dropped
        grad = contextlib.nullcontext() if not self.config.mim_stop_grad else torch.no_grad()
        with grad:
            target = self.model(batch.input_ids[rows], batch.attention_mask[rows], batch.pixels[rows])
            keys = self.model.mim_projection(target.vision[:, 1:])  # (R, P, d)
        queries = F.normalize(queries.float(), dim=-1)
        keys = F.normalize(keys.float(), dim=-1)
        r, p = queries.shape[:2]
        mask = batch.image_mask[rows]
        positions = {"masked": mask, "unmasked": ~mask, "all": torch.ones_like(mask)}[self.config.mim_positions]
        if self.config.align_only_for_mlm_mim:
            positions = positions & batch.aligned[rows, None]
        own = torch.arange(p, device=mask.device).expand(r, p)  # (R, P): the same position of the same image
        if self.config.mim_negatives == "batch":  # query (i, p) against every key of every MIM row
            logits = queries @ keys.reshape(r * p, -1).T / self.config.mim_temperature  # (R, P, R*P)
            targets = own + p * torch.arange(r, device=mask.device)[:, None]  # key (i, p) sits at i*P + p
        else:
            logits = queries @ keys.transpose(1, 2) / self.config.mim_temperature  # (R, P, P): query p vs key q
            targets = own
        _content_top1(sums, queries.detach(), keys.detach(), positions)
        return _record(sums, "mim", logits[positions], targets[positions], fallback=out.vision)

    def _itc(self, out, batch: TaskBatch, sums: dict[str, torch.Tensor]) -> torch.Tensor:
        aligned = batch.aligned[: batch.itc_rows]  # only pairs whose caption is their own

        def pairs(x: torch.Tensor) -> torch.Tensor:  # the N aligned rows among the first itc_rows
            return x[: batch.itc_rows][aligned]

        text, vision = (pairs(e) for e in self.model.contrastive_embeddings(out))  # (N, d) each
        count = text.shape[0]
        if count < 2:  # nothing to contrast with: a zero that keeps the graph
            return _store(sums, "itc", out.unimodal_text.sum() * 0.0, torch.zeros((), device=text.device), 0)
        logits = text @ vision.T / self.config.itc_temperature  # (N, N): caption i against image j
        targets = torch.arange(count, device=logits.device)
        loss = _symmetric_infonce(logits, targets)
        hits = ((logits.argmax(1) == targets).sum() + (logits.argmax(0) == targets).sum()).float() / 2
        if self.config.itc_token_weight > 0:
            tokens, patches = (pairs(e) for e in self.model.token_contrastive_embeddings(out))
            words = pairs(batch.attention_mask).bool()
            words[:, 0] = False  # [CLS] is the global term's
            scores = token_similarity(tokens, words, patches)
            token_loss = _symmetric_infonce(scores / self.config.itc_temperature, targets)
            loss = loss + self.config.itc_token_weight * token_loss
        return _store(sums, "itc", loss, hits, count)


def _content_top1(
    sums: dict[str, torch.Tensor], queries: torch.Tensor, keys: torch.Tensor, positions: torch.Tensor
) -> None:
    """`mim_content_*` sums: query (i, p) is a hit when, among the keys at the same position p of all R
    images, its own image's scores highest (chance 1/R). Position embeddings cannot tell these apart, so
    only what the patch shows can."""
    r = queries.shape[0]
    if r < 2:  # no other image: nothing to tell apart (written anyway, so every rank reduces the same keys)
        sums["mim_content_correct"] = sums["mim_content_count"] = torch.zeros((), device=queries.device)
        return
    scores = torch.einsum("ipd,jpd->ipj", queries, keys)  # (R, P, R): query (i, p) vs key (j, p)
    own = torch.arange(r, device=scores.device)[:, None].expand_as(positions)
    hits = (scores.argmax(-1) == own) & positions
    sums["mim_content_correct"] = hits.sum().float()
    sums["mim_content_count"] = positions.sum().float()


def token_similarity(tokens: torch.Tensor, words: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
    """FILIP's late interaction: `(N, N)` scores, caption i against image j = the mean over caption i's
    tokens (where `words` is True) of each token's best cosine among image j's patches.

    Args:
        tokens: `(N, T, d)` unit-norm caption tokens.
        words: `(N, T)` bool, the tokens that count (real tokens; [CLS] and padding excluded by the caller).
        patches: `(N, P, d)` unit-norm image patches.

    One `(N * T, N * P)` cosine matrix, with no data-dependent shapes (no device sync, no graph break).
    """
    n, t, d = tokens.shape
    cosines = tokens.reshape(-1, d).float() @ patches.reshape(-1, d).float().T  # (N * T, N * P)
    best = cosines.view(n, t, n, -1).amax(dim=-1)  # (N, T, N): each token's best patch in each image
    weights = words.float() / words.sum(dim=1, keepdim=True).clamp(min=1)  # (N, T): a mean over each caption
    return torch.einsum("itj,it->ij", best, weights)


def _symmetric_infonce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean of the row-wise (caption -> image) and column-wise (image -> caption) cross-entropies."""
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def _record(
    sums: dict[str, torch.Tensor], task: str, logits: torch.Tensor, targets: torch.Tensor, fallback: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy, and its sums into `sums`; an empty task gives a zero that keeps the graph."""
    count = targets.numel()
    if count == 0:
        return _store(sums, task, fallback.sum() * 0.0, torch.zeros((), device=logits.device), 0)
    loss = F.cross_entropy(logits, targets)
    return _store(sums, task, loss, (logits.argmax(dim=-1) == targets).sum().float(), count)


def _store(
    sums: dict[str, torch.Tensor], task: str, loss: torch.Tensor, hits: torch.Tensor, count: int
) -> torch.Tensor:
    """Write a task's loss sum, hit count and item count into `sums`; return `loss`."""
    sums[f"{task}_loss_sum"] = loss.detach().float() * count
    sums[f"{task}_correct"] = hits.detach()
    sums[f"{task}_count"] = torch.tensor(float(count), device=loss.device)
    return loss


@torch.no_grad()
def whole_caption_alignment(
    model: nn.Module,
    pixels: torch.Tensor,
    input_ids: torch.Tensor,
    num_tokens: torch.Tensor,
    *,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """The alignment head as a classifier of whole-caption pairs, for evaluation.

    Exactly half of the rows get another row's caption (`mismatch_captions`, a derangement), and nothing
    is masked. Returns the sums `ap_whole_correct` and `ap_whole_count` (empty for a batch of one row),
    which `summarize` turns into `ap_whole_acc`.

    Args:
        model: A `ViLBERT` (eval mode is the caller's).
        pixels: `(B, 3, H, W)` model input (normalized).
        input_ids, num_tokens: The batch's own captions, `(B, T)` and `(B,)`.
        generator: Draws the swap (same generator state, same pairs).
    """
    rows = input_ids.shape[0]
    if rows < 2:
        return {}
    source, labels = mismatch_captions(rows, generator=generator, device=input_ids.device)
    ids, lengths = input_ids.long()[source], num_tokens.long()[source]
    attention_mask = (torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]).long()
    logits = model.alignment_logits(model(ids, attention_mask, pixels))
    return {
        "ap_whole_correct": (logits.argmax(-1) == labels).sum().float(),
        "ap_whole_count": torch.tensor(float(rows), device=ids.device),
    }


def summarize(sums: dict[str, float], config: PretrainConfig) -> dict[str, float]:
    """Per-task mean loss and accuracy from accumulated sums, and `loss`, the weighted total (plus
    `ap_whole_acc` where the sums hold `whole_caption_alignment`'s, `mim_content_top1` where MIM had two rows)."""
    metrics: dict[str, float] = {}
    total = 0.0
    for task in config.tasks:
        count = sums.get(f"{task}_count", 0.0)
        if count <= 0:
            continue
        metrics[f"{task}_loss"] = sums[f"{task}_loss_sum"] / count
        metrics[ACCURACY_NAMES[task]] = sums[f"{task}_correct"] / count
        total += getattr(config, f"{task}_weight") * metrics[f"{task}_loss"]
    metrics["loss"] = total
    if sums.get("mim_content_count", 0.0) > 0:
        metrics["mim_content_top1"] = sums["mim_content_correct"] / sums["mim_content_count"]
    if sums.get("ap_whole_count", 0.0) > 0:
        metrics["ap_whole_acc"] = sums["ap_whole_correct"] / sums["ap_whole_count"]
    return metrics
