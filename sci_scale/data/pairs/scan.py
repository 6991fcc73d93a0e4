"""SCAN (Lake & Baroni 2018), generated from its grammar, with the published splits.

Grammar (the published one; enumerating it gives exactly the 20,910 commands of the task set)::

    C  -> S | S and S | S after S
    S  -> V | V twice | V thrice
    V  -> D | U | U' opposite dir | U' around dir
    D  -> U dir | turn dir
    U  -> walk | look | run | jump
    U' -> U | turn
    dir -> left | right

Meaning (T = the turn action of dir, [u] = the action of u, [turn] is empty): ``u dir`` = T [u];
``turn dir`` = T; ``x opposite dir`` = T T [x]; ``x around dir`` = (T [x]) four times;
``twice``/``thrice`` repeat the phrase; ``a and b`` = [a][b]; ``a after b`` = [b][a].

Splits follow the published rules, and their sizes equal the published line counts
(train / test):

=========================== ======= ======= ===============================================
split                        train   test    rule
=========================== ======= ======= ===============================================
simple                       16,728  4,182  the published random 80/20 draw (scan_simple)
length                       16,990  3,920  test: action sequences longer than 22 actions
addprim_jump                 14,670  7,706  train: commands without "jump" + bare "jump" (*)
addprim_turn_left            21,890  1,208  train: commands without "turn left" + bare "turn left"
template_around_right        15,225  4,476  test: contains "(walk|look|run|jump) around right"
template_jump_around_right   18,528  1,173  test: contains "jump around right"
template_opposite_right      15,225  4,476  test: contains "(walk|look|run|jump) opposite right"
template_right               15,225  4,476  test: contains "(walk|look|run|jump) right"
=========================== ======= ======= ===============================================

(*) The published add-primitive train files repeat the bare primitive line so that it makes up
exactly 10% of the lines: 13,203 jump-free commands + "jump" x 1,467 = 14,670 lines, and
19,701 commands without "turn left" + "turn left" x 2,189 = 21,890. The generator does the same
(repeats = other lines / 9), so the train part of these splits holds repeated lines; the test part
is every other command containing the primitive (the bare primitive itself is train-only).

In the template splits, commands containing the "turn" variant of the held-out phrase ("turn
around right", "turn opposite right", "turn right") are dropped from both parts, as in the
published files; a command holding both a held-out phrase and the dropped one is dropped too.
Phrases are matched on whole words (so "walk right" does not match "walk around right").

Membership of every split is the published one: fixed by its rule, and for ``simple`` (a random
draw) read from the published file's membership (:mod:`.scan_simple`). ``seed`` only orders a
train part (shuffled, like the published files); a test part's order never depends on it, so
scoring is the same whatever seed a model was trained with.

A *combined* split ``a+b`` trains one model for several evaluations without leaking any of
them: its train part holds the lines of ``a``'s train part whose command is also in the train
part of every other component, and its test part is every command some component holds out. A
model trained on ``length+template_around_right`` has seen none of the length split's test
commands and none of the template split's, so both of those test parts measure generalization.
"""

from __future__ import annotations

import functools
import random
from typing import Literal

from sci_scale.data.pairs.base import Example, PairDataError
from sci_scale.data.pairs.scan_simple import in_simple_test

PRIMITIVES: tuple[str, ...] = ("walk", "look", "run", "jump")
DIRECTIONS: tuple[str, ...] = ("left", "right")
ACTIONS: dict[str, str] = {
    "walk": "I_WALK",
    "look": "I_LOOK",
    "run": "I_RUN",
    "jump": "I_JUMP",
}
TURNS: dict[str, str] = {"left": "I_TURN_LEFT", "right": "I_TURN_RIGHT"}
REPEATS: dict[str, int] = {"twice": 2, "thrice": 3}
CONJUNCTIONS: tuple[str, ...] = ("and", "after")

#: The placeholder that replaces a primitive verb in :func:`scan_template`.
VERB_SLOT = "$V"

SCAN_SPLITS: tuple[str, ...] = (
    "simple",
    "length",
    "addprim_jump",
    "addprim_turn_left",
    "template_around_right",
    "template_jump_around_right",
    "template_opposite_right",
    "template_right",
)

NUM_COMMANDS = 20910
#: Length split: train holds action sequences of at most this many actions (no command has 23).
LENGTH_SPLIT_MAX_TRAIN_ACTIONS = 22

# Add-primitive splits: the primitive, and the repeats rule (it is 1/10 of the train lines).
_ADDPRIM: dict[str, str] = {"addprim_jump": "jump", "addprim_turn_left": "turn left"}
_ADDPRIM_SHARE_DENOMINATOR = 10

# Template splits: (held-out phrases, phrase dropped from both parts).
_TEMPLATE: dict[str, tuple[tuple[str, ...], str]] = {
    "template_around_right": (tuple(f"{u} around right" for u in PRIMITIVES), "turn around right"),
    "template_jump_around_right": (("jump around right",), "turn around right"),
    "template_opposite_right": (
        tuple(f"{u} opposite right" for u in PRIMITIVES),
        "turn opposite right",
    ),
    "template_right": (tuple(f"{u} right" for u in PRIMITIVES), "turn right"),
}


def _verb_phrases() -> list[str]:
    """Every V of the grammar, in a fixed order (34 of them)."""
    phrases: list[str] = list(PRIMITIVES)
    phrases += [f"{u} {d}" for u in (*PRIMITIVES, "turn") for d in DIRECTIONS]
    for mod in ("opposite", "around"):
        phrases += [f"{u} {mod} {d}" for u in (*PRIMITIVES, "turn") for d in DIRECTIONS]
    return phrases


@functools.lru_cache(maxsize=1)
def _commands() -> tuple[str, ...]:
    simple = [f"{v}{r}" for v in _verb_phrases() for r in ("", " twice", " thrice")]
    out = list(simple)
    out += [f"{a} {conj} {b}" for a in simple for conj in CONJUNCTIONS for b in simple]
    assert len(out) == NUM_COMMANDS == len(set(out))
    return tuple(out)


def enumerate_commands() -> list[str]:
    """All 20,910 distinct SCAN commands, in a fixed order (single phrases first, then
    ``S and S`` / ``S after S`` in grammar order)."""
    return list(_commands())


def _interpret_verb(words: list[str], command: str) -> list[str]:
    n = len(words)
    if n == 1 and words[0] in ACTIONS:
        return [ACTIONS[words[0]]]
    if n in (2, 3) and words[-1] in TURNS and (words[0] in ACTIONS or words[0] == "turn"):
        turn = TURNS[words[-1]]
        act = [ACTIONS[words[0]]] if words[0] in ACTIONS else []
        if n == 2:
            return [turn, *act]
        if words[1] == "opposite":
            return [turn, turn, *act]
        if words[1] == "around":
            return [turn, *act] * 4
    raise PairDataError(f"not a SCAN command: {command!r} (bad phrase {' '.join(words)!r})")


def _interpret_simple(words: list[str], command: str) -> list[str]:
    if words and words[-1] in REPEATS:
        return _interpret_verb(words[:-1], command) * REPEATS[words[-1]]
    return _interpret_verb(words, command)


def _interpret_uncached(command: str) -> list[str]:
    words = command.split()
    conj = [i for i, w in enumerate(words) if w in CONJUNCTIONS]
    if not conj:
        return _interpret_simple(words, command)
    if len(conj) > 1:
        raise PairDataError(f"not a SCAN command: {command!r} (more than one conjunction)")
    i = conj[0]
    left = _interpret_simple(words[:i], command)
    right = _interpret_simple(words[i + 1 :], command)
    return left + right if words[i] == "and" else right + left


@functools.lru_cache(maxsize=1)
def _table() -> dict[str, tuple[str, ...]]:
    """Every command's action sequence."""
    return {c: tuple(_interpret_uncached(c)) for c in _commands()}


def interpret(command: str) -> list[str]:
    """The action sequence of a SCAN command (the published semantics).

    >>> interpret("walk twice after run")
    ['I_RUN', 'I_WALK', 'I_WALK']

    Raises :class:`PairDataError` for a string the grammar does not generate.
    """
    cached = _table().get(" ".join(command.split()))
    if cached is None:
        _interpret_uncached(command)  # raises with the reason
        raise PairDataError(f"not a SCAN command: {command!r}")
    return list(cached)


def format_scan_line(command: str, actions: list[str]) -> str:
    """One line of the published SCAN files: ``IN: <command> OUT: <actions>`` (no newline)."""
    return f"IN: {command} OUT: {' '.join(actions)}"


def scan_template(command: str) -> str:
    """The structural template of a command: primitive verbs (walk, look, run, jump) become
    ``$V``; "turn", directions, "opposite", "around", "twice", "thrice", "and", "after" are kept.

    "turn" is structure, not content: "turn left" means a bare turn, so treating it as a verb
    would make "turn left" and "walk left" positives although their meanings differ. Over the
    20,910 commands this gives 3,081 templates; 666 hold a single command (those with no
    primitive verb at all) and the largest hold 16 (e.g. "$V left and $V right").
    """
    interpret(command)  # validates
    return " ".join(VERB_SLOT if w in ACTIONS else w for w in command.split())


def _contains(command: str, phrase: str) -> bool:
    return f" {phrase} " in f" {command} "


def _check_split(split: str) -> None:
    for component in split.split("+"):
        if component not in SCAN_SPLITS:
            raise PairDataError(
                f"unknown SCAN split {component!r}; valid splits: {', '.join(SCAN_SPLITS)} "
                "(or several joined by '+', e.g. length+template_around_right)"
            )


def _combined_split(
    components: list[str], part: Literal["train", "test"], seed: int
) -> list[tuple[str, list[str]]]:
    """A combined split (see the module docstring): train parts intersected, tests united."""
    parts = [scan_split(c, part, seed) for c in components]
    if part == "train":
        allowed = set.intersection(*({c for c, _ in p} for p in parts[1:]))
        return [(c, a) for c, a in parts[0] if c in allowed]
    seen: set[str] = set()
    united = []
    for command, actions in (line for p in parts for line in p):
        if command not in seen:
            seen.add(command)
            united.append((command, actions))
    return united


def _is_test(split: str, command: str, acts: tuple[str, ...]) -> bool | None:
    """True: test; False: train; None: in neither part. (Not for ``simple``.)"""
    if split == "length":
        return len(acts) > LENGTH_SPLIT_MAX_TRAIN_ACTIONS
    if split in _ADDPRIM:
        prim = _ADDPRIM[split]
        if command == prim:
            return None  # added to train as repeated lines, see scan_split
        return _contains(command, prim)
    held, dropped = _TEMPLATE[split]
    if _contains(command, dropped):
        return None
    return any(_contains(command, p) for p in held)


def scan_split(
    split: str, part: Literal["train", "test"], seed: int = 0
) -> list[tuple[str, list[str]]]:
    """``(command, actions)`` of one part of a published SCAN split (see the module docstring).

    The add-primitive splits' train part repeats the bare primitive (1,467 x "jump",
    2,189 x "turn left") as the published files do, so it holds duplicate lines.
    """
    _check_split(split)
    if part not in ("train", "test"):
        raise PairDataError(f"unknown SCAN split part {part!r}; valid parts: train, test")
    if "+" in split:
        return _combined_split(split.split("+"), part, seed)
    table = _table()
    order = list(_commands())
    # The test part's order is fixed (a limit always scores the same commands, whatever the
    # training seed); the train part's order follows the seed.
    rng = random.Random(f"scan:{split}:{seed if part == 'train' else 'test'}")
    if split == "simple":
        want_test = part == "test"
        chosen = [c for i, c in enumerate(order) if in_simple_test(i) is want_test]
        rng.shuffle(chosen)
    else:
        rng.shuffle(order)
        want_test = part == "test"
        chosen = [c for c in order if _is_test(split, c, table[c]) is want_test]
        if split in _ADDPRIM and part == "train":
            prim = _ADDPRIM[split]
            chosen += [prim] * (len(chosen) // (_ADDPRIM_SHARE_DENOMINATOR - 1))
            rng.shuffle(chosen)
    return [(c, list(table[c])) for c in chosen]


def scan_examples(
    split: str, seed: int = 0, part: Literal["train", "test"] = "train"
) -> list[Example]:
    """Structural examples from one part of a SCAN split: by default the train part only, so
    held-out (test) commands never appear; ``part="test"`` gives the held-out examples (with
    ``Example.split == "test"``) for evaluation.

    Repeated lines of the add-primitive train parts are kept once: an identical anchor and
    partner would be a trivial positive.
    """
    seen: set[str] = set()
    out: list[Example] = []
    for command, actions in scan_split(split, part, seed):
        if command in seen:
            continue
        seen.add(command)
        out.append(
            Example(format_scan_line(command, actions), scan_template(command), "scan", part)
        )
    return out
