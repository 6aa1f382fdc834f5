"""Where the cross layers run: Lu et al.'s `BertEncoder` order, replayed on the same modules.

`original_encoder` below restates the loop of `BertEncoder.forward` in facebookresearch/vilbert-multi-task
(`vilbert/vilbert.py`) from its published logic: for each pair (v_biattention_id[i], t_biattention_id[i]),
run the text layers from where the text stream stopped up to t_id, then the vision layers up to v_id, then
co-layer i; after the last co-layer, the remaining vision layers, then the remaining text layers. The heads
read the final sequences. It drives our modules, so hooks record the order of both runs.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import Tensor

from vilbert.config import CrossConfig, ModelConfig, TextConfig, VisionConfig, vilbert_original
from vilbert.errors import ConfigError
from vilbert.model import ViLBERT, cross_schedule
from vilbert.model.attention import padding_mask
from vilbert.overrides import apply_overrides, config_from_dict

from .conftest import make_batch, tiny_model_config

ORIGINAL = vilbert_original().model.cross


def original_encoder(model: ViLBERT, text: Tensor, vision: Tensor, mask: Tensor, t_ids, v_ids) -> tuple[Tensor, Tensor]:
    """Lu et al.'s loop on our modules. The one adaptation: timm's ViT is pre-LN and ends in a final norm,
    which belongs to its last block (their vision stream is post-LN and has none)."""
    text_layers, blocks = model.text.layers, model.vision.blocks

    def vision_layer(idx: int, x: Tensor) -> Tensor:
        x = blocks[idx](x)
        return model.vision.norm(x) if idx == len(blocks) - 1 else x

    t_start = v_start = 0
    for count, (v_end, t_end) in enumerate(zip(v_ids, t_ids, strict=True)):
        for idx in range(t_start, t_end):
            text = text_layers[idx](text, mask)
        for idx in range(v_start, v_end):
            vision = vision_layer(idx, vision)
        text, vision = model.cross[count](text, vision, mask)
        t_start, v_start = t_end, v_end
    for idx in range(v_start, len(blocks)):
        vision = vision_layer(idx, vision)
    for idx in range(t_start, len(text_layers)):
        text = text_layers[idx](text, mask)
    return text, vision


def _deep_config(text_layers: int, vision_layers: int, cross: CrossConfig) -> ModelConfig:
    """Narrow streams at the depth of the schedule under test (12 layers for Lu et al.'s)."""
    return ModelConfig(
        text=TextConfig(vocab_size=97, hidden_size=32, num_layers=text_layers, num_heads=2, intermediate_size=64),
        vision=VisionConfig(
            timm_name="vit_tiny_patch16_224",
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_layers=vision_layers,
            num_heads=2,
        ),
        cross=dataclasses.replace(cross, hidden_size=32, num_heads=2, intermediate_size=64),
        freeze=(),
        mim_projection_dim=16,
    )


CASES = {
    # vilbert_original: co-layer i before text layer 6+i and ViT block 6+i.
    "vilbert_original": _deep_config(12, 12, ORIGINAL),
    # The released config itself: a 6-layer vision stream, every layer after a co-layer (v ids 0..5).
    "released_6_layer_vision": _deep_config(12, 6, dataclasses.replace(ORIGINAL, before_vision_layer=range(6))),
    # The thesis: the whole stack after both encoders (empty lists).
    "thesis": tiny_model_config(),
    # Repeated indices: no layers between two cross layers of one stream.
    "repeats": tiny_model_config(
        cross=CrossConfig(pattern=("co", "self", "co"), before_text_layer=(1, 1, 2), before_vision_layer=(0, 2, 2))
    ),
}


def _record_calls(model: ViLBERT) -> list[str]:
    calls: list[str] = []
    named = [(f"text{j}", m) for j, m in enumerate(model.text.layers)]
    named += [(f"vision{j}", m) for j, m in enumerate(model.vision.blocks)]
    named += [("norm", model.vision.vit.norm)] + [(f"cross{i}", m) for i, m in enumerate(model.cross)]
    for name, module in named:
        module.register_forward_hook(lambda *_, name=name: calls.append(name))
    return calls


@pytest.mark.parametrize("case", CASES)
def test_forward_replays_the_original_encoder_loop(case):
    config = CASES[case]
    torch.manual_seed(0)
    model = ViLBERT(config).eval()
    calls = _record_calls(model)
    batch = make_batch(config)
    with torch.no_grad():
        out = model(**batch)
        ours = list(calls)
        calls.clear()
        mask = padding_mask(batch["attention_mask"])
        t_ids, v_ids = zip(*cross_schedule(config), strict=True)
        text, vision = original_encoder(
            model,
            model.text.embeddings(batch["input_ids"]),
            model.vision.embed(batch["pixels"], batch["image_mask"]),
            mask,
            t_ids,
            v_ids,
        )
    assert ours == calls
    assert ours.count("norm") == 1 and len(ours) == len(calls) == len(set(ours))  # every module exactly once
    torch.testing.assert_close(out.text, text, rtol=0, atol=0)
    torch.testing.assert_close(out.vision, vision, rtol=0, atol=0)
    torch.testing.assert_close(out.pooled_text, model.text_pooler(text), rtol=0, atol=0)  # heads read the end
    torch.testing.assert_close(out.pooled_vision, model.vision_pooler(vision), rtol=0, atol=0)


def test_vilbert_original_order_spelled_out():
    # Text layers 0-5 and ViT blocks 0-5, then co-layer 0; text layer 5+i and block 5+i before co-layer i;
    # after co-layer 5 the last block, the ViT's final norm and the last text layer.
    expected = [f"text{j}" for j in range(6)] + [f"vision{j}" for j in range(6)] + ["cross0"]
    for i in range(1, 6):
        expected += [f"text{5 + i}", f"vision{5 + i}", f"cross{i}"]
    expected += ["vision11", "norm", "text11"]
    model = ViLBERT(CASES["vilbert_original"]).eval()
    calls = _record_calls(model)
    with torch.no_grad():
        out = model(**make_batch(model.config), output_layers=True)
    assert calls == expected
    # the last co-layer's text is not the output: text layer 11 runs after it
    assert not torch.allclose(out.layer_cls[-1][0], out.text[:, 0])


def test_unimodal_streams_are_the_lower_layers_alone():
    model = ViLBERT(CASES["vilbert_original"]).eval()
    batch = make_batch(model.config)
    mask = padding_mask(batch["attention_mask"])
    with torch.no_grad():
        out = model(**batch)
        text = model.text.embeddings(batch["input_ids"])
        for layer in model.text.layers[:6]:
            text = layer(text, mask)
    torch.testing.assert_close(out.unimodal_text_tokens, text, rtol=0, atol=0)


def test_thesis_schedule_is_after_both_encoders():
    config = tiny_model_config()
    assert config.cross.before_text_layer == config.cross.before_vision_layer == ()
    layers = (config.text.num_layers, config.vision.num_layers)
    assert cross_schedule(config) == [layers] * len(config.cross.pattern)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.cross.before_text_layer=[6,7,8,9,10,13]", r"layer indices 0\.\.12 \(model.text.num_layers=12"),
        ("model.cross.before_vision_layer=[7,6,8,9,10,11]", "6 non-decreasing layer indices >= 0"),
        ("model.cross.before_text_layer=[6,7]", "one per cross.pattern item"),
        ("model.cross.before_vision_layer=[-1,0,1,2,3,4]", "non-decreasing layer indices >= 0"),
        ("model.cross.interleave_from=6", "unknown config key 'model.cross.interleave_from'"),
    ],
)
def test_bad_schedules_name_the_valid_values(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(vilbert_original(), [override])


def test_a_schedule_is_set_per_stream():
    config = apply_overrides(vilbert_original(), ["model.cross.before_vision_layer=[0,1,2,3,4,5]"])
    assert config.model.cross.before_vision_layer == (0, 1, 2, 3, 4, 5)
    assert config.model.cross.before_text_layer == tuple(range(6, 12))


def test_saved_configs_with_the_removed_interleave_from_are_refused():
    saved = {"model": {"cross": {"pattern": ["co"] * 6, "interleave_from": 6}}}
    with pytest.raises(ConfigError, match="unknown config key 'model.cross.interleave_from'"):
        config_from_dict(saved)
