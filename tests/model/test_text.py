"""Our TextEncoder against `transformers.BertModel`, with weights written by transformers itself."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest
import torch

from vilbert.errors import ModelError
from vilbert.model import TextEncoder, ViLBERT, text_config_from_hf

from .conftest import tiny_model_config

transformers = pytest.importorskip("transformers")

SMALL = dict(
    vocab_size=120,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=40,
)


@pytest.fixture(scope="module")
def hf_bert() -> transformers.BertModel:
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(**SMALL)).eval()
    with torch.no_grad():  # random LayerNorm affines, so a swapped weight/bias would show
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, SMALL["vocab_size"], (3, 11), generator=g)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0  # padding in the batch
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    return ids, mask


def _assert_parity(ours: TextEncoder, hf: transformers.BertModel) -> None:
    ids, mask = _batch()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours.eval()(ids, mask)
    real = mask.bool()  # padded positions carry no meaning in either model
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)


def test_equals_bert_model_from_save_pretrained(hf_bert, tmp_path):
    hf_bert.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    ours = TextEncoder.from_pretrained(tmp_path)
    assert ours.config.hidden_size == 32 and ours.config.num_layers == 2
    _assert_parity(ours, hf_bert)


def test_loads_old_pytorch_bin_with_gamma_beta_and_prefix(hf_bert, tmp_path):
    # BertForPreTraining checkpoints of old: `bert.` prefix, LayerNorm.gamma/beta, a cls head.
    old = {}
    for key, value in hf_bert.state_dict().items():
        key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        old[f"bert.{key}"] = value.clone()
    old["cls.predictions.bias"] = torch.zeros(SMALL["vocab_size"])
    torch.save(old, tmp_path / "pytorch_model.bin")
    hf_bert.config.to_json_file(tmp_path / "config.json")
    _assert_parity(TextEncoder.from_pretrained(tmp_path), hf_bert)


def test_without_padding_matches_too(hf_bert, tmp_path):
    hf_bert.save_pretrained(tmp_path)
    ours = TextEncoder.from_pretrained(tmp_path).eval()
    ids, _ = _batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf_bert(input_ids=ids).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_missing_weights_is_a_model_error(hf_bert, tmp_path):
    hf_bert.config.to_json_file(tmp_path / "config.json")
    with pytest.raises(ModelError, match="model.safetensors"):
        TextEncoder.from_pretrained(tmp_path)


def test_unsupported_activation_is_a_model_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**SMALL, "hidden_act": "relu"}))
    with pytest.raises(ModelError, match="hidden_act"):
        TextEncoder.from_pretrained(tmp_path)


def test_shape_mismatch_names_the_key(hf_bert, tmp_path):
    hf_bert.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="intermediate.dense"):
        TextEncoder.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------- BERT's MLM head


def _hf_with_heads(kind: str) -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    model = getattr(transformers, kind)(transformers.BertConfig(**SMALL)).eval()
    with torch.no_grad():  # BERT starts its MLM bias at zero and LayerNorms at 1/0: an unloaded head would pass
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name == "cls.predictions.bias":
                p.add_(0.1 * torch.randn_like(p))
    return model


def _vilbert_reading(directory) -> ViLBERT:
    text = dataclasses.replace(text_config_from_hf(directory), pretrained=str(directory))
    return ViLBERT(dataclasses.replace(tiny_model_config(), text=text)).eval()


def _assert_mlm_parity(model: ViLBERT, expected_logits: torch.Tensor) -> None:
    ids, mask = _batch()
    real = mask.bool()
    with torch.no_grad():
        got = model.mlm_logits(model.text(ids, mask)[real])
    torch.testing.assert_close(got, expected_logits[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["BertForMaskedLM", "BertForPreTraining"])
def test_mlm_logits_equal_bert_with_its_pretraining_heads(kind, tmp_path, caplog):
    hf = _hf_with_heads(kind)
    hf.save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO, logger="vilbert.model"):
        model = _vilbert_reading(tmp_path)
    ids, mask = _batch()
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask)
    _assert_mlm_parity(model, out.logits if kind == "BertForMaskedLM" else out.prediction_logits)
    assert "loaded BERT's MLM head" in caplog.text
    assert ("ignoring cls.seq_relationship" in caplog.text) == (kind == "BertForPreTraining")


def test_mlm_head_loads_from_an_old_torch_file_with_the_decoder_saved(tmp_path):
    # torch.save of the whole state dict writes the tied decoder weight and bias under their own names too.
    hf = _hf_with_heads("BertForMaskedLM")
    state = hf.state_dict()
    assert "cls.predictions.decoder.weight" in state
    old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
           for k, v in state.items()}  # fmt: skip
    torch.save(old, tmp_path / "pytorch_model.bin")
    hf.config.to_json_file(tmp_path / "config.json")
    ids, mask = _batch()
    with torch.no_grad():
        _assert_mlm_parity(_vilbert_reading(tmp_path), hf(input_ids=ids, attention_mask=mask).logits)


def test_a_bert_model_without_heads_leaves_the_mlm_head_new(hf_bert, tmp_path, caplog):
    hf_bert.save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO, logger="vilbert.model"):
        model = _vilbert_reading(tmp_path)
    assert "loaded BERT weights" in caplog.text and "MLM head" not in caplog.text
    assert torch.equal(model.mlm_head.bias, torch.zeros_like(model.mlm_head.bias))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("untie", "decoder.weight is not the word embeddings"),
        ("partial", r"MLM head \(cls.predictions\).*missing keys \['LayerNorm.bias'"),
    ],
)
def test_an_mlm_head_that_cannot_be_ours_is_a_model_error(change, tmp_path, message):
    state = dict(_hf_with_heads("BertForMaskedLM").state_dict())
    if change == "untie":
        state["cls.predictions.decoder.weight"] = state["cls.predictions.decoder.weight"] + 1.0
    else:
        state = {k: v for k, v in state.items() if not k.startswith("cls.predictions.transform.LayerNorm")}
    torch.save(state, tmp_path / "pytorch_model.bin")
    transformers.BertConfig(**SMALL).to_json_file(tmp_path / "config.json")
    with pytest.raises(ModelError, match=message):
        _vilbert_reading(tmp_path)
