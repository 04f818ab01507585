"""Real English sentences available offline: the Python standard library's own documentation.

The corpus is the prose of the Python reference manual that every CPython ships
(``pydoc_data.topics``: the text ``help("with")`` prints) plus the docstrings of the standard
library's top-level modules, read with :mod:`ast` from their source (nothing is imported, so no
module runs). Both come with the interpreter, so every machine with the same Python 3.11.x
has the same sentences, in the same order: files and topics are read in sorted order, and the
result is deduplicated and sorted.

A sentence is kept when it looks like English prose: it starts with a capital letter, ends with
a full stop, has 5-40 words and at least 80% of them are plain words (letters, hyphens,
apostrophes, trailing punctuation); paragraphs holding code (``>>>``, ``...``) or lists are
skipped. The splits are chosen by a seeded hash of each sentence (:func:`split_sentences`), so a
sentence that changes between Python patch releases moves only itself, never the others.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

from autocompress.errors import AutocompressError

CORPUS_VERSION = 1
"""Bumped whenever the selection rules change (part of every cache key built on the corpus)."""
MIN_WORDS, MAX_WORDS = 5, 40
_WORD = re.compile(r"^[A-Za-z][a-z]*(?:[-'\u2019][a-z]+)*[,;:.!?]?$")
_BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_CODE_LINE = (">>>", "...", "*", "-", "+", "|", "=", "$", "%")


def sentences(text: str) -> Iterator[str]:
    """The English-looking sentences of ``text`` (see the module docstring for the rules).

    Example:
        >>> list(sentences("Return the sum of the two numbers given. See math.fsum.\\n\\n>>> f(2)"))
        ['Return the sum of the two numbers given.']
    """
    for para in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in para.splitlines()]
        if any(line.startswith(_CODE_LINE) for line in lines):
            continue
        for s in _BREAK.split(" ".join(line for line in lines if line)):
            s = s.strip()
            words = s.split()
            if not MIN_WORDS <= len(words) <= MAX_WORDS or not (s[0].isupper() and s[-1] == "."):
                continue
            if sum(bool(_WORD.match(w)) for w in words) >= 0.8 * len(words):
                yield s


def _docstrings(path: Path) -> Iterator[str]:
    """Docstrings of a module, its classes and functions, in source order (no import)."""
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):  # a file this Python cannot parse: skip it
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc:
                yield doc


def stdlib_texts() -> Iterator[str]:
    """The reference manual's topics (sorted by name), then the docstrings of the standard
    library's top-level modules (sorted by file name)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions split pydoc_data off: the docstrings remain
        topics = {}
    for name in sorted(topics):
        yield topics[name]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.glob("*.py")):
        yield from _docstrings(path)


def corpus(texts: Iterable[str] | None = None) -> list[str]:
    """Unique English sentences of ``texts`` (default: :func:`stdlib_texts`), sorted.

    Example:
        >>> corpus(["Second sentence is right here. First sentence is right here."])
        ['First sentence is right here.', 'Second sentence is right here.']
    """
    found = {s for text in (stdlib_texts() if texts is None else texts) for s in sentences(text)}
    return sorted(found)


def split_sentences(pool: list[str], sizes: dict[str, int], seed: int = 0) -> dict[str, list[str]]:
    """Disjoint splits of ``pool`` with ``sizes[split]`` sentences each, chosen by a seeded hash.

    Sentences are ordered by ``sha256(f"{seed}:{sentence}")`` and the splits take consecutive
    runs of that order (in the order of ``sizes``), so the choice does not depend on the
    order of ``pool`` and an edit to one sentence moves no other.

    Example:
        >>> pool = [f"Sentence number {i} is here." for i in range(10)]
        >>> s = split_sentences(pool, {"train": 5, "val": 2, "test": 2}, seed=0)
        >>> [len(v) for v in s.values()], set(s["train"]) & set(s["val"])
        ([5, 2, 2], set())
    """
    unique = sorted(set(pool))
    need = sum(sizes.values())
    if any(n < 1 for n in sizes.values()) or need > len(unique):
        raise AutocompressError(
            f"split sizes {sizes} need {need} sentences (each >= 1), the corpus has "
            f"{len(unique)}: ask for fewer"
        )

    def rank(s: str) -> str:
        return hashlib.sha256(f"{seed}:{s}".encode()).hexdigest()

    order = sorted(unique, key=rank)
    out, start = {}, 0
    for name, n in sizes.items():
        out[name] = order[start : start + n]
        start += n
    return out
