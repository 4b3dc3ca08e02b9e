#!/usr/bin/env python
"""Speed and memory of cellkd against the targets of issue 7 (a 2-core CPU machine); prints a Markdown table.

    python benchmarks/run.py [--quick] [--only NAME ...] [--scale S] [--train-scale T] [--work-dir DIR] [--results CSV]

Every benchmark times the functions the workflow's scripts call (no separate fast path). Each topic is one module
``benchmarks/<topic>.py`` whose docstring says what it measures (``--help`` lists them). Synthetic inputs are
cached under ``--work-dir`` (default ``benchmarks/work``); their generation is not timed. Writes
``benchmarks/results.csv`` (one row per table row, plus a notes column).

Adding a topic is adding one module to ``benchmarks/`` (this runner finds it) that defines:

    NAME: str                        its ``--only`` name; by convention the module's name and its rows' first word
    ORDER: int                       its place in the table (topics run and print sorted by ORDER, then NAME)
    run(ctx: Context) -> list[Row]   the measurements; ``ctx.quick`` asks for a smoke-sized run, ``ctx.scale``
                                     (``--scale``) for a paper-sized input shrunk by that factor per side
    OPT_IN: bool (optional)          True for a topic that takes an hour or so (the whole workflow at paper scale,
                                     the full demo): it runs only when ``--only`` names it

``Row``, ``Context``, ``met``, ``Stopwatch``, ``peak_rss_mib`` and ``run_child`` (a step in a fresh process) come
from ``harness.py``; synthetic slides and raw stores that several topics share from ``inputs.py``. A ``run`` that
raises becomes one "failed" row and the other topics still run. Modules without ``NAME`` are helpers.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import platform
import re
import sys
import textwrap
from dataclasses import astuple, fields
from pathlib import Path
from types import ModuleType

from harness import N_CORES, REPO, Context, Row, Stopwatch

COLUMNS = [f.name for f in fields(Row)]
HERE = Path(__file__).resolve()


def find_topics(folder: Path = HERE.parent) -> dict[str, ModuleType]:
    """The topic modules in ``folder`` (those that define ``NAME``) by name, in table order."""
    topics: list[ModuleType] = []
    for path in sorted(folder.glob("*.py")):
        if path == HERE:  # the runner itself
            continue
        module = importlib.import_module(path.stem)
        if not hasattr(module, "NAME"):
            continue
        if not callable(getattr(module, "run", None)) or not isinstance(getattr(module, "ORDER", None), int):
            raise TypeError(f"{path}: a benchmark topic defines NAME, ORDER (int) and run(ctx) -> list[Row]")
        topics.append(module)
    by_name: dict[str, ModuleType] = {}
    for module in sorted(topics, key=lambda m: (m.ORDER, m.NAME)):
        if module.NAME in by_name:
            raise ValueError(f"benchmark NAME {module.NAME!r} is defined by both {by_name[module.NAME].__file__} "
                             f"and {module.__file__}; rename one")  # fmt: skip
        by_name[module.NAME] = module
    return by_name


def selected(topics: dict[str, ModuleType], only: list[str] | None) -> list[str]:
    """The topics to run: those ``--only`` names, else every topic that is not ``OPT_IN``."""
    return list(only) if only else [name for name, module in topics.items() if not getattr(module, "OPT_IN", False)]


def markdown_table(rows: list[Row]) -> str:
    """The table of the issue: benchmark, cellkd, comparator, ratio, target, met (notes go below as footnotes)."""
    head = COLUMNS[:-1]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(astuple(r)[:-1]) + " |" for r in rows]
    notes = [f"{i}. {r.benchmark.split(':')[0]}: {r.notes}" for i, r in enumerate(rows, start=1) if r.notes]
    return "\n".join(lines + ([""] + notes if notes else []))


def machine() -> str:
    model = platform.processor()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
        model = re.search(r"^model name\s*:\s*(.+)$", text, flags=re.MULTILINE).group(1)  # type: ignore[union-attr]
    except (OSError, AttributeError):
        pass
    return f"{N_CORES} cores, {model}, Python {platform.python_version()}"


def _describe(name: str, module: ModuleType) -> str:
    """One ``--help`` entry: the topic's name and its module docstring, wrapped."""
    text = " ".join((module.__doc__ or "").split())
    return textwrap.fill(text, width=110, initial_indent=f"  {name:<14}", subsequent_indent=" " * 16)


def main(argv: list[str] | None = None) -> int:
    topics = find_topics()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="benchmarks:\n" + "\n".join(_describe(name, module) for name, module in topics.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run in under 2 minutes")
    parser.add_argument("--only", nargs="+", choices=sorted(topics), metavar="NAME", help="run only these")
    parser.add_argument(
        "--scale", type=float, help="factor on both sides of paper-sized inputs (scale: default 1, --quick 0.05)"
    )
    parser.add_argument(
        "--train-scale",
        type=float,
        help="scale: train on the fixture of this scale, export the bundle and predict the --scale slide with it",
    )
    parser.add_argument("--work-dir", type=Path, default=REPO / "benchmarks" / "work", help="cache of inputs")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results.csv", help="CSV output")
    args = parser.parse_args(argv)

    from cellkd.workflow import log_to

    args.work_dir.mkdir(parents=True, exist_ok=True)
    log_to(str(args.work_dir / "run.log"))  # library logs and progress bars go there, not to the table
    ctx = Context(work=args.work_dir.resolve(), quick=args.quick, scale=args.scale, train_scale=args.train_scale)
    rows: list[Row] = []
    for name in selected(topics, args.only):
        print(f"# {name} ...", file=sys.stderr, flush=True)
        with Stopwatch() as watch:
            try:
                rows += topics[name].run(ctx)
            except Exception as err:  # one failing benchmark must not hide the others' rows
                rows.append(Row(name, f"failed: {type(err).__name__}", "-", "-", "-", "n/a", str(err)[-300:]))
        print(f"# {name} took {watch.seconds:.0f} s", file=sys.stderr, flush=True)

    print(f"Machine: {machine()}{' (quick run)' if args.quick else ''}\n")
    print(markdown_table(rows))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(astuple(r) for r in rows)
    return 0 if all(not r.cellkd.startswith("failed") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
