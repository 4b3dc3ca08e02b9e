"""Phase IV: expert-row selection, fine-tuning the student over a small grid, and Table 6."""

from __future__ import annotations

import logging
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import killed_after
from hypothesis import given, settings
from hypothesis import strategies as st

from cellkd.errors import ConfigError, StoreError
from cellkd.metrics.classification import classification_metrics
from cellkd.report.classification import SUMMARY_METRICS
from cellkd.report.finetune import TABLE6_TITLE, write_table6
from cellkd.report.tables import SeedTablePaths
from cellkd.training.classifier import ClassifierTrainParams, train_classifier
from cellkd.training.classifier import train as classifier_trainer
from cellkd.training.classifier.evaluate import predict_logits
from cellkd.training.finetune import (
    FinetuneParams,
    expert_classes,
    finetune_student,
    finetune_student_counts,
    select_expert_rows,
)

CLASSES = ["other", "immune", "muscle", "background"]
COLOURS = [(150, 30, 40), (30, 30, 150), (40, 150, 40), (205, 170, 195)]  # background = plain eosin pink
PER_CLASS = 60


def blob_store(path: Path, seed: int, ea_fraction: float = 0.8, with_ea: bool = True) -> Path:
    """A complete nuclei store of 4 x PER_CLASS rows, separable by colour: class c = a disk of COLOURS[c].

    labels/truth = the class; labels/ssa = a lazy annotator: immune and muscle called "other";
    labels/ea = the class on a random ``ea_fraction`` of the nucleus rows, -1 elsewhere (the expert labels nuclei,
    never background, as for a partial set in ``cellkd.nuclei.matching``); split 60/20/20 %.
    """
    rng = np.random.default_rng(seed)
    n = 4 * PER_CLASS
    truth = np.repeat(np.arange(4), PER_CLASS)
    yy, xx = np.mgrid[:32, :32]
    disk = (yy - 15.5) ** 2 + (xx - 15.5) ** 2 <= 64
    level0 = np.empty((n, 32, 32, 3), dtype=np.float64)
    level0[:] = COLOURS[3]
    level0[:, disk] = np.asarray(COLOURS)[truth][:, None, :]
    level0 = np.clip(level0 + rng.normal(0, 15, level0.shape), 0, 255).astype(np.uint8)
    ssa = np.where((truth == 1) | (truth == 2), 0, truth)
    ea = np.where((rng.random(n) < ea_fraction) & (truth != 3), truth, -1)
    split = rng.permutation(np.repeat([0, 1, 2], [int(0.6 * n), int(0.2 * n), n - int(0.8 * n)]))
    with h5py.File(path, "w") as h5:
        h5.attrs.update({"complete": True, "slide": path.stem, "stain": "raw", "classes": CLASSES})
        h5.create_dataset("crops/level0", data=level0)
        h5.create_dataset("crops/level1", data=level0[:, ::2, ::2])
        h5.create_dataset("crops/level2", data=level0[:, ::2, ::2])
        sets = {"truth": truth, "ssa": ssa, **({"ea": ea} if with_ea else {})}
        for name, values in sets.items():
            h5.create_dataset(f"labels/{name}", data=values.astype(np.int8))
        h5.create_dataset("split", data=split.astype(np.int8))
    return path


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two blob stores (seeds 0 and 1) of 240 rows each, about 80 % of them expert-labelled."""
    folder = tmp_path_factory.mktemp("nuclei")
    return [blob_store(folder / "a.h5", 0), blob_store(folder / "b.h5", 1)]


@pytest.fixture(scope="module")
def student(stores: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model.pt of an rccnet trained 1 epoch on the lazy ssa labels: it calls immune and muscle "other"."""
    out = tmp_path_factory.mktemp("student")
    params = ClassifierTrainParams(arch="rccnet", epochs=1, batch_size=8, lr=1e-3, max_per_class=40, seed=0)
    return train_classifier(stores, "ssa", out, params, device="cpu")


GRID = FinetuneParams(lrs=(1e-3, 1e-7), dropouts=(0.1,), epochs=4, batch_size=8, seed=5)


@pytest.fixture(scope="module")
def finetuned(stores: list[Path], student: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Output folder of ``finetune_student`` with 20 EA labels per class over GRID (lr 1e-3 or 1e-7)."""
    out = tmp_path_factory.mktemp("finetune") / "n20"
    finetune_student(student, stores, 20, out, GRID, device="cpu")
    return out


# --------------------------------------------------------------------------------- select_expert_rows

SMALL = np.array([0] * 10 + [-1] * 5 + [1] * 20 + [3] * 4 + [-1] * 3)
"""EA labels: 10 rows of class 0, 20 of class 1, 4 of class 3 (none of 2), 8 unlabelled. With test_reserve 0.3
the available rows are floor(0.7 n): 7, 14 and 2; the test rows 3, 6 and 2."""


@pytest.mark.parametrize(
    ("count", "taken", "val", "effective"),
    [
        (1, (1, 1, 1), (0, 0, 0), 1),
        (5, (5, 5, 2), (1, 1, 1), 5),
        (10, (7, 10, 2), (1, 2, 1), 10),
        (99, (7, 14, 2), (1, 3, 1), 14),
    ],
)
def test_select_expert_rows_takes_min_of_count_and_available_per_class(
    count: int, taken: tuple[int, ...], val: tuple[int, ...], effective: int
) -> None:
    train, valid, test, got_effective = select_expert_rows(SMALL, count, FinetuneParams())
    for c, n_taken, n_val in zip((0, 1, 3), taken, val, strict=True):
        assert np.sum(SMALL[train] == c) == n_taken - n_val
        assert np.sum(SMALL[valid] == c) == n_val
    assert [np.sum(SMALL[test] == c) for c in (0, 1, 2, 3)] == [3, 6, 0, 2]
    assert got_effective == effective


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(-1, 4), min_size=1, max_size=200).filter(lambda v: max(v) >= 0),
    counts=st.lists(st.integers(1, 60), min_size=2, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_select_expert_rows_is_disjoint_and_reserves_the_same_test_rows_for_every_count(
    labels: list[int], counts: list[int], seed: int
) -> None:
    ea = np.asarray(labels)
    params = FinetuneParams(seed=seed)
    tests = []
    for count in counts:
        train, val, test, effective = select_expert_rows(ea, count, params)
        parts = [set(train.tolist()), set(val.tolist()), set(test.tolist())]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
        assert np.all(ea[np.concatenate([train, val, test])] >= 0)
        for c in np.unique(ea[ea >= 0]):
            n_c = np.sum(ea == c)
            assert np.sum(ea[test] == c) >= 0.3 * n_c - 1e-9  # at least test_reserve of each class is never trained on
            assert np.sum(ea[train] == c) + np.sum(ea[val] == c) <= min(count, effective)
        tests.append(test)
    assert all(np.array_equal(tests[0], t) for t in tests[1:])


def test_select_expert_rows_is_seeded() -> None:
    first = select_expert_rows(SMALL, 5, FinetuneParams(seed=1))
    again = select_expert_rows(SMALL, 5, FinetuneParams(seed=1))
    other = select_expert_rows(SMALL, 5, FinetuneParams(seed=2))
    assert all(np.array_equal(a, b) for a, b in zip(first[:3], again[:3], strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first[:3], other[:3], strict=True))


def test_select_expert_rows_logs_each_clipped_class(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="cellkd.training.finetune"):
        select_expert_rows(SMALL, 10, FinetuneParams(), CLASSES)
    assert "count 10 clipped to 7 for class other" in caplog.text
    assert "count 10 clipped to 2 for class background" in caplog.text
    assert "class immune" not in caplog.text  # 14 available >= 10


@pytest.mark.parametrize(
    ("labels", "count", "error", "match"),
    [
        (np.full(5, -1), 3, StoreError, "no expert \\(ea\\) labels among the 5 nuclei"),
        (SMALL, 0, ConfigError, "count=0 must be an integer >= 1"),
        (np.array([0, -2]), 3, ValueError, "holds -2"),
        (np.array([[0, 1]]), 3, ValueError, "must be 1-D"),
    ],
)
def test_select_expert_rows_rejects_bad_input(labels: np.ndarray, count: int, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        select_expert_rows(labels, count, FinetuneParams())


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"lrs": ()}, "lrs=\\(\\) must be positive numbers"),
        ({"lrs": (1e-3, -1.0)}, "lrs=.* must be positive numbers"),
        ({"dropouts": (1.0,)}, "dropouts=.* must be numbers in \\[0, 1\\)"),
        ({"test_reserve": 0.0}, "test_reserve=0.0 must be in \\(0, 1\\)"),
        ({"val_fraction": 1.0}, "val_fraction=1.0 must be in \\[0, 1\\)"),
        ({"batch_size": 1}, "batch_size=1 must be >= 2"),
    ],
)
def test_finetune_params_reject_invalid_values(values: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        FinetuneParams(**values)


def test_finetune_params_from_dict_turns_lists_into_tuples_and_names_unknown_keys() -> None:
    params = FinetuneParams.from_dict({"lrs": [1e-3, 1e-4], "dropouts": [0.2]})
    assert params.lrs == (1e-3, 1e-4) and params.grid == [(1e-3, 0.2), (1e-4, 0.2)]
    with pytest.raises(ConfigError, match="unknown finetune parameter\\(s\\) \\['lr'\\]"):
        FinetuneParams.from_dict({"lr": 1e-3})


# ------------------------------------------------------------------------------------ finetune_student


def test_finetune_student_keeps_the_grid_point_with_the_best_val_f1(finetuned: Path) -> None:
    grid = pd.read_csv(finetuned / "grid.csv")
    student, points = grid.iloc[0], grid.iloc[1:]
    assert np.isnan(student["lr"]) and np.isnan(student["dropout"]) and student["best_epoch"] == 0
    assert list(points[["lr", "dropout"]].itertuples(index=False, name=None)) == [(1e-3, 0.1), (1e-7, 0.1)]
    assert grid["selected"].sum() == 1
    chosen = grid.loc[grid["selected"]].iloc[0]
    assert chosen["val_f1"] == grid["val_f1"].max()
    assert chosen["val_f1"] > student["val_f1"]  # the lazy student is beaten, so a grid point is kept
    assert chosen["lr"] == 1e-3  # lr 1e-7 cannot move the lazy student in 4 epochs
    history = pd.read_csv(finetuned / "lr0.001_do0.1" / "history.csv")
    assert chosen["val_f1"] == pytest.approx(history["val_f1"].max())
    kept = torch.load(finetuned / "model.pt", weights_only=True)
    assert kept["epoch"] == chosen["best_epoch"] and kept["params"]["lr"] == 1e-3
    for point in ("lr0.001_do0.1", "lr1e-07_do0.1"):  # only the histories stay behind
        assert sorted(p.name for p in (finetuned / point).iterdir()) == ["history.csv"]


def test_finetune_student_writes_before_and_after_rows_on_the_reserved_test_rows(
    finetuned: Path, stores: list[Path]
) -> None:
    metrics = pd.read_csv(finetuned / "metrics.csv")
    expected = ["count", "effective_count", "phase", "lr", "dropout", *SUMMARY_METRICS]
    assert list(metrics.columns) == [*expected, *(f"f1_{c}" for c in CLASSES), "nuclei"]
    assert metrics["recall_weighted"].tolist() == pytest.approx(metrics["accuracy"].tolist())
    assert metrics["phase"].tolist() == ["before", "after"]
    assert metrics["count"].tolist() == [20, 20] and metrics["effective_count"].tolist() == [20, 20]
    assert np.isnan(metrics.loc[0, "lr"]) and metrics.loc[1, "lr"] == 1e-3
    ea = np.concatenate([h5py.File(p, "r")["labels/ea"][:] for p in stores])
    _, _, test, _ = select_expert_rows(ea, 20, GRID)
    assert metrics["nuclei"].tolist() == [len(test), len(test)]


def test_finetune_student_improves_on_the_lazy_student(finetuned: Path) -> None:
    before, after = pd.read_csv(finetuned / "metrics.csv").set_index("phase")["f1_macro"][["before", "after"]]
    assert before < 0.75  # the student never saw immune or muscle labels
    assert after >= before - 1e-6
    assert after > 0.9  # chance is ~0.25 for 4 balanced classes; the colours separate them perfectly


def test_finetune_never_keeps_a_setting_worse_than_the_student_on_validation(
    stores: list[Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    good = ClassifierTrainParams(arch="rccnet", epochs=3, batch_size=8, lr=1e-3, max_per_class=40, seed=0)
    student = train_classifier(stores, "truth", tmp_path_factory.mktemp("good_student"), good, device="cpu")
    out = tmp_path_factory.mktemp("ruinous") / "n20"
    ruinous = FinetuneParams(lrs=(5.0,), dropouts=(0.0,), epochs=1, batch_size=8, seed=5)  # lr 5 wrecks the weights
    table = finetune_student(student, stores, 20, out, ruinous, device="cpu")
    grid = pd.read_csv(out / "grid.csv")
    assert grid.loc[1, "val_f1"] < grid.loc[0, "val_f1"]  # the setting really is worse on validation
    assert grid["selected"].tolist() == [True, False]
    assert (out / "model.pt").read_bytes() == student.read_bytes()
    before, after = table.set_index("phase").loc[["before", "after"]].to_dict("records")
    assert np.isnan(after["lr"]) and after["f1_macro"] == before["f1_macro"]


@pytest.mark.slow
def test_finetune_student_scores_every_count_on_the_same_test_rows(
    stores: list[Path], student: Path, finetuned: Path, tmp_path: Path
) -> None:
    params = FinetuneParams(lrs=(1e-3,), dropouts=(0.1,), epochs=1, batch_size=32, seed=5)
    small = finetune_student(student, stores, 3, tmp_path / "n3", params, device="cpu")
    reference = pd.read_csv(finetuned / "metrics.csv")
    assert small.loc[0, "nuclei"] == reference.loc[0, "nuclei"]
    assert small.loc[0, "f1_macro"] == pytest.approx(reference.loc[0, "f1_macro"])  # same student, same rows


def test_finetune_student_counts_writes_for_each_count_what_a_run_of_that_count_alone_writes(
    stores: list[Path], student: Path, finetuned: Path, tmp_path: Path
) -> None:
    # count 3 first: a count trained before must leave no trace (RNG state, files) in the next one's results
    out_dirs = {3: tmp_path / "n3", 20: tmp_path / "n20"}
    table = finetune_student_counts(student, stores, out_dirs, GRID, device="cpu")
    assert table["count"].tolist() == [3, 3, 20, 20]
    for name in ("metrics.csv", "grid.csv"):
        assert (out_dirs[20] / name).read_text() == (finetuned / name).read_text(), name
    merged, alone = (torch.load(d / "model.pt", weights_only=True)["state_dict"] for d in (out_dirs[20], finetuned))
    assert merged.keys() == alone.keys() and all(torch.equal(merged[k], alone[k]) for k in merged)
    assert pd.read_csv(out_dirs[3] / "metrics.csv")["count"].tolist() == [3, 3]


def test_finetune_student_counts_killed_in_its_second_count_reruns_to_the_same_figures(
    stores: list[Path], student: Path, finetuned: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # the epochs count 3 trains (patience may stop a grid point early), so that the kill lands inside count 20
    alone = tmp_path / "alone" / "n3"
    finetune_student(student, stores, 3, alone, GRID, device="cpu")
    epochs_of_count_3 = sum(len(pd.read_csv(history)) for history in alone.glob("lr*/history.csv"))
    out_dirs = {3: tmp_path / "n3", 20: tmp_path / "n20"}
    with killed_after(classifier_trainer, epochs=epochs_of_count_3 + 2):
        finetune_student_counts(student, stores, out_dirs, GRID, device="cpu")
    assert (out_dirs[3] / "metrics.csv").exists() and not (out_dirs[20] / "metrics.csv").exists()
    for out in out_dirs.values():  # Snakemake deletes a failed job's outputs: every count's, the finished one's too
        for name in ("model.pt", "metrics.csv", "grid.csv"):
            (out / name).unlink(missing_ok=True)
    with caplog.at_level(logging.INFO, logger="cellkd.training.classifier"):
        finetune_student_counts(student, stores, out_dirs, GRID, device="cpu")
    assert caplog.text.count("resuming") == 1  # count 20's first grid point, after its epoch 2
    for count, straight in ((3, alone), (20, finetuned)):
        for name in ("metrics.csv", "grid.csv"):
            rerun, reference = (pd.read_csv(folder / name) for folder in (out_dirs[count], straight))
            pd.testing.assert_frame_equal(rerun, reference, rtol=1e-5)


def test_finetune_averages_validation_and_test_f1_over_the_nucleus_classes(tmp_path: Path) -> None:
    stores = [blob_store(tmp_path / "a.h5", 0), blob_store(tmp_path / "b.h5", 1)]
    for path in stores:  # the expert also called 40 faint nuclei "other" that look like background to the student
        with h5py.File(path, "r+") as h5:
            ea, truth = h5["labels/ea"][:], h5["labels/truth"][:]
            ea[np.flatnonzero(truth == 3)[:40]] = 0
            h5["labels/ea"][...] = ea
    ea = np.concatenate([h5py.File(p, "r")["labels/ea"][:] for p in stores]).astype(np.int64)
    nuclei = expert_classes(CLASSES)
    assert nuclei == [0, 1, 2]
    good = ClassifierTrainParams(arch="rccnet", epochs=3, batch_size=8, lr=1e-3, max_per_class=40, seed=0)
    student = train_classifier(stores, "truth", tmp_path / "student", good, device="cpu")
    params = FinetuneParams(lrs=(1e-7,), dropouts=(0.1,), epochs=1, batch_size=8, seed=5)
    table = finetune_student(student, stores, 20, tmp_path / "n20", params, device="cpu")
    train, val, test, _ = select_expert_rows(ea, 20, params)
    predicted = predict_logits(student, stores, device="cpu").argmax(axis=1)
    assert (predicted[test] == 3).any() and (predicted[val] == 3).any()  # background predicted on expert nuclei

    before = table.set_index("phase").loc["before"]
    scores = classification_metrics(ea[test], predicted[test], 4, CLASSES, average_over=nuclei)
    assert before["f1_macro"] == pytest.approx(scores["f1"])
    assert before["f1_macro"] == pytest.approx(before[["f1_other", "f1_immune", "f1_muscle"]].mean())
    assert before["f1_macro"] > classification_metrics(ea[test], predicted[test], 4)["f1"]  # background drags it
    # Each expert nucleus called background is still an error, in its class's recall.
    assert before["recall_macro"] == pytest.approx(scores["recall"]) and scores["per_class"]["other"]["recall"] < 1
    grid = pd.read_csv(tmp_path / "n20" / "grid.csv")
    assert grid.loc[0, "val_f1"] == pytest.approx(
        classification_metrics(ea[val], predicted[val], 4, average_over=nuclei)["f1"]
    )

    # The grid points' trainer selects epochs by the same average (its checkpoints are deleted after the grid search,
    # so train one here as the grid does).
    out = tmp_path / "grid_point"
    trained = ClassifierTrainParams(arch="rccnet", epochs=1, batch_size=8, lr=1e-7, dropout=0.1, seed=5)
    model = train_classifier(
        stores, "ea", out, trained, init_from=student, train_indices=train, val_indices=val, val_average_over=nuclei
    )
    after = predict_logits(model, stores, device="cpu").argmax(axis=1)
    assert (after[val] == 3).any()
    val_f1 = pd.read_csv(out / "history.csv")["val_f1"].iloc[0]
    assert val_f1 == pytest.approx(classification_metrics(ea[val], after[val], 4, average_over=nuclei)["f1"])
    assert val_f1 > classification_metrics(ea[val], after[val], 4)["f1"]


def test_finetune_student_needs_expert_labels(student: Path, tmp_path: Path) -> None:
    store = blob_store(tmp_path / "no_ea.h5", 2, with_ea=False)
    with pytest.raises(StoreError, match="no label set 'ea'"):
        finetune_student(student, [store], 10, tmp_path / "out", GRID, device="cpu")
    empty = blob_store(tmp_path / "empty_ea.h5", 3, ea_fraction=0.0)
    with pytest.raises(StoreError, match="no expert \\(ea\\) labels .*check the ea GeoJSON"):
        finetune_student(student, [empty], 10, tmp_path / "out", GRID, device="cpu")
    assert not (tmp_path / "out" / "model.pt").exists()


# -------------------------------------------------------------------------------------------- Table 6


def write_metrics(path: Path, count: int, effective: int, before: float, after: float) -> Path:
    """A metrics.csv as finetune_student writes it (two classes a, b; 30 test nuclei)."""
    rows = [
        {
            "count": count,
            "effective_count": effective,
            "phase": "before",
            "lr": np.nan,
            "dropout": np.nan,
            "f1_macro": before,
        },
        {"count": count, "effective_count": effective, "phase": "after", "lr": 1e-4, "dropout": 0.3, "f1_macro": after},
    ]
    frame = pd.DataFrame(rows)
    frame["f1_weighted"] = frame["f1_macro"] + 0.02
    frame["accuracy"] = frame["recall_weighted"] = frame["f1_macro"] + 0.05
    for column in ("precision_macro", "recall_macro", "precision_weighted", "f1_a", "f1_b"):
        frame[column] = frame["f1_macro"]
    frame["nuclei"] = 30
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


def table6_paths(folder: Path) -> SeedTablePaths:
    return SeedTablePaths(folder / "t6.csv", folder / "t6_per_seed.csv", folder / "t6.md")


def test_write_table6_writes_one_row_per_stain_labels_count_with_a_plot(tmp_path: Path) -> None:
    inputs = {
        ("raw", "ssa", 50, 0): write_metrics(tmp_path / "raw/ssa/n50.csv", 50, 50, 0.6, 0.7),
        ("raw", "ssa", 10, 0): write_metrics(tmp_path / "raw/ssa/n10.csv", 10, 10, 0.6, 0.65),
        ("raw", "ssa", 500, 0): write_metrics(tmp_path / "raw/ssa/n500.csv", 500, 212, 0.6, 0.8),
        ("macenko", "wsa", 10, 0): write_metrics(tmp_path / "mac/wsa/n10.csv", 10, 10, 0.5, 0.55),
    }
    paths, png = table6_paths(tmp_path), tmp_path / "plots/t6.png"
    write_table6(inputs, paths, png)
    table = pd.read_csv(paths.per_seed)
    keys = list(table[["stain", "labels", "count"]].itertuples(index=False, name=None))
    assert keys == [("macenko", "wsa", 10), ("raw", "ssa", 10), ("raw", "ssa", 50), ("raw", "ssa", 500)]
    assert table["f1_macro_after"].tolist() == [0.55, 0.65, 0.7, 0.8]
    assert table["f1_macro_before"].tolist() == [0.5, 0.6, 0.6, 0.6]
    assert table["f1_macro_gain"].tolist() == pytest.approx([0.05, 0.05, 0.1, 0.2])
    assert table["f1_weighted_after"].tolist() == pytest.approx([0.57, 0.67, 0.72, 0.82])
    assert table["f1_weighted_before"].tolist() == pytest.approx([0.52, 0.62, 0.62, 0.62])
    assert table["accuracy_after"].tolist() == pytest.approx([0.6, 0.7, 0.75, 0.85])
    assert table["f1_a_after"].tolist() == table["f1_b_after"].tolist() == [0.55, 0.65, 0.7, 0.8]  # per class
    assert "f1_a_before" not in table and "f1_macro_after" in table  # averages keep both phases
    assert table.loc[3, "effective_count"] == 212 and table.loc[3, "lr"] == 1e-4
    assert table.loc[3, "setting"] == "lr=0.0001, dropout=0.3"  # no grid.csv beside it: epochs unknown
    summary = pd.read_csv(paths.csv)
    assert summary["f1_macro_gain_mean"].tolist() == pytest.approx([0.05, 0.05, 0.1, 0.2])
    assert summary["f1_macro_gain_ci95"].isna().all() and (summary["seeds"] == 1).all()
    assert summary["f1_b_after_mean"].tolist() == pytest.approx([0.55, 0.65, 0.7, 0.8])
    markdown = paths.md.read_text()
    assert markdown.startswith(f"# {TABLE6_TITLE} (") and "n=1" in markdown.splitlines()[0]
    assert "| macenko" in markdown
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob("**/.*.partial"))


def write_grid(metrics_csv: Path, lr: float, dropout: float, best_epoch: int) -> None:
    """The grid.csv finetune_student writes beside metrics.csv: the student (epoch 0) and one chosen grid point."""
    rows = [
        {"lr": np.nan, "dropout": np.nan, "val_f1": 0.5, "best_epoch": 0, "train_loss": np.nan, "selected": False},
        {"lr": lr, "dropout": dropout, "val_f1": 0.6, "best_epoch": best_epoch, "train_loss": 0.3, "selected": True},
    ]
    pd.DataFrame(rows).to_csv(metrics_csv.with_name("grid.csv"), index=False)


def test_table6_gain_ci_comes_from_each_seeds_own_student(tmp_path: Path) -> None:
    # seed s: the student of seed s scores `before`, its fine-tuned model `after`; the gain is paired per seed
    before_after = {0: (0.60, 0.70), 1: (0.50, 0.62), 2: (0.70, 0.78)}
    inputs = {}
    for seed, (before, after) in before_after.items():
        path = write_metrics(tmp_path / f"n50/seed{seed}/metrics.csv", 50, 50, before, after)
        write_grid(path, 1e-4, 0.3, best_epoch=4 if seed < 2 else 6)
        inputs[("raw", "wsa", 50, seed)] = path
    table = write_table6(inputs, table6_paths(tmp_path), tmp_path / "curve.png")

    per_seed = pd.read_csv(tmp_path / "t6_per_seed.csv")
    assert per_seed["f1_macro_gain"].tolist() == pytest.approx([0.10, 0.12, 0.08])
    assert per_seed["epochs"].tolist() == [4, 4, 6]
    row = table.iloc[0]
    gains = per_seed["f1_macro_gain"]
    assert row["f1_macro_gain_mean"] == pytest.approx(0.10)
    # t(0.975, 2) = 4.3027 from a printed table; sample sd of (0.10, 0.12, 0.08) is 0.02
    assert row["f1_macro_gain_ci95"] == pytest.approx(4.302652729911275 * gains.std(ddof=1) / np.sqrt(3))
    assert row["f1_macro_gain_ci95"] == pytest.approx(4.302652729911275 * 0.02 / np.sqrt(3))
    assert (row["setting"], row["setting_seeds"], row["seeds"]) == ("lr=0.0001, dropout=0.3, epochs=4", 2, 3)
    assert "0.100 ± 0.050" in (tmp_path / "t6.md").read_text()


def test_write_table6_rejects_a_file_under_the_wrong_count(tmp_path: Path) -> None:
    path = write_metrics(tmp_path / "n10.csv", 10, 10, 0.5, 0.6)
    with pytest.raises(StoreError, match="n10.csv: holds count 10 but was given for \\('raw', 'ssa', 20, 0\\)"):
        write_table6({("raw", "ssa", 20, 0): path}, table6_paths(tmp_path), tmp_path / "t.png")
    assert not (tmp_path / "t6.csv").exists()


def test_write_table6_names_a_metrics_file_of_an_older_cellkd(tmp_path: Path) -> None:
    path = write_metrics(tmp_path / "n10.csv", 10, 10, 0.5, 0.6)
    pd.read_csv(path).rename(columns={"f1_macro": "f1"}).drop(columns="f1_weighted").to_csv(path, index=False)
    with pytest.raises(StoreError, match=r"n10\.csv.*no column\(s\) \['f1_macro', 'f1_weighted'\].*rerun"):
        write_table6({("raw", "ssa", 10, 0): path}, table6_paths(tmp_path), tmp_path / "t.png")


def test_write_table6_needs_both_phases(tmp_path: Path) -> None:
    path = write_metrics(tmp_path / "n10.csv", 10, 10, 0.5, 0.6)
    pd.read_csv(path).iloc[:1].to_csv(path, index=False)  # only the "before" row
    with pytest.raises(StoreError, match="n10.csv: no \\['after'\\] row\\(s\\); rerun the fine-tuning rule"):
        write_table6({("raw", "ssa", 10, 0): path}, table6_paths(tmp_path), tmp_path / "t.png")
