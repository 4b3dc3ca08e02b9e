"""Glue between Snakemake scripts and the package: logging to the rule's log file, progress bars, and the job's
resource line (wall, CPU, peak RSS) at the end of every log."""

from __future__ import annotations

import atexit
import contextlib
import logging
import re
import resource
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import psutil  # a Snakemake dependency
from tqdm import tqdm

from cellkd.types import PathLike

T = TypeVar("T")
logger = logging.getLogger(__name__)

RESOURCE_LINE = "job resources: wall {wall_s:.1f} s, CPU {cpu_s:.1f} s, peak RSS {peak_rss_mb:.0f} MB"
"""The last line of every job log (``log_to``): what a cluster user reads to size ``runtime`` and ``mem_mb``."""
_RESOURCE_PATTERN = re.compile(
    r"job resources: wall (?P<wall_s>[\d.]+) s, CPU (?P<cpu_s>[\d.]+) s, peak RSS (?P<peak_rss_mb>[\d.]+) MB"
)


@dataclass(frozen=True)
class JobResources:
    """Wall and CPU seconds of a job's process and its peak resident memory in MB (10^6 bytes, like ``mem_mb``)."""

    wall_s: float
    cpu_s: float
    peak_rss_mb: float


def peak_rss_mb() -> float:
    """Peak RSS of this process in MB (10^6 bytes, the unit of Snakemake's ``mem_mb``).

    VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork + exec, so a job started by a (torch-sized)
    parent would report the parent's peak instead of its own.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e6  # kB (KiB) in /proc
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6  # KiB on Linux, a fallback elsewhere


def job_resources() -> JobResources:
    """This process's resources so far: wall seconds since it started, CPU seconds (user + system), peak RSS."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return JobResources(time.time() - psutil.Process().create_time(), usage.ru_utime + usage.ru_stime, peak_rss_mb())


def _log_job_resources() -> None:
    logger.info(RESOURCE_LINE.format(**vars(job_resources())))


def read_job_resources(log: PathLike) -> JobResources | None:
    """The resource line of the job log ``log`` (the last one if several); None when it has none.

    A job killed by the kernel or the scheduler (OOM, SIGKILL) ends without one.
    """
    found = None
    with open(log, encoding="utf-8", errors="replace") as f:
        for line in f:
            if match := _RESOURCE_PATTERN.search(line):
                found = match
    return None if found is None else JobResources(**{k: float(v) for k, v in found.groupdict().items()})


def _log_uncaught(kind: type[BaseException], error: BaseException, trace: TracebackType | None) -> None:
    """Put a job's fatal traceback in its log too, where ``show-failed-logs`` and a cluster user look first."""
    logger.critical("job failed", exc_info=(kind, error, trace))
    sys.__excepthook__(kind, error, trace)


def log_to(path: str | None, level: int = logging.INFO) -> None:
    """Send the ``cellkd`` loggers (and warnings) to ``path`` (or stderr when None).

    An uncaught exception is logged there with its traceback (and still printed to stderr). At exit, even after
    an exception, the job's wall and CPU seconds and peak RSS are logged as one line
    (``RESOURCE_LINE``): a job killed for memory has none, the others say what to request.
    """
    handler: logging.Handler = logging.FileHandler(path, mode="w") if path else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    # Registered after logging's own shutdown hook, so it runs first (atexit is last in, first out);
    # unregister + register keeps it to one line when log_to is called twice.
    atexit.unregister(_log_job_resources)
    atexit.register(_log_job_resources)


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """tqdm over ``items`` written to the current log handler's stream (the rule's log)."""
    stream = next(
        (h.stream for h in logging.getLogger().handlers if isinstance(h, logging.StreamHandler)),
        sys.stderr,
    )
    # mininterval keeps the log readable: a rule log gets a line every few seconds, not thousands.
    yield from tqdm(items, desc=desc, total=total, file=stream, mininterval=5.0, ascii=True)


def limit_threads(threads: int) -> None:
    """Make torch use the cores the rule was given (Snakemake ``threads:``), not every core of the node."""
    import torch

    torch.set_num_threads(max(1, int(threads)))
