"""A sentencepiece tokenizer trained on the corpus, and its megatron-facing wrapper.

Training choices follow what makes a pretraining tokenizer lossless and reproducible:

- ``normalization_rule_name="identity"`` and ``remove_extra_whitespaces=False``: the default NFKC
  normalisation and whitespace folding would make ``detokenize(tokenize(t)) != t``;
- ``byte_fallback=True``: characters never seen in training become UTF-8 byte pieces instead of
  ``<unk>``, so no text is lost;
- ``split_digits=True``: numbers are read digit by digit, which the arithmetic pairs rely on;
- one thread, no sentence shuffling, a fixed seed and no input path recorded in the model: the
  same texts give a byte-identical ``.model``, so cache keys derived from its hash are stable.

Fixed ids: pad 0, unk 1, bos 2, eos 3 (eos is the end-of-document token megatron calls ``eod``),
then ``PAIR_SPECIAL_TOKENS`` from 4 in order, then the 256 byte pieces, then learned pieces.

``load_tokenizer`` opens whichever kind a path names: such a model, or a Hugging Face backbone's
own tokenizer (``hf_tokenizer``), so callers never need to know which a run used.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from sci_scale.data.hf_tokenizer import TOKENIZER_FILE, HFTokenizer, is_hf_tokenizer_dir
from sci_scale.data.tokenizer_base import (
    TokenizerBase,
    TokenizerError,
    file_sha256,
    id_list,
    unique_identifiers,
)

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

# Structural pair blocks: "<in>" input "<sep>" output "<out>"-style markers that must never be
# split into pieces or collide with text, hence user-defined symbols with fixed ids 4, 5, 6.
PAIR_SPECIAL_TOKENS: tuple[str, ...] = ("<sep>", "<in>", "<out>")

MODEL_TYPES = ("bpe", "unigram")

# Sentencepiece silently drops training sentences longer than max_sentence_length bytes; long
# documents are cut at line breaks into chunks of at most this size instead of being lost.
_MAX_SENTENCE_BYTES = 16384


def _chunks(text: str, limit: int) -> Iterator[str]:
    """Split a long text at line ends (or, for one huge line, anywhere) into <= limit bytes."""
    if len(text.encode("utf-8")) <= limit:
        yield text
        return
    chunk, size = [], 0
    for line in text.splitlines(keepends=True):
        n = len(line.encode("utf-8"))
        if chunk and size + n > limit:
            yield "".join(chunk)
            chunk, size = [], 0
        while n > limit:  # a single line longer than the limit: cut by characters
            head = line[: limit // 4]  # <= limit bytes whatever the characters' widths
            yield head
            line = line[len(head) :]
            n = len(line.encode("utf-8"))
        chunk.append(line)
        size += n
    if chunk:
        yield "".join(chunk)


def _training_sentences(texts: Iterable[str]) -> Iterator[str]:
    """The texts as sentencepiece sentences: non-empty, and short enough to be used."""
    for text in texts:
        for chunk in _chunks(text, _MAX_SENTENCE_BYTES):
            if chunk.strip():
                yield chunk


def train_sentencepiece(
    texts: Iterable[str],
    model_prefix: str | Path,
    vocab_size: int,
    model_type: str = "bpe",
    byte_fallback: bool = True,
    input_sentence_size: int = 0,
    seed: int = 0,
    extra_symbols: Sequence[str] = (),
) -> Path:
    """Train a tokenizer on ``texts`` and write ``<model_prefix>.model`` atomically.

    ``input_sentence_size`` > 0 trains on a seeded random sample of that many sentences (for
    corpora too large to hold in memory); 0 uses every sentence. ``extra_symbols`` become
    single pieces (e.g. SCAN's action names, which otherwise split into several pieces each).
    Returns the .model path.
    """
    if model_type not in MODEL_TYPES:
        raise TokenizerError(
            f"model_type must be one of {', '.join(MODEL_TYPES)}; got {model_type!r}"
        )
    symbols = list(PAIR_SPECIAL_TOKENS) + [s for s in extra_symbols if s not in PAIR_SPECIAL_TOKENS]
    reserved = 4 + len(symbols) + (256 if byte_fallback else 0)
    if vocab_size <= reserved:
        raise TokenizerError(
            f"vocab_size={vocab_size} leaves no learned pieces: {reserved} ids are reserved "
            "for pad/unk/bos/eos, the pair tokens and the byte pieces"
        )
    target = Path(f"{model_prefix}.model")
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_sentences(texts),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            byte_fallback=byte_fallback,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            user_defined_symbols=symbols,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=False,
            max_sentence_length=_MAX_SENTENCE_BYTES,
            num_threads=1,
            minloglevel=2,
        )
    except RuntimeError as exc:  # e.g. a vocab smaller than the corpus' required characters
        reason = " ".join(str(exc).split())
        raise TokenizerError(
            f"sentencepiece could not train a {vocab_size}-piece vocab: {reason}"
        ) from None
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the model from other users
        with os.fdopen(fd, "wb") as stream:
            stream.write(model.getvalue())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def tokenizer_identity(path: str | Path) -> dict[str, str]:
    """Which tokenizer a run used, for checkpoints: where it was and exactly what it was."""
    path = Path(path)
    return {"path": str(path.resolve()), "sha256": file_sha256(path)}


class SentencePieceTokenizer(TokenizerBase):
    """A sentencepiece model with the surface megatron-core's GPT datasets read.

    ``tokenize`` adds neither bos nor eos: as in megatron's preprocessing, documents are
    concatenated with ``eod`` between them by the caller.
    """

    def __init__(self, model_path: str | Path) -> None:
        path = Path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"sentencepiece model not found: {path}")
        super().__init__(str(path), {"library": "sentencepiece"})
        self.model_path = path
        self._sp = spm.SentencePieceProcessor(model_file=str(path))
        for name, value in (("eos", self._sp.eos_id()), ("pad", self._sp.pad_id())):
            if value < 0:
                raise ValueError(
                    f"{path}: the model has no {name} piece; sci-scale needs both eos (end of "
                    "document) and pad. Train one with train_sentencepiece."
                )
        self.unique_identifiers = unique_identifiers(self, path)

    def tokenize(self, text: str) -> list[int]:
        """Text to ids, without bos or eos."""
        return self._sp.encode(text, out_type=int)

    def tokenize_batch(self, texts: list[str]) -> list[list[int]]:
        """Many texts in one call into sentencepiece's C++ loop."""
        return self._sp.encode(texts, out_type=int)

    def detokenize(self, ids: Sequence[int] | Any) -> str:
        """Ids (a list, numpy array or tensor) to text; control ids (pad, bos, eos) vanish."""
        return self._sp.decode(id_list(ids))

    def token_to_id(self, piece: str) -> int:
        """The id of one piece, e.g. a pair token; KeyError when the model lacks it."""
        idx = self._sp.piece_to_id(piece)
        if idx == self._sp.unk_id() and piece != self._sp.id_to_piece(idx):
            raise KeyError(f"{piece!r} is not a piece of {self.path}")
        return idx

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        """Pretraining tokenizers carry no chat template; megatron's base demands the method."""
        raise NotImplementedError(f"{type(self).__name__} has no chat template")

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def vocab(self) -> dict[str, int]:
        return {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}

    @property
    def eod(self) -> int:
        """eos doubles as end-of-document: megatron packs documents separated by it."""
        return self._sp.eos_id()

    @property
    def eos(self) -> int:
        return self._sp.eos_id()

    @property
    def bos(self) -> int:
        return self._sp.bos_id()

    @property
    def pad(self) -> int:
        """A dedicated id: megatron masks the loss on it, so it must not collide with eod."""
        return self._sp.pad_id()

    @property
    def unk(self) -> int:
        return self._sp.unk_id()


def load_tokenizer(spec: str | Path) -> Any:
    """A sentencepiece ``.model`` file, or a Hugging Face model directory (or its
    ``tokenizer.json``)."""
    path = Path(spec)
    if path.name == TOKENIZER_FILE and path.is_file():  # what a checkpoint's identity records
        path = path.parent
    if path.is_dir():
        if not is_hf_tokenizer_dir(path):
            raise TokenizerError(f"{path} is a directory without tokenizer.json")
        return HFTokenizer(path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer {path} not found (a .model file or an HF model directory)")
    return SentencePieceTokenizer(path)
