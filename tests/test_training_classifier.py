"""Classifier training: tiny real runs on synthetic nuclei stores, distillation, resume, determinism, evaluation."""

from __future__ import annotations

import csv
import logging
import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import killed_after

from cellkd.errors import ConfigError, StoreError
from cellkd.models import MODEL_REGISTRY, classifier_input, register_model
from cellkd.models.classifiers import RCCNet
from cellkd.report.classification import evaluate_classifier_stores
from cellkd.training.classifier import (
    ClassifierTrainParams,
    cache_teacher_logits,
    cap_per_class,
    distillation_loss,
    evaluate_classifier,
    load_classifier,
    load_teacher_logits,
    predict_logits,
    train_classifier,
)
from cellkd.training.classifier import evaluate as classifier_evaluate
from cellkd.training.classifier import train as classifier_trainer
from cellkd.training.classifier.data import augment_stain, draw_stain_jitter, load_crops, read_nucleus_rows
from cellkd.training.classifier.distillation import class_weights
from cellkd.training.classifier.evaluate import CPU_FORWARD_BATCH, crop_logits, infer_logits, prepare_for_inference
from cellkd.training.classifier.train import epochs_without_improvement

CLASSES = ["other", "immune", "muscle", "background"]
BG = (205, 170, 195)  # pinkish eosin background
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)

TINY = ClassifierTrainParams(arch="rccnet", epochs=3, batch_size=32, lr=1e-3, dropout=0.1, seed=3)
QUICK = replace(TINY, epochs=1, max_per_class=12)


def blob_crops(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n crops, n/4 of each class, on a noisy BG background: returns (level0 uint8 (n, 32, 32, 3), labels int8 (n,)).

    other (0): small dark-red disk, radius 3-4; immune (1): large dark-blue disk, radius 7-9;
    muscle (2): green ellipse with semi-axes 12 x 3 at a random angle; background (3): no blob.
    Blob centres jitter by +-3 px around the crop centre.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:32, :32].astype(np.float64)
    labels = np.repeat(np.arange(4, dtype=np.int8), n // 4)
    crops = np.empty((len(labels), 32, 32, 3), dtype=np.uint8)
    for i, label in enumerate(labels):
        image = np.asarray(BG, dtype=np.float64) + rng.normal(0, 12, (32, 32, 3))
        cy, cx = 15.5 + rng.uniform(-3, 3, size=2)
        if label in (0, 1):
            radius = rng.uniform(3, 4.5) if label == 0 else rng.uniform(7, 9)
            blob = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
            colour = (120, 30, 50) if label == 0 else (40, 40, 140)
        elif label == 2:
            angle = rng.uniform(0, np.pi)
            u = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
            v = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle)
            blob = (u / 12) ** 2 + (v / 3) ** 2 <= 1
            colour = (60, 140, 60)
        else:
            blob = np.zeros((32, 32), dtype=bool)
            colour = BG
        image[blob] = np.asarray(colour) + rng.normal(0, 12, (int(blob.sum()), 3))
        crops[i] = np.clip(image, 0, 255).astype(np.uint8)
    return crops, labels


def write_nuclei_store(path: Path, level0: np.ndarray, labels: dict[str, np.ndarray], split: np.ndarray) -> Path:
    """Write a complete nuclei store with the layout of ``results/nuclei/{stain}/{slide}.h5``.

    level1 = level0 averaged over 2x2 pixels; level2 = level0 subsampled 4x, centred on a 16x16 BG canvas.
    """
    n = len(level0)
    level1 = level0.reshape(n, 16, 2, 16, 2, 3).mean(axis=(2, 4)).astype(np.uint8)
    level2 = np.empty((n, 16, 16, 3), dtype=np.uint8)
    level2[:] = BG
    level2[:, 4:12, 4:12] = level0[:, ::4, ::4]
    with h5py.File(path, "w") as h5:
        h5.attrs.update(
            {
                "complete": True,
                "slide": path.stem,
                "stain": "raw",
                "classes": CLASSES,
                "label_sets": sorted(labels),
                "crop_size": 32,
                "multiscale_size": 16,
                "split_names": ["train", "val", "test"],
            }
        )
        h5.create_dataset("crops/level0", data=level0, chunks=(min(n, 64), 32, 32, 3))
        h5.create_dataset("crops/level1", data=level1)
        h5.create_dataset("crops/level2", data=level2)
        for name, values in labels.items():
            h5.create_dataset(f"labels/{name}", data=values.astype(np.int8))
        h5.create_dataset("split", data=split.astype(np.int8))
        h5.create_dataset("fragment", data=np.zeros(n, dtype=np.int32))
        h5.create_dataset("centroid_x", data=np.arange(n, dtype=np.float32))
        h5.create_dataset("centroid_y", data=np.zeros(n, dtype=np.float32))
        h5.create_dataset("area", data=np.full(n, 50, dtype=np.int32))
        h5.create_dataset("bbox", data=np.zeros((n, 4), dtype=np.int32))
    return path


def random_split(seed: int, n: int) -> np.ndarray:
    """0/1/2 in SPLIT_FRACTIONS proportions, shuffled."""
    counts = [round(f * n) for f in SPLIT_FRACTIONS[:2]]
    split = np.repeat([0, 1, 2], [*counts, n - sum(counts)])
    return np.random.default_rng(seed).permutation(split)


def make_store(path: Path, seed: int, n: int) -> Path:
    """A store of ``blob_crops(seed, n)``: ``ssa`` = the true classes; ``wsa`` = ssa with every 3rd row -1."""
    crops, truth = blob_crops(seed, n)
    wsa = truth.copy()
    wsa[::3] = -1
    return write_nuclei_store(path, crops, {"ssa": truth, "wsa": wsa}, random_split(seed + 100, n))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two stores of blob crops: 360 rows (seed 0) and 240 rows (seed 1), each 60/20/20 % train/val/test."""
    folder = tmp_path_factory.mktemp("nuclei")
    return [make_store(folder / "slide_a.h5", 0, 360), make_store(folder / "slide_b.h5", 1, 240)]


@pytest.fixture(scope="module")
def trained(stores: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Output folder of a 3-epoch TINY (rccnet) run on both stores with the ssa labels."""
    out = tmp_path_factory.mktemp("teacher")
    train_classifier(stores, "ssa", out, TINY, device="cpu")
    return out


def read_history(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def all_rows(stores: list[Path], key: str) -> np.ndarray:
    parts = []
    for path in stores:
        with h5py.File(path) as h5:
            parts.append(h5[key][:])
    return np.concatenate(parts)


class CountingRCCNet(RCCNet):
    """RCCNet that counts its forward calls and raises once ``armed`` (a teacher that must not run)."""

    calls = 0
    armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if CountingRCCNet.armed:
            raise AssertionError("the teacher ran during student training")
        CountingRCCNet.calls += 1
        return super().forward(x)


@pytest.fixture()
def counting_arch() -> Iterator[str]:
    """Registers "counting_rccnet" (CountingRCCNet) in the model registry for one test."""
    register_model("counting_rccnet", CountingRCCNet)
    CountingRCCNet.calls, CountingRCCNet.armed = 0, False
    yield "counting_rccnet"
    del MODEL_REGISTRY["counting_rccnet"]
    CountingRCCNet.armed = False


# ------------------------------------------------------------------------------------ distillation loss


def test_distillation_loss_with_t1_is_kl_between_teacher_and_student() -> None:
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen)
    y = torch.tensor([0, 1, 2, 3, 0])
    loss = distillation_loss(s, y, t, temperature=1.0, w_task=0.0, w_kd=1.0)
    p_t = t.softmax(dim=1)
    soft_ce = -(p_t * s.log_softmax(dim=1)).sum(dim=1).mean()
    entropy = -(p_t * p_t.log()).sum(dim=1).mean()
    assert loss.item() == pytest.approx((soft_ce - entropy).item(), rel=1e-5)
    assert distillation_loss(s, y, s, 1.0, 0.0, 1.0).item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_loss_combines_ce_and_t_squared_kl() -> None:
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen)
    y = torch.tensor([0, 1, 2, 3, 3, 1])
    temperature = 4.0
    p_t, log_p_s = (t / temperature).softmax(1), (s / temperature).log_softmax(1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(1).mean()
    expected = 0.7 * F.cross_entropy(s, y) + 0.3 * temperature**2 * kl
    assert distillation_loss(s, y, t, temperature, 0.7, 0.3).item() == pytest.approx(expected.item(), rel=1e-5)
    assert distillation_loss(s, y, None, temperature, 1.0, 0.0).item() == pytest.approx(F.cross_entropy(s, y).item())


def test_distillation_loss_t_squared_keeps_gradient_scale_independent_of_temperature() -> None:
    """For T >> |logits|, d(T^2 KL)/ds -> centred(s - t) / (K B) for every T; KL alone would shrink as 1/T^2."""
    gen = torch.Generator().manual_seed(2)
    s0, t = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    y = torch.zeros(3, dtype=torch.long)
    grads = {}
    for temperature in (25.0, 50.0):
        s = s0.clone().requires_grad_(True)
        distillation_loss(s, y, t, temperature, 0.0, 1.0).backward()
        grads[temperature] = s.grad
    diff = s0 - t
    limit = (diff - diff.mean(dim=1, keepdim=True)) / (4 * 3)
    for grad in grads.values():
        assert torch.allclose(grad, limit, rtol=0.1, atol=2e-3)
    assert torch.allclose(grads[25.0], grads[50.0], rtol=0.1, atol=1e-3)
    # Without the T^2 factor the gradients would differ by (50/25)^2 = 4.
    assert grads[25.0].norm() / grads[50.0].norm() == pytest.approx(1.0, abs=0.1)


def test_distillation_loss_class_weights_weight_the_task_term_only() -> None:
    gen = torch.Generator().manual_seed(3)
    s, t = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    y, w = torch.tensor([0, 1, 1, 2]), torch.tensor([2.0, 0.5, 1.0])
    expected = F.cross_entropy(s, y, weight=w) + distillation_loss(s, y, t, 2.0, 0.0, 1.0)
    assert distillation_loss(s, y, t, 2.0, 1.0, 1.0, class_weights=w).item() == pytest.approx(expected.item())


def test_class_weighting_gives_inverse_frequency_weights(stores: list[Path], tmp_path: Path) -> None:
    """Targets 0 x6, 1 x2, 3 x4 (class 2 absent): w_c = 12 / (3 * n_c), 0 for the absent class."""
    weights = class_weights(np.repeat([0, 1, 3], [6, 2, 4]), 4)
    np.testing.assert_allclose(weights, [12 / 18, 12 / 6, 0.0, 12 / 12])
    model_path = train_classifier(stores, "ssa", tmp_path, replace(QUICK, class_weighting=True), device="cpu")
    assert torch.load(model_path, weights_only=True)["params"]["class_weighting"] is True


@pytest.mark.parametrize("phase", ["teacher", "student"])
def test_class_weighting_is_a_config_option_of_teacher_and_student(phase: str) -> None:
    """The schema takes ``class_weighting`` for both phases, and the rules' whole-block params reach the trainer."""
    import yaml

    from cellkd.config import validate_config

    config = yaml.safe_load(Path("workflow_config.yaml").read_text())
    config[phase]["class_weighting"] = True
    validate_config(config, "schemas/config.schema.yaml", "workflow_config.yaml")
    settings = {k: v for k, v in config[phase].items() if k not in ("archs", "labels", "validate_against")}
    assert ClassifierTrainParams.from_dict({**settings, "arch": "vgg4"}).class_weighting is True


@pytest.mark.parametrize("phase", ["teacher", "student"])
def test_stain_augment_is_a_config_option_of_teacher_and_student(phase: str) -> None:
    """The schema takes ``stain_augment`` in [0, 1) for both phases, and the rules' whole-block params reach the
    trainer; the shipped default is off."""
    import yaml

    from cellkd.config import validate_config

    config = yaml.safe_load(Path("workflow_config.yaml").read_text())
    validate_config(config, "schemas/config.schema.yaml", "workflow_config.yaml")
    assert config[phase]["stain_augment"] == 0.0
    config[phase]["stain_augment"] = 0.1
    validate_config(config, "schemas/config.schema.yaml", "workflow_config.yaml")
    settings = {k: v for k, v in config[phase].items() if k not in ("archs", "labels", "validate_against")}
    assert ClassifierTrainParams.from_dict({**settings, "arch": "vgg4"}).stain_augment == 0.1
    config[phase]["stain_augment"] = 1.0
    with pytest.raises(ConfigError, match="stain_augment"):
        validate_config(config, "schemas/config.schema.yaml", "workflow_config.yaml")


def test_stain_jitter_of_strength_zero_gives_the_crops_back_bit_identical() -> None:
    crops, _ = blob_crops(5, 16)
    every_value = (np.arange(32 * 32) % 256).astype(np.uint8).reshape(1, 32, 32, 1).repeat(3, axis=3)  # 0..255
    batch = torch.from_numpy(np.concatenate([crops, every_value]))
    scale, shift = draw_stain_jitter(np.random.default_rng(0), len(batch), 0.0)
    assert torch.equal(augment_stain(batch, scale, shift), batch)


def test_stain_jitter_changes_colours_keeps_the_crops_shape_and_is_seeded() -> None:
    level0 = torch.from_numpy(blob_crops(5, 16)[0])
    multiscale = torch.cat([level0[:, :16, :16], level0[:, :16, :16]], dim=3)  # two identical 'levels'

    def jittered(crops: torch.Tensor, seed: int) -> torch.Tensor:
        return augment_stain(crops, *draw_stain_jitter(np.random.default_rng(seed), len(crops), 0.1))

    for crops in (level0, multiscale):
        out = jittered(crops, 1)
        assert out.shape == crops.shape and out.dtype == torch.uint8
        assert torch.equal(out, jittered(crops, 1))
        assert not torch.equal(out, jittered(crops, 2))
        # every crop changes colour, and not by a uniform shift of the three channels
        change = out.float() - crops.float()
        assert (change.abs().mean(dim=(1, 2)) > 0.5).any(dim=1).all()
        assert (change.mean(dim=(1, 2)).std(dim=1) > 0.1).all()
    out = jittered(multiscale, 1)
    assert torch.equal(out[..., :3], out[..., 3:])  # both levels of a nucleus get its one jitter
    hematoxylin_up = augment_stain(level0, np.array([[1.3, 1, 1]] * 16, np.float32), np.zeros((16, 3), np.float32))
    assert (hematoxylin_up.float().mean(dim=(0, 1, 2)) < level0.float().mean(dim=(0, 1, 2))).all()  # darker
    with pytest.raises(ValueError, match="multiple of 3"):
        augment_stain(level0[..., :2], *draw_stain_jitter(np.random.default_rng(0), 16, 0.1))


def test_stain_augment_reaches_every_training_batch_only_when_on(
    stores: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``stain_augment`` > 0 every training crop is jittered once per epoch (the trainer's seeded draws, so
    a rerun is identical); at 0 the augmentation is never called and the run is today's."""
    jittered: list[int] = []

    def spy(crops: torch.Tensor, scale: np.ndarray, shift: np.ndarray) -> torch.Tensor:
        assert np.abs(scale - 1).max() <= 0.2 and np.abs(shift).max() <= 0.2
        jittered.append(len(crops))
        return augment_stain(crops, scale, shift)

    monkeypatch.setattr(classifier_trainer, "augment_stain", spy)
    train_classifier(stores, "ssa", tmp_path / "off", QUICK, device="cpu")
    assert jittered == []
    on = replace(QUICK, stain_augment=0.2)
    for run in ("on", "again"):
        train_classifier(stores, "ssa", tmp_path / run, on, device="cpu")
    assert sum(jittered) == 2 * 4 * QUICK.max_per_class  # every capped training row, in each run
    weights = [torch.load(tmp_path / run / "model.pt", weights_only=True) for run in ("off", "on", "again")]
    assert weights[1]["params"]["stain_augment"] == 0.2
    assert all(torch.equal(weights[1]["state_dict"][k], weights[2]["state_dict"][k]) for k in weights[1]["state_dict"])
    assert not torch.equal(weights[0]["state_dict"]["0.weight"], weights[1]["state_dict"]["0.weight"])


def test_distillation_loss_soft_term_needs_teacher_logits() -> None:
    with pytest.raises(ValueError, match="needs teacher_logits"):
        distillation_loss(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), None, 2.0, 1.0, 0.5)


# -------------------------------------------------------------------------------------------- training


def test_train_classifier_beats_chance_and_keeps_best_val_f1(trained: Path, stores: list[Path]) -> None:
    history = read_history(trained / "history.csv")
    assert list(history[0]) == ["epoch", "train_loss", "val_loss", "val_accuracy", "val_f1", "seconds"]
    assert [row["epoch"] for row in history] == [1, 2, 3]
    checkpoint = torch.load(trained / "model.pt", weights_only=True)
    best = max(history, key=lambda row: row["val_f1"])
    assert checkpoint["epoch"] == best["epoch"] and checkpoint["score"] == pytest.approx(best["val_f1"])
    assert checkpoint["classes"] == CLASSES and checkpoint["input_kind"] == "level0"
    metrics = evaluate_classifier(trained / "model.pt", stores, "ssa", "test", device="cpu")
    assert metrics["f1"] > 0.6, metrics  # chance is 0.25
    assert metrics["rows"] == np.sum(all_rows(stores, "split") == 2)
    assert metrics["confusion"].sum() == metrics["rows"]


def test_load_classifier_rebuilds_the_best_weights_in_eval_mode(trained: Path) -> None:
    model = load_classifier(trained / "model.pt", device="cpu")
    assert not model.training and model.input_kind == "level0"
    state = torch.load(trained / "model.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())


def test_predict_logits_covers_every_row_in_store_order(trained: Path, stores: list[Path]) -> None:
    logits = predict_logits(trained / "model.pt", stores, batch_size=100, device="cpu")
    n_a = 360
    assert logits.shape == (600, 4) and logits.dtype == np.float32
    model = load_classifier(trained / "model.pt", device="cpu")
    with h5py.File(stores[1]) as h5:
        crops = torch.from_numpy(h5["crops/level0"][[0, 239]])
    with torch.inference_mode():
        expected = model(classifier_input(crops)).numpy()
    np.testing.assert_allclose(logits[[n_a, n_a + 239]], expected, rtol=1e-4, atol=1e-4)


def test_crop_logits_of_held_crops_match_predict_logits_of_those_rows(trained: Path, stores: list[Path]) -> None:
    # fine-tuning scores the crops it holds instead of streaming every row again: same logits, same argmax
    selected = np.array([3, 17, 359, 360, 361, 598], dtype=np.int64)
    crops = load_crops(read_nucleus_rows(stores, None), selected, "level0")
    model = prepare_for_inference(load_classifier(trained / "model.pt", device="cpu"))
    logits = crop_logits(model, crops, batch_size=4)  # two reading batches, the second partial
    streamed = predict_logits(trained / "model.pt", stores, device="cpu")[selected]
    assert logits.shape == (6, 4) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, streamed, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(logits.argmax(axis=1), streamed.argmax(axis=1))


def test_cpu_inference_in_channels_last_and_small_batches_gives_the_plain_forwards_logits() -> None:
    torch.manual_seed(0)
    model = RCCNet().eval()
    crops = torch.randint(0, 256, (CPU_FORWARD_BATCH * 2 + 7, 32, 32, 3), dtype=torch.uint8)  # 3 forward batches
    with torch.inference_mode():
        expected = model(classifier_input(crops))
        prepared = prepare_for_inference(model)
        logits = infer_logits(prepared, crops)
    assert prepared.training is False
    assert prepared[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert logits.shape == expected.shape and logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)  # float rounding of another conv layout only


def test_evaluate_classifier_scores_labelled_rows_of_the_split_against_hand_counts(stores: list[Path]) -> None:
    """Logits = one-hot of the truth, except test rows 0 and 1 predicted as class 3: hand-computed metrics."""
    truth = all_rows(stores, "labels/ssa").astype(np.int64)
    wsa = all_rows(stores, "labels/wsa").astype(np.int64)
    split = all_rows(stores, "split")
    logits = np.eye(4, dtype=np.float32)[truth]
    rows = np.flatnonzero((split == 2) & (wsa >= 0))
    logits[rows[:2]] = np.eye(4, dtype=np.float32)[3]
    metrics = evaluate_classifier("unused.pt", stores, "wsa", "test", logits=logits)
    n = len(rows)
    wrong = [int(truth[r]) for r in rows[:2] if truth[r] != 3]
    assert metrics["rows"] == n
    assert metrics["accuracy"] == pytest.approx((n - len(wrong)) / n)
    expected = np.bincount(truth[rows] * 4 + truth[rows], minlength=16).reshape(4, 4)
    for c in wrong:
        expected[c, c] -= 1
        expected[c, 3] += 1
    np.testing.assert_array_equal(metrics["confusion"], expected)
    support = expected.sum(axis=1)
    assert [metrics["per_class"][name]["support"] for name in CLASSES] == support.tolist()
    assert metrics["per_class"]["background"]["precision"] == pytest.approx(expected[3, 3] / expected[:, 3].sum())


def test_train_classifier_resumes_after_kill_and_matches_an_uninterrupted_run(
    stores: list[Path], trained: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with killed_after(classifier_trainer, epochs=2):  # last.pt and best.pt of 2 epochs survive, no model.pt
        train_classifier(stores, "ssa", tmp_path, TINY, device="cpu")
    assert not (tmp_path / "model.pt").exists()
    first = read_history(tmp_path / "history.csv")
    with caplog.at_level(logging.INFO, logger="cellkd.training.classifier"):
        train_classifier(stores, "ssa", tmp_path, TINY, device="cpu")
    assert "resuming" in caplog.text and "after epoch 2" in caplog.text
    resumed = read_history(tmp_path / "history.csv")
    assert resumed[:2] == first  # same seconds too: epochs 1-2 were not rerun
    straight = read_history(trained / "history.csv")
    for key in ("train_loss", "val_loss", "val_f1"):
        assert [row[key] for row in resumed] == pytest.approx([row[key] for row in straight], rel=1e-5)


def test_last_pt_of_an_older_format_restarts_the_run_from_scratch(
    stores: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    train_classifier(stores, "ssa", tmp_path / "old", QUICK, device="cpu")
    last = tmp_path / "old" / "last.pt"
    state = torch.load(last, weights_only=True)
    del state["torch_rng"]  # as if written by a cellkd whose resume state lacked a key this one reads
    torch.save(state, last)
    (tmp_path / "old" / "model.pt").unlink()
    with caplog.at_level(logging.WARNING):
        train_classifier(stores, "ssa", tmp_path / "old", QUICK, device="cpu")
    assert "older resume format" in caplog.text and "training from scratch" in caplog.text
    train_classifier(stores, "ssa", tmp_path / "fresh", QUICK, device="cpu")
    weights = [torch.load(tmp_path / run / "model.pt", weights_only=True)["state_dict"] for run in ("old", "fresh")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # a clean restart, not a half-resume


def test_train_classifier_is_deterministic_and_leaves_global_rng_alone(stores: list[Path], tmp_path: Path) -> None:
    before = torch.get_rng_state()
    for run in ("a", "b"):
        train_classifier(stores, "ssa", tmp_path / run, QUICK, device="cpu")
    assert torch.equal(torch.get_rng_state(), before)
    weights = [torch.load(tmp_path / run / "model.pt", weights_only=True)["state_dict"] for run in ("a", "b")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    train_classifier(stores, "ssa", tmp_path / "c", replace(QUICK, seed=4), device="cpu")
    other = torch.load(tmp_path / "c" / "model.pt", weights_only=True)["state_dict"]
    assert not torch.equal(other["0.weight"], weights[0]["0.weight"])


def test_cap_per_class_takes_exactly_cap_rows_per_class_seeded() -> None:
    rows = np.arange(100, 200)
    targets = np.repeat([0, 1, 2, 3], [40, 30, 4, 26])
    kept = cap_per_class(rows, targets, 10, seed=0)
    assert np.bincount(targets[kept - 100], minlength=4).tolist() == [10, 10, 4, 10]
    assert np.all(np.diff(kept) > 0)  # row order kept
    assert np.array_equal(kept, cap_per_class(rows, targets, 10, seed=0))
    assert not np.array_equal(kept, cap_per_class(rows, targets, 10, seed=1))
    assert np.array_equal(cap_per_class(rows, targets, None, seed=0), rows)


def test_train_classifier_max_per_class_and_explicit_indices_select_training_rows(
    stores: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Train on the test split's rows (as fine-tuning on expert labels does), 5 per class, validate on 20 rows."""
    split = all_rows(stores, "split")
    with caplog.at_level(logging.INFO, logger="cellkd.training.classifier"):
        train_classifier(
            stores,
            "wsa",
            tmp_path,
            replace(QUICK, max_per_class=5),
            train_indices=np.flatnonzero(split == 2),
            val_indices=np.arange(20),
            device="cpu",
        )
    assert "20 train rows per class {'other': 5, 'immune': 5, 'muscle': 5, 'background': 5}" in caplog.text
    wsa = all_rows(stores, "labels/wsa")
    assert f"{np.sum(wsa[:20] >= 0)} val rows" in caplog.text
    assert "dropping" in caplog.text  # the wsa-unlabelled test rows


def test_train_classifier_init_from_starts_from_the_given_weights(
    stores: list[Path], trained: Path, tmp_path: Path
) -> None:
    params = replace(QUICK, lr=1e-9, dropout=0.5)  # an lr this small leaves the weights where they started
    train_classifier(stores, "ssa", tmp_path, params, init_from=trained / "model.pt", device="cpu")
    start = load_classifier(trained / "model.pt")
    tuned = load_classifier(tmp_path / "model.pt")
    for (name, a), (_, b) in zip(start.named_parameters(), tuned.named_parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name
    assert torch.load(tmp_path / "model.pt", weights_only=True)["init_from"] == str(trained / "model.pt")


def test_train_classifier_init_from_other_arch_raises(stores: list[Path], trained: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="init_from holds a rccnet"):
        train_classifier(stores, "ssa", tmp_path, replace(QUICK, arch="vgg4"), init_from=trained / "model.pt")


def test_student_distillation_uses_cached_logits_and_never_runs_the_teacher(
    stores: list[Path], tmp_path: Path, counting_arch: str
) -> None:
    teacher = train_classifier(stores, "ssa", tmp_path / "teacher", replace(QUICK, arch=counting_arch), device="cpu")
    cache_teacher_logits(teacher, stores, tmp_path / "logits.h5", device="cpu")
    assert CountingRCCNet.calls > 0
    logits = load_teacher_logits(tmp_path / "logits.h5", stores)
    assert logits.shape == (600, 4) and logits.dtype == np.float32
    CountingRCCNet.armed = True
    student = replace(QUICK, w_kd=0.5, temperature=2.0)
    model_path = train_classifier(
        stores, "ssa", tmp_path / "student", student, teacher_logits=tmp_path / "logits.h5", device="cpu"
    )
    checkpoint = torch.load(model_path, weights_only=True)
    assert checkpoint["arch"] == "rccnet" and checkpoint["teacher_logits"] == str(tmp_path / "logits.h5")
    history = read_history(tmp_path / "student" / "history.csv")
    assert np.isfinite(history[0]["train_loss"]) and 0.0 <= history[0]["val_f1"] <= 1.0


def test_default_student_learns_the_teachers_argmax_not_the_ssa_labels(
    stores: list[Path], trained: Path, tmp_path: Path
) -> None:
    """The default student (w_kd = 0) trains on argmax(teacher logits); the SSA labels of its rows play no part.

    Copies of the stores whose SSA swaps other <-> immune and muscle <-> background: the blob a
    class is drawn with (the visual cue) keeps its true class, which the teacher, trained on the
    originals, predicts. The val split keeps the true SSA, so that selecting the best epoch by
    val F1 on SSA does not by itself push the student either way.
    """
    assert ClassifierTrainParams().w_kd == 0 and TINY.w_kd == 0
    swap = np.array([1, 0, 3, 2])
    copies = []
    for path in stores:
        copy = Path(shutil.copy(path, tmp_path / path.name))
        with h5py.File(copy, "a") as h5:
            ssa, split = h5["labels/ssa"][:], h5["split"][:]
            h5["labels/ssa"][:] = np.where(split == 1, ssa, swap[ssa])
        copies.append(copy)
    cache_teacher_logits(trained / "model.pt", copies, tmp_path / "logits.h5", device="cpu")
    teacher = load_teacher_logits(tmp_path / "logits.h5", copies).argmax(axis=1)
    ssa, test = all_rows(copies, "labels/ssa"), all_rows(copies, "split") == 2
    assert np.mean(teacher[test] != ssa[test]) > 0.6  # the premise: teacher and SSA disagree on most nuclei

    student = train_classifier(
        copies, "ssa", tmp_path / "student", TINY, teacher_logits=tmp_path / "logits.h5", device="cpu"
    )
    predicted = predict_logits(student, copies, device="cpu").argmax(axis=1)
    with_teacher = np.mean(predicted[test] == teacher[test])
    with_ssa = np.mean(predicted[test] == ssa[test])
    assert with_teacher > 0.7 and with_ssa < 0.3, (with_teacher, with_ssa)


def test_teacher_evaluation_caches_the_logits_it_scores_for_the_student(
    stores: list[Path], trained: Path, tmp_path: Path
) -> None:
    """evaluate_teacher's one pass: metrics from the logits it caches equal a plain evaluation's, and the student
    trains on that cache."""
    model = trained / "model.pt"
    plain = evaluate_classifier_stores(model, stores, "ssa", tmp_path / "plain.csv", tmp_path / "plain.png")
    cached = evaluate_classifier_stores(
        model, stores, "ssa", tmp_path / "metrics.csv", tmp_path / "confusion.png", logits_h5=tmp_path / "logits.h5"
    )
    pd.testing.assert_frame_equal(cached, plain)
    assert (tmp_path / "metrics.csv").read_text() == (tmp_path / "plain.csv").read_text()
    assert (tmp_path / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    logits = load_teacher_logits(tmp_path / "logits.h5", stores)
    np.testing.assert_array_equal(logits, predict_logits(model, stores, device="cpu"))
    student = train_classifier(
        stores, "ssa", tmp_path / "student", QUICK, teacher_logits=tmp_path / "logits.h5", device="cpu"
    )
    assert torch.load(student, weights_only=True)["teacher_logits"] == str(tmp_path / "logits.h5")


def test_teacher_logits_for_other_stores_are_rejected(stores: list[Path], trained: Path, tmp_path: Path) -> None:
    cache_teacher_logits(trained / "model.pt", stores[:1], tmp_path / "logits.h5", device="cpu")
    with pytest.raises(StoreError, match="cached for stores"):
        train_classifier(stores, "ssa", tmp_path / "out", QUICK, teacher_logits=tmp_path / "logits.h5")
    # The same slide with another stain: same file name and rows, different pixels.
    (tmp_path / "macenko").mkdir()
    other_stain = shutil.copy(stores[0], tmp_path / "macenko" / stores[0].name)
    with h5py.File(other_stain, "a") as h5:
        h5.attrs["stain"] = "macenko"
    with pytest.raises(
        StoreError,
        match=r"\('slide_a.h5', 'raw', 360\)\] \(name, stain, rows\), not \[\('slide_a.h5', 'macenko', 360\)",
    ):
        load_teacher_logits(tmp_path / "logits.h5", [other_stain])


@pytest.mark.parametrize("arch", ["xception", "resnet16ms", "vgg4ms"])
def test_multiscale_classifier_trains_on_level1_and_level2_crops(stores: list[Path], tmp_path: Path, arch: str) -> None:
    model_path = train_classifier(stores, "ssa", tmp_path, replace(QUICK, arch=arch), device="cpu")
    checkpoint = torch.load(model_path, weights_only=True)
    assert (checkpoint["arch"], checkpoint["input_kind"]) == (arch, "multiscale")
    logits = predict_logits(model_path, stores[1:], device="cpu")
    assert logits.shape == (240, 4) and np.isfinite(logits).all()


def test_train_classifier_without_val_rows_selects_by_train_loss(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    crops, truth = blob_crops(5, 16)
    store = write_nuclei_store(tmp_path / "train_only.h5", crops, {"ssa": truth}, np.zeros(16))
    with caplog.at_level(logging.WARNING):
        model_path = train_classifier([store], "ssa", tmp_path / "out", replace(QUICK, max_per_class=None))
    assert "no labelled validation rows" in caplog.text
    assert torch.load(model_path, weights_only=True)["criterion"] == "train_loss"


# ---------------------------------------------------------------------------------------------- errors


def test_epochs_without_improvement_counts_from_the_first_best_epoch() -> None:
    def rows(f1s: list[float], losses: list[float] | None = None) -> list[dict[str, float]]:
        losses = losses or [1.0] * len(f1s)
        return [{"val_f1": f, "train_loss": loss} for f, loss in zip(f1s, losses, strict=True)]

    assert epochs_without_improvement([], use_val=True) == 0
    assert epochs_without_improvement(rows([0.5, 0.7, 0.9]), use_val=True) == 0
    assert epochs_without_improvement(rows([0.5, 0.9, 0.9, 0.8]), use_val=True) == 2  # a tie is no improvement
    # a NaN training loss never counts as best; without validation the lowest training loss is the best
    assert epochs_without_improvement(rows([0.5, 0.99], [1.0, float("nan")]), use_val=True) == 1
    assert epochs_without_improvement(rows([0.0] * 3, [0.9, 0.4, 0.6]), use_val=False) == 1


def test_patience_stops_training_at_the_first_epoch_without_improvement(stores: list[Path], tmp_path: Path) -> None:
    # lr 1e-12 all but freezes the weights (only BatchNorm statistics move), so validation F1 soon stops improving
    frozen = replace(TINY, epochs=10, lr=1e-12, patience=1)
    train_classifier(stores, "ssa", tmp_path, frozen, device="cpu")
    history = read_history(tmp_path / "history.csv")
    assert len(history) < 10
    assert epochs_without_improvement(history, use_val=True) == 1  # it stopped at the first stalled epoch...
    assert all(
        epochs_without_improvement(history[:n], use_val=True) == 0 for n in range(1, len(history))
    )  # ...not later
    assert (tmp_path / "model.pt").exists()
    # without patience the same run goes past that epoch
    train_classifier(stores, "ssa", tmp_path / "all", replace(frozen, patience=None, epochs=len(history) + 1))
    assert len(read_history(tmp_path / "all" / "history.csv")) == len(history) + 1


def test_unknown_label_set_names_the_available_sets(stores: list[Path], tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=r"no label set 'ea'.*\['ssa', 'wsa'\]"):
        train_classifier(stores, "ea", tmp_path, QUICK)


def test_incomplete_nuclei_store_is_rejected(tmp_path: Path) -> None:
    crops, truth = blob_crops(0, 8)
    store = write_nuclei_store(tmp_path / "partial.h5", crops, {"ssa": truth}, np.zeros(8))
    with h5py.File(store, "a") as h5:
        h5.attrs["complete"] = False
    with pytest.raises(StoreError, match="incomplete"):
        train_classifier([store], "ssa", tmp_path / "out", QUICK)
    assert not (tmp_path / "out" / "model.pt").exists()


def test_soft_distillation_without_teacher_logits_raises(stores: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="w_kd=0.5 needs teacher_logits"):
        train_classifier(stores, "ssa", tmp_path, replace(QUICK, w_kd=0.5))


def test_out_of_range_train_indices_raise(stores: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train_indices holds row 600, outside the 600 rows"):
        train_classifier(stores, "ssa", tmp_path, QUICK, train_indices=[0, 600])


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"arch": "unet"}, r"arch 'unet' is unknown; expected one of \[.*'rccnet'"),
        ({"epochs": 0}, "epochs=0 must be >= 1"),
        ({"batch_size": 1}, "batch_size=1 must be >= 2"),
        ({"lr": 0.0}, "lr=0.0 must be a positive number"),
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"w_task": 0.0, "w_kd": 0.0}, "the loss would be zero"),
        ({"max_per_class": 0}, "max_per_class=0"),
        ({"dropout": 1.0}, "dropout=1.0"),
        ({"stain_augment": 1.0}, "stain_augment=1.0"),
    ],
)
def test_classifier_train_params_reject_bad_values(change: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        replace(TINY, **change)


def test_classifier_train_params_from_dict_names_unknown_keys() -> None:
    assert ClassifierTrainParams.from_dict({"arch": "vgg4", "w_kd": 0.5}).w_kd == 0.5
    with pytest.raises(ConfigError, match=r"unknown classifier training parameter\(s\) \['temp'\]"):
        ClassifierTrainParams.from_dict({"temp": 2.0})


def test_load_crops_returns_the_rows_asked_for_in_their_order_across_stores(stores: list[Path]) -> None:
    rows = read_nucleus_rows(stores, "ssa")
    level0 = all_rows(stores, "crops/level0")
    selected = np.array([599, 0, 360, 359, 5, 5, 420, 1], dtype=np.int64)  # both stores, unsorted, a repeat
    crops = load_crops(rows, selected, "level0").numpy()
    np.testing.assert_array_equal(crops, level0[selected])
    with pytest.raises(IndexError, match="outside"):
        load_crops(rows, np.array([0, 600]), "level0")


def test_crops_stay_uint8_and_become_float_one_batch_at_a_time(
    stores: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Training, validation and predict_logits convert each crop to float once per use, in batches of at most
    max(batch_size, CPU_FORWARD_BATCH) rows: float32 crops are 4x the uint8 ones (12 KB a nucleus), so a float copy
    of every crop would make memory grow with the slide far beyond its crops (issue 13)."""
    converted: list[tuple[torch.dtype, int]] = []

    def spy(crops: torch.Tensor) -> torch.Tensor:
        converted.append((crops.dtype, len(crops)))
        return classifier_input(crops)

    monkeypatch.setattr(classifier_evaluate, "classifier_input", spy)
    split = all_rows(stores, "split")
    params = replace(TINY, epochs=1)
    val_rows = np.flatnonzero(split > 0)  # val and test: 240 rows, more than one CPU forward batch
    model_path = train_classifier(stores, "ssa", tmp_path, params, val_indices=val_rows, device="cpu")
    assert {dtype for dtype, _ in converted} == {torch.uint8}
    assert max(rows for _, rows in converted) <= max(params.batch_size, CPU_FORWARD_BATCH)
    assert sum(rows for _, rows in converted) == len(split)  # every train and val row once

    converted.clear()
    predict_logits(model_path, stores, batch_size=1024, device="cpu")  # one reading chunk of all 600 rows
    assert max(rows for _, rows in converted) <= CPU_FORWARD_BATCH
    assert sum(rows for _, rows in converted) == len(split)
