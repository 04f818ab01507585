"""Write one benchmark's section of docs/benchmarks.md, leaving the other sections alone."""

from __future__ import annotations

import platform
import re
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = """# Benchmarks

Every number here is written by a script in `benchmarks/`; each section names the command that
produced it, when, and on what machine. Nothing is pasted by hand. Ratios are measured side by
side in one run.
"""


def machine() -> str:
    """A one-line description of where the numbers were measured."""
    return (
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, Python "
        f"{sys.version.split()[0]}, torch {torch.__version__}"
    )


def write_section(name: str, title: str, command: str, body: str) -> None:
    """Replace (or append) the section ``name`` of docs/benchmarks.md."""
    DOC.parent.mkdir(parents=True, exist_ok=True)
    text = DOC.read_text() if DOC.exists() else HEADER
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    block = (
        f"<!-- {name}:start -->\n## {title}\n\nCommand: `{command}`  \n"
        f"Measured {stamp} on {machine()}.\n\n{body.strip()}\n<!-- {name}:end -->"
    )
    pattern = re.compile(rf"<!-- {name}:start -->.*?<!-- {name}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else f"{text}\n{block}\n"
    DOC.write_text(text)


def table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub markdown table."""
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(str(r[c]) for c in columns) + " |\n" for r in rows)
