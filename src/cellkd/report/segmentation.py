"""Phase I results: per-architecture test metrics, architecture selection, Table 2 and the QuPath comparison.

The comparison (the paper's Figure 4) measures, per slide, stain and architecture, how well two nucleus
segmentations agree at level 0: each architecture's model against the QuPath (SSA) segmentation, and on
synthetic data also the model and QuPath each against the truth.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from cellkd.errors import StoreError
from cellkd.metrics import PIXEL_METRICS, PixelCounts, pixel_counts, pixel_metrics
from cellkd.report.figures import png_figure
from cellkd.report.tables import SeedTablePaths, concat_tables, write_seed_table, write_table
from cellkd.store.atomic import atomic_path, atomic_write_text, require_complete
from cellkd.store.attrs import open_store
from cellkd.store.masks import MaskStore
from cellkd.store.patches import PatchStore
from cellkd.types import PathLike

logger = logging.getLogger(__name__)

SELECTION_METRIC = "dice"
ROW_STRIP = 256
"""Rows compared at a time, so a large fragment never sits whole in memory."""


def evaluate_architecture(
    model_path: PathLike, patch_stores: Sequence[PathLike], mask_sets: Sequence[str], out_csv: PathLike
) -> pd.DataFrame:
    """Test-split pixel metrics of one trained model against each of ``mask_sets`` -> ``out_csv``.

    Columns: reference (annotation set), accuracy, precision, recall, dice, iou, patches. Each reference
    is scored on the stores that hold it (public datasets have only the target set, not ``truth``).
    """
    # Imported here: it brings torch and smp, which Table 2 and Figure 4 (same module) do not need.
    from cellkd.training.segmentation import evaluate_segmentation

    rows = []
    for mask_set in mask_sets:
        holding = [path for path in patch_stores if _has_mask_set(path, mask_set)]
        metrics = evaluate_segmentation(model_path, holding, split="test", mask_set=mask_set)
        rows.append({"reference": mask_set, **metrics})
        logger.info("%s vs %s: %s", model_path, mask_set, metrics)
    table = pd.DataFrame(rows)
    with atomic_path(out_csv) as tmp:
        table.to_csv(tmp, index=False)
    return table


def _has_mask_set(patch_store: PathLike, mask_set: str) -> bool:
    with PatchStore(patch_store) as store:
        return mask_set in store.annotation_sets


def select_architecture(metrics_csvs: Mapping[str, Mapping[int, PathLike]], reference: str, out_json: PathLike) -> str:
    """Pick the architecture with the best MEAN test Dice over seeds against ``reference``; write selected.json.

    ``metrics_csvs`` maps arch -> seed -> metrics.csv. Ties go to the first architecture in ``metrics_csvs``
    order (the config's order). The json names the arch, the mean and per-seed scores, and ``seed``: the first
    seed of the mapping, whose model segments the slides (one segmentation per slide, not one per seed).
    """
    per_seed = {
        arch: {
            int(seed): float(pd.read_csv(path).set_index("reference").loc[reference, SELECTION_METRIC])
            for seed, path in by_seed.items()
        }
        for arch, by_seed in metrics_csvs.items()
    }
    scores = {arch: float(np.mean(list(by_seed.values()))) for arch, by_seed in per_seed.items()}
    best = max(scores, key=lambda arch: scores[arch])
    payload = {
        "arch": best,
        "seed": next(iter(per_seed[best])),
        "metric": SELECTION_METRIC,
        "reference": reference,
        "scores": scores,
        "per_seed": {arch: {str(seed): score for seed, score in s.items()} for arch, s in per_seed.items()},
    }
    atomic_write_text(out_json, json.dumps(payload, indent=2) + "\n")
    logger.info("selected %s by mean test %s over seeds against %s: %s", best, SELECTION_METRIC, reference, scores)
    return best


TABLE2_TITLE = "Table 2: nucleus segmentation on the test split"


def write_table2(metrics_csvs: Mapping[tuple[str, str, int], PathLike], paths: SeedTablePaths) -> pd.DataFrame:
    """Table 2: test metrics per stain, architecture and reference set, mean ± 95% CI over seeds.

    ``metrics_csvs`` is keyed ``(stain, arch, seed)``; the per-seed rows go to ``paths.per_seed``.
    """
    per_seed = concat_tables(metrics_csvs, ("stain", "arch", "seed"))
    per_seed = per_seed[["stain", "arch", "seed", "reference", *PIXEL_METRICS, "patches"]]
    return write_seed_table(
        per_seed, ("stain", "arch", "reference"), PIXEL_METRICS, paths, TABLE2_TITLE, carry=("patches",)
    )


def _nucleus_mask(dataset: h5py.Dataset, rows: slice) -> np.ndarray:
    """Any class channel of a (H, W, C) mask dataset -> bool (h, W) for the given rows."""
    return np.asarray(dataset[rows]).any(axis=-1)


def compare_segmentations(
    predicted_store: PathLike, mask_store: PathLike, references: Sequence[str], level: int = 0
) -> pd.DataFrame:
    """Agreement of the predicted nuclei with each annotation set, and of the annotation sets with ``truth``.

    Returns one row per comparison (``model vs ssa``, ``model vs truth``, ``ssa vs truth``, ...) with
    the pixel metrics accumulated over all fragments of the slide at ``level``. Sets the mask store
    does not hold are skipped.
    """
    with (
        open_store(predicted_store, "predicted mask store", "rerun the segment_slide rule") as predicted,
        MaskStore(mask_store) as masks,
    ):
        require_complete(predicted)
        available = [s for s in references if s in masks.annotation_sets]
        pairs = [("model", s) for s in available]
        if "truth" in available:
            pairs += [(s, "truth") for s in available if s != "truth"]
        counts = {pair: PixelCounts() for pair in pairs}
        for name, group in predicted["fragments"].items():
            prediction = group[f"level{level}"]
            if not masks.has_fragment(name):
                raise StoreError(f"{mask_store}: has no fragment {name!r} of {predicted_store}; rerun both rules")
            height = prediction.shape[0]
            for y in range(0, height, ROW_STRIP):
                rows = slice(y, min(y + ROW_STRIP, height))
                layers = {"model": np.asarray(prediction[rows]).astype(bool)}
                for s in available:
                    layers[s] = _nucleus_mask(masks.level(name, s, level), rows)
                for a, b in pairs:
                    counts[(a, b)] += pixel_counts(layers[a], layers[b])
    return pd.DataFrame([{"comparison": f"{a} vs {b}", **pixel_metrics(c)} for (a, b), c in counts.items()])


ANNOTATIONS_ONLY = "none"
"""The ``arch`` of Figure 4's rows that compare two annotation sets (``ssa vs truth``): no model takes part."""


def write_qupath_comparison(
    comparisons: Mapping[tuple[str, str, str], pd.DataFrame], csv_path: PathLike, md_path: PathLike, png_path: PathLike
) -> pd.DataFrame:
    """Figure 4: Dice and IoU of each architecture vs QuPath (and truth), raw vs Macenko, as table and bar plot.

    ``comparisons`` maps ``(stain, arch, slide)`` to the rows of :func:`compare_segmentations` for that
    architecture's masks. Columns: stain, arch, comparison, dice, iou (means over slides), slides. A
    comparison of two annotation sets (``ssa vs truth``) is the same for every architecture: it appears once
    per stain, with arch :data:`ANNOTATIONS_ONLY`, after the architectures' rows.
    """
    frames = []
    for (stain, arch, slide), frame in comparisons.items():
        frame = frame.copy()
        model_rows = frame["comparison"].str.startswith("model vs ")
        frame.insert(0, "slide", slide)
        frame.insert(0, "arch", np.where(model_rows, arch, ANNOTATIONS_ONLY))
        frame.insert(0, "stain", stain)
        frames.append(frame)
    per_slide = pd.concat(frames, ignore_index=True).drop_duplicates(["stain", "arch", "slide", "comparison"])
    per_slide = per_slide.sort_values("arch", key=lambda arch: arch == ANNOTATIONS_ONLY, kind="stable")
    table = per_slide.groupby(["stain", "arch", "comparison"], as_index=False, sort=False).agg(
        dice=("dice", "mean"), iou=("iou", "mean"), slides=("slide", "size")
    )
    title = "Figure 4: each segmentation architecture vs the QuPath segmentation (and truth), mean over slides"
    write_table(table, csv_path, md_path, title)
    _plot_comparison(table, png_path)
    return table


def _plot_comparison(table: pd.DataFrame, png_path: PathLike) -> None:
    # One bar group per comparison, the model named by its architecture ("unet vs ssa"); one bar per stain.
    labels = pd.Series(
        [
            comparison if arch == ANNOTATIONS_ONLY else comparison.replace("model", arch, 1)
            for arch, comparison in zip(table["arch"], table["comparison"], strict=True)
        ],
        index=table.index,
    )
    groups = list(dict.fromkeys(labels))
    stains = list(dict.fromkeys(table["stain"]))
    width = 0.8 / len(stains)
    with png_figure(png_path, dpi=120, nrows=1, ncols=2, figsize=(12, 4.5), sharey=True) as (fig, axes):
        for ax, metric in zip(axes, ("dice", "iou"), strict=True):
            for i, stain in enumerate(stains):
                rows = table["stain"] == stain
                values = pd.Series(table.loc[rows, metric].to_numpy(), index=labels[rows]).reindex(groups)
                positions = np.arange(len(groups)) + (i - (len(stains) - 1) / 2) * width
                bars = ax.bar(positions, values.to_numpy(), width, label=stain)
                ax.bar_label(bars, fmt="%.2f", fontsize=7)
            ax.set_xticks(np.arange(len(groups)), groups, rotation=25, ha="right")
            ax.set_title(metric.upper() if metric == "iou" else metric.capitalize())
            ax.set_ylim(0, 1.05)
        axes[0].set_ylabel("agreement (mean over slides)")
        axes[1].legend(title="stain")
        fig.suptitle("Nucleus segmentation: each architecture vs QuPath (and truth, where known)")


def _selection(selected_json: PathLike) -> tuple[str, int]:
    """(arch, seed) that ``selected.json`` names."""
    selected = Path(selected_json)
    payload = json.loads(selected.read_text(encoding="utf-8"))
    if "seed" not in payload:
        raise StoreError(
            f"{selected}: names no seed (written by a cellkd without training seeds); "
            "rerun it with snakemake --forcerun select_segmentation"
        )
    return str(payload["arch"]), int(payload["seed"])


def _model_path(selected_json: PathLike, arch: str, seed: int) -> str:
    """``model.pt`` of ``arch`` and ``seed`` beside ``selected.json`` (``{arch}/seed{seed}/``)."""
    return str(Path(selected_json).parent / arch / f"seed{seed}" / "model.pt")


def selected_model_path(selected_json: PathLike) -> str:
    """``model.pt`` of the architecture and seed named in ``selected.json`` (beside it: ``{arch}/seed{seed}/``)."""
    return _model_path(selected_json, *_selection(selected_json))


def copy_selected_masks(selected_json: PathLike, masks_by_arch: Mapping[str, PathLike], out_path: PathLike) -> str:
    """Copy the slide masks of the architecture ``selected.json`` names to ``out_path`` (atomically); return it.

    ``masks_by_arch``: arch -> that architecture's mask store of the slide (``{stain}/{arch}/masks/{slide}.h5``,
    written by ``cellkd.inference.segment_fragment_store`` for Figure 4). The selected one's is what segmenting
    the slide with the selected model would write: same model, fragments and inference settings. The model is
    checked, not assumed: the store's ``model`` attr must be the one ``selected.json`` names. A copy, not a hard
    link: the two names would share one mtime, so Snakemake would see the Figure 4 store change with this one.
    """
    arch, seed = _selection(selected_json)
    model = _model_path(selected_json, arch, seed)
    if arch not in masks_by_arch:
        raise StoreError(
            f"{selected_json}: selects {arch!r}, but masks were given for {sorted(masks_by_arch)} only; "
            "rerun select_segmentation with the configured segmentation.archs"
        )
    source = masks_by_arch[arch]
    with open_store(source, "segmentation mask store", "rerun segment_slide_per_arch") as h5:
        require_complete(h5)
        recorded = str(h5.attrs["model"])
    if Path(recorded) != Path(model):
        raise StoreError(
            f"{source}: segmented with {recorded}, not with {model}, the model {selected_json} selects; "
            "rerun segment_slide_per_arch"
        )
    with atomic_path(out_path) as tmp:
        shutil.copyfile(source, tmp)
    logger.info("copied %s's masks %s (model %s) to %s", arch, source, model, out_path)
    return arch
