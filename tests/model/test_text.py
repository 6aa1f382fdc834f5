"""Our TextEncoder against `transformers.BertModel`, with weights written by transformers itself."""

from __future__ import annotations

import json

import pytest
import torch

from vilbert.errors import ModelError
from vilbert.model import TextEncoder

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
