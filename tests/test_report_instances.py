"""The instance table next to Table 2: a nuclei store written by extract_nuclei, scored against its truth GeoJSON."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import shapely
import shapely.affinity
from rasterio.features import rasterize
from rasterio.transform import Affine

from cellkd.annotations import write_qupath_geojson
from cellkd.classes import DEFAULT_CLASSES
from cellkd.metrics import INSTANCE_METRICS
from cellkd.nuclei import NucleiParams, extract_nuclei
from cellkd.report.instances import ALL_CLASSES, slide_instance_counts, write_instance_table
from cellkd.store.atomic import atomic_h5
from cellkd.store.fragments import Fragment, FragmentStoreWriter, fragment_name
from cellkd.types import DOWNSAMPLES

OTHER, IMMUNE, MUSCLE = 0, 1, 2
FRAGMENT = Fragment(fragment_name(0), 100, 50, 120, 80)
"""One fragment: level-0 box x 100..220, y 50..130."""
NUCLEI = [
    shapely.affinity.rotate(shapely.affinity.scale(shapely.Point(140, 75).buffer(1, 32), 16, 4), 25),  # muscle
    shapely.Point(175, 80).buffer(7, 32),  # two touching "other" nuclei, 12 px apart
    shapely.Point(187, 80).buffer(7, 32),
    shapely.Point(130, 110).buffer(5, 32),  # immune
]
NUCLEUS_CLASSES = [MUSCLE, OTHER, OTHER, IMMUNE]


@pytest.fixture
def slide(tmp_path: Path) -> dict[str, Path]:
    """Fragment store, predicted mask (the truth nuclei rasterized: a perfect segmentation) and truth GeoJSON."""
    with FragmentStoreWriter(
        tmp_path / "s1.frag.h5", slide="s1", source="s1.tiff", stain="raw", mpp=0.5, slide_size=(400, 200)
    ) as w:
        for level in range(len(DOWNSAMPLES)):
            w.create_level(FRAGMENT, level)[:] = 128
    to_fragment = Affine.translation(FRAGMENT.x, FRAGMENT.y)
    mask = rasterize(NUCLEI, out_shape=(FRAGMENT.height, FRAGMENT.width), transform=to_fragment, dtype=np.uint8)
    with atomic_h5(tmp_path / "s1.pred.h5") as h5:
        h5.attrs.update({"slide": "s1", "stain": "raw", "level": 0})
        group = h5.require_group(f"fragments/{FRAGMENT.name}")
        group.attrs.update({"x": FRAGMENT.x, "y": FRAGMENT.y, "width": FRAGMENT.width, "height": FRAGMENT.height})
        group["level0"] = mask
    truth = tmp_path / "s1.truth.geojson"
    write_qupath_geojson(truth, NUCLEI, np.asarray(NUCLEUS_CLASSES, dtype=np.int64), DEFAULT_CLASSES)
    return {"fragments": tmp_path / "s1.frag.h5", "predicted": tmp_path / "s1.pred.h5", "truth": truth}


def nuclei_store(slide: dict[str, Path], params: NucleiParams, name: str) -> Path:
    out = slide["truth"].parent / f"{name}.nuclei.h5"
    extract_nuclei(slide["predicted"], slide["fragments"], {"truth": slide["truth"]}, DEFAULT_CLASSES, out, params)
    return out


def test_a_perfect_segmentation_matches_every_true_nucleus_once(slide: dict[str, Path]) -> None:
    counts = slide_instance_counts(nuclei_store(slide, NucleiParams(), "split"), slide["truth"], DEFAULT_CLASSES)
    assert list(counts) == [ALL_CLASSES, "other", "immune", "muscle"]
    total = counts[ALL_CLASSES]
    assert (total.true, total.predicted, total.matches, total.split, total.merged) == (4, 4, 4, 0, 0)
    assert counts["muscle"].true == 1 and counts["muscle"].matches == 1
    assert counts["other"].true == 2 and counts["other"].predicted == 2


def test_unsplit_touching_nuclei_show_up_as_merged_in_their_class(slide: dict[str, Path]) -> None:
    store = nuclei_store(slide, NucleiParams(split_touching=False), "unsplit")
    counts = slide_instance_counts(store, slide["truth"], DEFAULT_CLASSES)
    assert counts[ALL_CLASSES].predicted == 3
    assert counts["other"].metrics()["merged"] == 1.0
    assert counts["muscle"].metrics()["merged"] == 0.0 and counts["immune"].metrics()["matched"] == 1.0


def test_the_table_sums_the_slides_of_each_stain(slide: dict[str, Path], tmp_path: Path) -> None:
    split = slide_instance_counts(nuclei_store(slide, NucleiParams(), "split"), slide["truth"], DEFAULT_CLASSES)
    unsplit = slide_instance_counts(
        nuclei_store(slide, NucleiParams(split_touching=False), "unsplit"), slide["truth"], DEFAULT_CLASSES
    )
    csv, md = tmp_path / "t.csv", tmp_path / "t.md"
    # The same slide scored twice stands in for two slides of one stain; a second stain has one slide.
    write_instance_table({("raw", "a"): split, ("raw", "b"): unsplit, ("macenko", "a"): split}, csv, md)
    table = pd.read_csv(csv)
    assert list(table.columns) == ["stain", "class", "slides", "true", "predicted", *INSTANCE_METRICS]
    raw = table[table["stain"] == "raw"].set_index("class")
    assert list(raw.index) == [ALL_CLASSES, "other", "immune", "muscle"]
    assert raw.loc[ALL_CLASSES, "slides"] == 2
    assert raw.loc[ALL_CLASSES, "true"] == 8 and raw.loc[ALL_CLASSES, "predicted"] == 7
    assert raw.loc["other", "merged"] == pytest.approx(2 / 4)
    assert raw.loc[ALL_CLASSES, "merged"] == pytest.approx(2 / 8) and raw.loc[ALL_CLASSES, "split"] == 0
    macenko = table[table["stain"] == "macenko"].set_index("class")
    assert macenko.loc[ALL_CLASSES, "matched"] == 1.0 and macenko.loc[ALL_CLASSES, "slides"] == 1
    assert md.read_text().startswith("# Table 2 (instances)")
