"""The cross layers: residuals go to each stream's own input, masks and widths are honoured."""

from __future__ import annotations

import pytest
import torch

from vilbert.config import CrossConfig
from vilbert.model import CoAttentionLayer, DualSelfAttentionLayer
from vilbert.model.attention import padding_mask

CROSS = CrossConfig(hidden_size=24, num_heads=4, intermediate_size=40, dropout=0.0, attention_dropout=0.0)
DT, DV = 16, 32  # different stream widths: the residual can only be the stream's own input


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    text, vision = torch.randn(2, 5, DT, generator=g), torch.randn(2, 7, DV, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    return text, vision, padding_mask(mask)


def _randomize_norms(layer: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "LayerNorm" in name:
                p.copy_(torch.randn_like(p))


def _ffn_inputs(layer: torch.nn.Module, text, vision, mask) -> dict[str, torch.Tensor]:
    """What reaches each stream's FFN (the attention block's output), captured by hooks."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        getattr(layer, s).intermediate.register_forward_hook(lambda _m, args, _out, s=s: seen.__setitem__(s, args[0]))
        for s in ("text", "vision")
    ]
    layer(text, vision, mask)
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("kind", [CoAttentionLayer, DualSelfAttentionLayer])
def test_zeroed_attention_output_leaves_layernorm_of_own_input(kind):
    layer = kind(CROSS, DT, DV).eval()
    _randomize_norms(layer)
    text, vision, mask = _inputs()
    before = _ffn_inputs(layer, text, vision, mask)
    with torch.no_grad():
        for stream in (layer.text, layer.vision):
            stream.attention.output.dense.weight.zero_()
            stream.attention.output.dense.bias.zero_()
    after = _ffn_inputs(layer, text, vision, mask)
    for stream, own in (("text", text), ("vision", vision)):
        norm = getattr(layer, stream).attention.output.LayerNorm
        torch.testing.assert_close(after[stream], norm(own))  # residual = this stream's input
        assert not torch.allclose(before[stream], norm(own))  # and attention did contribute before


def test_co_attention_reads_the_other_stream():
    layer = CoAttentionLayer(CROSS, DT, DV).eval()
    text, vision, mask = _inputs()
    t1, v1 = layer(text, vision, mask)
    _, other_vision, _ = _inputs(seed=1)
    t2, v2 = layer(text, other_vision, mask)
    assert not torch.allclose(t1, t2)  # text queries attended to vision keys/values
    assert t1.shape == text.shape and v1.shape == vision.shape  # each stream keeps its own width


def test_dual_self_attention_does_not_mix_streams():
    layer = DualSelfAttentionLayer(CROSS, DT, DV).eval()
    text, vision, mask = _inputs()
    _, other_vision, _ = _inputs(seed=1)
    torch.testing.assert_close(layer(text, vision, mask)[0], layer(text, other_vision, mask)[0])


def test_vision_queries_ignore_padded_text_keys():
    layer = CoAttentionLayer(CROSS, DT, DV).eval()
    text, vision, mask = _inputs()
    changed = text.clone()
    changed[0, 3:] = torch.randn(2, DT)  # only padded positions of row 0
    _, v1 = layer(text, vision, mask)
    _, v2 = layer(changed, vision, mask)
    torch.testing.assert_close(v1, v2)
