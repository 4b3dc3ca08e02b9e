"""Helpers shared by the trainers (segmentation, classifiers): devices, seeds, checkpoints, resume state.

Resume protocol (both trainers): after every epoch the trainer writes ``best.pt`` (when the epoch
improved the selection criterion) and then ``last.pt`` (model, optimizer, RNG states, history,
parameters, data fingerprint) atomically; ``model.pt``, the rule's output, is copied from
``best.pt`` only once training has finished (:func:`publish_model`). :func:`load_resume_state`
decides whether a ``last.pt`` may continue a run.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from cellkd.errors import ConfigError, StoreError
from cellkd.store.atomic import atomic_path
from cellkd.types import PathLike

ParamsT = TypeVar("ParamsT")


def check_parameters(params: object, checks: Iterable[tuple[bool, str, str]], what: str, where: str = "") -> None:
    """Raise ``ConfigError`` for the first failed ``(ok, name, allowed)`` check, naming the value and the rule."""
    for ok, name, allowed in checks:
        if not ok:
            raise ConfigError(f"{what} parameter {name}={getattr(params, name)!r} must be {allowed}{where}")


def params_from_dict(cls: type[ParamsT], values: Mapping[str, Any], what: str) -> ParamsT:
    """Build the parameter dataclass ``cls`` from a config mapping; unknown keys raise ``ConfigError`` naming them."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown {what} parameter(s) {unknown}; expected some of {sorted(known)}")
    return cls(**values)


logger = logging.getLogger(__name__)


DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"

_default_device: str = "auto"


def set_default_device(device: str) -> None:
    """Make ``device`` (the config's ``device`` key) what :func:`resolve_device` gives for None in this process.

    The Snakemake adapters call it once per job, so that every model the job builds or loads (training,
    evaluation, inference) lands on the configured device without threading it through each call.
    """
    global _default_device
    resolve_device(device)  # fail here, naming the key, rather than in the middle of a job
    _default_device = device


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device for ``device``: ``auto`` = CUDA when available, else CPU; None = the process default.

    Raises ``ConfigError`` for an unknown name and for CUDA requested where torch sees no GPU.
    """
    if device is None:
        device = _default_device
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"device {device!r} is not one of {DEVICE_CHOICES}") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not one of {DEVICE_CHOICES}")
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (resolved.index or 0) >= count:
            msg = (
                f"device {device!r} was requested but torch sees {count} CUDA device(s); "
                "set device: auto or cpu, or run on a GPU node (CUDA_VISIBLE_DEVICES)"
            )
            raise ConfigError(msg)
    return resolved


def amp_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype on ``device``: bfloat16 (float32's range: no overflow, no loss scaling) where supported.

    float16 only on CUDA GPUs without bfloat16 (before Ampere); its range (max 65504) is what turns
    activations into inf / NaN, so the caller must scale the loss (``torch.amp.GradScaler``).
    """
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def use_accelerator_default(setting: bool | None, device: torch.device) -> bool:
    """A speed setting (amp, channels_last, pin_memory): None = on for CUDA, off on CPU; a bool is taken as is."""
    return device.type == "cuda" if setting is None else bool(setting)


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


def torch_load(path: PathLike, *, rule: str = "the training rule") -> dict[str, Any]:
    """Load a cellkd checkpoint dict (CPU tensors, ``weights_only``); ``StoreError`` naming ``rule`` otherwise."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise StoreError(f"{path}: no such model checkpoint; run {rule} first") from err
    except Exception as err:  # a truncated / foreign file: torch raises several unrelated types
        raise StoreError(f"{path}: cannot read model checkpoint ({err}); delete it and retrain") from err
    if not isinstance(checkpoint, dict):
        raise StoreError(f"{path}: not a cellkd checkpoint (got {type(checkpoint).__name__}); delete it and retrain")
    return checkpoint


def torch_save_atomic(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj, path)`` that never leaves a partial file at ``path``."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


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
) -> dict[str, Any] | None:
    """The state in ``last.pt`` when it can continue a run with ``params`` on ``data``; None (fresh start) otherwise.

    params: ``asdict`` of the run's parameters; keys in ``resumable`` (e.g. epochs, num_workers) may
    differ from the stored run. data: any picklable fingerprint of the inputs (see
    :func:`data_fingerprint`), compared after turning lists into tuples. ``epochs``: the run's target;
    a ``last.pt`` already past it restarts. Each refusal is logged as a warning saying why.
    """
    if not last.exists():
        return None
    try:
        state = torch_load(last)
    except StoreError as err:
        logger.warning("ignoring unreadable %s (%s); training from scratch", last, err)
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
    """Copy ``best.pt`` to ``model.pt`` atomically: the last step of a run, so model.pt means "done"."""
    with atomic_path(model_path) as tmp:
        shutil.copyfile(best, tmp)
