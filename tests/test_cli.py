"""The ``sci-scale`` command line: SCAN splits, tokenizer training, errors as one line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sci_scale.cli.main import main
from sci_scale.data.corpus import stdlib_docstrings, write_jsonl_texts
from sci_scale.data.pairs import enumerate_commands, interpret, scan_split
from sci_scale.data.tokenizer import PAIR_SPECIAL_TOKENS, SentencePieceTokenizer

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"IN: (\S.*?) OUT: (\S.*)")


def scan_lines(capsys, *args: str) -> list[str]:
    assert main(["pairs", "scan", *args]) == 0
    captured = capsys.readouterr()
    assert captured.out.endswith("\n")
    return captured.out.splitlines()


def parse(lines: list[str]) -> list[tuple[str, list[str]]]:
    out = []
    for line in lines:
        match = LINE.fullmatch(line)
        assert match, line
        out.append((match.group(1), match.group(2).split()))
    return out


# --- pairs scan ----------------------------------------------------------------------------------


def test_pairs_scan_length_test_part(capsys):
    lines = scan_lines(capsys, "--split", "length", "--part", "test")
    assert len(lines) == 3920
    pairs = parse(lines)
    # the held-out part of the length split: every action sequence is longer than 22
    assert all(len(actions) > 22 for _, actions in pairs)
    assert all(interpret(command) == actions for command, actions in pairs)


def test_pairs_scan_all_is_the_task_set(capsys):
    lines = scan_lines(capsys, "--split", "all")
    assert len(lines) == 20910
    pairs = parse(lines)
    assert [c for c, _ in pairs] == enumerate_commands()
    assert len(set(lines)) == 20910


def test_pairs_scan_simple_train_part(capsys):
    lines = scan_lines(capsys, "--split", "simple", "--part", "train")
    assert len(lines) == 16728
    pairs = parse(lines)
    assert pairs == scan_split("simple", "train", seed=0)  # --seed defaults to 0
    test = scan_lines(capsys, "--split", "simple", "--part", "test")
    assert len(test) == 4182
    assert not {c for c, _ in pairs} & {c for c, _ in parse(test)}


def test_pairs_scan_part_defaults_to_train_and_seed_matters(capsys):
    default = scan_lines(capsys, "--split", "simple")
    assert default == scan_lines(capsys, "--split", "simple", "--part", "train")
    seeded = scan_lines(capsys, "--split", "simple", "--seed", "7")
    assert len(seeded) == 16728 and seeded != default
    assert parse(seeded) == scan_split("simple", "train", seed=7)


def test_pairs_scan_rejects_an_unknown_split(capsys):
    with pytest.raises(SystemExit) as info:
        main(["pairs", "scan", "--split", "bogus"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'bogus'" in err and "length" in err


# --- python -m sci_scale -------------------------------------------------------------------------


def test_python_m_sci_scale_help():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "sci_scale", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    for command in ("train", "pairs", "tokenizer", "preprocess"):
        assert command in proc.stdout
    assert proc.stdout.startswith("usage: sci-scale")


# --- tokenizer train -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def texts() -> list[str]:
    """Real prose on a small alphabet (lower-case letters, space, full stop).

    sentencepiece needs a piece for every character it covers on top of the 263 fixed ones
    (pad/unk/bos/eos, 3 pair tokens, 256 bytes): 300 pieces leave room for 37, which the
    stdlib docstrings' ~80 distinct characters would exceed.
    """
    docs = [re.sub(r"[^a-z. ]+", " ", d.lower()) for d in stdlib_docstrings(max_docs=150)]
    docs = [" ".join(d.split()) for d in docs]
    assert sum(len(d) for d in docs) > 50_000
    assert len(set("".join(docs))) <= 28
    return docs


def test_tokenizer_train_writes_a_model(texts, tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    assert write_jsonl_texts(texts, corpus) == len(texts)
    prefix = tmp_path / "tok" / "spm"
    status = main(
        ["tokenizer", "train", "--input", str(corpus), "--out", str(prefix), "--vocab-size", "300"]
    )
    assert status == 0, capsys.readouterr().err
    model = Path(f"{prefix}.model")
    assert model.is_file()
    tokenizer = SentencePieceTokenizer(model)
    assert tokenizer.vocab_size == 300
    assert [tokenizer.token_to_id(t) for t in PAIR_SPECIAL_TOKENS] == [4, 5, 6]
    assert (tokenizer.pad, tokenizer.eod) == (0, 3)
    sample = texts[3][:500]
    ids = tokenizer.tokenize(sample)
    assert tokenizer.detokenize(ids) == sample
    assert len(ids) < len(sample.encode("utf-8"))  # learned pieces, not only bytes
    assert str(model) in capsys.readouterr().out  # the log line names the model


def test_tokenizer_train_malformed_jsonl_names_file_and_line(tmp_path, capsys):
    corpus = tmp_path / "bad.jsonl"
    good = json.dumps({"text": "A perfectly good document about parsing."})
    corpus.write_text(f'{good}\n\n{{"text": "unterminated\n', encoding="utf-8")
    prefix = tmp_path / "spm"
    status = main(["tokenizer", "train", "--input", str(corpus), "--out", str(prefix)])
    assert status == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("sci-scale tokenizer: error: ")
    assert f"{corpus}:3:" in err and "not valid JSON" in err
    assert not Path(f"{prefix}.model").exists()


def test_tokenizer_train_wrong_text_key_names_file_and_line(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    write_jsonl_texts(["some text"], corpus, text_key="body")
    status = main(["tokenizer", "train", "--input", str(corpus), "--out", str(tmp_path / "spm")])
    assert status == 2
    err = capsys.readouterr().err
    assert f"{corpus}:1:" in err and "'text'" in err and err.count("\n") == 1


def test_tokenizer_train_missing_input_exits_2(tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    status = main(["tokenizer", "train", "--input", str(missing), "--out", str(tmp_path / "spm")])
    assert status == 2
    err = capsys.readouterr().err
    assert str(missing) in err and err.count("\n") == 1


def test_tokenizer_train_vocab_too_small_for_the_alphabet_exits_2(tmp_path, capsys):
    corpus = tmp_path / "corpus.jsonl"
    write_jsonl_texts(stdlib_docstrings(max_docs=150), corpus)  # ~80 distinct characters
    argv = ["tokenizer", "train", "--input", str(corpus), "--out", str(tmp_path / "spm")]
    assert main([*argv, "--vocab-size", "300"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "vocab" in err


def test_readme_opens_with_the_two_commands_and_ci_runs_the_second() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, flags=re.S)
    run_job, run_tests = blocks[0].strip(), blocks[1].strip()
    assert readme.index(run_job) < readme.index("---")  # first thing in the file
    assert run_job == "bash tools/setup.sh && .venv/bin/sci-scale train"
    assert run_tests.startswith("bash tools/setup.sh && ")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert run_tests in ci.splitlines()
