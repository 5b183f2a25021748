"""Write one benchmark's results into its own section of docs/benchmarks.md.

Each benchmark owns the text between ``<!-- begin NAME -->`` and ``<!-- end NAME -->``; running it
again replaces that section and leaves the others alone. Every section states the machine, the
date and the command that produced it.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"

_HEADER = """# Benchmarks

Every figure below was measured by the script named in its section, on the machine and date stated
there. Ratios are measured side by side in one run (these machines are noisy); absolute times are
for orientation only. Re-run a script to refresh its section.
"""


def machine() -> str:
    """One line describing the machine: CPU model, cores, GPU, torch version."""
    from probopt.experiments.report import environment

    cpu = environment()["cpu"]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} logical cores, {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} torch threads"
    )


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def write_section(name: str, title: str, body: str, *, doc: Path = DOC) -> None:
    """Replace (or append) section ``name`` of docs/benchmarks.md with ``body``.

    The machine, date and command are added above ``body``.
    """
    stamp = (
        f"*Machine:* {machine()}  \n*Date:* {_dt.date.today().isoformat()}  \n"
        f"*Command:* `{command()}`\n"
    )
    section = f"<!-- begin {name} -->\n## {title}\n\n{stamp}\n{body.strip()}\n<!-- end {name} -->\n"
    text = doc.read_text() if doc.exists() else _HEADER
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        text = head + section + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A GitHub markdown table; floats are printed with 3 significant digits."""

    def fmt(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
