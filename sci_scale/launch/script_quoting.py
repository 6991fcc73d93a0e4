"""Values rendered into a Slurm batch script: the checks and quoting each place needs.

``#SBATCH`` lines are read by sbatch's own tokenizer and shell lines by bash; a value must
survive the reader of the line it lands on, and no value may break a line. The rules are set
out in :mod:`sci_scale.launch.slurm`, which applies them to every template variable.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any

from sci_scale.config import ConfigError

# Characters that end or corrupt a line: C0/C1 controls, and the Unicode line and paragraph
# separators that editors and Python's splitlines() break lines at.
_LINE_BREAKING = frozenset({"Cc", "Zl", "Zp"})
_CHAR_NAMES = {
    "\n": "a newline",
    "\r": "a carriage return",
    "\0": "a NUL",
    "\t": "a tab",
    "\x1b": "an escape",
    "\x85": "a next line",
    "\u2028": "a line separator",
    "\u2029": "a paragraph separator",
}

# Characters sbatch's #SBATCH tokenizer does not take literally: whitespace splits arguments,
# quotes group, a backslash escapes, an unquoted "#" starts a comment.
_SBATCH_SPECIAL = re.compile(r"[\s\"'\\#]")
_SBATCH_ESCAPE = re.compile(r'([\\"#])')

_NAME = r"[A-Za-z0-9_.+-]+"
_NAMES = rf"{_NAME}(?:,{_NAME})*"


@dataclass(frozen=True)
class _DirectiveRule:
    """The form of one #SBATCH option's value, and how to say it in an error."""

    pattern: re.Pattern[str]
    accepts: str


_DIRECTIVE_RULES = {
    "--time": _DirectiveRule(
        re.compile(r"\d+(?::\d+){0,2}|\d+-\d+(?::\d+){0,2}|(?i:unlimited|infinite)"),
        "minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS or UNLIMITED",
    ),
    "--mem": _DirectiveRule(
        re.compile(r"\d+[KMGTkmgt]?"),
        "an integer with an optional K, M, G or T suffix, e.g. 80G (0: all of a node's memory)",
    ),
    "--partition": _DirectiveRule(
        re.compile(_NAMES), "partition names of letters, digits and '_.+-', comma-separated"
    ),
    "--account": _DirectiveRule(re.compile(_NAME), "an account name of letters, digits and '_.+-'"),
    "--qos": _DirectiveRule(
        re.compile(_NAMES), "QOS names of letters, digits and '_.+-', comma-separated"
    ),
    "--constraint": _DirectiveRule(
        re.compile(r"[A-Za-z0-9_.+\-&|,:\[\]()*!]+"),
        "node features of letters, digits and '_.+-' joined by & | , : with [ ] ( ) * !",
    ),
}


def _describe(char: str) -> str:
    """``char`` named for an error message that must stay on one line."""
    return f"{_CHAR_NAMES.get(char, 'a control character')} (U+{ord(char):04X})"


def refuse_control_characters(key: str, value: str) -> str:
    """``value``, or a ConfigError if it holds a character that would break a script line: a
    line break ends an #SBATCH directive (sbatch then reads no more of them) and starts a
    shell line that runs."""
    for char in value:
        if unicodedata.category(char) in _LINE_BREAKING:
            raise ConfigError(
                f"{key} {value!r} contains {_describe(char)}, which cannot be rendered into "
                "the batch script (a line break would end an #SBATCH directive)"
            )
    return value


def directive_value(key: str, value: str) -> str:
    """``value`` for the #SBATCH option ``key``, if it has the form sbatch accepts."""
    refuse_control_characters(key, value)
    rule = _DIRECTIVE_RULES[key]
    if rule.pattern.fullmatch(value) is None:
        raise ConfigError(f"{key} {value!r} is not what sbatch accepts: {rule.accepts}")
    return value


def optional_directive(key: str, value: str | None) -> str | None:
    return None if value is None else directive_value(key, value)


def count(key: str, value: Any, minimum: int) -> int:
    """An integer option that is rendered bare, checked so that nothing else can be."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def sbatch_quote(value: Any) -> str:
    """``value`` as one argument of an #SBATCH line, read back exactly by sbatch's tokenizer.

    Values with nothing special stay bare (``--partition=gpu``); others are double-quoted with
    ``\\``, ``"`` and ``#`` backslash-escaped, which every sbatch release reads the same way
    (older ones know no single quotes, and end an argument at ``#`` even inside quotes)."""
    text = str(value)
    if text and _SBATCH_SPECIAL.search(text) is None:
        return text
    return '"' + _SBATCH_ESCAPE.sub(r"\\\1", text) + '"'


_SHELL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def shell_name(key: str, name: str) -> str:
    """``name`` if it is a shell variable name (it is exported as written), else a ConfigError."""
    if _SHELL_NAME.fullmatch(name) is None:
        raise ConfigError(
            f"{key}: {name!r} is not an environment variable name ([A-Za-z_][A-Za-z0-9_]*)"
        )
    return name


def srun_option(key: str, option: str) -> str:
    """An extra srun option: one line, and an option (it is passed as one quoted argument)."""
    refuse_control_characters(key, option)
    if not option.startswith("-"):
        raise ConfigError(f"{key} {option!r} is not an srun option (e.g. --cpu-bind=cores)")
    return option
