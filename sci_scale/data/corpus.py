"""Text corpora: the built-in standard-library docstring corpus and JSONL files.

The default corpus has to be real natural language that exists on every machine without a
download and without shipping megabytes of text in the repository. The docstrings of the
running interpreter's standard library fit: several MB of edited English prose, assembled at
run time from source files that are always installed. The modules are parsed with ``ast``, never
imported, because importing stdlib modules has side effects (``antigravity`` opens a browser,
``this`` prints, ``tkinter`` probes a display) and would be slow.
"""

from __future__ import annotations

import ast
import json
import os
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from sci_scale.errors import UserError

# Directories whose docstrings are not prose worth training on, or not the stdlib's own:
# test suites (thousands of terse "test that x" lines and deliberately odd fixture files),
# installed third-party packages, and the generated codec modules (one boilerplate docstring
# repeated with a different code-page name).
_SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "__pycache__",
        "encodings",
        "pydoc_data",
        "ensurepip",
        "lib2to3",
    }
)

_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


class CorpusError(UserError, ValueError):
    """A corpus file is malformed; the message names the file and the line to fix."""


def _stdlib_sources(root: Path) -> list[Path]:
    """The stdlib's .py files in sorted path order, so the corpus is the same on every call."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        found.extend(
            Path(dirpath, name)
            for name in filenames
            if name.endswith(".py") and not name.startswith("test_")
        )
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _docstrings(tree: ast.Module) -> Iterator[str]:
    """Docstrings of a module in source order: module first, then classes and functions."""
    nodes = [n for n in ast.walk(tree) if isinstance(n, _DOC_NODES[1:])]
    nodes.sort(key=lambda n: (n.lineno, n.col_offset))
    for node in [tree, *nodes]:
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield doc


def _encodable(text: str) -> bool:
    """Whether the text survives UTF-8 encoding (escape sequences can produce lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def stdlib_docstrings(min_chars: int = 200, max_docs: int | None = None) -> list[str]:
    """The running interpreter's stdlib docstrings of at least ``min_chars`` characters.

    Short docstrings ("Return self.") are mostly boilerplate, hence the length floor. Exact
    duplicates (overridden methods repeating their base's docstring) are kept once so that
    they are not over-weighted. Files that do not parse or decode are skipped: the stdlib
    ships a few deliberately broken or non-UTF-8 files.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    docs: list[str] = []
    for path in _stdlib_sources(root):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (OSError, SyntaxError, ValueError, RecursionError):
            continue
        for doc in _docstrings(tree):
            if len(doc) < min_chars or doc in seen or not _encodable(doc):
                continue
            seen.add(doc)
            docs.append(doc)
            if max_docs is not None and len(docs) >= max_docs:
                return docs
    return docs


def _parse_line(raw: bytes, where: str, text_key: str) -> str:
    """One JSONL record's text, or a CorpusError that says what is wrong with the line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{where}: invalid UTF-8 at byte {exc.start}") from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise CorpusError(f"{where}: not valid JSON ({exc.msg}, column {exc.colno})") from None
    if not isinstance(record, dict):
        raise CorpusError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if text_key not in record:
        raise CorpusError(f"{where}: no {text_key!r} key")
    text = record[text_key]
    if not isinstance(text, str):
        raise CorpusError(f"{where}: {text_key!r} is {type(text).__name__}, expected a string")
    return text


def iter_jsonl_texts(path: str | Path, text_key: str = "text") -> Iterator[str]:
    """The ``text_key`` strings of a JSONL file, one per non-blank line.

    A bad record stops the run with its file and line rather than being skipped: silently
    dropping documents would change the corpus, and with it every cached artefact, unnoticed.
    """
    path = Path(path)
    count = 0
    with path.open("rb") as stream:
        for lineno, raw in enumerate(stream, start=1):
            if not raw.strip():
                continue
            yield _parse_line(raw, f"{path}:{lineno}", text_key)
            count += 1
    if count == 0:
        raise CorpusError(f"{path}: the file holds no records")


def write_jsonl_texts(texts: Iterable[str], path: str | Path, text_key: str = "text") -> int:
    """Write texts as JSONL; atomic, so a reader never sees a half-written corpus."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    count = 0
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the corpus from other users
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as stream:
            for text in texts:
                if not isinstance(text, str):
                    raise TypeError(f"texts must be str, got {type(text).__name__}")
                stream.write(json.dumps({text_key: text}, ensure_ascii=False))
                stream.write("\n")
                count += 1
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count
