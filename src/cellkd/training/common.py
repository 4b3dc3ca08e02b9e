"""Helpers shared by the trainers (segmentation, classifiers): seeds, fingerprints, the resumable epoch loop.

Resume protocol (both trainers, implemented once in :class:`ResumableRun`): after every epoch the
trainer writes ``best.pt`` (when the epoch improved the selection criterion, see :class:`Selection`)
and then ``last.pt`` (model, optimizer and other training state, RNG states, history, parameters,
data fingerprint) atomically with ``cellkd.models.checkpoint.torch_save_atomic``, then
``history.csv``; ``model.pt``, the rule's output, is copied from ``best.pt`` only once training has
finished (:func:`publish_model`). :func:`load_resume_state` decides whether a ``last.pt`` may
continue a run. ``last.pt`` is read only here; the best score is recomputed from its history.

Once a run has finished, ``last.pt`` is rewritten without the optimizer and the other training-only
state (Adam's two moments per weight: two thirds of the file), keeping the final weights, RNG states
and history (``"finished": True``; the key ``"dropped"`` lists what went). A run killed between two
epochs resumes exactly as before; a *finished* run whose ``epochs`` is later raised continues from its
final weights with the optimizer's state started afresh (Adam's moments rebuild within a few steps).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from cellkd.errors import ConfigError, StoreError
from cellkd.models.checkpoint import torch_load, torch_save_atomic
from cellkd.store.atomic import atomic_path, atomic_write_text
from cellkd.types import PathLike

logger = logging.getLogger(__name__)


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed for epoch ``epoch`` of a run seeded with ``seed`` (independent streams per epoch)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)


def rng_devices(device: torch.device) -> list[int]:
    """CUDA devices whose RNG ``torch.random.fork_rng`` must save for a run on ``device`` (none on CPU)."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def rng_state(device: torch.device) -> dict[str, Any]:
    """The torch RNG states (CPU, and ``device``'s when CUDA) to store in a resume checkpoint."""
    return {
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def restore_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Undo :func:`rng_state`: continue the random streams (dropout, ...) exactly where a killed run stopped."""
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def history_csv(history: Iterable[dict[str, float]], columns: Sequence[str]) -> str:
    """One CSV row per epoch dict, columns in ``columns`` order (the history.csv text)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    return buffer.getvalue()


def file_fingerprint(path: PathLike) -> tuple[str, int, int]:
    """(file name, size, mtime ns): a rewritten input (new data) must not resume an old run."""
    st = os.stat(path)
    return Path(path).name, int(st.st_size), int(st.st_mtime_ns)


def data_fingerprint(paths: Sequence[PathLike]) -> list[tuple[str, int, int]]:
    """:func:`file_fingerprint` of each input store, in order."""
    return [file_fingerprint(p) for p in paths]


def _frozen(value: Any) -> Any:
    """Lists (as config files and torch.load give them) -> tuples, recursively, so that values compare equal."""
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return {k: _frozen(v) for k, v in value.items()}
    return value


def load_resume_state(
    last: Path,
    best: Path,
    params: dict[str, Any],
    data: Any,
    *,
    epochs: int,
    resumable: frozenset[str],
    data_name: str = "inputs",
    required: Iterable[str] = (),
) -> dict[str, Any] | None:
    """The state in ``last.pt`` when it can continue a run with ``params`` on ``data``; None (fresh start) otherwise.

    params: ``asdict`` of the run's parameters; keys in ``resumable`` (e.g. epochs, num_workers) may
    differ from the stored run. data: any picklable fingerprint of the inputs (see
    :func:`data_fingerprint`), compared after turning lists into tuples. ``epochs``: the run's target;
    a ``last.pt`` already past it restarts. ``required``: keys the caller will read besides epoch,
    history and the RNG state; a ``last.pt`` without them (an older format) restarts. Each refusal is
    logged as a warning saying why.
    """
    if not last.exists():
        return None
    try:
        state = torch_load(last)
    except StoreError as err:
        logger.warning("ignoring unreadable %s (%s); training from scratch", last, err)
        return None
    # A finished run's compact last.pt dropped its optimizer state on purpose (see the module doc).
    dropped = set(state.get("dropped", ())) if state.get("finished") else set()
    missing = sorted({"epoch", "history", "torch_rng", *required} - dropped - set(state))
    if missing:
        logger.warning("%s lacks %s (an older resume format); training from scratch", last, missing)
        return None

    def key(values: dict[str, Any]) -> dict[str, Any]:
        return _frozen({k: v for k, v in values.items() if k not in resumable})

    if key(state.get("params", {})) != key(params):
        logger.warning("%s was written with other parameters; training from scratch", last)
        return None
    if _frozen(state.get("data")) != _frozen(data):
        logger.warning("%s was trained on other %s (or they were rewritten); training from scratch", last, data_name)
        return None
    if state["epoch"] > epochs:
        logger.warning("%s has %d epochs, more than epochs=%d; training from scratch", last, state["epoch"], epochs)
        return None
    if not best.exists():
        logger.warning("%s exists but %s is missing; training from scratch", last, best)
        return None
    return state


def publish_model(best: Path, model_path: Path) -> None:
    """Publish ``best.pt`` as ``model.pt`` atomically: the last step of a run, so model.pt means "done".

    A hard link where the filesystem allows one, else a copy: the two names then share one file on disk
    (a checkpoint of the paper's U-Net is ~100 MB). Sharing is safe because best.pt is only ever
    replaced by a rename (``torch_save_atomic``), never written in place, so model.pt keeps its bytes.
    """
    with atomic_path(model_path) as tmp:
        try:
            os.link(best, tmp)
            os.utime(tmp)  # a fresh mtime, as a copy would have: Snakemake compares it with the inputs'
        except OSError:  # no hard links here (some network or FAT filesystems)
            shutil.copyfile(best, tmp)


class Stateful(Protocol):
    """What ``last.pt`` saves and restores: a model, an optimizer, a ``GradScaler``..."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any], /) -> Any: ...


@dataclass(frozen=True)
class Selection:
    """How a run picks its best epoch from its history rows.

    column: the history column compared (the run's criterion, e.g. ``val_f1`` or ``val_loss``);
    lower_is_better: True for losses. An epoch whose value is NaN never wins, nor, with
    ``finite_train_loss``, one whose training loss is not finite (a diverged epoch); of equal values
    the earliest wins. Computed from the rows alone, so a resumed run selects (and stops early)
    exactly as an uninterrupted one.
    """

    column: str
    lower_is_better: bool
    finite_train_loss: bool = False

    def value(self, row: Mapping[str, float]) -> float:
        """The row's criterion value; NaN when the row can never be the best."""
        if self.finite_train_loss and not math.isfinite(row["train_loss"]):
            return math.nan
        return float(row[self.column])

    def best_index(self, history: Sequence[Mapping[str, float]]) -> int | None:
        """Index of the best row (the first of equals); None when no row can be the best."""
        best, best_key = None, -math.inf
        for index, row in enumerate(history):
            value = self.value(row)
            key = -math.inf if math.isnan(value) else (-value if self.lower_is_better else value)
            if key > best_key:
                best, best_key = index, key
        return best

    def epochs_since_best(self, history: Sequence[Mapping[str, float]]) -> int:
        """Epochs after the best one (0 when the last row is the best, or the history is empty)."""
        if not history:
            return 0
        best = self.best_index(history)
        return len(history) - 1 - (0 if best is None else best)


class ResumableRun:
    """The bookkeeping of one resumable training run in ``out_dir`` (see the module doc for the protocol).

    The trainer builds its model, optimizer, ... inside its seeded ``torch.random.fork_rng`` block,
    calls :meth:`resume` (True: continued from ``last.pt``; False: a fresh start, where it may load
    initial weights), trains the epochs of :meth:`epochs_to_run` and hands each epoch's history row
    to :meth:`end_epoch`, then calls :meth:`finish` for ``model.pt``.

    state: the objects whose ``state_dict`` goes into ``last.pt`` under these keys (``model`` and
    ``optimizer`` at least). params / data / data_name / resumable: see :func:`load_resume_state`.
    columns: history.csv's columns. log: the trainer's logger, for the resume and final lines.
    """

    def __init__(
        self,
        out_dir: PathLike,
        *,
        params: dict[str, Any],
        data: Any,
        data_name: str,
        resumable: frozenset[str],
        epochs: int,
        columns: Sequence[str],
        selection: Selection,
        state: Mapping[str, Stateful],
        device: torch.device,
        log: logging.Logger,
    ) -> None:
        self.out = Path(out_dir)
        self.last_path = self.out / "last.pt"
        self.best_path = self.out / "best.pt"
        self.model_path = self.out / "model.pt"
        self.params, self.data, self.data_name, self.resumable = params, data, data_name, resumable
        self.epochs, self.columns, self.selection = epochs, tuple(columns), selection
        self.state, self.device, self.log = dict(state), device, log
        self.history: list[dict[str, float]] = []

    @property
    def best_value(self) -> float:
        """The best epoch's criterion value so far (NaN before any)."""
        best = self.selection.best_index(self.history)
        return math.nan if best is None else self.selection.value(self.history[best])

    def resume(self) -> bool:
        """Continue from ``last.pt`` when it belongs to this run (weights, optimizer, RNG, history); else start fresh.

        A fresh start deletes a stale ``best.pt``: weights of another run must never become model.pt.
        """
        saved = load_resume_state(
            self.last_path,
            self.best_path,
            self.params,
            self.data,
            epochs=self.epochs,
            resumable=self.resumable,
            data_name=self.data_name,
            required=self.state,
        )
        if saved is None:
            self.best_path.unlink(missing_ok=True)
            return False
        for key, stateful in self.state.items():
            if key in saved:
                stateful.load_state_dict(saved[key])
        restore_rng_state(saved, self.device)
        self.history = list(saved["history"])
        if saved.get("finished") and self.epochs_to_run():
            self.log.warning(
                "%s is a finished run's compact state without %s: training continues from its final weights "
                "with the optimizer started afresh",
                self.last_path,
                ", ".join(saved.get("dropped", ())),
            )
        self.log.info(
            "resuming from %s after epoch %d (best %s %.4f)",
            self.last_path,
            len(self.history),
            self.selection.column,
            self.best_value,
        )
        return True

    def epochs_to_run(self) -> range:
        """The 1-based epochs still to train."""
        return range(len(self.history) + 1, self.epochs + 1)

    def end_epoch(self, row: dict[str, float], save_best: Callable[[int, float], object]) -> None:
        """Record an epoch's history row: best.pt when it is the best so far, then last.pt and history.csv.

        ``save_best(epoch, value)`` writes ``best_path`` (value: the row's criterion value).

        best.pt before last.pt: if killed in between, the resumed run redoes this epoch identically.
        """
        self.history.append(row)
        if self.selection.best_index(self.history) == len(self.history) - 1:
            save_best(len(self.history), self.selection.value(row))
        torch_save_atomic(self._resume_state(self.state), self.last_path)
        self.write_history()

    def _resume_state(self, state: Mapping[str, Stateful], **extra: Any) -> dict[str, Any]:
        """The ``last.pt`` dict after the epochs so far, holding the ``state_dict`` of each of ``state``."""
        return {
            "params": self.params,
            "data": self.data,
            "epoch": len(self.history),
            "history": self.history,
            **{key: stateful.state_dict() for key, stateful in state.items()},
            **rng_state(self.device),
            **extra,
        }

    def compact_last(self) -> None:
        """Rewrite ``last.pt`` with the model only (no optimizer state): the run is finished (see the module doc)."""
        dropped = sorted(key for key in self.state if key != "model")
        state = {"model": self.state["model"]}
        torch_save_atomic(self._resume_state(state, finished=True, dropped=dropped), self.last_path)

    def write_history(self) -> None:
        """history.csv from the epochs so far."""
        atomic_write_text(self.out / "history.csv", history_csv(self.history, self.columns))

    def finish(self, diverged: str) -> Path:
        """Compact ``last.pt``, then publish best.pt as model.pt (the rule's output, so last) and return its path.

        history.csv is rewritten first, also after a resume with nothing left to do (Snakemake deletes
        a failed job's outputs). Without a best epoch, raise ``ConfigError`` "training diverged ``diverged``".
        """
        self.write_history()
        if not self.best_path.exists():
            raise ConfigError(f"{self.out}: training diverged {diverged}")
        self.compact_last()  # before model.pt, which stays the last write ("done")
        publish_model(self.best_path, self.model_path)
        self.log.info("wrote %s (best %s %.4f)", self.model_path, self.selection.column, self.best_value)
        return self.model_path
