"""Tests for cellkd.stain: Macenko fit, tile normalization, fragment-store normalization."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cellkd.errors import ConfigError, StainError
from cellkd.stain import (
    MIN_TISSUE_PIXELS,
    MacenkoParams,
    StainModel,
    TileNormalizer,
    fit_macenko,
    load_reference,
    normalize_fragment_store,
    normalize_tile,
    sample_tissue_pixels,
)
from cellkd.store.fragments import Fragment, FragmentStore, FragmentStoreWriter

IO = 240.0
TORCHSTAIN_HE_REF = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
TORCHSTAIN_MAXC_REF = np.array([1.9705, 1.0308])

# Known stains of the synthetic images: H close to Ruifrok's haematoxylin, E a pink with enough red OD
# that pure-E pixels pass beta = 0.15. Both differ clearly from the reference, so normalization does work.
TRUE_HE = np.array([[0.65, 0.27], [0.70, 0.85], [0.29, 0.45]])
TRUE_HE = TRUE_HE / np.linalg.norm(TRUE_HE, axis=0)


def beer_lambert(conc: np.ndarray, rng: np.random.Generator, stain_matrix: np.ndarray = TRUE_HE) -> np.ndarray:
    """uint8 (N, 3) RGB = round(IO * exp(-stain_matrix @ conc) + N(0, 1) noise), conc float (2, N)."""
    rgb = IO * np.exp(-stain_matrix @ conc) + rng.normal(0.0, 1.0, (3, conc.shape[1]))
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8).T


def synthetic_concentrations(n: int, rng: np.random.Generator) -> np.ndarray:
    """float (2, n) H/E concentrations: 20% glass (0, 0), 25% pure H, 25% pure E, 30% H+E mixtures."""
    kind = rng.choice(4, n, p=[0.2, 0.25, 0.25, 0.3])
    conc = np.zeros((2, n))
    conc[0, kind == 1] = rng.uniform(0.3, 1.5, (kind == 1).sum())
    conc[1, kind == 2] = rng.uniform(0.8, 1.6, (kind == 2).sum())
    conc[:, kind == 3] = rng.uniform(0.2, 1.0, (2, (kind == 3).sum()))
    return conc


@pytest.fixture(scope="module")
def he_image() -> np.ndarray:
    """uint8 (128, 128, 3) H&E-like image made by Beer-Lambert from TRUE_HE and known concentrations."""
    rng = np.random.default_rng(0)
    return beer_lambert(synthetic_concentrations(128 * 128, rng), rng).reshape(128, 128, 3)


@pytest.fixture(scope="module")
def fitted(he_image: np.ndarray) -> StainModel:
    """The Macenko model fitted to ``he_image`` with default parameters."""
    return fit_macenko(he_image, MacenkoParams())


@pytest.fixture(scope="module")
def reference() -> StainModel:
    """The shipped default reference (torchstain's HERef / maxCRef)."""
    return load_reference(None)


def reference_normalize(tile: np.ndarray, source: StainModel, target: StainModel, io: float = IO) -> np.ndarray:
    """Plain float64 Macenko normalization (lstsq per pixel, exp), rounded: the ground truth for the fast path."""
    od = -np.log((tile.reshape(-1, 3).astype(np.float64) + 1.0) / io)
    conc = np.linalg.lstsq(source.stain_matrix, od.T, rcond=None)[0]
    conc *= (target.max_concentrations / source.max_concentrations)[:, None]
    with np.errstate(over="ignore"):
        out = io * np.exp(-target.stain_matrix @ conc)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8).T.reshape(tile.shape)


def abs_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|cosine| between corresponding columns of two (3, k) matrices."""
    return np.abs((a * b).sum(axis=0)) / (np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0))


# --- parameters and reference ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"io": 0.0}, "io=0.0"),
        ({"io": 300.0}, "io=300.0"),
        ({"alpha": 50.0}, "alpha=50.0"),
        ({"beta": -0.1}, "beta=-0.1"),
        ({"max_samples": 10}, "max_samples=10"),
    ],
)
def test_params_reject_out_of_range_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        MacenkoParams(**kwargs)


def test_load_reference_default_is_torchstain_reference(reference: StainModel) -> None:
    np.testing.assert_array_equal(reference.stain_matrix, TORCHSTAIN_HE_REF)
    np.testing.assert_array_equal(reference.max_concentrations, TORCHSTAIN_MAXC_REF)
    assert reference.stain_matrix.dtype == np.float64
    assert not reference.stain_matrix.flags.writeable


def test_load_reference_reads_custom_json(tmp_path: Path) -> None:
    path = tmp_path / "ref.json"
    path.write_text(json.dumps({"stain_matrix": TRUE_HE.tolist(), "max_concentrations": [1.5, 0.9]}))
    model = load_reference(path)
    np.testing.assert_allclose(model.stain_matrix, TRUE_HE)
    np.testing.assert_allclose(model.max_concentrations, [1.5, 0.9])


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "cannot read"),
        ("not json", "not a Macenko reference"),
        ('{"stain_matrix": [[1, 0], [0, 1], [0, 0]]}', "not a Macenko reference"),
        ('{"stain_matrix": [[1, 0, 0], [0, 1, 0]], "max_concentrations": [1, 1]}', r"shape \(3, 2\)"),
        ('{"stain_matrix": [[1, 0], [0, 1], [0, 0]], "max_concentrations": [1, 0]}', "positive"),
        ('{"stain_matrix": [[1, 1], [0, 0], [0, 0]], "max_concentrations": [1, 1]}', "collinear"),
    ],
)
def test_load_reference_rejects_bad_files(tmp_path: Path, content: str | None, match: str) -> None:
    path = tmp_path / "ref.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(StainError, match=match) as info:
        load_reference(path)
    assert str(path) in str(info.value)


# --- fitting ---------------------------------------------------------------------------------------


def test_fit_recovers_known_stain_matrix_h_first(fitted: StainModel) -> None:
    assert (abs_cos(fitted.stain_matrix, TRUE_HE) > 0.999).all()
    np.testing.assert_allclose(np.linalg.norm(fitted.stain_matrix, axis=0), 1.0)


def test_fit_equals_torchstain_numpy(he_image: np.ndarray, fitted: StainModel) -> None:
    import torchstain

    ts = torchstain.normalizers.MacenkoNormalizer(backend="numpy")
    ts.fit(he_image, Io=IO, alpha=1, beta=0.15)
    np.testing.assert_allclose(fitted.stain_matrix, ts.HERef, atol=1e-9)
    np.testing.assert_allclose(fitted.max_concentrations, ts.maxCRef, rtol=1e-9)


def test_fit_agrees_with_staintools_stain_matrix(he_image: np.ndarray, fitted: StainModel) -> None:
    from staintools.stain_extraction.macenko_stain_extractor import MacenkoStainExtractor

    # staintools: rows H, E; OD = -log(I/255) and a luminosity tissue mask instead of beta, so close, not equal.
    # It also overwrites 0 pixels in its input, hence the copy.
    rows = MacenkoStainExtractor.get_stain_matrix(he_image.copy())
    assert (abs_cos(fitted.stain_matrix, rows.T) > 0.999).all()


def test_fit_is_invariant_to_pixel_order(he_image: np.ndarray, fitted: StainModel) -> None:
    shuffled = np.random.default_rng(1).permutation(he_image.reshape(-1, 3))
    model = fit_macenko(shuffled, MacenkoParams())
    np.testing.assert_allclose(model.stain_matrix, fitted.stain_matrix, atol=1e-12)
    np.testing.assert_allclose(model.max_concentrations, fitted.max_concentrations, rtol=1e-12)


def test_fit_rejects_non_uint8_pixels(he_image: np.ndarray) -> None:
    with pytest.raises(StainError, match="expected uint8 RGB"):
        fit_macenko(he_image.astype(np.float32), MacenkoParams(), name="slide.h5")


def white_with_tissue(n_tissue: int) -> np.ndarray:
    """uint8 (5000, 3): ``n_tissue`` Beer-Lambert tissue pixels, the rest near-white glass (RGB 238)."""
    rng = np.random.default_rng(2)
    pixels = np.full((5000, 3), 238, dtype=np.uint8)
    conc = synthetic_concentrations(4 * n_tissue, rng)
    tissue = beer_lambert(conc[:, conc[0] + conc[1] > 0.5][:, :n_tissue], rng)
    pixels[: len(tissue)] = tissue
    return pixels


@pytest.mark.parametrize(
    ("pixels", "reason"),
    [
        (white_with_tissue(300), "fewer than the 1000"),
        (np.full((5000, 3), 255, dtype=np.uint8), "fewer than the 1000"),
        (np.tile(np.array([[90, 60, 150]], dtype=np.uint8), (5000, 1)), "degenerate stain matrix"),
    ],
    ids=["too-little-tissue", "all-glass", "single-colour"],
)
def test_fit_falls_back_to_reference_with_warning(
    pixels: np.ndarray, reason: str, reference: StainModel, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="cellkd.stain"):
        model = fit_macenko(pixels, MacenkoParams(), name="slide7.h5")
    np.testing.assert_array_equal(model.stain_matrix, reference.stain_matrix)
    np.testing.assert_array_equal(model.max_concentrations, reference.max_concentrations)
    assert "slide7.h5" in caplog.text
    assert reason in caplog.text
    assert "reference stain model" in caplog.text


def test_fit_with_enough_tissue_among_glass_does_not_fall_back(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="cellkd.stain"):
        model = fit_macenko(white_with_tissue(2 * MIN_TISSUE_PIXELS), MacenkoParams())
    assert caplog.text == ""
    assert (abs_cos(model.stain_matrix, TRUE_HE) > 0.99).all()


def test_fit_with_pen_marks_stays_finite(he_image: np.ndarray) -> None:
    """5% saturated pen pixels (black, pure blue, green, red) must not make the model NaN or inf."""
    pixels = he_image.reshape(-1, 3).copy()
    pen = np.array([[0, 0, 0], [0, 0, 255], [0, 255, 0], [255, 0, 0]], dtype=np.uint8)
    pixels[: len(pixels) // 20] = np.resize(pen, (len(pixels) // 20, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a RuntimeWarning (overflow, invalid value) fails the test
        model = fit_macenko(pixels, MacenkoParams())
    assert np.isfinite(model.stain_matrix).all()
    assert np.isfinite(model.max_concentrations).all()


# --- tile normalization ----------------------------------------------------------------------------


def test_normalize_matches_torchstain_numpy(he_image: np.ndarray, fitted: StainModel, reference: StainModel) -> None:
    """torchstain truncates to uint8 where we round, so outputs differ by at most one grey level."""
    import torchstain

    expected, _, _ = torchstain.normalizers.MacenkoNormalizer(backend="numpy").normalize(he_image, Io=IO, stains=False)
    diff = np.abs(normalize_tile(he_image, fitted, reference).astype(int) - expected)
    assert diff.max() <= 1


def test_normalize_matches_torchstain_torch(he_image: np.ndarray, fitted: StainModel, reference: StainModel) -> None:
    """The torch backend computes in float32 and takes nearest-rank percentiles: allow 2 levels on >99% of pixels."""
    import torch
    import torchstain

    expected, _, _ = torchstain.normalizers.MacenkoNormalizer(backend="torch").normalize(
        torch.from_numpy(he_image).permute(2, 0, 1), Io=IO, stains=False
    )
    diff = np.abs(normalize_tile(he_image, fitted, reference).astype(int) - expected.numpy())
    assert (diff <= 2).mean() > 0.99
    assert diff.max() <= 4


def test_normalize_moves_colours_towards_reference_stains(
    he_image: np.ndarray, fitted: StainModel, reference: StainModel
) -> None:
    refit = fit_macenko(normalize_tile(he_image, fitted, reference), MacenkoParams())
    assert (abs_cos(refit.stain_matrix, reference.stain_matrix) > 0.999).all()
    np.testing.assert_allclose(refit.max_concentrations, reference.max_concentrations, rtol=0.05)


@settings(max_examples=40, deadline=None)
@given(tile=arrays(np.uint8, st.tuples(st.integers(1, 9), st.integers(1, 9), st.just(3))))
def test_normalize_tile_equals_float64_reference(tile: np.ndarray, fitted: StainModel, reference: StainModel) -> None:
    out = normalize_tile(tile, fitted, reference)
    assert out.dtype == np.uint8 and out.shape == tile.shape
    assert np.abs(out.astype(int) - reference_normalize(tile, fitted, reference)).max() <= 1


def test_normalize_with_near_collinear_source_equals_reference_without_nan(reference: StainModel) -> None:
    """A 1-degree-apart source makes |pinv| ~ 60, beyond the product-of-tables range: the exp path must agree."""
    h = np.array([0.65, 0.70, 0.29])
    e = h + np.array([0.0, 0.0, 0.02])
    source = StainModel(np.stack([h / np.linalg.norm(h), e / np.linalg.norm(e)], axis=1), np.array([1.0, 1.0]))
    tile = np.random.default_rng(3).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = normalize_tile(tile, source, reference)
    assert np.abs(out.astype(int) - reference_normalize(tile, source, reference)).max() <= 1


@pytest.mark.parametrize("grey", [235, 240, 248, 255])
def test_all_background_tile_maps_to_near_white(grey: int, fitted: StainModel, reference: StainModel) -> None:
    out = normalize_tile(np.full((64, 64, 3), grey, dtype=np.uint8), fitted, reference)
    assert out.min() >= 225


def test_pen_marks_normalize_without_warnings(fitted: StainModel, reference: StainModel) -> None:
    """Saturated pixels (OD = log(240) in a channel) give finite, deterministic output; black stays dark."""
    tile = np.array([[[0, 0, 0], [0, 0, 255], [0, 255, 0], [255, 0, 0], [255, 255, 255]]], dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = normalize_tile(tile, fitted, reference)
    np.testing.assert_array_equal(out, reference_normalize(tile, fitted, reference))
    assert out[0, 0].max() <= 10


def test_normalize_tile_rejects_non_rgb(fitted: StainModel, reference: StainModel) -> None:
    with pytest.raises(StainError, match=r"\(4, 4\)"):
        normalize_tile(np.zeros((4, 4), dtype=np.uint8), fitted, reference)


def test_tile_normalizer_is_pixelwise(he_image: np.ndarray, fitted: StainModel, reference: StainModel) -> None:
    """Normalizing tile by tile gives the same image as normalizing it whole (no per-tile statistics)."""
    normalizer = TileNormalizer(fitted, reference, IO)
    whole = normalizer(he_image)
    tiled = np.concatenate([normalizer(he_image[:50]), normalizer(he_image[50:])])
    np.testing.assert_array_equal(whole, tiled)


# --- fragment stores -------------------------------------------------------------------------------


def write_raw_store(path: Path, images: dict[str, np.ndarray], stain: str = "raw") -> Path:
    """Write a fragment store whose fragment ``name`` holds ``images[name]`` at level 0 and [::2], [::4] at 1, 2."""
    with FragmentStoreWriter(path, slide="s1", source="s1.tiff", stain=stain, mpp=0.5) as writer:
        for i, (name, image) in enumerate(images.items()):
            fragment = Fragment(name, x=100 * i, y=50, width=image.shape[1], height=image.shape[0])
            for level, down in enumerate((1, 2, 4)):
                writer.write_tiles(fragment, level, iter([(0, 0, image[::down, ::down])]))
    return path


def tissue_fragment(height: int, width: int, seed: int) -> np.ndarray:
    """uint8 (height, width, 3): an elliptical Beer-Lambert (TRUE_HE) tissue region on glass (RGB ~240)."""
    rng = np.random.default_rng(seed)
    image = beer_lambert(np.zeros((2, height * width)), rng).reshape(height, width, 3)
    yy, xx = np.mgrid[:height, :width]
    inside = ((yy - height / 2) / (height / 2)) ** 2 + ((xx - width / 2) / (width / 2)) ** 2 < 0.8
    conc = synthetic_concentrations(int(inside.sum()), rng)
    conc[:, conc.sum(axis=0) == 0] = 0.6  # no glass inside the ellipse
    image[inside] = beer_lambert(conc, rng)
    return image


@pytest.fixture
def raw_store(tmp_path: Path) -> Path:
    """Raw store of slide s1: f000 = 300x520 tissue ellipse (several 256 windows at level 0), f001 = 40x60 glass."""
    glass = np.full((40, 60, 3), 241, dtype=np.uint8)
    return write_raw_store(tmp_path / "raw.h5", {"f000": tissue_fragment(300, 520, seed=4), "f001": glass})


def test_sample_tissue_pixels_keeps_only_tissue_up_to_max_samples(raw_store: Path) -> None:
    params = MacenkoParams(max_samples=1500)
    with FragmentStore(raw_store) as store:
        pixels = sample_tissue_pixels(store, params, seed=0)
    assert pixels.dtype == np.uint8 and pixels.shape == (1500, 3)
    od = -np.log((pixels.astype(float) + 1) / params.io)
    assert (od >= params.beta).all()


def test_sample_tissue_pixels_is_deterministic_per_seed(raw_store: Path) -> None:
    params = MacenkoParams(max_samples=1500)
    with FragmentStore(raw_store) as store:
        a, b = sample_tissue_pixels(store, params, seed=0), sample_tissue_pixels(store, params, seed=0)
        c = sample_tissue_pixels(store, params, seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(np.sort(a, axis=0), np.sort(c, axis=0))


def test_sample_tissue_pixels_moves_to_finer_level_on_tiny_slides(tmp_path: Path) -> None:
    """A 100x100 all-tissue fragment has 625 pixels at level 2 (< 1000) and 2500 at level 1."""
    rng = np.random.default_rng(5)
    conc = np.full((2, 100 * 100), 0.8)
    path = write_raw_store(tmp_path / "tiny.h5", {"f000": beer_lambert(conc, rng).reshape(100, 100, 3)})
    with FragmentStore(path) as store:
        pixels = sample_tissue_pixels(store, MacenkoParams(), seed=0)
    assert len(pixels) == 50 * 50


def test_normalize_fragment_store_writes_every_level_normalized(raw_store: Path, tmp_path: Path) -> None:
    out_path = tmp_path / "macenko.h5"
    model = normalize_fragment_store(raw_store, out_path, MacenkoParams(), seed=0)
    assert (abs_cos(model.stain_matrix, TRUE_HE) > 0.99).all()
    reference = load_reference(None)
    with FragmentStore(raw_store) as raw, FragmentStore(out_path) as out:
        assert out.stain == "macenko" and out.slide == "s1" and out.mpp == 0.5
        assert out.fragments == raw.fragments
        for fragment in raw.fragments:
            for level in (0, 1, 2):
                expected = normalize_tile(raw.level(fragment, level)[:], model, reference)
                np.testing.assert_array_equal(out.level(fragment, level)[:], expected)
    with h5py.File(out_path, "r") as h5:
        np.testing.assert_array_equal(h5.attrs["stain_matrix"], model.stain_matrix)
        np.testing.assert_array_equal(h5.attrs["max_concentrations"], model.max_concentrations)
        np.testing.assert_array_equal(h5.attrs["reference_stain_matrix"], reference.stain_matrix)


def test_normalize_fragment_store_is_deterministic(raw_store: Path, tmp_path: Path) -> None:
    params = MacenkoParams(max_samples=2000)
    a = normalize_fragment_store(raw_store, tmp_path / "a.h5", params, seed=3)
    b = normalize_fragment_store(raw_store, tmp_path / "b.h5", params, seed=3)
    np.testing.assert_array_equal(a.stain_matrix, b.stain_matrix)
    np.testing.assert_array_equal(a.max_concentrations, b.max_concentrations)


def test_normalize_fragment_store_without_tissue_warns_and_uses_reference(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    raw = write_raw_store(tmp_path / "glass.h5", {"f000": np.full((64, 64, 3), 239, dtype=np.uint8)})
    with caplog.at_level(logging.WARNING, logger="cellkd.stain"):
        model = normalize_fragment_store(raw, tmp_path / "out.h5", MacenkoParams())
    np.testing.assert_array_equal(model.stain_matrix, load_reference(None).stain_matrix)
    assert str(raw) in caplog.text
    with FragmentStore(tmp_path / "out.h5") as out:
        assert out.level("f000", 0)[:].min() >= 225


def test_normalize_fragment_store_rejects_normalized_input(tmp_path: Path) -> None:
    done = write_raw_store(tmp_path / "done.h5", {"f000": tissue_fragment(64, 64, seed=6)}, stain="macenko")
    with pytest.raises(StainError, match="stain='macenko'"):
        normalize_fragment_store(done, tmp_path / "again.h5", MacenkoParams())
    assert not (tmp_path / "again.h5").exists()
