"""ViLBERT end to end on the tiny config: shapes, freezing, dropout, masks, schedules, weights I/O."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import torch

import vilbert.model
from vilbert.config import ModelConfig
from vilbert.errors import ConfigError, ModelError
from vilbert.model import ViLBERT, set_fused_attention

from .conftest import make_batch


def _loss(model: ViLBERT, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**batch)
    real = batch["attention_mask"].bool()
    return (
        model.mlm_logits(out.text[real]).logsumexp(-1).mean()
        + model.alignment_logits(out).sum()
        + model.mim_projection(out.vision[:, 1:]).pow(2).mean()
        + model.classify(out).sum()
        + sum(e.sum() for e in model.contrastive_embeddings(out))
    )


def test_output_shapes_and_heads(config):
    model = ViLBERT(config).eval()
    batch = make_batch(config)
    out = model(**batch, output_layers=True)
    b, t = batch["input_ids"].shape
    dt, dv, dc = config.text.hidden_size, config.vision.hidden_size, config.cross.hidden_size
    assert out.text.shape == (b, t, dt) and out.vision.shape == (b, 1 + model.num_patches, dv)
    assert out.pooled_text.shape == out.pooled_vision.shape == (b, dc)
    assert len(out.layer_pooled) == len(out.layer_cls) == len(config.cross.pattern)
    torch.testing.assert_close(out.layer_pooled[-1][0], out.pooled_text)  # the last is the output's
    assert model.mlm_logits(out.text[:, 1]).shape == (b, config.text.vocab_size)
    assert model.alignment_logits(out).shape == (b, 2)
    assert model.mim_projection(out.vision[:, 1:]).shape == (b, model.num_patches, config.mim_projection_dim)
    assert model.classify(out).shape == (b, config.num_labels)
    assert model(**batch).layer_pooled is None


@pytest.mark.parametrize("frozen", [("text", "vision"), ("cross",), ("heads",), (), ("text", "vision", "cross")])
def test_gradients_reach_exactly_the_unfrozen_parts(config, frozen):
    model = ViLBERT(dataclasses.replace(config, freeze=frozen)).train()
    _loss(model, make_batch(config)).backward()
    for name, param in model.named_parameters():
        if model.part_of(name) in frozen:
            assert param.grad is None and not param.requires_grad, name
        else:
            assert param.grad is not None, f"{name} is trainable but got no gradient"
    for part in {"text", "vision", "cross", "heads"} - set(frozen):  # and not all of them zero
        grads = [p.grad for n, p in model.named_parameters() if model.part_of(n) == part]
        assert any(g.abs().sum() > 0 for g in grads), part


def test_freeze_is_declarative_and_checked(config):
    model = ViLBERT(config)
    model.freeze(["text"])
    model.freeze(["cross"])
    report = model.parameter_report()
    assert report["text"]["trainable"] == report["text"]["total"]  # unfrozen again
    assert report["cross"]["trainable"] == 0
    assert report["all"]["total"] == sum(p.numel() for p in model.parameters())
    assert report["all"]["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    with pytest.raises(ConfigError, match="valid: text, vision, cross, heads"):
        model.freeze(["encoder"])


def _dropout_config(config: ModelConfig, p: float) -> ModelConfig:
    """Every dropout zero except attention dropout (= p) in all three places."""
    return dataclasses.replace(
        config,
        text=dataclasses.replace(config.text, dropout=0.0, attention_dropout=p),
        vision=dataclasses.replace(config.vision, dropout=0.0, attention_dropout=p),
        cross=dataclasses.replace(config.cross, dropout=0.0, attention_dropout=p),
    )


@pytest.mark.parametrize("fused", [True, False])
def test_attention_dropout_active_in_training_only(config, fused):
    torch.manual_seed(0)
    model = ViLBERT(_dropout_config(config, 0.5))
    set_fused_attention(model, fused)
    batch = make_batch(config)
    model.train()
    a, b = model(**batch).text, model(**batch).text
    assert not torch.allclose(a, b)  # attention probabilities were dropped, differently each time
    model.eval()
    c, d = model(**batch).text, model(**batch).text
    torch.testing.assert_close(c, d)
    same = ViLBERT(_dropout_config(config, 0.0))
    same.load_state_dict(model.state_dict())
    torch.testing.assert_close(c, same.train()(**batch).text)  # eval == no attention dropout at all


def test_fused_and_plain_attention_agree(config):
    model = ViLBERT(config).eval()
    batch = make_batch(config)
    fused = model(**batch)
    set_fused_attention(model, False)
    plain = model(**batch)
    torch.testing.assert_close(plain.text, fused.text, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain.vision, fused.vision, atol=1e-5, rtol=1e-5)


def test_padding_does_not_leak(config):
    model = ViLBERT(config).eval()
    batch = make_batch(config)
    other = dict(batch, input_ids=batch["input_ids"].clone())
    other["input_ids"][batch["attention_mask"] == 0] = 7  # only padded positions change
    a, b = model(**batch), model(**other)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(a.text[real], b.text[real])
    torch.testing.assert_close(a.vision, b.vision)


def test_takes_cache_dtypes_int32_ids_and_float16_pixels(config):
    model = ViLBERT(config).eval()
    batch = make_batch(config)
    cached = dict(batch, input_ids=batch["input_ids"].int(), pixels=batch["pixels"].half())
    expected = model(**dict(batch, pixels=batch["pixels"].half().float()))
    torch.testing.assert_close(model(**cached).text, expected.text)
    with pytest.raises(ModelError, match="floating-point"):
        model(**dict(batch, pixels=batch["pixels"].to(torch.uint8)))


def test_image_mask_changes_vision(config):
    model = ViLBERT(config).eval()
    batch = make_batch(config)
    masked = model(**batch).vision
    unmasked = model(**dict(batch, image_mask=None)).vision
    assert not torch.allclose(masked, unmasked)


def test_without_cross_layers_the_streams_are_the_encoders(config):
    model = ViLBERT(dataclasses.replace(config, cross=dataclasses.replace(config.cross, pattern=()))).eval()
    batch = make_batch(config)
    out = model(**batch)
    torch.testing.assert_close(out.text, model.text(batch["input_ids"], batch["attention_mask"]))
    torch.testing.assert_close(out.vision, model.vision(batch["pixels"], batch["image_mask"]))


def test_unimodal_first_tokens_are_the_encoders_and_contrastive_embeddings_unit_norm(config):
    model = ViLBERT(config).eval()
    batch = make_batch(config)
    out = model(**batch)
    # The cross stack runs after both encoders here, so what enters it is what the encoders return.
    torch.testing.assert_close(out.unimodal_text, model.text(batch["input_ids"], batch["attention_mask"])[:, 0])
    torch.testing.assert_close(out.unimodal_vision, model.vision(batch["pixels"], batch["image_mask"])[:, 0])
    assert not torch.allclose(out.unimodal_text, out.text[:, 0]), "the cross stack changed the first token"
    text, vision = model.contrastive_embeddings(out)
    assert text.shape == vision.shape == (batch["input_ids"].shape[0], config.cross.hidden_size)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(len(text)))
    torch.testing.assert_close(vision.norm(dim=-1), torch.ones(len(vision)))
    # They are the poolers' Linear maps of those first tokens (normalized instead of ReLU'd): the space
    # the alignment head multiplies in, which ITC thereby aligns.
    expected = torch.nn.functional.normalize(model.text_pooler.dense(out.unimodal_text), dim=-1)
    torch.testing.assert_close(text, expected)


def test_initializer_range_sets_the_scratch_init(config):
    torch.manual_seed(0)
    wide = ViLBERT(dataclasses.replace(config, initializer_range=0.1))
    params = dict(wide.named_parameters())
    for name in ("text.layers.0.attention.self.query.weight", "cross.0.text.attention.self.query.weight"):
        assert params[name].std().item() == pytest.approx(0.1, rel=0.15), name
    assert wide.text_pooler.dense.weight.std().item() == pytest.approx(0.1, rel=0.15)


def test_different_stream_widths(config):
    text = dataclasses.replace(config.text, hidden_size=48, num_heads=3, intermediate_size=96)
    cross = dataclasses.replace(config.cross, hidden_size=32, num_heads=4)
    model = ViLBERT(dataclasses.replace(config, text=text, cross=cross)).eval()
    out = model(**make_batch(config))
    assert out.text.shape[-1] == 48 and out.vision.shape[-1] == 64 and out.pooled_text.shape[-1] == 32
    assert model.alignment_logits(out).shape[-1] == 2


def test_mlm_decoder_is_tied_to_word_embeddings(config):
    model = ViLBERT(config).eval()
    hidden = torch.randn(4, config.text.hidden_size)
    before = model.mlm_logits(hidden)
    with torch.no_grad():
        model.text.embeddings.word_embeddings.weight[5] += 1.0
    after = model.mlm_logits(hidden)
    changed = (before != after).any(0)
    assert changed[5] and changed.sum() == 1


def test_save_and_load_round_trip(config, tmp_path):
    model = ViLBERT(dataclasses.replace(config, freeze=("vision",))).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = ViLBERT.from_pretrained(tmp_path / "m").eval()
    assert loaded.config == model.config
    batch = make_batch(config)
    a, b = model(**batch), loaded(**batch)
    torch.testing.assert_close(a.text, b.text, rtol=0, atol=0)
    torch.testing.assert_close(model.alignment_logits(a), loaded.alignment_logits(b), rtol=0, atol=0)
    assert loaded.parameter_report() == model.parameter_report()


def test_exports_of_an_earlier_format_are_refused_and_missing_weights_named(config, tmp_path):
    from safetensors.torch import load_file, save_file

    model = ViLBERT(config).eval()
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})  # as vilbert-model/1 wrote it
    with pytest.raises(
        ModelError, match=r"format vilbert-model/1 \(an earlier vilbert\); this version reads vilbert-model/2"
    ):
        ViLBERT.from_pretrained(tmp_path)
    del state["alignment_head.linear.weight"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt", "vilbert_format": "vilbert-model/2"})
    with pytest.raises(ModelError, match="alignment_head.linear.weight"):
        ViLBERT.from_pretrained(tmp_path)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ModelError, match="config.json"):
        ViLBERT.from_pretrained(tmp_path)


def test_bf16_autocast_forward_on_cpu(config):
    model = ViLBERT(config).eval()
    batch = make_batch(config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
        logits = model.alignment_logits(out)
    assert out.pooled_text.dtype == logits.dtype == torch.bfloat16  # linears ran in bf16
    assert torch.isfinite(logits.float()).all()
    reference = model(**batch).text
    torch.testing.assert_close(out.text.float(), reference, atol=0.1, rtol=0.1)


def test_traces_as_one_graph_under_torch_compile(config):
    # `aot_eager` runs dynamo and AOT autograd without generating C++; the inductor test is `slow`.
    model = ViLBERT(config).eval()
    batch = make_batch(config)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(**batch).text, model(**batch).text)


@pytest.mark.slow
def test_compiled_with_inductor_equals_eager(config):
    model = ViLBERT(config).eval()
    batch = make_batch(config)
    compiled = torch.compile(model)
    with torch.no_grad():
        got, expected = compiled(**batch, output_layers=True), model(**batch, output_layers=True)
    torch.testing.assert_close(got.text, expected.text, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.pooled_vision, expected.pooled_vision, atol=1e-5, rtol=1e-5)


def test_model_imports_only_config_overrides_and_errors():
    allowed = {"vilbert.config", "vilbert.overrides", "vilbert.errors"}  # overrides: config <-> dicts
    for path in Path(vilbert.model.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            )
            for name in names:
                if name.startswith("vilbert.") and not name.startswith("vilbert.model"):
                    assert name in allowed, f"{path.name} imports {name}"


def test_pretrained_text_directory_loads_and_is_not_needed_after_saving(config, tmp_path):
    transformers = pytest.importorskip("transformers")
    t = config.text
    hf = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=t.vocab_size,
            hidden_size=t.hidden_size,
            num_hidden_layers=t.num_layers,
            num_attention_heads=t.num_heads,
            intermediate_size=t.intermediate_size,
        )
    ).eval()
    hf.save_pretrained(tmp_path / "bert")
    text = dataclasses.replace(t, pretrained=str(tmp_path / "bert"))
    model = ViLBERT(dataclasses.replace(config, text=text)).eval()
    torch.testing.assert_close(model.text.embeddings.word_embeddings.weight, hf.embeddings.word_embeddings.weight)
    model.save_pretrained(tmp_path / "vilbert")
    for path in (tmp_path / "bert").iterdir():
        path.unlink()  # from_pretrained reads only its own directory
    loaded = ViLBERT.from_pretrained(tmp_path / "vilbert")
    assert loaded.config.text.pretrained == str(tmp_path / "bert")
    torch.testing.assert_close(loaded.text.layers[1].output.dense.weight, hf.encoder.layer[1].output.dense.weight)
