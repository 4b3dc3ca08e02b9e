"""What every benchmark topic shares: the table row, the run context, and how to measure.

A topic module (``benchmarks/<topic>.py``, see ``run.py``) builds ``Row``s from a ``Context``; it times with
``Stopwatch``, reads its own peak memory with ``peak_rss_mib`` and runs a step in a fresh interpreter with
``run_child`` when the step's peak memory must be its own.

This file is also the child's entry point: ``python benchmarks/harness.py MODULE:FUNCTION JSON`` calls
``FUNCTION(**JSON)`` from ``benchmarks/MODULE.py`` and prints its result as one JSON line.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

REPO = Path(__file__).resolve().parents[1]
N_CORES = os.cpu_count() or 1


@dataclass(frozen=True)
class Row:
    """One line of the results table; ``met`` is "yes", "no" or "n/a" (see ``met``)."""

    benchmark: str
    cellkd: str
    comparator: str
    ratio: str
    target: str
    met: str
    notes: str = ""


@dataclass(frozen=True)
class Context:
    """What a topic's ``run`` gets: ``work`` caches its synthetic inputs, ``quick`` asks for small sizes, ``scale``
    (None = the topic's default) shrinks a paper-sized input by that factor per side; ``train_scale`` (None = the
    same slide) is the scale of the slide the scale topic trains its models on, when it only predicts at ``scale``."""

    work: Path
    quick: bool
    scale: float | None = None
    train_scale: float | None = None


def met(ok: bool | None) -> str:
    """The ``met`` column: "yes" / "no" for a target, "n/a" (``None``) where there is none."""
    return "n/a" if ok is None else ("yes" if ok else "no")


class Stopwatch:
    """Wall-clock seconds of a ``with`` block (``time.perf_counter``), in ``seconds`` once the block ends."""

    seconds: float

    def __enter__(self) -> Stopwatch:
        self._began = time.perf_counter()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.seconds = time.perf_counter() - self._began


def peak_rss_mib() -> float:
    """Peak RSS of this process in MiB (VmHWM, as every job log's resource line reports it in MB)."""
    from cellkd.workflow import peak_rss_mb

    return peak_rss_mb() * 1e6 / 2**20


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_child(step: Callable[..., dict], **kwargs: object) -> dict:
    """Run ``step(**kwargs)`` in a fresh interpreter and return its JSON-able result.

    A fresh process per measurement makes its peak RSS (VmHWM) that of the step alone. ``step`` must be a
    module-level function of a module in ``benchmarks/`` and its arguments and result JSON-able.
    """
    target = f"{step.__module__}:{step.__name__}"
    cmd = [sys.executable, str(Path(__file__).resolve()), target, json.dumps(kwargs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child step {target} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child_main(target: str, kwargs_json: str) -> None:
    from cellkd.workflow import log_to

    log_to(os.devnull, level=100)  # the parent parses our stdout: nothing else may print there
    module, function = target.split(":")
    step = getattr(importlib.import_module(module), function)
    print(json.dumps(step(**json.loads(kwargs_json))))


if __name__ == "__main__":
    _child_main(*sys.argv[1:])
