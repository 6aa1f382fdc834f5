"""`vilbert export` on a real two-step run: the model round trip, its tokenizer, and each stream loaded by its
home library (transformers' BertModel, timm's create_model) computing what the stream computes inside ViLBERT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import vilbert
from vilbert.cache import CacheReader
from vilbert.model import ViLBERT
from vilbert.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = ["--preset", "tiny", "--device", "cpu", "--set", "data.max_len=32", "--set", "pretrain.batch_size=8"]


def _cli(*args: object) -> int:
    from vilbert.cli.app import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    return exit_info.value.code or 0


@pytest.fixture(scope="module")
def exported(tiny_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export")
    run = root / "run"
    torch.set_num_threads(1)
    assert (
        _cli(
            "pretrain",
            "--data",
            tiny_cache,
            "--out",
            run,
            *SETTINGS,
            "--set",
            "pretrain.log_every=1",
            "--max-steps",
            "2",
        )
        == 0
    )
    paths = {"run": run, "out": root / "model", "bert": root / "bert", "timm": root / "vit.safetensors"}
    streams = ["--text-as-bert", paths["bert"], "--vision-as-timm", paths["timm"]]
    assert _cli("export", run, "--out", paths["out"], *streams) == 0
    return paths


@pytest.fixture(scope="module")
def model(exported: dict[str, Path]) -> ViLBERT:
    return ViLBERT.from_pretrained(exported["out"]).eval()


def _text_batch(vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, vocab_size, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    ids[mask == 0] = 0
    return ids, mask


def test_from_pretrained_round_trip_and_tagged_config(exported, model) -> None:
    state = load_checkpoint(exported["run"])
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state["model"][name]), name
    config = json.loads((exported["out"] / "config.json").read_text())
    assert config["model_type"] == "vilbert" and config["vilbert_version"] == vilbert.__version__
    processor = json.loads((exported["out"] / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == list(model.image_mean) and processor["image_std"] == list(model.image_std)
    assert processor["size"] == {"height": 64, "width": 64}


def test_model_card_names_preset_data_steps_and_final_metrics(exported, tiny_cache) -> None:
    card = (exported["out"] / "README.md").read_text()
    assert "# ViLBERT (tiny)" in card and "step 2" in card
    assert str(tiny_cache / "train") in card
    assert "| train | 2 | loss |" in card and "| train | 2 | mlm_loss |" in card and "samples_per_s" not in card


def test_the_exported_tokenizer_encodes_captions_to_the_cached_ids(exported, tiny_cache) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(exported["out"] / "tokenizer.json"))
    reader = CacheReader(tiny_cache / "train")
    rows = np.arange(min(len(reader), 12))
    batch = reader.gather(rows)
    for row, caption in zip(rows, reader.captions(rows), strict=True):
        encoding = tokenizer.encode(caption)  # padded and truncated to the cache's max_len, as the cache holds it
        assert encoding.ids == batch["input_ids"][row].tolist(), caption
        assert sum(encoding.attention_mask) == int(batch["num_tokens"][row])


def test_text_stream_loads_as_transformers_bert_model(exported, model) -> None:
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertModel.from_pretrained(exported["bert"], add_pooling_layer=False).eval()
    ids, mask = _text_batch(model.config.text.vocab_size)
    with torch.no_grad():
        expected = model.text(ids, mask)
        got = bert(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=1e-5)
    assert (exported["bert"] / "tokenizer.json").is_file()


def test_vision_stream_loads_as_timm_model(exported, model, monkeypatch) -> None:
    import timm

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the file, never the hub
    card = (exported["out"] / "README.md").read_text()
    assert "timm.create_model" in card and str(exported["timm"]) in card
    from vilbert.model.vision import timm_model_kwargs

    vit = timm.create_model(
        model.config.vision.timm_name,
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(exported["timm"])),
        **timm_model_kwargs(model.config.vision),
    ).eval()
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(vit.forward_features(pixels), model.vision(pixels), atol=1e-5, rtol=1e-5)


def test_export_refuses_a_non_empty_directory_without_overwrite(exported, capsys) -> None:
    assert _cli("export", exported["run"], "--out", exported["out"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _cli("export", exported["run"], "--out", exported["out"], "--overwrite") == 0


def test_export_without_the_cache_says_to_pass_it(exported, tmp_path, capsys) -> None:
    assert _cli("export", exported["run"], "--out", tmp_path / "m", "--cache", tmp_path / "gone") == 2
    assert "--cache" in capsys.readouterr().err
