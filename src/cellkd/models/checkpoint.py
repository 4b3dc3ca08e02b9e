"""Model checkpoints: the ``model.pt`` format of both kinds of model, their writers and their readers.

Every checkpoint is a ``torch.save``'d dict of plain values and CPU tensors, read back with
``torch.load(..., weights_only=True)`` (:func:`torch_load`): no pickled code runs on load.
Written atomically (:func:`torch_save_atomic`), so a killed job never leaves a partial file.

Classifier ``model.pt`` (``format`` ``"cellkd.classifier/1"``; teachers, students, fine-tuned)
    arch, num_classes, dropout, input_kind ("level0" / "multiscale"), classes (names, background
    last), label_set, params (the ``ClassifierTrainParams`` as a dict), epoch, criterion
    ("val_f1" / "train_loss"), score, teacher_logits (path or None), init_from (path or None),
    state_dict

Segmentation ``model.pt`` (``format`` ``"cellkd.segmentation/1"``)
    arch, encoder, encoder_depth, decoder_channels, dropout, mask_set, params (the
    ``SegmentationTrainParams`` as a dict), epoch, val_loss, criterion, state_dict

A model bundle's weights (``cellkd.bundle``: safetensors + ``model.json``) are read by the same
readers: a path ending in ``.safetensors`` gives the same dict, built from the bundle.

The trainers' resume state ``last.pt`` goes through the same :func:`torch_load` /
:func:`torch_save_atomic`; its content is described in ``cellkd.training.common``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cellkd.device import resolve_device
from cellkd.errors import StoreError
from cellkd.models import create_model
from cellkd.models.segmentation import create_segmentation_model
from cellkd.store.atomic import atomic_path
from cellkd.types import PathLike

if TYPE_CHECKING:
    from cellkd.training.segmentation import SegmentationTrainParams

CLASSIFIER_FORMAT = "cellkd.classifier/1"
SEGMENTATION_FORMAT = "cellkd.segmentation/1"


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


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _read(path: PathLike, expected_format: str, rule: str, writer: str) -> dict[str, Any]:
    from cellkd.bundle import is_bundle_weights, read_bundle_checkpoint  # bundle imports this module

    if is_bundle_weights(path):  # a model bundle's safetensors: same dict, metadata from its model.json
        return read_bundle_checkpoint(path, expected_format)
    checkpoint = torch_load(path, rule=rule)
    if checkpoint.get("format") != expected_format:
        msg = (
            f"{path}: checkpoint format {checkpoint.get('format')!r} is not {expected_format!r}; "
            f"it was not written by {writer} - retrain it"
        )
        raise StoreError(msg)
    return checkpoint


# ------------------------------------------------------------------------------------------ classifiers


def classifier_checkpoint(
    model: nn.Module,
    params: Mapping[str, Any],
    classes: Sequence[str],
    label_set: str,
    *,
    epoch: int,
    criterion: str,
    score: float,
    teacher_logits: PathLike | None,
    init_from: PathLike | None,
) -> dict[str, Any]:
    """The classifier ``model.pt`` dict (module docstring) of ``model``, trained with ``params`` (a dict)."""
    return {
        "format": CLASSIFIER_FORMAT,
        "arch": params["arch"],
        "num_classes": len(classes),
        "dropout": params["dropout"],
        "input_kind": str(model.input_kind),
        "classes": list(classes),
        "label_set": label_set,
        "params": dict(params),
        "epoch": epoch,
        "criterion": criterion,
        "score": score,
        "teacher_logits": None if teacher_logits is None else str(teacher_logits),
        "init_from": None if init_from is None else str(init_from),
        "state_dict": _cpu_state(model),
    }


def read_classifier_checkpoint(model_path: PathLike) -> dict[str, Any]:
    """The checkpoint dict of a classifier ``model.pt`` (arch, state dict, classes, ...); checks its format."""
    return _read(model_path, CLASSIFIER_FORMAT, "the classifier training rule", "cellkd.training.classifier")


def classifier_from_checkpoint(checkpoint: Mapping[str, Any], device: str | torch.device | None) -> nn.Module:
    """Rebuild the classifier of a :func:`read_classifier_checkpoint` dict on ``device``, in eval mode."""
    model = create_model(checkpoint["arch"], num_classes=checkpoint["num_classes"], dropout=checkpoint["dropout"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(resolve_device(device)).eval()


def load_classifier(model_path: PathLike, device: str | torch.device | None = None) -> nn.Module:
    """Rebuild the classifier saved in ``model_path`` (arch, classes, weights) on ``device``, in eval mode.

    The model maps ``classifier_input(crops)`` to logits (B, K) and has ``input_kind``.
    """
    return classifier_from_checkpoint(read_classifier_checkpoint(model_path), device)


# ----------------------------------------------------------------------------------------- segmentation


def save_segmentation_model(
    path: PathLike,
    model: nn.Module,
    params: SegmentationTrainParams,
    *,
    epoch: int = 0,
    val_loss: float = math.nan,
    criterion: str = "val_loss",
) -> Path:
    """Write ``model`` (built by ``create_segmentation_model`` from ``params``) atomically as a model.pt."""
    checkpoint = {
        "format": SEGMENTATION_FORMAT,
        "arch": params.arch,
        "encoder": params.encoder,
        "encoder_depth": params.encoder_depth,
        "decoder_channels": params.decoder_channels,
        "dropout": params.dropout,
        "mask_set": params.mask_set,
        "params": asdict(params),
        "epoch": epoch,
        "val_loss": val_loss,
        "criterion": criterion,
        "state_dict": _cpu_state(model),
    }
    return torch_save_atomic(checkpoint, path)


def read_segmentation_checkpoint(model_path: PathLike) -> dict[str, Any]:
    """The checkpoint dict of a segmentation ``model.pt`` (arch, encoder, mask_set, ...); checks its format."""
    return _read(model_path, SEGMENTATION_FORMAT, "the train_segmentation rule", "cellkd.training.segmentation")


def segmentation_from_checkpoint(checkpoint: Mapping[str, Any], device: str | torch.device | None) -> nn.Module:
    """Rebuild the segmentation model of a :func:`read_segmentation_checkpoint` dict on ``device``, in eval mode."""
    decoder = checkpoint["decoder_channels"]
    model = create_segmentation_model(
        checkpoint["arch"],
        encoder=checkpoint["encoder"],
        dropout=checkpoint["dropout"],
        encoder_depth=checkpoint["encoder_depth"],
        decoder_channels=None if decoder is None else tuple(decoder),
    )
    # Checkpoints written before unused encoder layers were pruned still hold their (never used) weights.
    pruned = tuple(f"{name}." for name in getattr(model, "pruned_modules", ()))
    model.load_state_dict({k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(pruned) or not pruned})
    return model.to(resolve_device(device)).eval()


def load_segmentation_model(model_path: PathLike, device: str | torch.device | None = None) -> nn.Module:
    """Rebuild the model saved in ``model_path`` (arch, encoder and weights), on ``device``, in eval mode."""
    return segmentation_from_checkpoint(read_segmentation_checkpoint(model_path), device)


__all__ = [
    "CLASSIFIER_FORMAT",
    "SEGMENTATION_FORMAT",
    "classifier_checkpoint",
    "classifier_from_checkpoint",
    "load_classifier",
    "load_segmentation_model",
    "read_classifier_checkpoint",
    "read_segmentation_checkpoint",
    "save_segmentation_model",
    "segmentation_from_checkpoint",
    "torch_load",
    "torch_save_atomic",
]
