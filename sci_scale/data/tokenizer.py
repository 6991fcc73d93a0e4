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

``model_type="word"`` is sentencepiece's word model, for closed vocabularies (SCAN, COGS): every
space-separated word of the training text becomes one piece (``I_TURN_LEFT`` is one id), most
frequent first while the vocabulary has room; numbers are words too (``split_digits`` does not
apply) and no character is left out for rarity (``character_coverage=1.0``). Sentencepiece gives
each user-defined symbol a second piece, the symbol as a word (``"\u2581<sep>"``), right after
it: the pair tokens are then 4, 6, 8. A word never seen in training falls back to byte pieces
(or ``<unk>`` without byte fallback); :meth:`SentencePieceTokenizer.detokenize` restores the
spaces that sentencepiece leaves as ``"\u2581"`` in such bytes, so text still round-trips.

The vocabulary size is a soft limit: a text with fewer distinct pieces than ``vocab_size`` (SCAN
alone has a few dozen words) gives the largest vocabulary it supports, with a log line saying so.

``load_tokenizer`` opens whichever kind a path names: such a model, or a Hugging Face backbone's
own tokenizer (``hf_tokenizer``), so callers never need to know which a run used.
"""

from __future__ import annotations

import io
import logging
import os
import re
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
# split into pieces or collide with text, hence user-defined symbols with fixed ids 4, 5, 6
# (4, 6, 8 in a word model, which follows each with the symbol as a word).
PAIR_SPECIAL_TOKENS: tuple[str, ...] = ("<sep>", "<in>", "<out>")

MODEL_TYPES = ("bpe", "unigram", "word")

# Sentencepiece's mark for a space inside pieces (U+2581).
_SPACE = "\u2581"

log = logging.getLogger(__name__)

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


def _training_sentences(texts: Iterable[str], spaced: Sequence[str] = ()) -> Iterator[str]:
    """The texts as sentencepiece sentences: non-empty, and short enough to be used.

    A space before a symbol of ``spaced`` is doubled. A word model also registers
    ``"\u2581" + symbol`` (the symbol as a word), and training replaces it with a boundary mark
    glued to the word before it, which is then lost: ``OUT: I_WALK`` with the symbol ``I_WALK``
    would leave no piece for ``OUT:``. With a second space the mark takes that space, and each
    word is counted as in the text; symbols need no count, their pieces are reserved.
    """
    alternatives = "|".join(map(re.escape, sorted(spaced, key=len, reverse=True)))
    before_symbol = re.compile(f" (?={alternatives})") if spaced else None
    for text in texts:
        if before_symbol is not None:
            text = before_symbol.sub("  ", text)
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
    ``vocab_size`` is an upper bound: a text with fewer distinct pieces gives a smaller
    vocabulary (logged); read the real size from the model (``SentencePieceTokenizer``).
    Returns the .model path.
    """
    if model_type not in MODEL_TYPES:
        raise TokenizerError(
            f"model_type must be one of {', '.join(MODEL_TYPES)}; got {model_type!r}"
        )
    symbols = list(dict.fromkeys([*PAIR_SPECIAL_TOKENS, *extra_symbols]))
    bad = [s for s in symbols if not s or _SPACE in s or any(c.isspace() for c in s)]
    if bad:  # sentencepiece would keep such a symbol, but text never matches it
        raise TokenizerError(f"symbols must be non-empty and hold no whitespace: got {bad!r}")
    word = model_type == "word"
    # A word model adds each symbol twice: itself and, right after it, the symbol as a word.
    reserved = 4 + len(symbols) * (2 if word else 1) + (256 if byte_fallback else 0)
    if vocab_size <= reserved:
        raise TokenizerError(
            f"vocab_size={vocab_size} leaves no learned pieces: {reserved} ids are reserved "
            f"for pad/unk/bos/eos, the pair tokens{', extra symbols' if extra_symbols else ''}"
            f"{' and the byte pieces' if byte_fallback else ''}"
            f"{' (a word model reserves two per symbol)' if word else ''}"
        )
    target = Path(f"{model_prefix}.model")
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_training_sentences(texts, symbols if word else ()),
            model_writer=model,
            model_type=model_type,
            vocab_size=vocab_size,
            # A soft limit: fewer pieces when the text has no more (sentencepiece then records
            # the real size in the model); too few for the required characters is still an error.
            hard_vocab_limit=False,
            byte_fallback=byte_fallback,
            split_digits=not word,  # a word model keeps whole words, numbers included
            **({"character_coverage": 1.0} if word else {}),  # no word dropped for a rare letter
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
    size = spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()
    if not reserved < size <= vocab_size:  # never write a model that breaks the id layout
        raise TokenizerError(
            f"sentencepiece trained {size} pieces for vocab_size={vocab_size}, {reserved} of them "
            "reserved: the text gives no learned pieces"
            if size <= reserved
            else f"sentencepiece trained {size} pieces, more than vocab_size={vocab_size}"
        )
    if size < vocab_size:
        log.warning(
            "tokenizer: trained %d %s pieces, not the %d asked: the text supports no more",
            size,
            model_type,
            vocab_size,
        )
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


def _model_kind(path: Path) -> tuple[str, bool]:
    """The model type of a sentencepiece model ("bpe", "unigram", "word", "char") and whether it
    adds a dummy prefix; ("unknown", True) where protobuf cannot read it."""
    try:
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto.FromString(path.read_bytes())
    except Exception:  # protobuf missing or incompatible: no word-model decoding fix then
        return "unknown", True
    name = sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
    return name.lower(), proto.normalizer_spec.add_dummy_prefix


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
        self._model_type, self._dummy_prefix = _model_kind(path)
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
        ids = id_list(ids)
        text = self._sp.decode(ids)
        if self._model_type == "word" and _SPACE in text:
            # A word model byte-encodes an unknown word with its space mark, which sentencepiece
            # decodes as U+2581 (other pieces turn it into a space, which text can't hold as
            # U+2581 anyway); as for the first piece, a text's first space is the dummy prefix.
            first = next((i for i in ids if not self._sp.is_control(i)), None)
            if self._dummy_prefix and first is not None and self._sp.is_byte(first):
                text = text.removeprefix(_SPACE)
            text = text.replace(_SPACE, " ")
        return text

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
