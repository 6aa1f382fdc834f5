"""Tokenizers: BERT vocab.txt parity with transformers, training, batch encoding, loading errors."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
from tokenizers import Tokenizer

from vilbert.errors import DataError, UsageError
from vilbert.pipeline import text
from vilbert.pipeline.text import (
    CaptionEncoder,
    load_tokenizer,
    special_token_ids,
    tokenizer_fingerprint,
    train_wordpiece,
)

WORDS = [
    *("a", "small", "big", "red", "blue", "green", "yellow", "circle", "square", "triangle", "left", "right"),
    *("of", "above", "below", "the", "near", "tiny", "large", "purple", "star", "café", "naïve", "résumé"),
    *("photograph", "photographer", "photography", "running", "runner", "2019", "100"),
]

TRICKY = [
    "",
    "   ",
    "A Small RED Circle, left of a blue square!",
    "Café naïve résumé — Ångström ÉCOLE façade",
    "hello,world!!! (yes)... 'quoted' \"double\" semi;colon a-b_c",
    "3.14 and 1,000,000 people in 2019; 2nd place, 100%",
    "tabs\tand\nnewlines\r\nand \x00control\x07 chars",
    "中文字符 and emoji 🙂 mixed",
    "the [MASK] is a [CLS] token [SEP] here [UNK]",
    "x" * 150 + " supercalifragilisticexpialidocious",
    " ".join(WORDS * 8),  # far longer than max_len
    "photographers photographing the runners running",
]


def _captions(n: int = 1500, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


@pytest.fixture(scope="module")
def trained() -> Tokenizer:
    return train_wordpiece(_captions(), vocab_size=150, min_frequency=2)


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory: pytest.TempPathFactory, trained: Tokenizer) -> Path:
    """A BERT-style vocab.txt (one token per line, id = line) written from a trained tokenizer."""
    directory = tmp_path_factory.mktemp("bert")
    vocab = sorted(trained.get_vocab(with_added_tokens=False).items(), key=lambda kv: kv[1])
    (directory / "vocab.txt").write_text("".join(token + "\n" for token, _ in vocab), encoding="utf-8")
    return directory


def test_trained_tokenizer_is_bert_style(trained: Tokenizer) -> None:
    assert special_token_ids(trained) == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    assert trained.get_vocab_size() <= 150
    assert any(t.startswith("##") for t in trained.get_vocab())
    encoding = trained.encode("A small RED circle")
    assert encoding.tokens == ["[CLS]", "a", "small", "red", "circle", "[SEP]"]


def test_training_numbers_tokens_canonically(trained: Tokenizer) -> None:
    # The Rust trainer numbers tokens in hash-map order; we renumber: specials, words, ## pieces.
    tokens = [t for t, _ in sorted(trained.get_vocab(with_added_tokens=False).items(), key=lambda kv: kv[1])]
    rest = tokens[5:]
    assert tokens[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert rest == sorted(rest, key=lambda t: (t.startswith("##"), t))
    again = train_wordpiece(_captions(), vocab_size=150, min_frequency=2)
    assert again.encode("the big green triangle").tokens == trained.encode("the big green triangle").tokens


def test_vocab_txt_matches_transformers(vocab_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    ours = load_tokenizer(vocab_dir / "vocab.txt")
    by_vocab = transformers.BertTokenizerFast(vocab=str(vocab_dir / "vocab.txt"))
    by_dir = transformers.BertTokenizerFast.from_pretrained(str(vocab_dir))
    # Guard against the trap in DESIGN.md: a reference that maps every word to [UNK] proves nothing.
    assert by_vocab("a small circle")["input_ids"] != by_vocab("zzz qqq www")["input_ids"]
    for caption in TRICKY:
        expected = by_vocab(caption)["input_ids"]
        assert ours.encode(caption).ids == expected, caption
        assert by_dir(caption)["input_ids"] == expected, caption


def test_vocab_txt_batch_encoding_matches_transformers_padding(vocab_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    reference = transformers.BertTokenizerFast(vocab=str(vocab_dir / "vocab.txt"))
    expected = reference(TRICKY, max_length=36, truncation=True, padding="max_length")
    encoded = CaptionEncoder(load_tokenizer(vocab_dir), max_len=36)(TRICKY)
    assert encoded.input_ids.dtype == np.int32 and encoded.input_ids.shape == (len(TRICKY), 36)
    np.testing.assert_array_equal(encoded.input_ids, np.array(expected["input_ids"]))
    np.testing.assert_array_equal(encoded.num_tokens, np.array(expected["attention_mask"]).sum(axis=1))


def test_encoder_truncates_pads_and_counts(trained: Tokenizer) -> None:
    encoder = CaptionEncoder(trained, max_len=8)
    ids, num = encoder(["", "a small red circle", " ".join(["square"] * 20)])
    cls, sep, pad = 2, 3, 0
    assert ids[0].tolist() == [cls, sep] + [pad] * 6 and num[0] == 2
    assert ids[1].tolist()[:6] == trained.encode("a small red circle").ids and num[1] == 6
    assert ids[2, 0] == cls and ids[2, 7] == sep and num[2] == 8
    assert encoder([]).input_ids.shape == (0, 8)


def test_stored_tokenizer_reproduces_rows(trained: Tokenizer) -> None:
    encoder = CaptionEncoder(trained, max_len=12)
    captions = _captions(20, seed=3) + TRICKY
    rows = encoder(captions)
    stored = Tokenizer.from_str(encoder.tokenizer_json)
    for caption, row in zip(captions, rows.input_ids, strict=True):
        assert stored.encode(caption).ids == row.tolist()
    # Padding and truncation are not part of the fingerprint; the vocabulary is.
    assert tokenizer_fingerprint(stored) == tokenizer_fingerprint(trained)
    assert encoder.fingerprint == tokenizer_fingerprint(trained)
    assert trained.padding is None  # the caller's tokenizer is untouched


def test_load_tokenizer_json_file_and_directory(tmp_path: Path, trained: Tokenizer) -> None:
    trained.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nzzz\n", encoding="utf-8")
    for spec in (tmp_path / "tokenizer.json", tmp_path, str(tmp_path)):  # the directory prefers tokenizer.json
        assert tokenizer_fingerprint(load_tokenizer(spec)) == tokenizer_fingerprint(trained)
    other = tmp_path / "other.vocab"  # recognised by content, not by name
    other.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nzzz\n", encoding="utf-8")
    assert load_tokenizer(other).encode("zzz yyy").tokens == ["[CLS]", "zzz", "[UNK]", "[SEP]"]
    cache = tmp_path / "cache"  # a cache directory: its _tokenizer.json, to rebuild with the same one
    cache.mkdir()
    trained.save(str(cache / "_tokenizer.json"))
    assert tokenizer_fingerprint(load_tokenizer(cache)) == tokenizer_fingerprint(trained)


def test_load_tokenizer_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        load_tokenizer(tmp_path / "missing" / "tokenizer.json")
    with pytest.raises(UsageError, match="neither tokenizer.json nor vocab.txt"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a tokenizer"}', encoding="utf-8")
    with pytest.raises(UsageError, match="not a valid tokenizers"):
        load_tokenizer(bad)
    no_cls = tmp_path / "vocab.txt"
    no_cls.write_text("[PAD]\n[UNK]\nhello\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"no \[CLS\]"):
        load_tokenizer(no_cls)


def test_hub_name_offline_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UsageError, match="HF_HUB_OFFLINE is set; pass a local tokenizer.json or vocab.txt"):
        load_tokenizer("bert-base-uncased")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # .invalid never resolves (RFC 6761)
    with pytest.raises(UsageError, match=r"the hub is unreachable \(hub.invalid does not resolve"):
        load_tokenizer("bert-base-uncased")
    monkeypatch.delenv("HF_ENDPOINT")

    def unreachable(name: str) -> Tokenizer:
        raise Exception(f"Failed to connect while fetching {name}")

    monkeypatch.setattr(text, "_why_offline", lambda: None)  # as if the name resolved: the download fails later
    monkeypatch.setattr(text.Tokenizer, "from_pretrained", staticmethod(unreachable))
    with pytest.raises(UsageError, match="cannot load tokenizer 'org/model'.*local tokenizer.json"):
        load_tokenizer("org/model")


def test_hub_name_offline_uses_the_hub_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    snapshot = tmp_path / "models--org--model" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    (tmp_path / "models--org--model" / "refs").mkdir()
    (tmp_path / "models--org--model" / "refs" / "main").write_text("0123abc")
    train_wordpiece(_captions(200), 80).save(str(snapshot / "tokenizer.json"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load_tokenizer("org/model").get_vocab_size() == 80


def test_special_ids_and_training_errors(tmp_path: Path) -> None:
    plain = Tokenizer.from_str(json.dumps(json.loads(train_wordpiece(_captions(200), 80).to_str())))
    assert special_token_ids(plain)["mask"] == 4
    with pytest.raises(UsageError, match="vocab_size=3"):
        train_wordpiece(["a b c"], vocab_size=3)
    with pytest.raises(DataError, match="no text"):
        train_wordpiece(["", "   "], vocab_size=50)
    with pytest.raises(UsageError, match="max_len=2"):
        CaptionEncoder(plain, max_len=2)


_THREADS_SCRIPT = """
import os, sys
from tokenizers import Tokenizer
from vilbert.pipeline.text import tokenizer_on_one_thread
tokenizer = Tokenizer.from_file(sys.argv[1])
threads = lambda: len(os.listdir("/proc/self/task"))
before = threads()
with tokenizer_on_one_thread():
    tokenizer.encode_batch_fast(["a red circle on the left"] * 2000)
inside = threads()
left = os.environ.get("TOKENIZERS_PARALLELISM")
tokenizer.encode_batch_fast(["a red circle on the left"] * 2000)
print(before, inside, threads(), left)
"""


@pytest.mark.skipif(not Path("/proc/self/task").is_dir() or (os.cpu_count() or 1) < 2, reason="counts Linux threads")
def test_tokenizer_on_one_thread_starts_no_rust_thread_pool(trained: Tokenizer, tmp_path: Path) -> None:
    # A fresh interpreter: the pool starts once per process, at the first parallel batch.
    path = tmp_path / "tokenizer.json"
    trained.save(str(path))
    env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
    done = subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, str(path)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    before, inside, after, left = done.stdout.split()
    assert inside == before and int(after) > int(before), done.stdout  # then the pool starts, outside the block
    assert left == "None"  # the variable is restored (unset)


def test_tokenizer_on_one_thread_leaves_the_users_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")
    with text.tokenizer_on_one_thread():
        assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
    assert os.environ["TOKENIZERS_PARALLELISM"] == "true"
