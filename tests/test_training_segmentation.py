"""Segmentation training: real (tiny) training runs, resume, determinism, evaluation against hand counts."""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml
from conftest import killed_after
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from cellkd.config import validate_config
from cellkd.errors import ConfigError, StoreError
from cellkd.models.checkpoint import load_segmentation_model
from cellkd.models.segmentation import create_segmentation_model
from cellkd.store.atomic import atomic_h5
from cellkd.store.fragments import Fragment, FragmentStoreWriter
from cellkd.store.patches import PatchParams, PatchStore, cut_patches
from cellkd.training import segmentation as segmentation_trainer
from cellkd.training.segmentation import (
    LR_SCHEDULES,
    PatchDataset,
    SegmentationTrainParams,
    evaluate_model,
    evaluate_segmentation,
    train_segmentation,
)

CONFIG_SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"
PATCH = 64
BRIGHT, DARK = 230, 30  # preprocess maps channel 0 above 123.675 to > 0: BRIGHT is positive, DARK negative
SPLIT_COUNTS = {0: 16, 1: 4, 2: 4}

TINY = SegmentationTrainParams(
    arch="unet",
    encoder="mobilenet_v2",  # smallest checkpoints of smp's encoders: last.pt is written every epoch
    encoder_depth=3,
    decoder_channels=(16, 8, 8),
    dropout=0.1,
    epochs=3,
    batch_size=8,
    lr=1e-3,
    mask_set="ssa",
    seed=7,
)


def write_patch_store(path: Path, images: np.ndarray, masks: dict[str, np.ndarray], split: np.ndarray) -> Path:
    """Patches side by side in one fragment (+ mask) store next to ``path``, indexed by ``cut_patches`` at
    level 0 (patch i at x = i * P), with the split set to ``split``."""
    n, size = len(images), images.shape[1]
    fragment = Fragment("f000", 0, 0, n * size, size)
    fragments, mask_store = path.with_suffix(".fragments.h5"), path.with_suffix(".masks.h5")
    with FragmentStoreWriter(fragments, slide="s1", source="s1.tiff", stain="raw", mpp=0.5) as writer:
        writer.create_level(fragment, 0)[:] = np.concatenate(list(images), axis=1)
    with atomic_h5(mask_store) as h5:
        h5.attrs.update({"slide": "s1", "classes": ["tumor", "other"], "annotation_sets": sorted(masks)})
        for name, mask in masks.items():
            h5[f"fragments/f000/{name}/level0"] = np.concatenate(list(mask), axis=1)
    assert cut_patches(fragments, mask_store, path, path.stem, PatchParams(size=size, levels=(0,))) == n
    with h5py.File(path, "a") as h5:
        h5["split"][...] = split.astype(np.int8)
    return path


def blob_patches(seed: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n patches of DARK background with 3 BRIGHT disks each (radius 5-9 px, gray RGB).

    Returns images uint8 (n, 64, 64, 3), ``ssa`` uint8 (n, 64, 64, 2) = the disks exactly, each disk
    in one of two class channels, and ``wsa`` = ``ssa`` with the right half of every patch erased.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:PATCH, :PATCH]
    images = np.full((n, PATCH, PATCH, 3), DARK, dtype=np.uint8)
    ssa = np.zeros((n, PATCH, PATCH, 2), dtype=np.uint8)
    for i in range(n):
        for _ in range(3):
            cy, cx = rng.integers(8, PATCH - 8, size=2)
            disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= rng.integers(5, 10) ** 2
            images[i][disk] = BRIGHT
            ssa[i, ..., rng.integers(2)][disk] = 1
    ssa[..., 1][ssa[..., 0] == 1] = 0  # overlapping disks: one class per pixel
    wsa = ssa.copy()
    wsa[:, :, PATCH // 2 :] = 0
    return images, ssa, wsa


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def patch_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 blob patches: 16 train, 4 val, 4 test (split interleaved); annotation sets ssa and wsa."""
    n = sum(SPLIT_COUNTS.values())
    images, ssa, wsa = blob_patches(0, n)
    split = np.repeat(list(SPLIT_COUNTS), list(SPLIT_COUNTS.values()))
    split = np.random.default_rng(1).permutation(split)
    return write_patch_store(tmp_path_factory.mktemp("patches") / "blobs.h5", images, {"ssa": ssa, "wsa": wsa}, split)


@pytest.fixture(scope="module")
def trained(patch_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Output folder of a 3-epoch run of TINY on ``patch_store``."""
    out = tmp_path_factory.mktemp("trained")
    train_segmentation([patch_store], out, TINY, device="cpu")
    return out


def read_history(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


class BrightnessModel(nn.Module):
    """Stand-in segmenter: logit +10 where the (preprocessed) red channel is above the mean, -10 elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x[:, :1] > 0, 10.0, -10.0)


def test_train_segmentation_lowers_loss_and_writes_model_and_history(trained: Path) -> None:
    history = read_history(trained / "history.csv")
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert list(history[0]) == ["epoch", "train_loss", "val_loss", "val_dice", "seconds"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert all(0.0 <= row["val_dice"] <= 1.0 and row["seconds"] > 0 for row in history)
    checkpoint = torch.load(trained / "model.pt", weights_only=True)
    best = min(history, key=lambda row: row["val_loss"])
    assert checkpoint["epoch"] == best["epoch"]
    assert checkpoint["val_loss"] == pytest.approx(best["val_loss"])
    assert checkpoint["arch"] == "unet" and checkpoint["params"]["decoder_channels"] == (16, 8, 8)


def test_load_segmentation_model_rebuilds_the_best_weights_in_eval_mode(trained: Path) -> None:
    model = load_segmentation_model(trained / "model.pt", device="cpu")
    assert not model.training
    state = torch.load(trained / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    with torch.inference_mode():
        assert model(torch.zeros(2, 3, PATCH, PATCH)).shape == (2, 1, PATCH, PATCH)


def test_evaluate_segmentation_returns_metrics_in_unit_interval(trained: Path, patch_store: Path) -> None:
    metrics = evaluate_segmentation(trained / "model.pt", [patch_store], split="test", device="cpu")
    assert set(metrics) == {"accuracy", "precision", "recall", "dice", "iou", "patches"}
    assert metrics["patches"] == SPLIT_COUNTS[2]
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("accuracy", "precision", "recall", "dice", "iou"))


@pytest.mark.parametrize("mask_set", ["ssa", "wsa"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_evaluate_model_matches_hand_counted_pixels(patch_store: Path, mask_set: str, split: str) -> None:
    with PatchStore(patch_store) as store:
        rows = store.split_indices(split)
        pred = store.images[rows][..., 0] == BRIGHT
        truth = store.masks(mask_set)[rows].any(axis=-1)
    tp, fp = np.sum(pred & truth), np.sum(pred & ~truth)
    fn, tn = np.sum(~pred & truth), np.sum(~pred & ~truth)
    metrics = evaluate_model(BrightnessModel(), [patch_store], split=split, mask_set=mask_set, device="cpu")
    assert metrics["accuracy"] == pytest.approx((tp + tn) / pred.size)
    assert metrics["precision"] == pytest.approx(tp / (tp + fp))
    assert metrics["recall"] == pytest.approx(tp / (tp + fn))
    assert metrics["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert metrics["iou"] == pytest.approx(tp / (tp + fp + fn))
    if mask_set == "ssa":  # the stand-in reproduces the ssa masks exactly
        assert metrics["dice"] == 1.0


def test_evaluate_model_spans_several_stores(patch_store: Path, tmp_path: Path) -> None:
    images, ssa, _ = blob_patches(5, 3)
    ssa[0] = 0  # 1 patch whose nuclei are all missed by the annotation
    other = write_patch_store(tmp_path / "other.h5", images, {"ssa": ssa}, np.full(3, 2))
    both = evaluate_model(BrightnessModel(), [patch_store, other], mask_set="ssa", device="cpu")
    assert both["patches"] == SPLIT_COUNTS[2] + 3
    assert both["recall"] == 1.0 and both["precision"] < 1.0


def test_train_segmentation_resumes_after_kill_and_matches_an_uninterrupted_run(
    patch_store: Path, trained: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with killed_after(segmentation_trainer, epochs=2):  # last.pt and best.pt of 2 epochs survive, no model.pt
        train_segmentation([patch_store], tmp_path, TINY, device="cpu")
    assert not (tmp_path / "model.pt").exists()
    first = read_history(tmp_path / "history.csv")
    with caplog.at_level(logging.INFO, logger="cellkd.training.segmentation"):
        train_segmentation([patch_store], tmp_path, TINY, device="cpu")
    assert "resuming" in caplog.text and "after epoch 2" in caplog.text
    assert "optimizer started afresh" not in caplog.text  # an interrupted run keeps its Adam state
    resumed = read_history(tmp_path / "history.csv")
    assert [row["epoch"] for row in resumed] == [1, 2, 3]
    assert resumed[:2] == first  # same seconds too: epochs 1-2 were not rerun
    straight = read_history(trained / "history.csv")  # 3 epochs in one go, same seed
    for key in ("train_loss", "val_loss", "val_dice"):
        assert [row[key] for row in resumed] == pytest.approx([row[key] for row in straight], rel=1e-5)


def test_finished_run_keeps_a_compact_last_pt_and_continues_from_its_final_weights(
    patch_store: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    params = replace(TINY, epochs=1, max_patches_per_epoch=8)
    train_segmentation([patch_store], tmp_path, params, device="cpu")
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["finished"] and last["dropped"] == ["optimizer", "scaler"]  # constant lr: no scheduler
    assert "optimizer" not in last and "scaler" not in last
    final = last["model"]
    with caplog.at_level(logging.INFO, logger="cellkd.training.segmentation"):
        train_segmentation([patch_store], tmp_path, replace(params, epochs=2), device="cpu")
    assert "after epoch 1" in caplog.text and "optimizer started afresh" in caplog.text
    history = read_history(tmp_path / "history.csv")
    assert [row["epoch"] for row in history] == [1, 2]
    longer = torch.load(tmp_path / "last.pt", weights_only=True)
    assert longer["epoch"] == 2 and longer["finished"]
    assert any(not torch.equal(final[k], longer["model"][k]) for k in final if final[k].is_floating_point())


def torch_schedule_lrs(schedule: str, lr: float, steps: int, after: int) -> list[float]:
    """The learning rates torch's own scheduler for ``schedule`` gives after ``after`` of ``steps`` steps."""
    weight = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.Adam([weight], lr=lr)
    schedulers = {
        "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps),
        "onecycle": lambda: torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps),
    }
    scheduler = schedulers[schedule]()
    for _ in range(after):
        optimizer.step()
        scheduler.step()
    return scheduler.get_last_lr()


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_lr_schedule_is_applied_per_batch_and_a_killed_run_resumes_it_exactly(
    schedule: str, patch_store: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    params = replace(TINY, lr_schedule=schedule)  # 16 train patches in batches of 8: 2 steps per epoch, 6 in all
    train_segmentation([patch_store], tmp_path / "straight", params, device="cpu")
    with killed_after(segmentation_trainer, epochs=2):
        train_segmentation([patch_store], tmp_path / "resumed", params, device="cpu")
    last = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert last["scheduler"]["last_epoch"] == 4
    lrs = [group["lr"] for group in last["optimizer"]["param_groups"]]
    assert lrs == pytest.approx(torch_schedule_lrs(schedule, TINY.lr, steps=6, after=4), rel=1e-12)
    assert lrs[0] < TINY.lr  # a schedule, not the constant lr
    with caplog.at_level(logging.INFO, logger="cellkd.training.segmentation"):
        train_segmentation([patch_store], tmp_path / "resumed", params, device="cpu")
    assert "after epoch 2" in caplog.text and "schedule restarts" not in caplog.text
    straight = read_history(tmp_path / "straight" / "history.csv")
    resumed = read_history(tmp_path / "resumed" / "history.csv")
    for key in ("train_loss", "val_loss", "val_dice"):
        assert [row[key] for row in resumed] == pytest.approx([row[key] for row in straight], rel=1e-5)


@pytest.mark.parametrize("finished", [True, False], ids=["compact-last-pt", "killed-then-more-epochs"])
def test_lr_schedule_restarts_over_the_epochs_left_when_the_resumed_state_ends_elsewhere(
    finished: bool, patch_store: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A finished run's compact last.pt has no scheduler; a killed one planned fewer epochs: plan the rest anew."""
    params = replace(TINY, epochs=1 if finished else 2, lr_schedule="onecycle")
    if finished:
        train_segmentation([patch_store], tmp_path, params, device="cpu")
        assert "scheduler" in torch.load(tmp_path / "last.pt", weights_only=True)["dropped"]
    else:
        with killed_after(segmentation_trainer, epochs=1):
            train_segmentation([patch_store], tmp_path, params, device="cpu")
    with caplog.at_level(logging.WARNING), killed_after(segmentation_trainer, epochs=1):
        train_segmentation([patch_store], tmp_path, replace(params, epochs=4), device="cpu")  # epoch 2 of 4 only
    assert "onecycle learning-rate schedule restarts over the 3 epochs left" in caplog.text
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert last["epoch"] == 2
    assert last["scheduler"]["total_steps"] == 6 and last["scheduler"]["last_epoch"] == 2
    lrs = [group["lr"] for group in last["optimizer"]["param_groups"]]
    assert lrs == pytest.approx(torch_schedule_lrs("onecycle", TINY.lr, steps=6, after=2), rel=1e-12)


def test_constant_lr_schedule_keeps_adams_lr_and_saves_no_scheduler(patch_store: Path, tmp_path: Path) -> None:
    with killed_after(segmentation_trainer, epochs=1):
        train_segmentation([patch_store], tmp_path, TINY, device="cpu")
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    assert "scheduler" not in last
    assert [group["lr"] for group in last["optimizer"]["param_groups"]] == [TINY.lr]


@pytest.mark.parametrize("schedule", [None, "constant", "cosine", "onecycle"])
def test_config_schema_lr_schedule_accepts_the_trainers_schedules_and_defaults_to_constant(
    schedule: str | None,
) -> None:
    config: dict = {"segmentation": {} if schedule is None else {"lr_schedule": schedule}}
    validate_config(config, CONFIG_SCHEMA, "cfg.yaml")
    assert config["segmentation"]["lr_schedule"] == (schedule or "constant")
    assert SegmentationTrainParams(lr_schedule=config["segmentation"]["lr_schedule"]).lr_schedule in LR_SCHEDULES


def test_config_schema_lr_schedule_rejects_other_values_and_lists_the_trainers() -> None:
    with pytest.raises(ConfigError, match=r"segmentation.lr_schedule: 'step' is not one of"):
        validate_config({"segmentation": {"lr_schedule": "step"}}, CONFIG_SCHEMA, "cfg.yaml")
    schema = yaml.safe_load(CONFIG_SCHEMA.read_text())
    assert tuple(schema["properties"]["segmentation"]["properties"]["lr_schedule"]["enum"]) == LR_SCHEDULES


def test_train_segmentation_after_kill_at_the_end_only_rewrites_outputs(patch_store: Path, tmp_path: Path) -> None:
    params = replace(TINY, epochs=1, max_patches_per_epoch=8)
    train_segmentation([patch_store], tmp_path, params, device="cpu")
    history = (tmp_path / "history.csv").read_text()
    weights = torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]
    for output in ("model.pt", "history.csv"):  # what Snakemake deletes after a failed job
        (tmp_path / output).unlink()
    train_segmentation([patch_store], tmp_path, params, device="cpu")
    assert (tmp_path / "history.csv").read_text() == history
    again = torch.load(tmp_path / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(weights[k], again[k]) for k in weights)


def test_train_segmentation_restarts_when_a_store_was_rewritten(
    patch_store: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images, ssa, _ = blob_patches(9, 8)
    store = write_patch_store(tmp_path / "store.h5", images, {"ssa": ssa}, np.zeros(8))
    params = replace(TINY, epochs=1)
    train_segmentation([store], tmp_path / "out", params, device="cpu")
    images, ssa, _ = blob_patches(10, 9)
    write_patch_store(store, images, {"ssa": ssa}, np.zeros(9))  # the upstream rule ran again
    with caplog.at_level(logging.WARNING):
        train_segmentation([store], tmp_path / "out", params, device="cpu")
    assert "trained on other patch stores" in caplog.text


def test_train_segmentation_restarts_when_only_the_pixels_were_rewritten(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The patch store indexes the fragment store: new pixels there (same shapes) are new training data."""
    images, ssa, _ = blob_patches(9, 8)
    store = write_patch_store(tmp_path / "store.h5", images, {"ssa": ssa}, np.zeros(8))
    params = replace(TINY, epochs=1)
    train_segmentation([store], tmp_path / "out", params, device="cpu")
    index_before = store.stat().st_mtime_ns
    with FragmentStoreWriter(store.with_suffix(".fragments.h5"), slide="s1", source="s", stain="raw", mpp=0.5) as w:
        w.create_level(Fragment("f000", 0, 0, 8 * PATCH, PATCH), 0)[:] = 255 - np.concatenate(list(images), axis=1)
    assert store.stat().st_mtime_ns == index_before
    with caplog.at_level(logging.WARNING):
        train_segmentation([store], tmp_path / "out", params, device="cpu")
    assert "trained on other patch stores" in caplog.text


def test_train_segmentation_is_deterministic_and_leaves_global_rng_alone(patch_store: Path, tmp_path: Path) -> None:
    params = replace(TINY, epochs=1, max_patches_per_epoch=8)
    before = torch.get_rng_state()
    histories = []
    for run in ("a", "b"):
        train_segmentation([patch_store], tmp_path / run, params, device="cpu")
        histories.append([(r["train_loss"], r["val_loss"]) for r in read_history(tmp_path / run / "history.csv")])
    assert histories[0] == histories[1]
    assert torch.equal(torch.get_rng_state(), before)
    weights = [torch.load(tmp_path / run / "model.pt", weights_only=True)["state_dict"] for run in ("a", "b")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_train_segmentation_with_workers_matches_single_process(patch_store: Path, tmp_path: Path) -> None:
    params = replace(TINY, epochs=1, max_patches_per_epoch=8)
    train_segmentation([patch_store], tmp_path / "main", params, device="cpu")
    train_segmentation([patch_store], tmp_path / "workers", replace(params, num_workers=2), device="cpu")
    assert read_history(tmp_path / "main" / "history.csv")[0]["train_loss"] == pytest.approx(
        read_history(tmp_path / "workers" / "history.csv")[0]["train_loss"], rel=1e-6
    )


def test_amp_on_cpu_trains_in_bfloat16_validates_in_float32_and_keeps_losses_finite(
    patch_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The H200 run with amp logged ``val loss nan``: validation must not run under autocast."""
    from cellkd.training import segmentation as module

    head_outputs: list[tuple[bool, torch.dtype]] = []  # (training mode, dtype) of every forward pass

    def recording_model(*args: object, **kwargs: object) -> nn.Module:
        model = create_segmentation_model(*args, **kwargs)
        model.segmentation_head.register_forward_hook(
            lambda m, _inputs, out: head_outputs.append((m.training, out.dtype))
        )
        return model

    monkeypatch.setattr(module, "create_segmentation_model", recording_model)
    params = replace(TINY, epochs=2, amp=True, channels_last=True)
    with caplog.at_level(logging.INFO):
        train_segmentation([patch_store], tmp_path, params, device="cpu")
    assert "precision mixed (bfloat16; validation in float32), channels_last True" in caplog.text
    assert {dtype for training, dtype in head_outputs if training} == {torch.bfloat16}
    assert {dtype for training, dtype in head_outputs if not training} == {torch.float32}
    history = read_history(tmp_path / "history.csv")
    assert [row["epoch"] for row in history] == [1, 2]
    for row in history:
        assert math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"]), row
        assert 0.0 <= row["val_dice"] <= 1.0
    model = load_segmentation_model(tmp_path / "model.pt", "cpu")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_accelerator_settings_default_to_off_on_cpu(patch_store: Path, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.INFO):
        train_segmentation([patch_store], tmp_path, replace(TINY, epochs=1, max_patches_per_epoch=8), device="cpu")
    assert "precision float32, channels_last False, 0 data loader workers, pinned memory False" in caplog.text


def test_train_segmentation_restarts_when_params_changed(
    patch_store: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    params = replace(TINY, epochs=1, max_patches_per_epoch=8)
    train_segmentation([patch_store], tmp_path, params, device="cpu")
    with caplog.at_level(logging.WARNING):
        train_segmentation([patch_store], tmp_path, replace(params, lr=5e-4), device="cpu")
    assert "other parameters; training from scratch" in caplog.text
    assert len(read_history(tmp_path / "history.csv")) == 1


def test_train_segmentation_without_val_split_selects_by_train_loss(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images, ssa, _ = blob_patches(3, 8)
    store = write_patch_store(tmp_path / "train_only.h5", images, {"ssa": ssa}, np.zeros(8))
    with caplog.at_level(logging.WARNING):
        model_path = train_segmentation([store], tmp_path / "out", replace(TINY, epochs=1), device="cpu")
    assert "no validation patches" in caplog.text
    (row,) = read_history(tmp_path / "out" / "history.csv")
    assert math.isnan(row["val_loss"]) and math.isnan(row["val_dice"])
    checkpoint = torch.load(model_path, weights_only=True)
    assert checkpoint["criterion"] == "train_loss" and checkpoint["val_loss"] == pytest.approx(row["train_loss"])


@settings(max_examples=20, deadline=None)
@given(epoch=st.integers(0, 1000), seed=st.integers(0, 2**31))
def test_patch_dataset_augmentation_keeps_image_and_mask_aligned(patch_store: Path, epoch: int, seed: int) -> None:
    dataset = PatchDataset([patch_store], 0, "ssa", augment=True, seed=seed)
    dataset.set_epoch(epoch)
    for i in range(3):
        image, mask = dataset[i]
        assert image.shape == (PATCH, PATCH, 3) and image.dtype == torch.uint8
        assert mask.shape == (1, PATCH, PATCH) and mask.dtype == torch.uint8
        assert torch.equal(mask[0].bool(), image[..., 0] == BRIGHT)
    again = PatchDataset([patch_store], 0, "ssa", augment=True, seed=seed)
    again.set_epoch(epoch)
    assert torch.equal(again[2][0], dataset[2][0])


def test_patch_dataset_mask_is_union_of_class_channels(patch_store: Path) -> None:
    dataset = PatchDataset([patch_store], 1, "ssa")
    with PatchStore(patch_store) as store:
        classes = store.masks("ssa")[int(store.split_indices("val")[0])]
    assert classes[..., 0].any() or classes[..., 1].any()
    assert np.array_equal(dataset[0][1][0].numpy(), classes.max(axis=-1))


def test_patch_dataset_keep_evenly_spreads_the_kept_patches_over_both_stores(patch_store: Path, tmp_path: Path) -> None:
    images, ssa, _ = blob_patches(11, 6)
    other = write_patch_store(tmp_path / "other.h5", images, {"ssa": ssa}, np.zeros(6))
    dataset = PatchDataset([patch_store, other], 0, "ssa")  # 16 + 6 training patches
    everything = dataset.index.copy()
    dataset.keep_evenly(None)
    np.testing.assert_array_equal(dataset.index, everything)
    dataset.keep_evenly(4)
    np.testing.assert_array_equal(dataset.index, everything[[0, 7, 14, 21]])
    assert set(dataset.index[:, 0]) == {0, 1}  # both stores keep a share
    dataset.keep_evenly(10)  # more than it holds: unchanged
    assert len(dataset) == 4


def test_patch_dataset_unknown_mask_set_names_available_sets(patch_store: Path) -> None:
    with pytest.raises(StoreError, match=r"no annotation set 'ea'.*\['ssa', 'wsa'\]"):
        PatchDataset([patch_store], 0, "ea")


def test_train_segmentation_rejects_incomplete_store(tmp_path: Path) -> None:
    images, ssa, _ = blob_patches(0, 2)
    store = write_patch_store(tmp_path / "partial.h5", images, {"ssa": ssa}, np.zeros(2))
    with h5py.File(store, "a") as h5:
        h5.attrs["complete"] = False
    with pytest.raises(StoreError, match="incomplete"):
        train_segmentation([store], tmp_path / "out", TINY, device="cpu")
    assert not (tmp_path / "out" / "model.pt").exists()


def test_train_segmentation_without_train_patches_raises(tmp_path: Path) -> None:
    images, ssa, _ = blob_patches(0, 2)
    store = write_patch_store(tmp_path / "test_only.h5", images, {"ssa": ssa}, np.full(2, 2))
    with pytest.raises(StoreError, match="no training patches"):
        train_segmentation([store], tmp_path / "out", TINY, device="cpu")


def test_missing_patch_store_raises_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot open patch store"):
        PatchDataset([tmp_path / "nope.h5"], 0, "ssa")


def test_load_segmentation_model_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no such model checkpoint"):
        load_segmentation_model(tmp_path / "model.pt")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"arch": "segformer"}, "arch 'segformer' is unknown"),
        ({"epochs": 0}, "epochs=0 must be >= 1"),
        ({"lr": -1.0}, "lr=-1.0 must be a positive number"),
        ({"dropout": 1.0}, "dropout=1.0"),
        ({"encoder_depth": 2, "decoder_channels": None}, "encoder_depth=2"),
        ({"decoder_channels": (8, 8)}, "one entry per encoder stage"),
        ({"max_patches_per_epoch": 0}, "max_patches_per_epoch=0"),
        ({"max_val_patches": 0}, "max_val_patches=0"),
        ({"lr_schedule": "step"}, r"lr_schedule='step' must be one of \['constant', 'cosine', 'onecycle'\]"),
    ],
)
def test_segmentation_train_params_reject_bad_values(change: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        replace(TINY, **change)


def test_segmentation_train_params_from_dict_names_unknown_keys() -> None:
    assert SegmentationTrainParams.from_dict({"decoder_channels": [16, 8, 8], "encoder_depth": 3}).decoder_channels == (
        16,
        8,
        8,
    )
    with pytest.raises(ConfigError, match=r"unknown segmentation training parameter\(s\) \['epoch'\]"):
        SegmentationTrainParams.from_dict({"epoch": 3})


@pytest.mark.parametrize(
    ("device", "match"),
    [("tpu", "not one of auto, cpu, cuda or cuda:N"), ("gpu0", "not one of"), ("cuda:64", "torch sees")],
)
def test_resolve_device_rejects_unknown_and_absent_devices(device: str, match: str) -> None:
    from cellkd.device import resolve_device

    with pytest.raises(ConfigError, match=match):
        resolve_device(device)


def test_default_device_setting_applies_to_calls_without_a_device() -> None:
    from cellkd import device

    assert device.resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert device.resolve_device("auto").type == expected
    try:
        device.set_default_device("cpu")
        assert device.resolve_device(None) == torch.device("cpu")
        with pytest.raises(ConfigError, match="not one of"):
            device.set_default_device("tpu")
        assert device.resolve_device(None) == torch.device("cpu")  # a refused setting changes nothing
    finally:
        device.set_default_device("auto")


def test_published_model_shares_best_pt_on_disk_and_survives_its_replacement(tmp_path: Path) -> None:
    from cellkd.models.checkpoint import torch_save_atomic
    from cellkd.training.common import publish_model

    best, model = tmp_path / "best.pt", tmp_path / "model.pt"
    torch_save_atomic({"epoch": 1}, best)
    publish_model(best, model)
    assert model.read_bytes() == best.read_bytes()
    assert model.stat().st_ino == best.stat().st_ino  # one file on disk, not two
    torch_save_atomic({"epoch": 2}, best)  # a later run replaces best.pt by a rename
    assert torch.load(model, weights_only=True) == {"epoch": 1}
    assert not list(tmp_path.glob(".*.partial"))
