"""Which torch device a job runs on, and the speed settings that depend on it.

The config's ``device`` key (``auto|cpu|cuda|cuda:N``) is set once per job by the Snakemake adapter
(:func:`set_default_device`); every model the job builds or loads then resolves ``device=None`` to it
through :func:`resolve_device`, so the setting need not be threaded through each call.
"""

from __future__ import annotations

import torch

from cellkd.errors import ConfigError

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
