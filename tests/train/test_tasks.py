"""Task inputs built from a batch, and the objective's losses and counts, on a real tiny ViLBERT."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from vilbert.config import PretrainConfig, tiny
from vilbert.errors import ConfigError
from vilbert.model import ViLBERT
from vilbert.overrides import apply_overrides
from vilbert.train.masking import IGNORE_INDEX, SpecialTokens, mismatch_captions, num_masked_patches
from vilbert.train.pixels import PixelNormalizer
from vilbert.train.tasks import (
    PretrainObjective,
    build_task_batch,
    summarize,
    token_similarity,
    whole_caption_alignment,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SPECIAL = SpecialTokens(pad=0, unk=1, cls=2, sep=3, mask=4)
VOCAB = 60


def _batch(rows: int = 12, length: int = 16):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(6, length + 1, (rows,), generator=g, dtype=torch.int32)
    ids = torch.randint(5, VOCAB, (rows, length), generator=g, dtype=torch.int32)
    ids[:, 0] = SPECIAL.cls
    ids[torch.arange(rows), lengths.long() - 1] = SPECIAL.sep
    ids[torch.arange(length)[None, :] >= lengths[:, None]] = SPECIAL.pad
    pixels = torch.randint(0, 256, (rows, 3, 64, 64), generator=g, dtype=torch.uint8)
    return pixels, ids, lengths


def _build(config: PretrainConfig, rows: int = 12, seed: int = 0):
    pixels, ids, lengths = _batch(rows)
    return build_task_batch(
        pixels,
        ids,
        lengths,
        config=config,
        special=SPECIAL,
        vocab_size=VOCAB,
        num_patches=64,
        normalizer=PixelNormalizer((0.5,) * 3, (0.5,) * 3, "cpu"),
        generator=torch.Generator().manual_seed(seed),
    ), (pixels, ids, lengths)


def test_sub_batches_and_aligned_only() -> None:
    config = PretrainConfig(
        batch_size=12, ap_batch_size=8, mlm_batch_size=10, mim_batch_size=4, mlm_probability=0.5, augment=False
    )
    tasks, (pixels, ids, lengths) = _build(config)
    assert tasks.ap_labels.shape == (8,) and (tasks.ap_labels == 0).sum() == 4
    assert tasks.aligned[8:].all() and torch.equal(tasks.aligned[:8], tasks.ap_labels.bool())
    selected = tasks.mlm_labels != IGNORE_INDEX
    assert not selected[10:].any(), "rows past mlm_batch_size are not masked"
    assert not selected[~tasks.aligned].any(), "mismatched rows get no MLM (align_only_for_mlm_mim)"
    assert torch.equal(tasks.input_ids[10:], ids[10:].long())
    k = num_masked_patches(64, config.mim_mask_ratio)
    assert tasks.mim_rows == 4 and (tasks.image_mask.sum(1) == torch.tensor([0] * 8 + [k] * 4)).all()  # the last rows
    # Mismatched rows are corrupted like aligned ones (only their labels are dropped): otherwise [MASK]
    # tokens would reveal the AP label. The same seed without MLM draws the same donors (AP comes first).
    clean, _ = _build(dataclasses.replace(config, tasks=("ap", "mim")))
    corrupted = tasks.input_ids != clean.input_ids
    assert corrupted[:10][~tasks.aligned[:10]].any() and not corrupted[10:].any()
    assert not (corrupted & selected.logical_not() & tasks.aligned[:, None]).any()
    # The attention mask follows the caption each row received.
    received = tasks.attention_mask.sum(1)
    for row in range(8):
        donor = [r for r in range(12) if torch.equal(ids[r].long(), clean.input_ids[row])]
        assert donor and received[row] == lengths[donor[0]]
    assert torch.allclose(tasks.pixels, pixels.float() / 255 * 2 - 1)


def test_every_row_gets_mlm_without_aligned_only_and_one_row_batches_skip_ap() -> None:
    config = PretrainConfig(batch_size=12, align_only_for_mlm_mim=False, mlm_probability=0.9)
    tasks, _ = _build(config)
    assert ((tasks.mlm_labels != IGNORE_INDEX).sum(1) > 0).all()
    single, _ = _build(config, rows=1)
    assert single.ap_labels is None and single.mlm_labels is not None


@pytest.mark.parametrize("positions", ["masked", "unmasked", "all"])
def test_objective_counts_and_gradients(positions: str) -> None:
    base = apply_overrides(
        tiny(),
        [
            "pretrain.batch_size=12",
            f"pretrain.mim_positions={positions}",
            "pretrain.mim_batch_size=6",
            "pretrain.align_only_for_mlm_mim=false",
        ],
    )
    model_config = dataclasses.replace(base.model, text=dataclasses.replace(base.model.text, vocab_size=VOCAB))
    torch.manual_seed(0)
    model = ViLBERT(model_config)
    objective = PretrainObjective(model, base.pretrain)
    tasks, _ = _build(base.pretrain)
    out = objective(tasks)
    out.loss.backward()
    k = num_masked_patches(64, base.pretrain.mim_mask_ratio)
    per_image = {"masked": k, "unmasked": 64 - k, "all": 64}[positions]
    assert out.sums["mim_count"].item() == 6 * per_image
    assert out.sums["ap_count"].item() == 12
    assert out.sums["mlm_count"].item() == (tasks.mlm_labels != IGNORE_INDEX).sum().item()
    metrics = summarize({k: v.item() for k, v in out.sums.items()}, base.pretrain)
    assert metrics["loss"] == pytest.approx(out.loss.item(), rel=1e-5)
    assert 0 <= metrics["mim_top1"] <= 1 and metrics["ap_loss"] > 0
    heads = ("cross.", "mlm_head", "alignment_head", "mim_head", "vision.mask_token")
    grads = [p.grad for n, p in model.named_parameters() if n.startswith(heads)]
    assert all(g is not None for g in grads)


def test_stop_grad_target_view_gets_no_gradient() -> None:
    base = apply_overrides(tiny(), ["pretrain.batch_size=4", "pretrain.tasks=mim", "pretrain.mim_stop_grad=true"])
    model_config = dataclasses.replace(base.model, text=dataclasses.replace(base.model.text, vocab_size=VOCAB))
    model = ViLBERT(model_config).eval()
    objective = PretrainObjective(model, base.pretrain)
    tasks, _ = _build(base.pretrain, rows=4)
    with_stop = torch.autograd.grad(objective(tasks).loss, model.vision.mask_token)[0]
    free = PretrainObjective(model, dataclasses.replace(base.pretrain, mim_stop_grad=False))
    without = torch.autograd.grad(free(tasks).loss, model.vision.mask_token)[0]
    # The mask token appears only in the online view, so its gradient is the same either way...
    assert torch.allclose(with_stop, without, atol=1e-6)
    patch = model.vision.vit.patch_embed.proj.weight
    g_stop = torch.autograd.grad(objective(tasks).loss, patch)[0]
    g_free = torch.autograd.grad(free(tasks).loss, patch)[0]
    # ...while the shared encoder also gets the target view's gradient without stop-grad.
    assert not torch.allclose(g_stop, g_free)


def test_itc_is_symmetric_infonce_over_the_aligned_rows() -> None:
    base = apply_overrides(tiny(), ["pretrain.batch_size=12", "pretrain.tasks=[ap,itc]", "pretrain.ap_batch_size=8"])
    config = dataclasses.replace(base.pretrain, itc_batch_size=10, itc_temperature=0.5)
    model_config = dataclasses.replace(base.model, text=dataclasses.replace(base.model.text, vocab_size=VOCAB))
    torch.manual_seed(0)
    model = ViLBERT(model_config).eval()  # no dropout: the reference forward below sees the same model
    objective = PretrainObjective(model, config)
    tasks, _ = _build(config)
    assert tasks.itc_rows == 10
    out = objective(tasks)
    keep = tasks.aligned[:10]  # 4 of the 8 AP rows got another caption: they are left out
    assert keep.sum() == 6
    forward = model(tasks.input_ids, tasks.attention_mask, tasks.pixels)
    text, vision = (e[:10][keep] for e in model.contrastive_embeddings(forward))
    logits = text @ vision.T / 0.5
    expected = 0.0
    for i in range(6):
        expected += -torch.log_softmax(logits[i], 0)[i] - torch.log_softmax(logits[:, i], 0)[i]
    assert out.sums["itc_count"].item() == 6
    assert out.sums["itc_loss_sum"].item() / 6 == pytest.approx(expected.item() / 12, rel=1e-5)
    metrics = summarize({k: v.item() for k, v in out.sums.items()}, config)
    assert 0 <= metrics["itc_acc"] <= 1
    assert metrics["loss"] == pytest.approx(out.loss.item(), rel=1e-5)
    out.loss.backward()
    for pooler in (model.text_pooler, model.vision_pooler):
        assert pooler.dense.weight.grad is not None and pooler.dense.weight.grad.abs().sum() > 0
    # ITC reads the streams before the cross stack, so its gradient never reaches the cross layers;
    # AP's does.
    itc_only = PretrainObjective(model, dataclasses.replace(config, tasks=("itc",)))
    model.zero_grad()
    itc_only(_build(dataclasses.replace(config, tasks=("itc",)))[0]).loss.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.cross.parameters())


def test_token_similarity_is_the_mean_over_words_of_each_words_best_patch() -> None:
    e = torch.eye(3)
    tokens = torch.stack([e[[0, 1, 2]], e[[2, 2, 0]]])  # (2 captions, 3 tokens, d=3)
    patches = torch.stack([e[[0, 0]], e[[1, 2]]])  # image 0 has only direction 0; image 1 has 1 and 2
    words = torch.tensor([[True, True, False], [True, True, True]])  # caption 0's last token is padding
    scores = token_similarity(tokens, words, patches)
    # caption 0 (tokens 0, 1): image 0 matches token 0 only -> 1/2; image 1 matches token 1 -> 1/2.
    # caption 1 (tokens 2, 2, 0): image 0 matches the last -> 1/3; image 1 matches the first two -> 2/3.
    assert torch.allclose(scores, torch.tensor([[0.5, 0.5], [1 / 3, 2 / 3]]))
    # The padding token would have matched image 1: it is not counted.
    assert token_similarity(tokens, torch.ones(2, 3, dtype=torch.bool), patches)[0, 1] == pytest.approx(2 / 3)


def test_itc_token_term_adds_filip_infonce_over_the_same_rows() -> None:
    base = apply_overrides(
        tiny(), ["pretrain.batch_size=12", "pretrain.tasks=[ap,itc]", "pretrain.ap_batch_size=8", "data.max_len=16"]
    )
    model_config = dataclasses.replace(base.model, text=dataclasses.replace(base.model.text, vocab_size=VOCAB))
    torch.manual_seed(0)
    model = ViLBERT(model_config).eval()
    global_only = dataclasses.replace(base.pretrain, itc_temperature=0.5)
    with_tokens = dataclasses.replace(global_only, itc_token_weight=2.0)
    tasks, _ = _build(with_tokens)
    keep = tasks.aligned[: tasks.itc_rows]
    n = int(keep.sum())
    loss_global = PretrainObjective(model, global_only)(tasks).sums["itc_loss_sum"].item() / n
    out = PretrainObjective(model, with_tokens)(tasks)
    forward = model(tasks.input_ids, tasks.attention_mask, tasks.pixels)
    tokens, patches = (e[keep] for e in model.token_contrastive_embeddings(forward))
    words = tasks.attention_mask[keep].bool()
    words[:, 0] = False
    scores = torch.zeros(n, n)
    for i in range(n):
        for j in range(n):
            best = (tokens[i] @ patches[j].T).max(dim=1).values  # (T,): each token's best patch
            scores[i, j] = best[words[i]].mean()
    logits = scores / 0.5
    targets = torch.arange(n)
    token_term = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    assert out.sums["itc_loss_sum"].item() / n == pytest.approx(loss_global + 2.0 * token_term.item(), rel=1e-5)
    assert token_term.item() > 0.1
    # The token term trains the patch embedding through the patches themselves, not only through [CLS].
    model.zero_grad()
    out.loss.backward()
    with_grad = model.vision.vit.patch_embed.proj.weight.grad.clone()
    model.zero_grad()
    PretrainObjective(model, global_only)(tasks).loss.backward()
    assert not torch.allclose(with_grad, model.vision.vit.patch_embed.proj.weight.grad)


def test_itc_token_weight_must_not_be_negative() -> None:
    with pytest.raises(ConfigError, match="itc_token_weight=-1.0 is invalid"):
        apply_overrides(tiny(), ["pretrain.itc_token_weight=-1"])


def test_itc_needs_two_aligned_rows() -> None:
    config = PretrainConfig(batch_size=12, tasks=("itc",))
    single, _ = _build(config, rows=1)
    assert single.itc_rows == 0


def test_whole_caption_alignment_swaps_half_the_captions_and_masks_nothing() -> None:
    torch.manual_seed(0)
    model = ViLBERT(dataclasses.replace(tiny().model, text=dataclasses.replace(tiny().model.text, vocab_size=VOCAB)))
    model.eval()
    pixels, ids, lengths = _batch(rows=12)
    pixels = PixelNormalizer((0.5,) * 3, (0.5,) * 3, "cpu").model_input(pixels)
    with torch.no_grad():  # every row once with its own caption, once with each other row's
        scores = torch.stack([
            model.alignment_logits(model(ids.long()[(torch.arange(12) + k) % 12],
                                         (torch.arange(16)[None] < lengths[(torch.arange(12) + k) % 12, None]).long(),
                                         pixels)).argmax(-1)
            for k in range(12)
        ])  # fmt: skip  # (shift, row): predicted label of row i with the caption of row (i + shift) % 12
    sums = whole_caption_alignment(model, pixels, ids, lengths, generator=torch.Generator().manual_seed(3))
    source = torch.Generator().manual_seed(3)
    donor, labels = mismatch_captions(12, generator=source)
    assert (labels == 0).sum() == 6 and (donor[labels == 0] != torch.arange(12)[labels == 0]).all()
    expected = sum(int(scores[(donor[i] - i) % 12, i] == labels[i]) for i in range(12))
    assert sums["ap_whole_count"].item() == 12 and sums["ap_whole_correct"].item() == expected
    again = whole_caption_alignment(model, pixels, ids, lengths, generator=torch.Generator().manual_seed(3))
    assert again["ap_whole_correct"].item() == expected
    assert whole_caption_alignment(model, pixels[:1], ids[:1], lengths[:1], generator=source) == {}
    metrics = summarize({"ap_whole_correct": 9.0, "ap_whole_count": 12.0}, PretrainConfig())
    assert metrics["ap_whole_acc"] == 0.75


def _mim_objective(negatives: str, rows: int = 4) -> tuple[PretrainObjective, object]:
    base = apply_overrides(
        tiny(),
        [
            f"pretrain.batch_size={rows}",
            "pretrain.tasks=mim",
            "pretrain.mim_positions=all",
            "pretrain.mim_temperature=0.5",
        ],
    )
    config = dataclasses.replace(base.pretrain, mim_negatives=negatives)
    model_config = dataclasses.replace(base.model, text=dataclasses.replace(base.model.text, vocab_size=VOCAB))
    torch.manual_seed(0)
    model = ViLBERT(model_config).eval()
    return PretrainObjective(model, config), _build(config, rows=rows)[0]


def _mim_keys_and_queries(objective: PretrainObjective, tasks) -> tuple[torch.Tensor, torch.Tensor]:
    model = objective.model
    with torch.no_grad():
        online = model(tasks.input_ids, tasks.attention_mask, tasks.pixels, image_mask=tasks.image_mask)
        target = model(tasks.input_ids, tasks.attention_mask, tasks.pixels)
        queries = F.normalize(model.mim_projection(online.vision[:, 1:]), dim=-1)
        keys = F.normalize(model.mim_projection(target.vision[:, 1:]), dim=-1)
    return queries, keys


@pytest.mark.parametrize("negatives", ["image", "batch"])
def test_mim_negatives_are_the_image_or_the_whole_batch(negatives: str) -> None:
    objective, tasks = _mim_objective(negatives)
    out = objective(tasks)
    queries, keys = _mim_keys_and_queries(objective, tasks)
    r, p, _ = queries.shape
    expected = 0.0
    for i in range(r):
        for q in range(p):
            candidates = keys[i] if negatives == "image" else keys.reshape(r * p, -1)  # (P, d) or (R*P, d)
            positive = q if negatives == "image" else i * p + q
            expected += -torch.log_softmax(candidates @ queries[i, q] / 0.5, 0)[positive]
    assert out.sums["mim_count"].item() == r * p
    assert out.sums["mim_loss_sum"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_mim_content_top1_compares_the_same_position_across_images() -> None:
    objective, tasks = _mim_objective("image")
    out = objective(tasks)
    queries, keys = _mim_keys_and_queries(objective, tasks)
    r, p, _ = queries.shape
    hits = sum(int(torch.argmax(keys[:, q] @ queries[i, q]).item() == i) for i in range(r) for q in range(p))
    assert out.sums["mim_content_count"].item() == r * p
    assert out.sums["mim_content_correct"].item() == hits
    metrics = summarize({k: v.item() for k, v in out.sums.items()}, objective.config)
    assert metrics["mim_content_top1"] == pytest.approx(hits / (r * p))
    # Position embeddings alone cannot score here: a model that sees the same pixels in every row is at 1/R.
    same = dataclasses.replace(tasks, pixels=tasks.pixels[:1].expand_as(tasks.pixels).clone())
    same.input_ids[:] = tasks.input_ids[:1]
    same.attention_mask[:] = tasks.attention_mask[:1]
    same.image_mask[:] = tasks.image_mask[:1]
    sums = objective(same).sums
    assert sums["mim_content_correct"].item() == p  # 1/R: every tie goes to row 0, so only its queries hit


def test_mim_negatives_is_validated() -> None:
    with pytest.raises(ConfigError, match="mim_negatives"):
        apply_overrides(tiny(), ["pretrain.mim_negatives=everything"])


def test_itc_through_separate_heads_leaves_the_poolers_to_ap(tmp_path) -> None:
    base = apply_overrides(tiny(), ["pretrain.batch_size=8", "pretrain.tasks=itc", "model.itc_projection=heads"])
    model_config = dataclasses.replace(base.model, text=dataclasses.replace(base.model.text, vocab_size=VOCAB))
    torch.manual_seed(0)
    model = ViLBERT(model_config).eval()
    tasks, _ = _build(base.pretrain, rows=8)
    PretrainObjective(model, base.pretrain)(tasks).loss.backward()
    for head in (model.itc_text_head, model.itc_vision_head):
        assert head.dense.weight.grad is not None and head.dense.weight.grad.abs().sum() > 0
    for pooler in (model.text_pooler, model.vision_pooler):
        assert pooler.dense.weight.grad is None
    out = model(tasks.input_ids, tasks.attention_mask, tasks.pixels)
    text, _ = model.contrastive_embeddings(out)
    torch.testing.assert_close(text, F.normalize(model.itc_text_head.dense(out.unimodal_text), dim=-1))
    loaded = ViLBERT.from_pretrained(model.save_pretrained(tmp_path / "export"))  # the heads travel with it
    torch.testing.assert_close(loaded.itc_text_head.dense.weight, model.itc_text_head.dense.weight)
    assert not hasattr(ViLBERT(tiny().model), "itc_text_head")  # poolers: no extra parameters
