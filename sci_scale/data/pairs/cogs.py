"""COGS (Kim & Linzen 2020) examples read from its TSV files, with structural templates.

A COGS line is ``sentence \\t logical form \\t generalization type``, e.g.::

    Emma slept .	sleep . agent ( x _ 1 , Emma )	in_distribution

The structural template is the logical form with its lexical items replaced by typed slots, read
off the predicates: a one-place predicate ``noun ( x _ i )`` is a noun (``$N``), the head of
``noun . nmod . prep ( .. )`` too (the preposition is kept), the head of any other dotted
predicate ``verb . role ( .. )`` is a verb (``$V``; the thematic role is kept), and a capitalised
argument is a proper name (``$P``). Variables (``x _ i`` -- ``i`` is the word position in the
sentence -- and the lambda variables of primitives), definiteness (``*``), roles, ``AND``,
``;`` and ``LAMBDA`` are kept. So "Emma rolled a teacher ." and "Liam ate a cake ." share the
template ``$V . agent ( x _ 1 , $P ) AND $V . theme ( x _ 1 , x _ 3 ) AND $N ( x _ 3 )``,
while "The ball rolled ." (theme subject) gets another: the template is the syntactic frame
together with its thematic structure.

The path is always an argument: the project never depends on where the data lies.
"""

from __future__ import annotations

from pathlib import Path

from sci_scale.data.pairs.base import Example, PairDataError, where

NOUN_SLOT = "$N"
VERB_SLOT = "$V"
NAME_SLOT = "$P"
_SEPARATORS = ("AND", ";")


def _is_name(tok: str) -> bool:
    return len(tok) > 1 and tok[0].isupper() and tok[1:].islower() and tok.isalpha()


def _is_word(tok: str) -> bool:
    return tok.replace("_", "").isalpha() and tok not in ("LAMBDA", "AND")


class _LFError(ValueError):
    pass


def _abstract_lf(lf: str, n_words: int | None) -> str:
    """Parse a COGS logical form and return it with lexical items abstracted.

    Raises ``_LFError`` if the string is not a well-formed logical form (or refers to a word
    position outside a sentence of ``n_words`` words).
    """
    toks = lf.split()
    if not toks:
        raise _LFError("empty logical form")
    if len(toks) == 1 and _is_name(toks[0]):  # a proper-name primitive: "Emma"
        return NAME_SLOT
    out: list[str] = []
    i = 0
    lambda_vars: set[str] = set()
    while i < len(toks) and toks[i] == "LAMBDA":  # LAMBDA v . (primitives)
        if i + 2 >= len(toks) or not toks[i + 1].isalpha() or toks[i + 2] != ".":
            raise _LFError(f"bad lambda binder at token {i + 1}")
        lambda_vars.add(toks[i + 1])
        out += toks[i : i + 3]
        i += 3

    def arg(j: int) -> int:
        t = toks[j] if j < len(toks) else None
        if t == "x":
            if j + 2 >= len(toks) or toks[j + 1] != "_" or not toks[j + 2].isdigit():
                raise _LFError(f"bad variable at token {j + 1}")
            if n_words is not None and int(toks[j + 2]) >= n_words:
                raise _LFError(
                    f"variable x _ {toks[j + 2]} points past the sentence's {n_words} words"
                )
            out.extend(toks[j : j + 3])
            return j + 3
        if t is not None and t in lambda_vars:
            out.append(t)
            return j + 1
        if t is not None and _is_name(t):
            out.append(NAME_SLOT)
            return j + 1
        raise _LFError(f"bad argument {t!r} at token {j + 1}")

    while True:  # one predicate term
        if i < len(toks) and toks[i] == "*":
            out.append("*")
            i += 1
        parts: list[str] = []
        while True:
            if i >= len(toks) or not _is_word(toks[i]):
                got = toks[i] if i < len(toks) else "end of input"
                raise _LFError(f"expected a predicate name at token {i + 1}, got {got!r}")
            parts.append(toks[i])
            i += 1
            if i < len(toks) and toks[i] == ".":
                i += 1
                continue
            break
        if i >= len(toks) or toks[i] != "(":
            raise _LFError(f"expected '(' after predicate {' . '.join(parts)!r}")
        if len(parts) == 1:
            out += [NOUN_SLOT]
        elif parts[1] == "nmod":
            out += [NOUN_SLOT, ".", *" . ".join(parts[1:]).split()]
        else:
            out += [VERB_SLOT, ".", *" . ".join(parts[1:]).split()]
        out.append("(")
        i = arg(i + 1)
        while i < len(toks) and toks[i] == ",":
            out.append(",")
            i = arg(i + 1)
        if i >= len(toks) or toks[i] != ")":
            raise _LFError(f"expected ')' or ',' at token {i + 1}")
        out.append(")")
        i += 1
        if i == len(toks):
            return " ".join(out)
        if toks[i] not in _SEPARATORS:
            raise _LFError(f"expected 'AND' or ';' at token {i + 1}, got {toks[i]!r}")
        out.append(toks[i])
        i += 1


def cogs_template(sentence: str, lf: str) -> str:
    """The structural template of a COGS example (see the module docstring).

    ``sentence`` bounds the word positions the logical form may refer to. Raises
    :class:`PairDataError` if the logical form is malformed.
    """
    n_words = len(sentence.split())
    if n_words == 0:
        raise PairDataError("empty COGS sentence")
    try:
        return _abstract_lf(lf, n_words)
    except _LFError as exc:
        raise PairDataError(f"malformed COGS logical form: {exc}: {lf!r}") from None


def format_cogs_line(sentence: str, lf: str) -> str:
    return f"IN: {sentence} OUT: {lf}"


def cogs_examples(path: str | Path, split: str = "train") -> list[Example]:
    """Every example of a COGS TSV file (``sentence \\t lf [\\t type]``), with ``split`` as
    the examples' split (``"train"`` for training material, e.g. ``"test"`` for dev/test files).

    Blank lines are skipped; a malformed line raises :class:`PairDataError` naming
    ``path:line``.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PairDataError(f"cannot read COGS file {path}: {exc.strerror or exc}") from None
    out: list[Example] = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        line_s = line.rstrip(b"\r")
        if not line_s.strip():
            continue
        try:
            text = line_s.decode("utf-8")
        except UnicodeDecodeError:
            raise PairDataError(f"{where(path, lineno)}: not valid UTF-8") from None
        fields = text.split("\t")
        if len(fields) not in (2, 3):
            raise PairDataError(
                f"{where(path, lineno)}: expected 'sentence<TAB>logical form<TAB>type' "
                f"(2 or 3 tab-separated fields), got {len(fields)} field(s)"
            )
        sentence, lf = fields[0].strip(), fields[1].strip()
        if not sentence or not lf:
            raise PairDataError(f"{where(path, lineno)}: empty sentence or logical form")
        try:
            template = cogs_template(sentence, lf)
        except PairDataError as exc:
            raise PairDataError(f"{where(path, lineno)}: {exc}") from None
        out.append(Example(format_cogs_line(sentence, lf), template, "cogs", split))
    return out
