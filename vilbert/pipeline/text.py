"""Tokenizers for captions: load, build from a BERT `vocab.txt`, train, and encode in batches.

Everything runs on the Rust `tokenizers` library (no `transformers` at runtime). A tokenizer comes
from one of:

- a `tokenizer.json` (any `tokenizers` pipeline, e.g. one written by `vilbert tokenizer train`);
- a BERT `vocab.txt`, built as BERT's uncased WordPiece: `BertNormalizer` (clean text, Chinese
  characters split, accents stripped, lowercased), `BertPreTokenizer`, `WordPiece` (`[UNK]`, `##`,
  words over 100 characters become `[UNK]`) and `[CLS] $A [SEP]`;
- a directory holding either file (a Hugging Face model directory);
- a hub name such as `bert-base-uncased` when online.

`CaptionEncoder` turns a list of captions into fixed-size `input_ids [N, max_len]` (int32, truncated,
padded with `[PAD]`) and `num_tokens [N]` (the real tokens, `[CLS]` and `[SEP]` included). The
tokenizer it stores in a cache (`CaptionEncoder.tokenizer_json`) has the same truncation and padding
enabled, so `Tokenizer.from_str(json).encode(caption).ids` is exactly the stored row.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import socket
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors, trainers
from tokenizers.models import WordPiece

from vilbert.cache import TOKENIZER_NAME, CacheSpec
from vilbert.errors import DataError, UsageError

__all__ = [
    "SPECIAL_TOKENS",
    "DEFAULT_MAX_LEN",
    "EncodedCaptions",
    "CaptionEncoder",
    "tokenizer_on_one_thread",
    "load_tokenizer",
    "bert_wordpiece_from_vocab",
    "train_wordpiece",
    "special_token_ids",
    "tokenizer_fingerprint",
]

PARALLELISM_ENV = "TOKENIZERS_PARALLELISM"


@contextlib.contextmanager
def tokenizer_on_one_thread() -> Iterator[None]:
    """Within the block, `tokenizers` encodes a batch on the calling thread, not on its own thread pool
    (it reads `TOKENIZERS_PARALLELISM` at every call); a value the user set is left alone.

    For a stage whose worker processes already keep every core busy (preprocess): there the Rust pool
    only competes with them, and the batch waits for its threads to be scheduled. Measured on 2 cores,
    10,000 images: 3-5% less wall time and 5% less CPU, and 10,000 captions cost 0.26 s of CPU
    serially against 0.51 s on the pool (docs/results.md, appendix C).
    """
    if PARALLELISM_ENV in os.environ:
        yield
        return
    os.environ[PARALLELISM_ENV] = "false"
    try:
        yield
    finally:
        os.environ.pop(PARALLELISM_ENV, None)


SPECIAL_TOKENS = {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
"""BERT's special tokens by role; a trained tokenizer gives them ids 0-4 in this order."""
DEFAULT_MAX_LEN = 36
"""ViLBERT's maximum caption length in tokens ([CLS] and [SEP] included)."""
_MAX_WORD = 100  # BERT's: a longer "word" is one [UNK]


class EncodedCaptions(NamedTuple):
    """A batch of encoded captions."""

    input_ids: np.ndarray
    """int32, (N, max_len), padded with the [PAD] id."""
    num_tokens: np.ndarray
    """int32, (N,), real tokens per row including [CLS] and [SEP]."""


def load_tokenizer(spec: str | os.PathLike[str]) -> Tokenizer:
    """Load a tokenizer from a `tokenizer.json`, a BERT `vocab.txt`, a directory or a hub name.

    Args:
        spec: A path to `tokenizer.json` or `vocab.txt` (recognised by content, not name), a
            directory holding one of them, a cache directory (its `_tokenizer.json`: the same
            tokenizer again), or a Hugging Face hub name (needs the network).

    Raises:
        UsageError: The path does not exist, the file is neither kind, or the hub is unreachable.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        for name in ("tokenizer.json", "vocab.txt", TOKENIZER_NAME):
            if (path / name).is_file():
                return load_tokenizer(path / name)
        raise UsageError(f"tokenizer directory {path} holds neither tokenizer.json nor vocab.txt")
    if path.is_file():
        return _load_file(path)
    if _looks_like_path(str(spec)):
        raise UsageError(f"tokenizer file {path} does not exist; pass a tokenizer.json, a vocab.txt or a hub name")
    return _from_hub(str(spec))


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.endswith((".json", ".txt")) or spec.count("/") > 1 or "\\" in spec


def _load_file(path: Path) -> Tokenizer:
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if head.startswith(b"{"):
        try:
            return Tokenizer.from_file(str(path))
        except Exception as err:  # tokenizers raises a bare Exception on a bad file
            raise UsageError(f"{path} is not a valid tokenizers tokenizer.json: {err}") from err
    return bert_wordpiece_from_vocab(path)


def _from_hub(name: str) -> Tokenizer:
    hint = "pass a local tokenizer.json or vocab.txt with --tokenizer, or train one with `vilbert tokenizer train`"
    offline = _why_offline()
    if offline is not None:
        cached = _hub_cache_file(name)
        if cached is not None:
            return Tokenizer.from_file(cached)
        raise UsageError(f"tokenizer {name!r} is not a local file nor in the hub cache, and {offline}; {hint}")
    try:
        return Tokenizer.from_pretrained(name)
    except Exception as err:  # no network, unknown repo, no tokenizer.json in it
        raise UsageError(f"cannot load tokenizer {name!r} from the Hugging Face hub ({err}); {hint}") from err


def _why_offline() -> str | None:
    """Why the hub cannot be reached, decided before the download client's minute of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urllib.parse.urlsplit(endpoint).hostname or endpoint
    try:
        socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
    except OSError as err:
        return f"the hub is unreachable ({host} does not resolve: {err.strerror or err})"
    return None


def _hub_cache_file(name: str) -> str | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # tokenizers without the hub client: nothing cached to find
        return None
    found = try_to_load_from_cache(name, "tokenizer.json")
    return found if isinstance(found, str) else None


def bert_wordpiece_from_vocab(vocab_path: str | os.PathLike[str]) -> Tokenizer:
    """BERT's uncased WordPiece tokenizer over the vocabulary in `vocab_path` (one token per line).

    Raises:
        DataError: The file is empty or lacks one of [UNK], [CLS], [SEP].
    """
    path = Path(vocab_path)
    vocab = _read_vocab(path)
    for token in ("[UNK]", "[CLS]", "[SEP]"):
        if token not in vocab:
            raise DataError(
                f"vocabulary {path} has no {token} token; a BERT vocab.txt has [PAD] [UNK] [CLS] [SEP] [MASK]"
            )
    return _bert_wordpiece(vocab)


def _bert_wordpiece(vocab: dict[str, int]) -> Tokenizer:
    model = WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##", max_input_chars_per_word=_MAX_WORD)
    tokenizer = Tokenizer(model)
    _set_bert_pipeline(tokenizer)
    # As transformers' BertTokenizerFast: the special tokens are matched whole in the text.
    tokenizer.add_special_tokens([t for t in SPECIAL_TOKENS.values() if t in vocab])
    _set_post_processor(tokenizer)
    return tokenizer


def _read_vocab(path: Path) -> dict[str, int]:
    # The tokenizers reader (line = token, id = line number, trailing whitespace trimmed, a repeated
    # token keeps its last line) is the one transformers uses for `BertTokenizerFast(vocab=path)`.
    try:
        vocab = WordPiece.read_file(str(path))
    except Exception as err:  # not UTF-8, unreadable
        raise DataError(f"cannot read vocabulary {path}: {err}") from err
    if not vocab:
        raise DataError(f"vocabulary {path} is empty")
    return vocab


def _set_bert_pipeline(tokenizer: Tokenizer) -> None:
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=True, lowercase=True
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")


def _set_post_processor(tokenizer: Tokenizer) -> None:
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )


def train_wordpiece(
    captions: Iterable[str], vocab_size: int, *, min_frequency: int = 2, length: int | None = None
) -> Tokenizer:
    """Train a BERT-style uncased WordPiece tokenizer on `captions`.

    The special tokens [PAD] [UNK] [CLS] [SEP] [MASK] get ids 0-4, the other tokens canonical ids, so
    the same captions give the same tokenizer (up to rare count ties at the vocabulary cut-off, which
    the Rust trainer breaks in hash order). Training streams the captions: memory grows with the
    number of distinct words, not with the corpus.

    Args:
        captions: The training text, one caption per item (may be a one-pass iterator).
        vocab_size: Size of the final vocabulary, special tokens and alphabet included.
        min_frequency: A merge must occur at least this often.
        length: Number of captions if known (only used for progress reporting).

    Raises:
        UsageError: `vocab_size` is too small to hold the special tokens.
        DataError: The captions contain no text.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise UsageError(f"vocab_size={vocab_size} is too small; valid: > {len(SPECIAL_TOKENS)}")
    model = WordPiece(unk_token="[UNK]", continuing_subword_prefix="##", max_input_chars_per_word=_MAX_WORD)
    tokenizer = Tokenizer(model)
    _set_bert_pipeline(tokenizer)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS.values()),
        limit_alphabet=1000,  # BERT's: rare characters become [UNK] instead of filling the vocab
        continuing_subword_prefix="##",
        show_progress=False,
    )
    tokenizer.train_from_iterator(captions, trainer=trainer, length=length)
    trained = tokenizer.get_vocab(with_added_tokens=False)
    if len(trained) <= len(SPECIAL_TOKENS):
        raise DataError("cannot train a tokenizer: the captions contain no text")
    # The Rust trainer numbers tokens in hash-map order, different in every process; renumber them
    # canonically (specials, then word starts, then ## continuations, each sorted) so that the same
    # captions give the same tokenizer.json.
    specials = list(SPECIAL_TOKENS.values())
    rest = sorted((t for t in trained if t not in SPECIAL_TOKENS.values()), key=lambda t: (t.startswith("##"), t))
    return _bert_wordpiece({token: i for i, token in enumerate(specials + rest)})


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """The ids of `pad`, `unk`, `cls`, `sep` and `mask`.

    Raises:
        DataError: The tokenizer lacks one of them (naming which).
    """
    ids = {role: tokenizer.token_to_id(token) for role, token in SPECIAL_TOKENS.items()}
    missing = [SPECIAL_TOKENS[role] for role, i in ids.items() if i is None]
    if missing:
        raise DataError(
            f"tokenizer has no {', '.join(missing)} token; ViLBERT needs {' '.join(SPECIAL_TOKENS.values())}"
        )
    return ids  # type: ignore[return-value]


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """sha256 of the tokenizer's canonical JSON without its padding/truncation settings.

    Two tokenizers with the same fingerprint split every text into the same ids.
    """
    data = json.loads(tokenizer.to_str())
    data.pop("padding", None)
    data.pop("truncation", None)
    canonical = json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class CaptionEncoder:
    """Encodes captions in batches to fixed-length id rows with the Rust tokenizer.

    Args:
        tokenizer: The tokenizer; it is copied, the caller's object is not changed.
        max_len: Row length; longer captions are truncated (keeping [SEP]), shorter ones padded.
    """

    def __init__(self, tokenizer: Tokenizer, max_len: int = DEFAULT_MAX_LEN) -> None:
        if max_len < 3:
            raise UsageError(f"max_len={max_len} is too small; valid: >= 3 ([CLS] x [SEP])")
        self.max_len = max_len
        self.special_ids = special_token_ids(tokenizer)
        self.fingerprint = tokenizer_fingerprint(tokenizer)
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.tokenizer = Tokenizer.from_str(tokenizer.to_str())
        self.tokenizer.enable_truncation(max_length=max_len)
        self.tokenizer.enable_padding(pad_id=self.special_ids["pad"], pad_token=SPECIAL_TOKENS["pad"], length=max_len)
        # Encoding runs unpadded and pads in numpy: the same ids, without building 2 x max_len Python
        # ints per caption (ids and attention mask) for numpy to convert back.
        self._unpadded = Tokenizer.from_str(tokenizer.to_str())
        self._unpadded.enable_truncation(max_length=max_len)
        self._unpadded.no_padding()

    @property
    def tokenizer_json(self) -> str:
        """The tokenizer as stored in a cache, with this encoder's truncation and padding."""
        return self.tokenizer.to_str()

    def cache_spec(self, **settings: Any) -> CacheSpec:
        """The `CacheSpec` of a cache of captions encoded here: this encoder's tokenizer, special ids,
        vocabulary and `max_len`, plus `settings` (split, image_size, pixel_dtype, normalization,
        has_labels, command, ...)."""
        return CacheSpec(
            max_len=self.max_len,
            tokenizer_json=self.tokenizer_json,
            special_token_ids=self.special_ids,
            vocab_size=self.vocab_size,
            **settings,
        )

    def __call__(self, captions: Sequence[str]) -> EncodedCaptions:
        """Encode `captions` (any length, including empty strings) in one batch call."""
        if not captions:
            empty = np.zeros((0, self.max_len), np.int32)
            return EncodedCaptions(empty, np.zeros(0, np.int32))
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets we do not use.
        encode = getattr(self._unpadded, "encode_batch_fast", self._unpadded.encode_batch)
        rows = [e.ids for e in encode(list(captions), add_special_tokens=True)]
        lengths = np.fromiter(map(len, rows), np.int32, len(rows))
        flat = np.fromiter(itertools.chain.from_iterable(rows), np.int32, int(lengths.sum()))
        input_ids = np.full((len(rows), self.max_len), self.special_ids["pad"], np.int32)
        input_ids[np.arange(self.max_len)[None, :] < lengths[:, None]] = flat  # row-major: each row's ids in order
        return EncodedCaptions(input_ids, lengths)
