"""Phase I: train and evaluate U-Net / U-Net++ binary nucleus segmentation on patch stores.

The target of a patch is the union of the class channels of one annotation set
(``masks/{mask_set}`` in the patch store, see ``cellkd.store``): a pixel is "nucleus" when any
class is set. Training is resumable: after every epoch ``last.pt`` (model, optimizer, RNG states,
history) is written atomically, and the best weights so far go to ``best.pt``. ``model.pt``, the
rule's output, is written only once training has finished, so its presence means "done".
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler

from cellkd.device import amp_dtype, resolve_device, use_accelerator_default
from cellkd.errors import ConfigError, StoreError
from cellkd.metrics import PixelCounts, pixel_counts, pixel_metrics
from cellkd.models.checkpoint import (
    read_segmentation_checkpoint,
    save_segmentation_model,
    segmentation_from_checkpoint,
)
from cellkd.models.segmentation import SEGMENTATION_ARCHS, create_segmentation_model, preprocess
from cellkd.params import check_parameters, params_from_dict
from cellkd.store.patches import PatchStore
from cellkd.training.common import (
    ResumableRun,
    Selection,
    data_fingerprint,
    epoch_seed,
    rng_devices,
)
from cellkd.types import SPLITS, PathLike
from cellkd.workflow import progress

logger = logging.getLogger(__name__)


CHECKPOINT_FORMAT = "cellkd.segmentation/1"
HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_dice", "seconds")

# Parameters that may change between a killed run and its resumption without invalidating it:
# more epochs extends training, and the data loading settings do not change the numbers
# (augmentation is seeded per patch, see PatchDataset).
_RESUMABLE_CHANGES = frozenset({"epochs", "num_workers", "pin_memory"})

LR_SCHEDULES = ("constant", "cosine", "onecycle")


@dataclass(frozen=True)
class SegmentationTrainParams:
    """Hyperparameters of one segmentation training run (``segmentation:`` in workflow_config.yaml).

    ``decoder_channels`` = None uses the model factory's default for ``encoder_depth``.
    ``max_patches_per_epoch`` caps the patches drawn (without replacement) per epoch; None = all.
    ``max_val_patches`` caps the validation patches scored after every epoch to a fixed subset spread evenly
    over the stores (the same patches every epoch, so epochs stay comparable); None = all.
    ``lr_schedule``: how Adam's learning rate moves over the run's optimizer steps (see :func:`lr_scheduler`):
    ``constant`` (the paper's), ``cosine`` (from ``lr`` down to 0) or ``onecycle`` (warm-up to ``lr`` over the
    first 30% of the steps, then cosine down to ``lr`` / 2.5e5).
    ``amp`` (mixed precision, see ``amp_dtype``), ``channels_last`` and ``pin_memory``: None = on for
    CUDA, off on CPU; True turns them on on CPU too (amp in bfloat16). ``num_workers``: DataLoader
    processes; None = the job's torch threads on CUDA (at most 8), 0 on CPU, where worker processes
    would compete with the training threads for the same cores.
    """

    arch: str = "unet"
    encoder: str = "resnet34"
    encoder_depth: int = 5
    decoder_channels: tuple[int, ...] | None = None
    dropout: float = 0.3
    epochs: int = 30
    batch_size: int = 8
    lr: float = 1e-4
    mask_set: str = "ssa"
    amp: bool | None = None
    channels_last: bool | None = None
    num_workers: int | None = None
    pin_memory: bool | None = None
    seed: int = 0
    max_patches_per_epoch: int | None = None
    max_val_patches: int | None = None
    lr_schedule: str = "constant"

    def __post_init__(self) -> None:
        if self.arch not in SEGMENTATION_ARCHS:
            raise ConfigError(f"segmentation arch {self.arch!r} is unknown; expected one of {list(SEGMENTATION_ARCHS)}")
        if self.decoder_channels is not None:
            # Config files give lists; keep a tuple so the params stay hashable and compare equal.
            object.__setattr__(self, "decoder_channels", tuple(int(c) for c in self.decoder_channels))
            if len(self.decoder_channels) != self.encoder_depth:
                msg = (
                    f"decoder_channels {list(self.decoder_channels)} must have one entry per encoder stage "
                    f"(encoder_depth={self.encoder_depth})"
                )
                raise ConfigError(msg)
        checks = [
            (3 <= self.encoder_depth <= 5, "encoder_depth", "3, 4 or 5"),
            (0.0 <= self.dropout < 1.0, "dropout", "in [0, 1)"),
            (self.epochs >= 1, "epochs", ">= 1"),
            (self.batch_size >= 1, "batch_size", ">= 1"),
            (self.lr > 0 and math.isfinite(self.lr), "lr", "a positive number"),
            (bool(self.mask_set), "mask_set", "an annotation set name such as 'ssa'"),
            (self.num_workers is None or self.num_workers >= 0, "num_workers", ">= 0 or None"),
            (self.max_patches_per_epoch is None or self.max_patches_per_epoch >= 1, "max_patches_per_epoch", ">= 1"),
            (self.max_val_patches is None or self.max_val_patches >= 1, "max_val_patches", ">= 1"),
            (self.lr_schedule in LR_SCHEDULES, "lr_schedule", f"one of {list(LR_SCHEDULES)}"),
        ]
        check_parameters(self, checks, "segmentation training")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SegmentationTrainParams:
        """Build from a config mapping; unknown keys raise ``ConfigError`` naming them."""
        return params_from_dict(cls, values, "segmentation training")


class PatchDataset(Dataset):
    """The patches of one split across several patch stores.

    Item ``i``: ``(image, mask)`` with image uint8 (P, P, 3) and mask uint8 (1, P, P) 0/1, the
    union of the class channels of ``mask_set``, read through ``PatchStore`` from the fragment and
    mask stores the patches index. With ``augment``, a random element of the 8 flips/rotations is
    applied, drawn from ``(seed, epoch, i)`` so that results do not depend on the number of DataLoader
    workers; call ``set_epoch`` before each epoch.

    Stores are opened lazily in the process that reads them (h5py handles do not survive fork).
    """

    def __init__(
        self, paths: Sequence[PathLike], split: int, mask_set: str, *, augment: bool = False, seed: int = 0
    ) -> None:
        self.paths = [str(p) for p in paths]
        self.mask_set = mask_set
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self._stores: dict[int, PatchStore] = {}
        self.pixel_stores: list[Path] = []
        """The fragment and mask stores the patches are read from (each once, in order)."""
        index: list[np.ndarray] = []
        sizes: set[int] = set()
        for store, path in enumerate(self.paths):
            with PatchStore(path) as patches:
                for pixels in (*patches.fragment_stores, *patches.mask_stores):
                    if pixels is not None and pixels not in self.pixel_stores:
                        self.pixel_stores.append(pixels)
                if mask_set not in patches.annotation_sets:
                    msg = (
                        f"{path}: no annotation set {mask_set!r} in the patch store (it has "
                        f"{patches.annotation_sets}); set mask_set to one of them"
                    )
                    raise StoreError(msg)
                sizes.add(patches.patch_size)
                rows = patches.split_indices(split)
            index.append(np.stack([np.full_like(rows, store), rows], axis=1))
        if len(sizes) > 1:
            raise StoreError(f"{self.paths}: patch stores have different patch sizes {sorted(sizes)}; use one size")
        self.patch_size = sizes.pop() if sizes else 0
        self.index = np.concatenate(index) if index else np.zeros((0, 2), dtype=np.int64)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def keep_evenly(self, count: int | None) -> None:
        """Keep at most ``count`` patches, evenly spaced over the index (so every store keeps its share); None = all."""
        if count is not None and count < len(self.index):
            self.index = self.index[np.linspace(0, len(self.index) - 1, count).round().astype(np.int64)]

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        store, row = (int(v) for v in self.index[i])
        patches = self._stores.get(store)
        if patches is None:
            patches = self._stores[store] = PatchStore(self.paths[store])
        image = patches.image(row)
        mask = patches.mask(self.mask_set, row).any(axis=-1).astype(np.uint8)
        if self.augment:
            rng = np.random.default_rng((self.seed, self.epoch, i))
            k, flip = int(rng.integers(4)), bool(rng.integers(2))
            image, mask = np.rot90(image, k), np.rot90(mask, k)
            if flip:
                image, mask = image[:, ::-1], mask[:, ::-1]
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(np.ascontiguousarray(mask[None]))

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_stores"] = {}
        return state

    def close(self) -> None:
        for patches in self._stores.values():
            patches.close()
        self._stores.clear()


def loader_workers(num_workers: int | None, device: torch.device) -> int:
    """DataLoader processes for ``num_workers`` (None = auto, see ``SegmentationTrainParams``)."""
    if num_workers is not None:
        return num_workers
    # On CUDA the main process only feeds the GPU: the job's other cores decode and augment patches.
    return min(8, torch.get_num_threads()) if device.type == "cuda" else 0


def _loader(
    dataset: PatchDataset,
    params: SegmentationTrainParams,
    device: torch.device,
    *,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
) -> DataLoader:
    if generator is None:
        sampler: torch.utils.data.Sampler = SequentialSampler(dataset)
    else:
        num = None if params.max_patches_per_epoch is None else min(params.max_patches_per_epoch, len(dataset))
        sampler = RandomSampler(dataset, num_samples=num, generator=generator)
    return DataLoader(
        dataset,
        batch_size=batch_size or params.batch_size,
        sampler=sampler,
        num_workers=loader_workers(params.num_workers, device),
        pin_memory=device.type == "cuda" and use_accelerator_default(params.pin_memory, device),
        generator=generator,
    )


def _batch_to_device(
    images: torch.Tensor, masks: torch.Tensor, device: torch.device, *, channels_last: bool = False
) -> tuple[torch.Tensor, ...]:
    # Normalize on the device: uint8 crosses the bus, 4x less than float32.
    x = preprocess(images.to(device, non_blocking=True))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = masks.to(device, non_blocking=True).float()
    return x, y


def _evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    *,
    loss_fn: nn.Module | None = None,
    channels_last: bool = False,
) -> tuple[float, PixelCounts]:
    """Mean loss (patch-weighted; NaN without ``loss_fn``) and pixel counts of ``sigmoid(logits) >= 0.5``.

    Always in float32, also when training uses AMP: in eval mode BatchNorm divides by running
    statistics that are still far from the batch's after one epoch, and in float16 the activations
    then overflow to inf and the loss becomes NaN (every first epoch of an H200 run logged
    ``val loss nan``). Validation is a small share of an epoch, so exactness costs little.
    """
    model.eval()
    total, count, counts = 0.0, 0, PixelCounts()
    with torch.inference_mode(), torch.autocast(device_type=device.type, enabled=False):
        for images, masks in loader:
            x, y = _batch_to_device(images, masks, device, channels_last=channels_last)
            logits = model(x).float()
            if loss_fn is not None:
                total += float(loss_fn(logits, y)) * len(x)
            count += len(x)
            # logit >= 0 <=> sigmoid >= 0.5, without the rounding of sigmoid near 0.5; counted on the device.
            counts += pixel_counts(logits >= 0, y.bool())
    loss = total / count if (loss_fn is not None and count) else math.nan
    return loss, counts


def _train_epoch(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loss_fn: nn.Module,
    *,
    amp: torch.dtype | None,
    channels_last: bool,
    desc: str,
    scheduler: LRScheduler | None = None,
) -> float:
    """One epoch of training; ``amp`` is the autocast dtype (None = float32); ``scheduler`` steps after every batch."""
    model.train()
    total, count = 0.0, 0
    for images, masks in progress(loader, desc=desc, total=len(loader)):
        x, y = _batch_to_device(images, masks, device, channels_last=channels_last)
        with torch.autocast(device_type=device.type, dtype=amp, enabled=amp is not None):
            logits = model(x)
        # The Dice loss sums over many pixels: compute it in float32 even under AMP.
        loss = loss_fn(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        total += float(loss.detach()) * len(x)
        count += len(x)
    return total / max(count, 1)


def lr_scheduler(optimizer: torch.optim.Optimizer, schedule: str, lr: float, steps: int) -> LRScheduler | None:
    """The torch scheduler of ``schedule`` (see ``SegmentationTrainParams``) over ``steps`` steps; None = constant.

    Stepped after every batch: the demo's 10 epochs of 8 steps are too few for a per-epoch warm-up. Sets each
    param group's ``lr`` to ``lr`` first, so that a schedule planned anew on a resumed optimizer starts from the
    run's learning rate, not from where the loaded state left it (CosineAnnealingLR continues from the group's).
    """
    if schedule == "constant":
        return None
    for group in optimizer.param_groups:
        group["lr"] = lr
        group.pop("initial_lr", None)
    if schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    if schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    raise ConfigError(f"lr_schedule {schedule!r} is unknown; expected one of {list(LR_SCHEDULES)}")


def _steps_planned(scheduler: LRScheduler) -> int:
    """The optimizer steps ``scheduler`` was planned over (OneCycleLR's total_steps, CosineAnnealingLR's T_max)."""
    return int(getattr(scheduler, "total_steps", None) or scheduler.T_max)  # type: ignore[attr-defined]


def _continue_schedule(
    scheduler: LRScheduler | None,
    optimizer: torch.optim.Optimizer,
    params: SegmentationTrainParams,
    *,
    epochs_done: int,
    steps_per_epoch: int,
) -> None:
    """After ``ResumableRun.resume``: keep a restored schedule that ends with the run, else plan it anew over the rest.

    A killed run's ``last.pt`` restores the scheduler exactly (it ends at the run's last step). A finished run's
    compact ``last.pt`` has no scheduler (nor Adam state), and a killed run resumed with more ``epochs`` has one
    planned for fewer steps: both continue with a fresh schedule over the epochs left (a warm restart: with
    ``onecycle`` its warm-up also rebuilds Adam's fresh moments).
    """
    steps_left = (params.epochs - epochs_done) * steps_per_epoch
    if scheduler is None or epochs_done == 0 or _steps_planned(scheduler) - scheduler.last_epoch == steps_left:
        return
    logger.warning(
        "the %s learning-rate schedule restarts over the %d epochs left (the resumed state ends elsewhere)",
        params.lr_schedule,
        params.epochs - epochs_done,
    )
    fresh = lr_scheduler(optimizer, params.lr_schedule, params.lr, steps_left)
    scheduler.load_state_dict(fresh.state_dict())  # type: ignore[union-attr]  # same object: last.pt saves it


def train_segmentation(
    patch_stores: Sequence[PathLike],
    out_dir: PathLike,
    params: SegmentationTrainParams,
    device: str | torch.device | None = None,
) -> Path:
    """Train a binary nucleus segmentation model on the train split of ``patch_stores``; return ``out_dir/model.pt``.

    Writes ``out_dir/history.csv`` (one row per epoch: epoch, train_loss, val_loss, val_dice,
    seconds), ``last.pt`` / ``best.pt`` (resume state, kept so that a later call with more epochs
    continues) and finally ``model.pt``: the weights with the lowest validation Dice loss (the
    training loss when the stores have no validation patches). Deterministic on CPU for a given
    ``params.seed``; the global torch RNG is left untouched.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    amp = amp_dtype(dev) if use_accelerator_default(params.amp, dev) else None
    channels_last = use_accelerator_default(params.channels_last, dev)

    train_set = PatchDataset(patch_stores, SPLITS["train"], params.mask_set, augment=True, seed=params.seed)
    val_set = PatchDataset(patch_stores, SPLITS["val"], params.mask_set)
    # Validation runs after every epoch: on a small CPU budget a fixed subset keeps it a minor share of the epoch.
    val_set.keep_evenly(params.max_val_patches)
    if len(train_set) == 0:
        raise StoreError(f"{list(map(str, patch_stores))}: no training patches (split == 0); check the split ratios")
    # The lowest validation Dice loss (training loss without validation patches); NaN never wins.
    selection = Selection("val_loss" if len(val_set) else "train_loss", lower_is_better=True)
    if len(val_set) == 0:
        logger.warning(
            "no validation patches in %s; selecting the model by training loss", list(map(str, patch_stores))
        )
    logger.info(
        "training %s/%s on %s: %d train, %d val patches", params.arch, params.encoder, dev, len(train_set), len(val_set)
    )
    logger.info(
        "precision %s, channels_last %s, %d data loader workers, pinned memory %s",
        "float32" if amp is None else f"mixed ({str(amp).removeprefix('torch.')}; validation in float32)",
        channels_last,
        loader_workers(params.num_workers, dev),
        dev.type == "cuda" and use_accelerator_default(params.pin_memory, dev),
    )

    # The pixels live in the fragment and mask stores: a rewritten one is new data too.
    data = data_fingerprint([*patch_stores, *train_set.pixel_stores])
    generator = torch.Generator()
    train_loader = _loader(train_set, params, dev, generator=generator)
    val_loader = _loader(val_set, params, dev)
    # Imported here: smp (and timm, torchvision) take seconds to import, and the classifier jobs import this package.
    from segmentation_models_pytorch.losses import DiceLoss

    loss_fn = DiceLoss(mode="binary", from_logits=True)

    with torch.random.fork_rng(devices=rng_devices(dev)):
        torch.manual_seed(params.seed)
        model = create_segmentation_model(
            params.arch,
            encoder=params.encoder,
            dropout=params.dropout,
            encoder_depth=params.encoder_depth,
            decoder_channels=params.decoder_channels,
        ).to(dev, memory_format=torch.channels_last if channels_last else torch.preserve_format)
        optimizer = torch.optim.Adam(model.parameters(), lr=params.lr)
        steps_per_epoch = len(train_loader)
        scheduler = lr_scheduler(optimizer, params.lr_schedule, params.lr, params.epochs * steps_per_epoch)
        # Loss scaling only for float16, whose small range underflows gradients; bfloat16 has float32's.
        scaler = torch.amp.GradScaler(dev.type, enabled=amp == torch.float16)
        state: dict[str, Any] = {"model": model, "optimizer": optimizer, "scaler": scaler}
        if scheduler is not None:
            state["scheduler"] = scheduler
        run = ResumableRun(
            out,
            params=asdict(params),
            data=data,
            data_name="patch stores",
            resumable=_RESUMABLE_CHANGES,
            epochs=params.epochs,
            columns=HISTORY_COLUMNS,
            selection=selection,
            state=state,
            device=dev,
            log=logger,
        )
        run.resume()
        _continue_schedule(scheduler, optimizer, params, epochs_done=len(run.history), steps_per_epoch=steps_per_epoch)

        def save_best(epoch: int, value: float) -> None:
            save_segmentation_model(
                run.best_path, model, params, epoch=epoch, val_loss=value, criterion=selection.column
            )

        for epoch in run.epochs_to_run():
            began = time.perf_counter()
            train_set.set_epoch(epoch)
            generator.manual_seed(epoch_seed(params.seed, epoch))
            desc = f"epoch {epoch}/{params.epochs}"
            train_loss = _train_epoch(
                model,
                train_loader,
                dev,
                optimizer,
                scaler,
                loss_fn,
                amp=amp,
                channels_last=channels_last,
                desc=desc,
                scheduler=scheduler,
            )
            val_loss, val_dice = math.nan, math.nan
            if len(val_set):
                val_loss, counts = _evaluate(model, val_loader, dev, loss_fn=loss_fn, channels_last=channels_last)
                val_dice = pixel_metrics(counts)["dice"]
            row = {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "val_dice": val_dice,
                "seconds": time.perf_counter() - began,
            }
            logger.info("%s: train loss %.4f, val loss %.4f, val Dice %.4f", desc, train_loss, val_loss, val_dice)
            run.end_epoch(row, save_best)

    train_set.close()
    val_set.close()
    return run.finish(
        f"({selection.column} is NaN in every epoch, see history.csv); lower lr in workflow_config.yaml or turn amp off"
    )


def evaluate_model(
    model: nn.Module,
    patch_stores: Sequence[PathLike],
    split: str = "test",
    mask_set: str = "ssa",
    device: str | torch.device | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """Pixel metrics of ``model`` (logits (B, 1, P, P)) thresholded at 0.5 over one split of ``patch_stores``.

    Counts are summed over all patches before the ratios are taken; zero-padded pixels at fragment
    borders count as background. Returns accuracy, precision, recall, dice, iou and ``patches``
    (see ``cellkd.metrics.pixel`` for 0/0). Leaves ``model`` on ``device`` in eval mode.
    """
    if split not in SPLITS:
        raise ConfigError(f"split {split!r} is unknown; expected one of {list(SPLITS)}")
    dev = resolve_device(device)
    dataset = PatchDataset(patch_stores, SPLITS[split], mask_set)
    if len(dataset) == 0:
        raise StoreError(f"{list(map(str, patch_stores))}: no {split!r} patches to evaluate; check the split ratios")
    loader = DataLoader(dataset, batch_size=batch_size, sampler=SequentialSampler(dataset))
    model = model.to(dev)
    try:
        _, counts = _evaluate(model, loader, dev)
    finally:
        dataset.close()
    metrics = {name: float(value) for name, value in pixel_metrics(counts).items()}
    metrics["patches"] = float(len(dataset))
    return metrics


def evaluate_segmentation(
    model_path: PathLike,
    patch_stores: Sequence[PathLike],
    split: str = "test",
    mask_set: str | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """``evaluate_model`` for the model in ``model_path``; ``mask_set`` None = the set it was trained on."""
    checkpoint = read_segmentation_checkpoint(model_path)
    model = segmentation_from_checkpoint(checkpoint, device)
    if mask_set is None:
        mask_set = str(checkpoint["mask_set"])
    return evaluate_model(model, patch_stores, split, mask_set, device, batch_size)
