"""Arithmetic, COGS and user pair sources, and load_pair_examples."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import pytest

from sci_scale.data.pairs import (
    Example,
    PairDataError,
    arithmetic_examples,
    cogs_examples,
    cogs_template,
    heldout_templates,
    load_pair_examples,
    user_examples,
)

# The COGS directory the tests read (train.tsv, dev.tsv): $SCI_SCALE_COGS_DIR when set (e.g. the
# full COGS data), else the excerpt that ships with the tests (tests/data/cogs/README.md), so the
# COGS tests run on any checkout.
COGS_DIR = Path(os.environ.get("SCI_SCALE_COGS_DIR") or Path(__file__).parent / "data/cogs")
if not (COGS_DIR / "train.tsv").is_file():
    raise FileNotFoundError(f"SCI_SCALE_COGS_DIR: no train.tsv in {COGS_DIR}")


def tsv_lines(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


# --- arithmetic -----------------------------------------------------------------------------


def test_arithmetic_deterministic():
    a = arithmetic_examples(per_template=10, seed=3)
    assert a == arithmetic_examples(per_template=10, seed=3)
    assert a != arithmetic_examples(per_template=10, seed=4)
    assert all(isinstance(e, Example) and e.source == "arithmetic" for e in a)


def test_arithmetic_templates_and_counts():
    train = arithmetic_examples(per_template=5, seed=0)
    test = arithmetic_examples(per_template=5, seed=0, part="test")
    names = {e.template for e in train} | {e.template for e in test}
    assert len(names) >= 24
    assert set(Counter(e.template for e in train + test).values()) == {5}
    assert len({e.text for e in train}) == len(train)
    assert all(e.split == "train" for e in train) and all(e.split == "test" for e in test)


def test_arithmetic_equations_are_correct():
    for e in arithmetic_examples(per_template=20, seed=1, heldout_fraction=0.0):
        lhs, rhs = e.text.split(" A: ")[1].split(" = ")
        assert re.fullmatch(r"[0-9 +\-*/()]+", lhs)
        assert eval(lhs) == int(rhs), e.text  # digits and operators only
        assert int(rhs) >= 0


def test_arithmetic_heldout_templates_never_in_train():
    for seed in range(5):
        held = set(heldout_templates(seed))
        assert held
        train = arithmetic_examples(per_template=8, seed=seed)
        test = arithmetic_examples(per_template=8, seed=seed, part="test")
        assert not {e.template for e in train} & held
        assert {e.template for e in test} == held
        assert not {e.text for e in train} & {e.text for e in test}
        # the held-out set does not depend on how many problems are drawn
        assert {e.template for e in arithmetic_examples(2, seed, part="test")} == held
    assert len({tuple(heldout_templates(seed)) for seed in range(5)}) > 1
    assert arithmetic_examples(3, 0, heldout_fraction=0.0, part="test") == []


def test_arithmetic_bad_arguments():
    with pytest.raises(PairDataError):
        arithmetic_examples(3, 0, part="dev")
    with pytest.raises(PairDataError):
        arithmetic_examples(3, 0, heldout_fraction=1.0)


# --- COGS -----------------------------------------------------------------------------------


@pytest.fixture
def cogs_subset(tmp_path):
    lines = (COGS_DIR / "train.tsv").read_text(encoding="utf-8").splitlines()[:400]
    path = tmp_path / "train.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, lines


def test_cogs_parsing(cogs_subset):
    path, lines = cogs_subset
    examples = cogs_examples(path)
    assert len(examples) == len(lines)
    sentence, lf, _ = lines[0].split("\t")
    assert examples[0].text == f"IN: {sentence} OUT: {lf}"
    assert all(e.source == "cogs" and e.split == "train" for e in examples)
    assert cogs_examples(path, split="test")[0].split == "test"
    assert all("$" in e.template for e in examples)
    groups = Counter(e.template for e in examples)
    assert max(groups.values()) >= 10  # frames recur: templates have partners


def test_cogs_full_files_parse():
    dev = COGS_DIR / "dev.tsv"
    assert len(cogs_examples(dev, split="test")) == tsv_lines(dev)


def test_cogs_template_sharing():
    a = cogs_template(
        "Emma rolled a teacher .",
        "roll . agent ( x _ 1 , Emma ) AND roll . theme ( x _ 1 , x _ 3 ) AND teacher ( x _ 3 )",
    )
    b = cogs_template(
        "Liam ate a cake .",
        "eat . agent ( x _ 1 , Liam ) AND eat . theme ( x _ 1 , x _ 3 ) AND cake ( x _ 3 )",
    )
    assert a == b == ("$V . agent ( x _ 1 , $P ) AND $V . theme ( x _ 1 , x _ 3 ) AND $N ( x _ 3 )")
    c = cogs_template("The ball rolled .", "* ball ( x _ 1 ) ; roll . theme ( x _ 2 , x _ 1 )")
    d = cogs_template("The girl slept .", "* girl ( x _ 1 ) ; sleep . agent ( x _ 2 , x _ 1 )")
    assert c == "* $N ( x _ 1 ) ; $V . theme ( x _ 2 , x _ 1 )"
    assert c != d  # same surface frame, different thematic structure
    nmod = cogs_template(
        "A cat on the mat smiled .",
        "* mat ( x _ 4 ) ; cat ( x _ 1 ) AND cat . nmod . on ( x _ 1 , x _ 4 ) "
        "AND smile . agent ( x _ 5 , x _ 1 )",
    )
    assert "$N . nmod . on ( x _ 1 , x _ 4 )" in nmod
    assert cogs_template("Emma", "Emma") == "$P"
    assert cogs_template("ball", "LAMBDA a . ball ( a )") == "LAMBDA a . $N ( a )"


def test_cogs_malformed_lines_name_file_and_line(tmp_path):
    good = "The girl slept .\t* girl ( x _ 1 ) ; sleep . agent ( x _ 2 , x _ 1 )\tin_distribution"
    for bad in (
        "only one field",
        "A dog ran .\tdog ( x _ 1 ) AND run . agent ( x _ 2 , x _ 1\tin_distribution",
        "A dog ran .\t\tin_distribution",
        "A dog ran .\tdog ( x _ 9 )\tin_distribution",
        "a\tb\tc\td",
    ):
        path = tmp_path / "bad.tsv"
        path.write_text(f"{good}\n\n{bad}\n", encoding="utf-8")
        with pytest.raises(PairDataError, match=re.escape(f"{path}:3")):
            cogs_examples(path)
    with pytest.raises(PairDataError, match="cannot read"):
        cogs_examples(tmp_path / "missing.tsv")


# --- user JSONL -----------------------------------------------------------------------------


def test_user_examples_good(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [
        {"text": "IN: fly twice OUT: I_FLY I_FLY", "template": "$V twice"},
        {"text": "IN: swim twice OUT: I_SWIM I_SWIM", "template": "$V twice"},
        {"text": "held out", "template": "t2", "split": "test"},
        {"anchor": "a b", "partner": "c d", "template": "t3"},
    ]
    path.write_text(
        "\n".join(json.dumps(r) for r in rows[:2])
        + "\n\n   \n"
        + "\n".join(json.dumps(r) for r in rows[2:])
        + "\n",
        encoding="utf-8",
    )
    ex = user_examples(path)
    assert [e.text for e in ex] == [rows[0]["text"], rows[1]["text"], "held out", "a b", "c d"]
    assert ex[0] == Example(rows[0]["text"], "$V twice", "user", "train")
    assert ex[2].split == "test"
    assert ex[3].template == ex[4].template == "t3"


@pytest.mark.parametrize(
    "bad, message",
    [
        ("{not json", "malformed JSON"),
        ('{"template": "t"}', "missing key 'text'"),
        ('{"text": "x"}', "missing key 'template'"),
        ('["text", "template"]', "expected a JSON object"),
        ('{"text": 3, "template": "t"}', "non-empty string"),
        ('{"anchor": "x", "template": "t"}', "missing key 'partner'"),
    ],
)
def test_user_examples_malformed_line(tmp_path, bad, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"text": "ok", "template": "t"}\n\n' + bad + "\n", encoding="utf-8")
    with pytest.raises(PairDataError, match=re.escape(f"{path}:3")) as info:
        user_examples(path)
    assert message in str(info.value)


# --- load_pair_examples ---------------------------------------------------------------------


def test_load_pair_examples_sources(tmp_path):
    user = tmp_path / "u.jsonl"
    user.write_text(
        '{"text": "a", "template": "t"}\n{"text": "b", "template": "t", "split": "test"}\n',
        encoding="utf-8",
    )
    ex = load_pair_examples(
        ["arithmetic", "user"],
        seed=0,
        scan_split="simple",
        arithmetic_per_template=3,
        cogs_path=None,
        user_pairs_path=str(user),
    )
    assert Counter(e.source for e in ex)["user"] == 1  # the held-out user line is left out
    assert all(e.split == "train" for e in ex)
    scan = load_pair_examples(
        ["scan"],
        seed=0,
        scan_split="length",
        arithmetic_per_template=3,
        cogs_path=None,
        user_pairs_path=None,
    )
    assert len(scan) == 16990


def test_load_pair_examples_cogs_directory():
    ex = load_pair_examples(
        ["cogs"],
        seed=0,
        scan_split="simple",
        arithmetic_per_template=3,
        cogs_path=str(COGS_DIR),
        user_pairs_path=None,
    )
    assert len(ex) == tsv_lines(COGS_DIR / "train.tsv") and {e.source for e in ex} == {"cogs"}


def test_load_pair_examples_errors(tmp_path):
    kw = {"seed": 0, "scan_split": "simple", "arithmetic_per_template": 3}
    with pytest.raises(PairDataError, match="valid sources: scan, arithmetic, cogs, user"):
        load_pair_examples(["scan", "wiki"], cogs_path=None, user_pairs_path=None, **kw)
    with pytest.raises(PairDataError, match="'cogs' needs"):
        load_pair_examples(["cogs"], cogs_path=None, user_pairs_path=None, **kw)
    with pytest.raises(PairDataError, match="'user' needs"):
        load_pair_examples(["user"], cogs_path=None, user_pairs_path=None, **kw)
    with pytest.raises(PairDataError, match="COGS data not found"):
        load_pair_examples(["cogs"], cogs_path=str(tmp_path), user_pairs_path=None, **kw)
    with pytest.raises(PairDataError, match="valid splits"):
        load_pair_examples(
            ["scan"], cogs_path=None, user_pairs_path=None, **{**kw, "scan_split": "x"}
        )
