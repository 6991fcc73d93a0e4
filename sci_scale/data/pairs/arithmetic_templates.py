"""The arithmetic problem frames and the words that fill them.

Each template fixes a problem's operations and their order; its fillers (names, objects,
numbers) are drawn from the ``random.Random`` it is given, so one template yields many problems
of one structure. Kept apart from the generation and the held-out split in ``arithmetic`` so
that adding a frame touches only this table.
"""

from __future__ import annotations

import random
from collections.abc import Callable

NAMES: tuple[str, ...] = (
    "Mia", "Omar", "Lena", "Ravi", "Sofia", "Jamal", "Aiko", "Lucas", "Nadia", "Tom",
    "Priya", "Carlos", "Hana", "Ben", "Zara", "Ivan", "Chloe", "Kofi", "Elena", "Sam",
    "Yuki", "Diego", "Amara", "Felix",
)  # fmt: skip
# (singular, plural) countable things that people collect, carry and share.
THINGS: tuple[tuple[str, str], ...] = (
    ("apple", "apples"), ("pencil", "pencils"), ("marble", "marbles"), ("sticker", "stickers"),
    ("book", "books"), ("cookie", "cookies"), ("shell", "shells"), ("card", "cards"),
    ("balloon", "balloons"), ("stamp", "stamps"), ("orange", "oranges"), ("toy car", "toy cars"),
    ("crayon", "crayons"), ("button", "buttons"), ("cupcake", "cupcakes"), ("ribbon", "ribbons"),
)  # fmt: skip
FOODS: tuple[str, ...] = (
    "apples", "cookies", "cupcakes", "grapes", "strawberries", "crackers", "muffins", "plums",
)  # fmt: skip
# (singular, plural) things with a price.
GOODS: tuple[tuple[str, str], ...] = (
    ("notebook", "notebooks"), ("pen", "pens"), ("ticket", "tickets"), ("sandwich", "sandwiches"),
    ("toy", "toys"), ("plant", "plants"), ("mug", "mugs"), ("puzzle", "puzzles"),
    ("scarf", "scarves"), ("kite", "kites"),
)  # fmt: skip
CONTAINERS: tuple[str, ...] = ("boxes", "bags", "jars", "baskets", "crates", "packs")

Problem = tuple[str, str]  # (problem text, equation)


def _two_names(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(NAMES, 2)
    return a, b


def _add_buy(r: random.Random) -> Problem:
    n, (_, o), a, b = r.choice(NAMES), r.choice(THINGS), r.randint(2, 60), r.randint(2, 40)
    return (
        f"{n} has {a} {o} and buys {b} more. How many {o} does {n} have now?",
        f"{a} + {b} = {a + b}",
    )


def _add_gift(r: random.Random) -> Problem:
    (n, m), (_, o), a, b = _two_names(r), r.choice(THINGS), r.randint(2, 60), r.randint(2, 40)
    return (
        f"{n} had {a} {o}. {m} gave {n} {b} more {o}. How many {o} does {n} have?",
        f"{a} + {b} = {a + b}",
    )


def _add_together(r: random.Random) -> Problem:
    (n, m), (_, o), a, b = _two_names(r), r.choice(THINGS), r.randint(2, 80), r.randint(2, 80)
    return (
        f"{n} has {a} {o} and {m} has {b} {o}. How many {o} do they have together?",
        f"{a} + {b} = {a + b}",
    )


def _add_three_days(r: random.Random) -> Problem:
    n, a, b, c = r.choice(NAMES), r.randint(5, 60), r.randint(5, 60), r.randint(5, 60)
    return (
        (
            f"{n} read {a} pages on Monday, {b} pages on Tuesday and {c} pages on Wednesday. "
            f"How many pages did {n} read in total?"
        ),
        f"{a} + {b} + {c} = {a + b + c}",
    )


def _sub_eat(r: random.Random) -> Problem:
    n, f = r.choice(NAMES), r.choice(FOODS)
    a = r.randint(5, 60)
    b = r.randint(1, a - 1)
    return (
        f"{n} has {a} {f} and eats {b} of them. How many {f} are left?",
        f"{a} - {b} = {a - b}",
    )


def _sub_give(r: random.Random) -> Problem:
    (n, m), (_, o) = _two_names(r), r.choice(THINGS)
    a = r.randint(5, 80)
    b = r.randint(1, a - 1)
    return (
        f"{n} had {a} {o} and gave {b} of them to {m}. How many {o} does {n} have left?",
        f"{a} - {b} = {a - b}",
    )


def _sub_compare(r: random.Random) -> Problem:
    (n, m), (_, o) = _two_names(r), r.choice(THINGS)
    a = r.randint(10, 90)
    b = r.randint(1, a - 1)
    return (
        f"{n} has {a} {o}. {m} has {b} {o}. How many more {o} does {n} have than {m}?",
        f"{a} - {b} = {a - b}",
    )


def _sub_spend(r: random.Random) -> Problem:
    n, (g, _) = r.choice(NAMES), r.choice(GOODS)
    a = r.randint(10, 100)
    b = r.randint(1, a - 1)
    return (
        f"{n} had {a} dollars and spent {b} dollars on a {g}. How much money does {n} have left?",
        f"{a} - {b} = {a - b}",
    )


def _mul_containers(r: random.Random) -> Problem:
    c, (_, o), a, b = r.choice(CONTAINERS), r.choice(THINGS), r.randint(2, 12), r.randint(2, 12)
    return (
        f"There are {a} {c} with {b} {o} in each. How many {o} are there in all?",
        f"{a} * {b} = {a * b}",
    )


def _mul_price(r: random.Random) -> Problem:
    n, (g, gs), a, b = r.choice(NAMES), r.choice(GOODS), r.randint(2, 20), r.randint(2, 9)
    return (
        f"One {g} costs {a} dollars. How much does {n} pay for {b} {gs}?",
        f"{b} * {a} = {a * b}",
    )


def _mul_days(r: random.Random) -> Problem:
    n, a, b = r.choice(NAMES), r.randint(2, 15), r.randint(2, 9)
    return (
        f"{n} walks {a} kilometres every day. How many kilometres does {n} walk in {b} days?",
        f"{a} * {b} = {a * b}",
    )


def _mul_times_as_many(r: random.Random) -> Problem:
    (n, m), (_, o), a, b = _two_names(r), r.choice(THINGS), r.randint(2, 20), r.randint(2, 6)
    return (
        f"{n} has {a} {o}. {m} has {b} times as many {o} as {n}. How many {o} does {m} have?",
        f"{b} * {a} = {a * b}",
    )


def _div_share(r: random.Random) -> Problem:
    n, (_, o), a, b = r.choice(NAMES), r.choice(THINGS), r.randint(2, 12), r.randint(2, 9)
    return (
        f"{n} shares {a * b} {o} equally among {b} friends. How many {o} does each friend get?",
        f"{a * b} / {b} = {a}",
    )


def _div_groups(r: random.Random) -> Problem:
    n, (_, o), a, b = r.choice(NAMES), r.choice(THINGS), r.randint(2, 12), r.randint(2, 9)
    return (
        f"{n} packs {a * b} {o} into bags of {b}. How many bags does {n} fill?",
        f"{a * b} / {b} = {a}",
    )


def _div_rate(r: random.Random) -> Problem:
    n, a, b = r.choice(NAMES), r.randint(5, 25), r.randint(2, 9)
    return (
        f"{n} earned {a * b} dollars in {b} hours. How many dollars did {n} earn per hour?",
        f"{a * b} / {b} = {a}",
    )


def _div_half(r: random.Random) -> Problem:
    (n, m), (_, o), a = _two_names(r), r.choice(THINGS), r.randint(2, 40)
    return (
        f"{n} has {2 * a} {o} and gives half of them to {m}. How many {o} does {m} get?",
        f"{2 * a} / 2 = {a}",
    )


def _buy_then_give(r: random.Random) -> Problem:
    n, (_, o), a, b = r.choice(NAMES), r.choice(THINGS), r.randint(2, 40), r.randint(2, 30)
    c = r.randint(1, a + b - 1)
    return (
        f"{n} has {a} {o}, buys {b} more and then gives {c} away. How many {o} does {n} have?",
        f"{a} + {b} - {c} = {a + b - c}",
    )


def _packs_plus(r: random.Random) -> Problem:
    n, (_, o) = r.choice(NAMES), r.choice(THINGS)
    a, b, c = r.randint(2, 9), r.randint(2, 12), r.randint(1, 30)
    return (
        f"{n} already had {c} {o} and buys {a} packs of {b} {o}. How many {o} does {n} have now?",
        f"{a} * {b} + {c} = {a * b + c}",
    )


def _change(r: random.Random) -> Problem:
    n, (_, gs), a, b = r.choice(NAMES), r.choice(GOODS), r.randint(2, 6), r.randint(2, 15)
    c = a * b + r.randint(1, 50)
    return (
        (
            f"{n} buys {a} {gs} at {b} dollars each and pays with {c} dollars. "
            f"How much change does {n} get?"
        ),
        f"{c} - {a} * {b} = {c - a * b}",
    )


def _split_then_add(r: random.Random) -> Problem:
    n, (_, o), a, b = r.choice(NAMES), r.choice(THINGS), r.randint(2, 12), r.randint(2, 6)
    c = r.randint(1, 20)
    return (
        (
            f"{n} splits {a * b} {o} into {b} equal piles and adds {c} more {o} to one pile. "
            f"How many {o} are in that pile?"
        ),
        f"{a * b} / {b} + {c} = {a + c}",
    )


def _rows_minus(r: random.Random) -> Problem:
    a, b = r.randint(2, 12), r.randint(2, 12)
    c = r.randint(1, a * b - 1)
    return (
        f"An orchard has {a} rows of {b} trees. {c} trees are cut down. How many trees are left?",
        f"{a} * {b} - {c} = {a * b - c}",
    )


def _compare_more(r: random.Random) -> Problem:
    (n, m), (_, o), a, b = _two_names(r), r.choice(THINGS), r.randint(2, 60), r.randint(1, 30)
    return (
        f"{n} has {a} {o}. {m} has {b} more {o} than {n}. How many {o} does {m} have?",
        f"{a} + {b} = {a + b}",
    )


def _compare_fewer(r: random.Random) -> Problem:
    (n, m), (_, o) = _two_names(r), r.choice(THINGS)
    a = r.randint(5, 60)
    b = r.randint(1, a - 1)
    return (
        f"{n} has {a} {o}. {m} has {b} fewer {o} than {n}. How many {o} does {m} have?",
        f"{a} - {b} = {a - b}",
    )


def _more_then_total(r: random.Random) -> Problem:
    (n, m), (_, o), a, b = _two_names(r), r.choice(THINGS), r.randint(2, 40), r.randint(1, 20)
    return (
        f"{n} has {a} {o}. {m} has {b} more {o} than {n}. How many {o} do they have together?",
        f"{a} + {a} + {b} = {2 * a + b}",
    )


def _square_perimeter(r: random.Random) -> Problem:
    a = r.randint(2, 50)
    thing = r.choice(("garden", "field", "tile", "table", "room", "playground"))
    return (
        f"A square {thing} has sides of {a} metres. What is its perimeter in metres?",
        f"4 * {a} = {4 * a}",
    )


def _rectangle_area(r: random.Random) -> Problem:
    a, b = r.randint(2, 20), r.randint(2, 20)
    thing = r.choice(("garden", "field", "rug", "wall", "room", "pool"))
    return (
        (
            f"A rectangular {thing} is {a} metres long and {b} metres wide. "
            f"What is its area in square metres?"
        ),
        f"{a} * {b} = {a * b}",
    )


def _age_later(r: random.Random) -> Problem:
    (n, m), a, b, c = _two_names(r), r.randint(3, 40), r.randint(1, 15), r.randint(1, 10)
    return (
        f"{n} is {a} years old. {m} is {b} years older than {n}. How old will {m} be in {c} years?",
        f"{a} + {b} + {c} = {a + b + c}",
    )


def _average_three(r: random.Random) -> Problem:
    n, a, b = r.choice(NAMES), r.randint(40, 100), r.randint(40, 100)
    c = r.randint(40, 100)
    c -= (a + b + c) % 3  # a whole-number mean
    return (
        (
            f"{n} scored {a}, {b} and {c} points in three games. "
            f"What was {n}'s average score per game?"
        ),
        f"({a} + {b} + {c}) / 3 = {(a + b + c) // 3}",
    )


def _weeks_to_save(r: random.Random) -> Problem:
    n, (g, _), a, b = r.choice(NAMES), r.choice(GOODS), r.randint(2, 20), r.randint(2, 12)
    return (
        (
            f"{n} saves {a} dollars a week to buy a {g} that costs {a * b} dollars. "
            f"How many weeks does {n} need to save?"
        ),
        f"{a * b} / {a} = {b}",
    )


def _remaining_after_two(r: random.Random) -> Problem:
    (n, m), f = _two_names(r), r.choice(FOODS)
    a = r.randint(10, 80)
    b = r.randint(1, a // 2)
    c = r.randint(1, a - b - 1)
    return (
        (
            f"There were {a} {f} on a plate. {n} ate {b} and {m} ate {c}. "
            f"How many {f} are left on the plate?"
        ),
        f"{a} - {b} - {c} = {a - b - c}",
    )


#: Template name -> generator of (problem, equation); the name is the structural template id.
TEMPLATES: dict[str, Callable[[random.Random], Problem]] = {
    "add_buy": _add_buy,
    "add_gift": _add_gift,
    "add_together": _add_together,
    "add_three_days": _add_three_days,
    "sub_eat": _sub_eat,
    "sub_give": _sub_give,
    "sub_compare": _sub_compare,
    "sub_spend": _sub_spend,
    "mul_containers": _mul_containers,
    "mul_price": _mul_price,
    "mul_days": _mul_days,
    "mul_times_as_many": _mul_times_as_many,
    "div_share": _div_share,
    "div_groups": _div_groups,
    "div_rate": _div_rate,
    "div_half": _div_half,
    "buy_then_give": _buy_then_give,
    "packs_plus": _packs_plus,
    "change": _change,
    "split_then_add": _split_then_add,
    "rows_minus": _rows_minus,
    "compare_more": _compare_more,
    "compare_fewer": _compare_fewer,
    "more_then_total": _more_then_total,
    "square_perimeter": _square_perimeter,
    "rectangle_area": _rectangle_area,
    "age_later": _age_later,
    "average_three": _average_three,
    "weeks_to_save": _weeks_to_save,
    "remaining_after_two": _remaining_after_two,
}
