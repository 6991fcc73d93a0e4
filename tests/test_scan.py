"""SCAN generated from its grammar: the task set, the semantics, the published splits."""

from __future__ import annotations

from collections import Counter

import pytest

from sci_scale.data.pairs import (
    SCAN_SPLITS,
    PairDataError,
    enumerate_commands,
    format_scan_line,
    interpret,
    scan_examples,
    scan_split,
    scan_template,
)

PUBLISHED = {
    "simple": (16728, 4182),
    "length": (16990, 3920),
    "addprim_jump": (14670, 7706),
    "addprim_turn_left": (21890, 1208),
    "template_around_right": (15225, 4476),
    "template_jump_around_right": (18528, 1173),
    "template_opposite_right": (15225, 4476),
    "template_right": (15225, 4476),
}

L, R = "I_TURN_LEFT", "I_TURN_RIGHT"


def test_task_set_size_and_distinct():
    cmds = enumerate_commands()
    assert len(cmds) == 20910
    assert len(set(cmds)) == 20910
    assert enumerate_commands() == cmds  # deterministic
    assert max(len(c.split()) for c in cmds) == 9
    assert max(len(interpret(c)) for c in cmds) == 48


def test_split_names():
    assert set(SCAN_SPLITS) == set(PUBLISHED)


@pytest.mark.parametrize(
    "command, actions",
    [
        ("walk", ["I_WALK"]),
        ("turn left", [L]),
        ("jump left", [L, "I_JUMP"]),
        ("jump around right", [R, "I_JUMP"] * 4),
        ("turn opposite left", [L, L]),
        ("turn around right", [R] * 4),
        ("run opposite right", [R, R, "I_RUN"]),
        ("walk twice after run", ["I_RUN", "I_WALK", "I_WALK"]),
        ("look left and jump", [L, "I_LOOK", "I_JUMP"]),
        ("look thrice", ["I_LOOK"] * 3),
        ("jump after look left twice", [L, "I_LOOK", L, "I_LOOK", "I_JUMP"]),
        ("walk opposite left thrice and turn right", [L, L, "I_WALK"] * 3 + [R]),
    ],
)
def test_interpret(command, actions):
    assert interpret(command) == actions


@pytest.mark.parametrize(
    "bad", ["", "fly", "walk and", "walk twice twice", "walk and run after look"]
)
def test_interpret_rejects_non_commands(bad):
    with pytest.raises(PairDataError):
        interpret(bad)


def test_format_scan_line():
    cmd = "jump opposite right twice"
    assert format_scan_line(cmd, interpret(cmd)) == (
        "IN: jump opposite right twice OUT: I_TURN_RIGHT I_TURN_RIGHT I_JUMP "
        "I_TURN_RIGHT I_TURN_RIGHT I_JUMP"
    )
    assert format_scan_line("walk", ["I_WALK"]) == "IN: walk OUT: I_WALK"


@pytest.mark.parametrize("split", sorted(PUBLISHED))
def test_split_counts_and_disjointness(split):
    train = scan_split(split, "train")
    test = scan_split(split, "test")
    assert (len(train), len(test)) == PUBLISHED[split]
    train_cmds = {c for c, _ in train}
    test_cmds = {c for c, _ in test}
    assert len(test_cmds) == len(test)  # test parts never repeat a line
    assert not train_cmds & test_cmds
    for c, acts in train[:50] + test[:50]:
        assert acts == interpret(c)
    if not split.startswith("addprim"):
        assert len(train_cmds) == len(train)


def test_addprim_repeats_the_primitive():
    for split, prim, n_other, reps in (
        ("addprim_jump", "jump", 13203, 1467),
        ("addprim_turn_left", "turn left", 19701, 2189),
    ):
        counts = Counter(c for c, _ in scan_split(split, "train"))
        assert counts[prim] == reps
        assert len(counts) - 1 == n_other
        assert all(f" {prim} " not in f" {c} " for c in counts if c != prim)
        assert all(f" {prim} " in f" {c} " for c, _ in scan_split(split, "test"))


def test_length_split_rule():
    train = scan_split("length", "train")
    test = scan_split("length", "test")
    assert max(len(a) for _, a in train) == 22
    assert min(len(a) for _, a in test) == 24
    assert all(len(a) > 22 for _, a in test)


def test_template_split_rules():
    test = {c for c, _ in scan_split("template_around_right", "test")}
    train = {c for c, _ in scan_split("template_around_right", "train")}
    assert "jump around right" in test and "walk around right and turn left" in test
    assert "jump around left" in train
    assert all("turn around right" not in c for c in train | test)
    jar = {c for c, _ in scan_split("template_jump_around_right", "test")}
    assert all("jump around right" in c for c in jar)
    assert "walk around right" in {c for c, _ in scan_split("template_jump_around_right", "train")}
    right_train = {c for c, _ in scan_split("template_right", "train")}
    assert "walk around right" in right_train and "walk right" not in right_train


def test_simple_split_is_the_published_draw_whatever_the_seed():
    """Membership is the published file's (a few commands of tasks_test_simple.txt, read from
    github.com/brendenlake/SCAN); the seed only orders the train part."""
    a = scan_split("simple", "train", seed=0)
    assert a == scan_split("simple", "train", seed=0)
    assert a != scan_split("simple", "train", seed=1)
    assert {c for c, _ in a} == {c for c, _ in scan_split("simple", "train", seed=1)}
    test = {c for c, _ in scan_split("simple", "test", seed=5)}
    published_test = [
        "turn opposite right thrice and turn opposite left",
        "run right twice after walk right twice",
    ]
    assert all(c in test for c in published_test)
    published_train = ["jump opposite right twice and turn opposite right thrice",
                       "run opposite left after walk right"]  # fmt: skip
    assert not any(c in test for c in published_train)
    assert scan_split("simple", "test", seed=0) == scan_split("simple", "test", seed=9)


@pytest.mark.parametrize("seed", [0, 3])
def test_combined_split_trains_on_what_every_component_trains_on(seed):
    components = ["simple", "length", "template_around_right"]
    combined = "+".join(components)
    train = {c for c, _ in scan_split(combined, "train", seed)}
    test = {c for c, _ in scan_split(combined, "test", seed)}
    parts = {c: ({x for x, _ in scan_split(c, "train", seed)},
                 {x for x, _ in scan_split(c, "test", seed)}) for c in components}  # fmt: skip
    assert train == set.intersection(*(tr for tr, _ in parts.values()))
    assert test == set.union(*(te for _, te in parts.values()))
    for _, component_test in parts.values():
        assert not train & component_test  # no evaluated test command is ever trained on
    assert len(train) == len(scan_split(combined, "train", seed))  # no repeated lines
    examples = scan_examples(combined, seed=seed)
    assert {e.text.removeprefix("IN: ").split(" OUT:")[0] for e in examples} == train


def test_combined_split_names_the_unknown_component():
    with pytest.raises(PairDataError, match=r"unknown SCAN split 'lenght'.*joined by '\+'"):
        scan_split("simple+lenght", "train")


def test_unknown_split_or_part():
    with pytest.raises(PairDataError, match="valid splits"):
        scan_split("nope", "train")
    with pytest.raises(PairDataError):
        scan_split("simple", "dev")  # type: ignore[arg-type]


def test_template_properties():
    assert scan_template("walk twice") == "$V twice"
    assert scan_template("walk twice") == scan_template("run twice")
    assert scan_template("walk twice") != scan_template("walk thrice")
    assert scan_template("turn left") == "turn left"
    assert scan_template("turn left") != scan_template("walk left")
    assert scan_template("jump around right after look") == "$V around right after $V"


def test_template_statistics():
    groups = Counter(scan_template(c) for c in enumerate_commands())
    assert len(groups) == 3081
    assert sum(1 for n in groups.values() if n == 1) == 666
    assert max(groups.values()) == 16


@pytest.mark.parametrize("split", sorted(PUBLISHED))
def test_scan_examples_never_contain_test_commands(split):
    examples = scan_examples(split, seed=0)
    test_lines = {format_scan_line(c, a) for c, a in scan_split(split, "test", seed=0)}
    assert examples
    assert not {e.text for e in examples} & test_lines
    assert all(e.source == "scan" and e.split == "train" for e in examples)
    assert len({e.text for e in examples}) == len(examples)
    e = examples[0]
    command = e.text.removeprefix("IN: ").split(" OUT: ")[0]
    assert e.template == scan_template(command)


def test_scan_examples_heldout_part():
    held = scan_examples("length", seed=0, part="test")
    assert len(held) == 3920 and all(e.split == "test" for e in held)
