"""Distillation: a ``train_classifier`` student epoch with cached teacher logits vs the same loop running the teacher
per step."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path

import numpy as np
from harness import N_CORES, Context, Row, Stopwatch, met

NAME = "distill"
ORDER = 50


def _nuclei_store(path: Path, n: int) -> None:
    """Synthetic nuclei store of n rows: random crops, ssa labels in 0..3, split 80/10/10 (layout of cellkd.nuclei)."""
    import h5py

    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as h5:
        h5.attrs.update({"classes": ["other", "immune", "muscle", "background"], "stain": "raw"})
        h5.create_dataset("crops/level0", data=rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8))
        for level in (1, 2):
            h5.create_dataset(f"crops/level{level}", data=rng.integers(0, 256, size=(n, 16, 16, 3), dtype=np.uint8))
        h5.create_dataset("labels/ssa", data=rng.integers(0, 4, size=n).astype(np.int8))
        h5.create_dataset("split", data=rng.choice(3, size=n, p=[0.8, 0.1, 0.1]).astype(np.int8))
        h5.attrs["complete"] = True


def run(ctx: Context) -> list[Row]:
    import h5py
    import torch

    from cellkd.models import classifier_input, create_model
    from cellkd.training.classifier import (
        ClassifierTrainParams,
        augment_dihedral,  # the trainer's own augmentation, so that both loops do the same work
        cache_teacher_logits,
        distillation_loss,
        load_classifier,
        train_classifier,
    )
    from cellkd.training.common import epoch_seed

    torch.set_num_threads(N_CORES)
    n = 1_000 if ctx.quick else 6_000  # resnet18 on 32x32 crops costs ~0.56 GFLOP a crop: ~10 ms on 2 cores
    folder = ctx.work / "distill"
    if folder.exists():
        shutil.rmtree(folder)  # train_classifier resumes from last.pt: start clean
    folder.mkdir(parents=True)
    store = folder / "nuclei.h5"
    _nuclei_store(store, n)
    teacher = train_classifier(
        [store], "ssa", folder / "teacher", ClassifierTrainParams(arch="resnet18", epochs=1, batch_size=128),
        train_indices=np.arange(512), val_indices=np.arange(512, 640),
    )  # fmt: skip
    logits = folder / "logits.h5"
    with Stopwatch() as watch:
        cache_teacher_logits(teacher, [store], logits)
    cache_s = watch.seconds

    # demo config student: rccnet, batch 128, lr 1e-3, dropout 0.3, T 4, w_task 1, w_kd 0 (hard labels)
    params = ClassifierTrainParams(arch="rccnet", epochs=1, batch_size=128, lr=1e-3, dropout=0.3, temperature=4.0)
    train_classifier([store], "ssa", folder / "student", params, teacher_logits=logits)
    with open(folder / "student" / "history.csv", encoding="utf-8") as f:
        cached_s = float(next(csv.DictReader(f))["seconds"])  # epoch 1: train + validation

    # Baseline: the same epoch, but the teacher labels every batch itself (no cache).
    with h5py.File(store, "r") as h5:
        crops_all, split, ssa = h5["crops/level0"][:], h5["split"][:], h5["labels/ssa"][:]
    train_rows = np.flatnonzero(split == 0)
    val_rows = np.flatnonzero((split == 1) & (ssa >= 0))
    crops = torch.from_numpy(crops_all[train_rows])
    val_crops, val_labels = torch.from_numpy(crops_all[val_rows]), torch.from_numpy(ssa[val_rows].astype(np.int64))
    teacher_model = load_classifier(teacher).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)
        student = create_model("rccnet", num_classes=4, dropout=params.dropout)
        optimizer = torch.optim.Adam(student.parameters(), lr=params.lr)
        rng = np.random.default_rng(epoch_seed(params.seed, 1))
        teacher_s = 0.0
        with Stopwatch() as epoch:
            student.train()
            order = rng.permutation(len(crops))
            rot, flip = rng.integers(4, size=len(crops)), rng.integers(2, size=len(crops))
            for batch in np.array_split(order, math.ceil(len(crops) / params.batch_size)):
                index = torch.from_numpy(batch)
                x = classifier_input(augment_dihedral(crops[index], rot[batch], flip[batch]))
                with Stopwatch() as teacher_watch, torch.inference_mode():
                    soft = teacher_model(x).float()
                teacher_s += teacher_watch.seconds
                loss = distillation_loss(
                    student(x).float(), soft.argmax(dim=1), soft, params.temperature, params.w_task, params.w_kd
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            student.eval()
            with torch.inference_mode():  # validation as in train_classifier (eval batch max(batch, 1024))
                for start in range(0, len(val_crops), 1024):
                    out = student(classifier_input(val_crops[start : start + 1024])).float()
                    torch.nn.functional.cross_entropy(out, val_labels[start : start + 1024], reduction="sum")
        online_s = epoch.seconds
    ratio = online_s / cached_s
    return [
        Row(
            "distillation: student epoch with cached teacher logits vs teacher per step, s",
            f"{cached_s:.1f}",
            f"{online_s:.1f}",
            f"{ratio:.1f}x",
            ">= 4x",
            met(ratio >= 4),
            f"rccnet student, resnet18 teacher, {len(train_rows)} train + {len(val_rows)} val crops 32x32, "
            f"batch 128, {N_CORES} threads; teacher forward {teacher_s:.1f} s of the {online_s:.1f} s baseline epoch; "
            f"caching the logits once took {cache_s:.1f} s",
        )
    ]
