"""Corpus, tokenizer and indexed-dataset tests: the data every run is built from.

A fault here corrupts training silently (lost text, wrapped ids, a half-written dataset taken
for a whole one), so each guarantee the pipeline leans on is checked directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy
import pytest

from sci_scale.data.corpus import (
    CorpusError,
    iter_jsonl_texts,
    stdlib_docstrings,
    write_jsonl_texts,
)
from sci_scale.data.indexed import open_indexed_dataset, tokenize_documents, write_indexed_dataset
from sci_scale.data.pairs import format_scan_line, scan_split
from sci_scale.data.tokenizer import (
    PAIR_SPECIAL_TOKENS,
    SentencePieceTokenizer,
    TokenizerError,
    tokenizer_identity,
    train_sentencepiece,
)

REPO = Path(__file__).resolve().parents[1]
VOCAB = 500


@pytest.fixture(scope="module")
def docstrings() -> list[str]:
    return stdlib_docstrings()


@pytest.fixture(scope="module")
def sample(docstrings: list[str]) -> list[str]:
    return docstrings[:300]


@pytest.fixture(scope="module")
def model_path(sample: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_sentencepiece(sample, tmp_path_factory.mktemp("spm") / "tok", VOCAB)


@pytest.fixture(scope="module")
def tokenizer(model_path: Path) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(model_path)


# --- the stdlib docstring corpus -------------------------------------------------------------


@pytest.mark.slow
def test_docstrings_nonempty_long_enough_and_deterministic(docstrings: list[str]) -> None:
    assert len(docstrings) > 500
    assert sum(map(len, docstrings)) > 500_000
    assert all(len(d) >= 200 for d in docstrings)
    assert len(set(docstrings)) == len(docstrings)
    assert stdlib_docstrings() == docstrings


def test_docstrings_min_chars_and_max_docs(docstrings: list[str]) -> None:
    few = stdlib_docstrings(min_chars=1000, max_docs=5)
    assert len(few) == 5
    assert all(len(d) >= 1000 for d in few)
    assert stdlib_docstrings(max_docs=10) == docstrings[:10]


def test_docstrings_import_no_modules() -> None:
    # In a fresh interpreter: pytest has imported too much already for a diff to mean anything.
    # ast (inspect, for get_docstring's cleaning) and sysconfig (its _sysconfigdata) are warmed
    # up first; codecs that the parser loads for coding cookies are allowed.
    code = textwrap.dedent(
        '''
        import ast, json, sys, sysconfig
        from sci_scale.data.corpus import stdlib_docstrings
        ast.get_docstring(ast.parse('"""warm up."""'), clean=True)
        sysconfig.get_paths()
        before = set(sys.modules)
        assert stdlib_docstrings()
        new = set(sys.modules) - before
        print(json.dumps(sorted(m for m in new if not m.startswith("encodings."))))
        '''
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


# --- JSONL corpora ----------------------------------------------------------------------------


def test_jsonl_round_trip(tmp_path: Path) -> None:
    texts = ["plain", "line one\nline two", 'quotes " and \\ and ü, 你好', ""]
    path = tmp_path / "c.jsonl"
    assert write_jsonl_texts(texts, path) == len(texts)
    assert list(iter_jsonl_texts(path)) == texts
    assert [p.name for p in tmp_path.iterdir()] == ["c.jsonl"]  # no temp file left behind


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "expected a JSON object"),
        (b'{"body": "x"}', "no 'text' key"),
        (b'{"text": 5}', "'text' is int"),
        (b'{"text": "caf\xe9"}', "invalid UTF-8"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, line: bytes, problem: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "fine"}\n\n' + line + b"\n")
    with pytest.raises(CorpusError) as err:
        list(iter_jsonl_texts(path))
    assert str(err.value).startswith(f"{path}:3: ")
    assert problem in str(err.value)
    assert isinstance(err.value, ValueError)


def test_jsonl_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(CorpusError, match=re.escape(str(path))):
        list(iter_jsonl_texts(path))


# --- sentencepiece ----------------------------------------------------------------------------


def test_special_ids(tokenizer: SentencePieceTokenizer) -> None:
    assert tokenizer.vocab_size == VOCAB
    assert (tokenizer.pad, tokenizer.unk, tokenizer.bos, tokenizer.eod) == (0, 1, 2, 3)
    ids = [tokenizer.token_to_id(t) for t in PAIR_SPECIAL_TOKENS]
    assert ids == list(range(4, 4 + len(PAIR_SPECIAL_TOKENS)))
    for token, idx in zip(PAIR_SPECIAL_TOKENS, ids, strict=True):
        encoded = tokenizer.tokenize(f"input{token}output")
        assert idx in encoded  # one id, never split into pieces
        assert tokenizer.detokenize([idx]) == token
    with pytest.raises(KeyError):
        tokenizer.token_to_id("<no such piece>")


def test_round_trip(tokenizer: SentencePieceTokenizer, docstrings: list[str]) -> None:
    # Unseen docstrings too: identity normalisation must keep whitespace and newlines exactly.
    for text in docstrings[:20] + docstrings[-20:] + ["  indented\n\n\ttab  two  spaces  "]:
        ids = tokenizer.tokenize(text)
        assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.detokenize(ids) == text
        assert tokenizer.detokenize(numpy.asarray([*ids, tokenizer.eod])) == text


def test_byte_fallback(tokenizer: SentencePieceTokenizer) -> None:
    text = "Ωλ 你好 🙂"
    ids = tokenizer.tokenize(text)
    assert tokenizer.unk not in ids
    assert tokenizer.detokenize(ids) == text


def test_training_is_deterministic(sample: list[str], model_path: Path, tmp_path: Path) -> None:
    again = train_sentencepiece(sample, tmp_path / "other" / "tok", VOCAB)
    assert again.read_bytes() == model_path.read_bytes()
    assert tokenizer_identity(again)["sha256"] == tokenizer_identity(model_path)["sha256"]
    assert sorted(p.name for p in again.parent.iterdir()) == ["tok.model"]


def test_bad_model_type(sample: list[str], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bpe, unigram, word"):
        train_sentencepiece(sample, tmp_path / "tok", VOCAB, model_type="wordpiece")


def test_identifiers_follow_the_model_file(
    tokenizer: SentencePieceTokenizer, model_path: Path
) -> None:
    sha = hashlib.sha256(model_path.read_bytes()).hexdigest()
    ids = tokenizer.unique_identifiers
    assert ids["sha256"] == sha
    assert ids["tokenizer_path"] == str(model_path)
    json.dumps(ids)  # megatron hashes it into its dataset cache names
    assert tokenizer_identity(model_path) == {"path": str(model_path.resolve()), "sha256": sha}


def test_missing_model(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape("nope.model")):
        SentencePieceTokenizer(tmp_path / "nope.model")


# --- closed vocabularies: SCAN, the word model and the soft vocabulary limit -------------------

SCAN_EXAMPLE = "IN: walk twice OUT: I_WALK I_WALK"


@pytest.fixture(scope="module")
def scan_texts() -> list[str]:
    """The train part of SCAN's length split: every one of its words, a few dozen in all."""
    return [format_scan_line(c, a) for c, a in scan_split("length", "train")]


@pytest.fixture(scope="module")
def scan_words(scan_texts: list[str]) -> set[str]:
    words = {w for t in scan_texts for w in t.split()}
    assert {"IN:", "OUT:", "I_TURN_LEFT", "I_JUMP", "thrice", "opposite"} <= words
    assert len(words) == 21  # 15 of the commands (with IN: and OUT:), 6 actions
    return words


@pytest.fixture(scope="module")
def word_tokenizer(scan_texts: list[str], tmp_path_factory: pytest.TempPathFactory):
    prefix = tmp_path_factory.mktemp("word") / "tok"
    return SentencePieceTokenizer(train_sentencepiece(scan_texts, prefix, 2048, model_type="word"))


def test_word_model_gives_one_id_per_scan_word(
    word_tokenizer: SentencePieceTokenizer, scan_words: set[str], scan_texts: list[str]
) -> None:
    tok = word_tokenizer
    ids = tok.tokenize(SCAN_EXAMPLE)
    assert len(ids) == 6
    assert ids[-1] == ids[-2] == tok.token_to_id("\u2581I_WALK")
    assert tok.detokenize(ids) == SCAN_EXAMPLE
    for word in scan_words:
        assert len(tok.tokenize(word)) == 1, word
        assert len(tok.tokenize(f"IN: {word}")) == 2, word
    # Every word a piece, and nothing else learned: 4 fixed ids, 3 pair tokens and their word
    # forms, 256 bytes, then the words.
    assert tok.vocab_size == 4 + 2 * len(PAIR_SPECIAL_TOKENS) + 256 + len(scan_words)
    assert [tok.token_to_id(t) for t in PAIR_SPECIAL_TOKENS] == [4, 6, 8]
    assert (tok.pad, tok.unk, tok.bos, tok.eod) == (0, 1, 2, 3)
    held_out = [format_scan_line(c, a) for c, a in scan_split("length", "test")[:500]]
    for text in scan_texts[:500] + held_out:
        ids = tok.tokenize(text)
        assert len(ids) == len(text.split())
        assert tok.detokenize(ids) == text


def test_word_model_round_trips_unseen_words(word_tokenizer: SentencePieceTokenizer) -> None:
    # An unseen word falls back to bytes that hold sentencepiece's space mark; decoding must
    # give back the spaces, at the start of a text as elsewhere.
    tok = word_tokenizer
    for text in ["IN: fly twice", "fly twice", " fly", "walk  fly ", "Ωλ\nwalk", "a\tb"]:
        ids = tok.tokenize(text)
        assert tok.unk not in ids
        assert tok.detokenize(ids) == text
        assert tok.detokenize([tok.eod, *ids]) == text  # control ids vanish
    assert tok.detokenize([*tok.tokenize("walk fly"), tok.eod, *tok.tokenize("fly")]) == (
        "walk fly fly"  # as for known words, a later text keeps its leading space
    )


def test_word_model_with_symbols_keeps_every_word(
    scan_texts: list[str], scan_words: set[str], tmp_path: Path
) -> None:
    # As the pipeline trains it for SCAN: the actions as symbols. Sentencepiece would lose the
    # word before each symbol ("OUT:", always followed by an action) but for the extra space.
    actions = sorted(w for w in scan_words if w.startswith("I_"))
    assert len(actions) == 6
    model = train_sentencepiece(scan_texts, tmp_path / "tok", 2048, "word", extra_symbols=actions)
    tok = SentencePieceTokenizer(model)
    for word in scan_words:
        assert len(tok.tokenize(word)) == 1, word
    ids = tok.tokenize(SCAN_EXAMPLE)
    assert len(ids) == 6 and tok.detokenize(ids) == SCAN_EXAMPLE
    assert tok.token_to_id("I_WALK") == 10 + 2 * actions.index("I_WALK")  # after the pair tokens
    # symbols and pair tokens, each with its word form; then the 15 other words
    assert tok.vocab_size == 4 + 2 * (3 + 6) + 256 + 15


def test_word_model_keeps_words_with_rare_letters(scan_texts: list[str], tmp_path: Path) -> None:
    # "z" and "q" make up far less than sentencepiece's default 0.05% of uncovered characters; a
    # word holding one must still be a piece.
    texts = [*scan_texts[:2000], "IN: jump quizzically OUT: I_JUMP"]
    tok = SentencePieceTokenizer(train_sentencepiece(texts, tmp_path / "tok", 2048, "word"))
    assert len(tok.tokenize("quizzically")) == 1


@pytest.mark.parametrize("model_type", ["bpe", "word"])
def test_vocab_size_is_a_soft_limit(
    model_type: str, scan_texts: list[str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # SCAN alone has far fewer distinct pieces than 2,048: sentencepiece's own limit would fail
    # ("Vocabulary size too high"); the model gets the largest vocabulary the text supports.
    with caplog.at_level("WARNING", logger="sci_scale.data.tokenizer"):
        model = train_sentencepiece(scan_texts, tmp_path / "tok", 2048, model_type=model_type)
    tok = SentencePieceTokenizer(model)
    assert 263 < tok.vocab_size < 2048
    assert tok.detokenize(tok.tokenize(SCAN_EXAMPLE)) == SCAN_EXAMPLE
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and f"{tok.vocab_size} {model_type}" in lines[0] and "2048" in lines[0]
    # ... and that vocabulary is the whole one: asking for exactly its size gives the same pieces.
    exact = train_sentencepiece(scan_texts, tmp_path / "exact", tok.vocab_size, model_type)
    assert SentencePieceTokenizer(exact).vocab == tok.vocab


def test_a_vocab_that_fits_is_exact_and_unlogged(
    sample: list[str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="sci_scale.data.tokenizer"):
        model = train_sentencepiece(sample, tmp_path / "tok", VOCAB, model_type="unigram")
    assert SentencePieceTokenizer(model).vocab_size == VOCAB
    assert not [r for r in caplog.records if r.name == "sci_scale.data.tokenizer"]


@pytest.mark.parametrize(("model_type", "per_symbol"), [("bpe", 1), ("word", 2)])
def test_reserved_ids_per_model_type(
    model_type: str, per_symbol: int, scan_texts: list[str], tmp_path: Path
) -> None:
    # A word model gives each user-defined symbol a second piece (the symbol as a word).
    reserved = 4 + per_symbol * len(PAIR_SPECIAL_TOKENS) + 256
    texts = scan_texts[:200]
    with pytest.raises(TokenizerError, match=f"{reserved} ids are reserved"):
        train_sentencepiece(texts, tmp_path / "tok", reserved, model_type=model_type)
    if model_type == "word":
        tok = SentencePieceTokenizer(
            train_sentencepiece(texts, tmp_path / "tok", reserved + 1, model_type="word")
        )
        assert tok.vocab_size == reserved + 1  # one learned word, the most frequent
    with pytest.raises(TokenizerError, match=f"{reserved + per_symbol} ids are reserved"):
        train_sentencepiece(
            texts, tmp_path / "tok", reserved + per_symbol, model_type, extra_symbols=["X"]
        )


def test_extra_symbols_are_single_pieces(scan_texts: list[str], tmp_path: Path) -> None:
    texts = scan_texts[:2000]
    plain = SentencePieceTokenizer(train_sentencepiece(texts, tmp_path / "plain", 2048))
    assert len(plain.tokenize("I_TURN_LEFT")) > 1  # bpe alone splits it
    symbols = ["I_TURN_LEFT", "I_TURN_RIGHT", "I_TURN_LEFT"]  # repeats are kept once
    model = train_sentencepiece(texts, tmp_path / "sym", 2048, extra_symbols=symbols)
    tok = SentencePieceTokenizer(model)
    assert tok.token_to_id("I_TURN_LEFT") == 4 + len(PAIR_SPECIAL_TOKENS)
    assert tok.token_to_id("I_TURN_RIGHT") == 5 + len(PAIR_SPECIAL_TOKENS)
    ids = tok.tokenize("OUT: I_TURN_LEFT I_TURN_RIGHT I_TURN_LEFT")
    assert ids.count(tok.token_to_id("I_TURN_LEFT")) == 2
    assert tok.token_to_id("I_TURN_RIGHT") in ids
    with pytest.raises(TokenizerError, match="whitespace"):
        train_sentencepiece(texts, tmp_path / "bad", 2048, extra_symbols=["I_TURN LEFT"])


# --- indexed datasets -------------------------------------------------------------------------


def _write(texts: list[str], tokenizer: SentencePieceTokenizer, prefix: Path) -> tuple[int, int]:
    docs = tokenize_documents(texts, tokenizer)
    return write_indexed_dataset(docs, prefix, tokenizer.vocab_size)


def test_indexed_round_trip(
    tokenizer: SentencePieceTokenizer, sample: list[str], tmp_path: Path
) -> None:
    texts = sample[:50]
    prefix = tmp_path / "corpus"
    n_docs, n_tokens = _write(texts, tokenizer, prefix)
    ds = open_indexed_dataset(prefix)
    assert n_docs == len(ds) == len(texts)
    assert n_tokens == int(ds.sequence_lengths.sum())
    assert ds.index.dtype == numpy.uint16
    for i, text in enumerate(texts):
        ids = ds[i]
        assert ids[-1] == tokenizer.eod
        assert tokenizer.detokenize(ids) == text


def test_indexed_wide_vocab_uses_int32(tmp_path: Path) -> None:
    docs = [[1, 2, 70_000], [99_999]]
    assert write_indexed_dataset(docs, tmp_path / "wide", 100_000) == (2, 4)
    ds = open_indexed_dataset(tmp_path / "wide")
    assert ds.index.dtype == numpy.int32
    assert ds[0].tolist() == [1, 2, 70_000]


def test_indexed_rejects_out_of_range_ids(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"document 1: ids span \[0, 500\]"):
        write_indexed_dataset([[1], [0, 500]], tmp_path / "bad", 500)
    assert list(tmp_path.iterdir()) == []


def test_truncated_bin_is_detected(
    tokenizer: SentencePieceTokenizer, sample: list[str], tmp_path: Path
) -> None:
    prefix = tmp_path / "corpus"
    _write(sample[:10], tokenizer, prefix)
    bin_path = Path(f"{prefix}.bin")
    os.truncate(bin_path, bin_path.stat().st_size - 4)
    with pytest.raises(ValueError, match=f"{re.escape(str(bin_path))}.*truncated"):
        open_indexed_dataset(prefix)


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "absent"))):
        open_indexed_dataset(tmp_path / "absent")


def test_interrupted_write_leaves_the_target_untouched(
    tokenizer: SentencePieceTokenizer, sample: list[str], tmp_path: Path
) -> None:
    def failing(texts: list[str]):
        for i, ids in enumerate(tokenize_documents(texts, tokenizer)):
            if i == 5:
                raise RuntimeError("interrupted")
            yield ids

    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="interrupted"):
        write_indexed_dataset(failing(sample[:10]), fresh, tokenizer.vocab_size)
    assert not Path(f"{fresh}.idx").exists()
    assert list(tmp_path.iterdir()) == []

    prefix = tmp_path / "corpus"
    _write(sample[:3], tokenizer, prefix)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(RuntimeError, match="interrupted"):
        write_indexed_dataset(failing(sample[10:20]), prefix, tokenizer.vocab_size)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert len(open_indexed_dataset(prefix)) == 3


def test_gpt_dataset_accepts_the_tokenizer(
    tokenizer: SentencePieceTokenizer, sample: list[str], tmp_path: Path
) -> None:
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    prefix = tmp_path / "corpus"
    _write(sample[:100], tokenizer, prefix)
    config = GPTDatasetConfig(
        random_seed=1,
        sequence_length=64,
        blend=([str(prefix)], None),
        split="90,10,0",
        path_to_cache=str(tmp_path / "cache"),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [20, 4, 0], lambda: True, config
    ).build()
    sample0 = train[0]
    assert sample0["tokens"].shape == (64,)
    assert int(sample0["tokens"].max()) < tokenizer.vocab_size
    assert train.unique_identifiers["tokenizer"] is tokenizer
    assert len(valid) >= 4
