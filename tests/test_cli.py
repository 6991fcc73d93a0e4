"""The ``sci-scale`` command line: SCAN splits, tokenizers, overrides, errors as one line."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sci_scale.cli.main import main, parse_args
from sci_scale.data.corpus import stdlib_docstrings, write_jsonl_texts
from sci_scale.data.indexed import open_indexed_dataset
from sci_scale.data.pairs import (
    enumerate_commands,
    format_scan_line,
    interpret,
    scan_split,
    scan_template,
    user_examples,
)
from sci_scale.data.tokenizer import PAIR_SPECIAL_TOKENS, SentencePieceTokenizer

REPO = Path(__file__).resolve().parents[1]
LINE = re.compile(r"IN: (\S.*?) OUT: (\S.*)")


def scan_lines(capsys, *args: str, fmt: str = "txt") -> list[str]:
    assert main(["pairs", "scan", *args, "--format", fmt]) == 0
    captured = capsys.readouterr()
    assert captured.out.endswith("\n")
    return captured.out.splitlines()


def scan_records(capsys, *args: str) -> list[dict]:
    """``pairs scan`` in its default format, JSONL."""
    assert main(["pairs", "scan", *args]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n")
    return [json.loads(line) for line in out.splitlines()]


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


def test_pairs_scan_writes_jsonl_by_default(capsys, tmp_path):
    records = scan_records(capsys, "--split", "length", "--part", "test")
    pairs = scan_split("length", "test")
    assert len(records) == len(pairs) == 3920
    for record, (command, actions) in zip(records, pairs, strict=True):
        assert record == {
            "text": format_scan_line(command, actions),
            "input": command,
            "output": " ".join(actions),
            "template": scan_template(command),
            "split": "test",
        }
    assert [r["text"] for r in records] == scan_lines(capsys, "--split", "length", "--part", "test")
    # The user-pairs loader reads it as is: texts, templates and the held-out split.
    path = tmp_path / "length_test.jsonl"
    assert main(["pairs", "scan", "--split", "length", "--part", "test"]) == 0
    path.write_text(capsys.readouterr().out, encoding="utf-8")
    examples = user_examples(path)
    assert [(e.text, e.template, e.split) for e in examples] == [
        (r["text"], r["template"], "test") for r in records
    ]


def test_pairs_scan_takes_a_combined_split(capsys):
    split = "length+template_around_right"
    train = scan_records(capsys, "--split", split)
    assert [(r["input"], r["output"].split()) for r in train] == scan_split(split, "train")
    assert {r["split"] for r in train} == {"train"}
    held_out = {
        c for part in ("length", "template_around_right") for c, _ in scan_split(part, "test")
    }
    commands = {r["input"] for r in train}
    assert 0 < len(commands) < 16990 and not commands & held_out
    test = scan_records(capsys, "--split", split, "--part", "test")
    assert {r["input"] for r in test} == held_out


@pytest.mark.parametrize("split", ["bogus", "length+bogus"])
def test_pairs_scan_rejects_an_unknown_split(capsys, split):
    assert main(["pairs", "scan", "--split", split]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing written before the error
    err = captured.err
    assert err.count("\n") == 1, err
    assert err.startswith("sci-scale pairs: error: unknown SCAN split 'bogus'")
    assert "length" in err and "template_around_right" in err


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


@pytest.fixture(scope="module")
def scan_jsonl(tmp_path_factory) -> Path:
    """``sci-scale pairs scan`` output as a file (the simple split's train part)."""
    path = tmp_path_factory.mktemp("scan") / "scan.jsonl"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(["pairs", "scan", "--split", "simple"]) == 0
    path.write_text(buffer.getvalue(), encoding="utf-8")
    return path


@pytest.mark.parametrize("model_type", ["bpe", "word"])
def test_scan_jsonl_trains_a_tokenizer_and_preprocesses(scan_jsonl, model_type, tmp_path, capsys):
    # The default --vocab-size 2048 is more than SCAN's text holds: a smaller vocabulary, logged.
    prefix = tmp_path / "spm"
    argv = ["tokenizer", "train", "--input", str(scan_jsonl), "--out", str(prefix)]
    assert main([*argv, "--model-type", model_type]) == 0, capsys.readouterr().err
    tokenizer = SentencePieceTokenizer(Path(f"{prefix}.model"))
    assert 263 < tokenizer.vocab_size < 2048
    out = capsys.readouterr().out
    assert "not the 2048 asked" in out
    assert f"trained a {tokenizer.vocab_size}-piece {model_type} tokenizer" in out
    text = "IN: walk twice OUT: I_WALK I_WALK"
    ids = tokenizer.tokenize(text)
    assert tokenizer.detokenize(ids) == text
    if model_type == "word":
        assert len(ids) == 6
        assert len(tokenizer.tokenize("I_TURN_LEFT")) == 1
    data = tmp_path / "data" / "scan"
    argv = ["preprocess", "--input", str(scan_jsonl), "--tokenizer", f"{prefix}.model"]
    assert main([*argv, "--out", str(data)]) == 0, capsys.readouterr().err
    dataset = open_indexed_dataset(data)
    lines = scan_jsonl.read_text(encoding="utf-8").splitlines()
    assert len(dataset) == len(lines) == 16728
    first = json.loads(lines[0])["text"]
    assert tokenizer.detokenize(dataset[0]) == first
    assert dataset[0].tolist() == [*tokenizer.tokenize(first), tokenizer.eod]


def test_tokenizer_train_symbols_are_single_pieces(scan_jsonl, tmp_path, capsys):
    argv = ["tokenizer", "train", "--input", str(scan_jsonl), "--max-docs", "2000"]
    assert main([*argv, "--out", str(tmp_path / "plain")]) == 0
    plain = SentencePieceTokenizer(tmp_path / "plain.model")
    assert len(plain.tokenize("I_TURN_LEFT")) > 1  # bpe alone splits it
    symbols = ["--symbols", "I_TURN_LEFT, I_TURN_RIGHT"]
    assert main([*argv, "--out", str(tmp_path / "sym"), *symbols]) == 0
    assert "and 2 symbol(s)" in capsys.readouterr().out
    tokenizer = SentencePieceTokenizer(tmp_path / "sym.model")
    left, right = tokenizer.token_to_id("I_TURN_LEFT"), tokenizer.token_to_id("I_TURN_RIGHT")
    assert (left, right) == (7, 8)  # after the pair tokens, in the order given
    ids = tokenizer.tokenize("OUT: I_TURN_LEFT I_TURN_RIGHT I_TURN_LEFT")
    assert ids.count(left) == 2 and ids.count(right) == 1
    assert main([*argv, "--out", str(tmp_path / "bad"), "--symbols", "I_TURN LEFT"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "whitespace" in err and "'I_TURN LEFT'" in err


# --- dotted overrides anywhere after the command -------------------------------------------------

TINY = str(REPO / "configs" / "tiny.yaml")


def orders(command: list[str], options: list[str], first: str, second: str) -> list[list[str]]:
    """Every place a user types two overrides: before, between and after the options, with and
    without the config file; each line sets ``first`` before ``second``."""
    return [
        [*command, TINY, first, second, *options],
        [*command, TINY, *options, first, second],
        [*command, TINY, first, *options, second],
        [*command, *options, TINY, first, second],
        [*command, first, *options, second],
        [*command, *options, first, second],
        [*command, first, second, *options],
    ]


@pytest.mark.parametrize(
    ("command", "options"),
    [
        (["train"], ["--resume"]),
        (["bench"], ["--steps", "2", "--no-baseline", "--json", "figures.json"]),
        (["submit"], ["--nodes", "2", "--dry-run", "--sbatch=--mail-type=END"]),
        (["plan"], ["--gpu-memory", "80GiB", "--nodes", "2"]),
        (["experiment", "ablation"], ["--out", "study", "--reevaluate"]),
    ],
)
def test_overrides_parse_in_every_position(command: list[str], options: list[str]) -> None:
    expected = parse_args([*command, TINY, *options])
    for argv in orders(command, options, "train.steps=3", "experiment.seeds=[1,2]"):
        args = parse_args(argv)
        assert args.overrides == ["train.steps=3", "experiment.seeds=[1,2]"], argv
        assert args.config == (TINY if TINY in argv else None), argv
        options_of = {k: v for k, v in vars(args).items() if k not in ("config", "overrides")}
        assert options_of == {
            k: v for k, v in vars(expected).items() if k not in ("config", "overrides")
        }, argv


def test_an_override_value_may_hold_equals_signs_or_be_empty() -> None:
    args = parse_args(["plan", "data.path=a=b", "--nodes", "1", "run.name="])
    assert (args.config, args.overrides) == (None, ["data.path=a=b", "run.name="])


def test_a_yaml_first_positional_is_the_config_even_with_an_equals_sign() -> None:
    args = parse_args(["train", "runs/lr=1e-3/config.yaml", "--resume", "train.steps=3"])
    assert (args.config, args.overrides) == ("runs/lr=1e-3/config.yaml", ["train.steps=3"])


def test_submit_dry_run_takes_overrides_in_every_position(tmp_path: Path, capsys) -> None:
    first, last = tmp_path / "first", tmp_path / "last"
    options = ["--nodes", "1", "--gpus-per-node", "1", "--dry-run"]
    scripts = []
    for argv in orders(["submit"], options, f"run.dir={first}", f"run.dir={last}"):
        assert main(argv) == 0, capsys.readouterr().err
        scripts.append(capsys.readouterr().out)
    assert f"RUN_DIR={last}\n" in scripts[0]  # the later override wins, wherever it stands
    assert all(script == scripts[0] for script in scripts)
    assert not first.exists() and not last.exists()


def test_plan_takes_overrides_in_every_position(tmp_path: Path, capsys) -> None:
    options = ["--nodes", "1", "--gpus-per-node", "1", "--gpu-memory", "80GiB"]
    plans = []
    for i, argv in enumerate(
        orders(["plan"], options, "train.micro_batch_size=1", "train.micro_batch_size=2")
    ):
        out = tmp_path / f"plan{i}.json"
        assert main([*argv, "--json", str(out)]) == 0, capsys.readouterr().err
        plans.append(json.loads(out.read_text()))
    single = tmp_path / "single.json"
    assert main(["plan", TINY, "train.micro_batch_size=2", *options, "--json", str(single)]) == 0
    assert all(plan == plans[0] for plan in plans)
    assert plans[0] == json.loads(single.read_text())
    assert plans[0]["micro_batch_size"] == 2  # the later override wins; tiny.yaml has 8


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["submit", TINY, "--dry-run", "--bogus", "train.steps=3"], "--bogus"),
        (["submit", TINY, "--bogus=train.steps=3", "--dry-run"], "--bogus=train.steps=3"),
        (["plan", TINY, "--train.steps=3"], "--train.steps=3"),
        (["train", TINY, "train.steps=3", "junk"], "junk"),
        (["plan", "--nodes", "1", TINY, "steps=3"], "steps=3"),
        (["plan", "train.steps=3", "--nodes", "1", TINY], TINY),  # the config file comes first
        (["status", "runs/tiny", "train.steps=3"], "train.steps=3"),  # takes no overrides
        (["train", "-x"], "-x"),
    ],
)
def test_what_is_neither_an_option_nor_an_override_is_an_argparse_error(
    argv: list[str], named: str, capsys
) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"unrecognized arguments: {named}" in err.splitlines()[-1]


def test_status_and_help_do_not_import_torch(tmp_path: Path) -> None:
    # A fresh interpreter: pytest itself has imported torch here.
    code = (
        "import json, sys\n"
        "from sci_scale.cli.main import main\n"
        f"assert main(['status', {str(tmp_path)!r}]) == 0\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ('torch', 'megatron', 'deepspeed', 'transformers')\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in heavy)))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []
