"""Macenko stain normalisation: ``normalize_fragment_store`` and ``TileNormalizer`` vs torchstain (torch) and
staintools on the same tiles, and how far their outputs differ at equal stain matrices."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from harness import N_CORES, Context, Row, Stopwatch, met
from inputs import raw_store

NAME = "macenko"
ORDER = 10


def _tissue_tiles(store_path: Path, size: int, count: int) -> list[np.ndarray]:
    """Up to ``count`` level-0 size x size tiles, mostly tissue (>= 50 % pixels below io * exp(-beta))."""
    from cellkd.store.fragments import FragmentStore

    tiles: list[np.ndarray] = []
    with FragmentStore(store_path) as store:
        for fragment in store.fragments:
            ds = store.level(fragment, 0)
            for y in range(0, ds.shape[0] - size + 1, size):
                for x in range(0, ds.shape[1] - size + 1, size):
                    tile = ds[y : y + size, x : x + size]
                    if (tile.max(axis=2) < 240 * math.exp(-0.15) - 1).mean() >= 0.5:
                        tiles.append(tile)
                    if len(tiles) == count:
                        return tiles
    return tiles


def _patched_staintools():  # noqa: ANN202 - returns the staintools module
    """staintools with spams.lasso fed Fortran-ordered arrays (spams-bin rejects C-ordered ones)."""
    import spams
    import staintools
    import staintools.miscellaneous.get_concentrations as concentrations

    class _FortranSpams:
        @staticmethod
        def lasso(X: np.ndarray, D: np.ndarray, **kwargs: object):  # noqa: ANN205, N803 - spams' own names
            return spams.lasso(X=np.asfortranarray(X), D=np.asfortranarray(D), **kwargs)

    concentrations.spams = _FortranSpams()
    return staintools


def run(ctx: Context) -> list[Row]:
    import torch
    import torchstain

    from cellkd.stain import MacenkoParams, TileNormalizer, fit_macenko, load_reference, normalize_fragment_store
    from cellkd.store.fragments import FragmentStore

    width, height = (4096, 2048) if ctx.quick else (10_000, 5_000)
    raw = raw_store(ctx, width, height)
    params = MacenkoParams()
    reference = load_reference()

    # 1. The workflow's function, end to end: sample + fit once per slide, map every chunk of 3 levels, HDF5 in/out.
    out = ctx.work / "stores" / f"macenko_{width}x{height}.h5"
    with Stopwatch() as watch:
        slide_model = normalize_fragment_store(raw, out, params, seed=0)
    store_s = watch.seconds
    with FragmentStore(raw) as store:
        store_px = sum(int(np.prod(store.level(f, k).shape[:2])) for f in store.fragments for k in range(3))

    # 2. Same in-memory tiles for everyone: cellkd's slide model (fit once) vs per-tile fits of the comparators.
    tiles = _tissue_tiles(raw, 1024, 4 if ctx.quick else 16)
    tile_px = sum(t.shape[0] * t.shape[1] for t in tiles)
    with Stopwatch() as watch:
        normalizer = TileNormalizer(slide_model, reference, params.io)
        for tile in tiles:
            normalizer(tile)
    cellkd_s = watch.seconds
    cellkd_mpix = tile_px / cellkd_s / 1e6

    torch.set_num_threads(N_CORES)
    ts = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    ts.HERef = torch.tensor(reference.stain_matrix, dtype=torch.float32)
    ts.maxCRef = torch.tensor(reference.max_concentrations, dtype=torch.float32)
    tensors = [torch.from_numpy(t).permute(2, 0, 1).contiguous() for t in tiles]
    ts.normalize(I=tensors[0], Io=params.io, alpha=params.alpha, beta=params.beta, stains=False)  # warm-up
    with Stopwatch() as watch:
        for tensor in tensors:
            ts.normalize(I=tensor, Io=params.io, alpha=params.alpha, beta=params.beta, stains=False)
    torch_mpix = tile_px / watch.seconds / 1e6

    staintools = _patched_staintools()
    st = staintools.StainNormalizer(method="macenko")
    # staintools keeps stains as rows (2, 3); the target is the same reference as cellkd's.
    st.stain_matrix_target = reference.stain_matrix.T.copy()
    st.maxC_target = reference.max_concentrations.reshape(1, 2).copy()
    st_tiles = tiles[: 1 if ctx.quick else 4]
    with Stopwatch() as watch:
        for tile in st_tiles:
            st.transform(tile.copy())  # its convert_RGB_to_OD writes into the input
    st_mpix = sum(t.shape[0] * t.shape[1] for t in st_tiles) / watch.seconds / 1e6

    # 3. Outputs at equal stain matrices: both fit the source on the same tile's pixels, same target (the reference).
    diffs_torch, he_torch, diffs_st, p99_st = [], [], [], []
    for tile, tensor in zip(tiles[:4], tensors[:4], strict=False):
        own = fit_macenko(tile, params)
        mine = TileNormalizer(own, reference, params.io)(tile).astype(np.int16)
        theirs, _, _ = ts.normalize(I=tensor, Io=params.io, alpha=params.alpha, beta=params.beta, stains=False)
        diffs_torch.append(int(np.abs(mine - theirs.numpy().astype(np.int16)).max()))
        he_t, _, _ = ts._TorchMacenkoNormalizer__compute_matrices(tensor, params.io, params.alpha, params.beta)
        he_torch.append(float(np.abs(he_t.numpy() - own.stain_matrix).max()))
        # staintools at cellkd's stain matrix (its extractor patched to return it): what differs is its OD
        # (io=255, no +1) and non-negative lasso concentrations; cellkd run with io=255 to match the first.
        p255 = MacenkoParams(io=255.0)
        own255 = fit_macenko(tile, p255)
        mine255 = TileNormalizer(own255, reference, 255.0)(tile).astype(np.int16)
        extractor = staintools.stain_normalizer.MacenkoStainExtractor
        saved = extractor.get_stain_matrix
        extractor.get_stain_matrix = staticmethod(lambda _image, he=own255.stain_matrix: he.T.copy())
        try:
            st_out = st.transform(tile.copy()).astype(np.int16)
        finally:
            extractor.get_stain_matrix = saved
        diffs_st.append(int(np.abs(mine255 - st_out).max()))
        p99_st.append(float(np.percentile(np.abs(mine255 - st_out), 99)))

    store_mpix = store_px / store_s / 1e6
    tile_note = f"{len(tiles)} tissue tiles of 1024x1024 from a {width}x{height} synthetic slide"
    return [
        Row(
            "macenko: normalize_fragment_store (fit + 3 levels, HDF5 in/out) vs torchstain-torch, MPix/s",
            f"{store_mpix:.1f}",
            f"{torch_mpix:.1f}",
            f"{store_mpix / torch_mpix:.1f}x",
            ">= 3x",
            met(store_mpix / torch_mpix >= 3),
            f"{store_px / 1e6:.0f} MPix (all levels) in {store_s:.1f} s; torchstain on {tile_note}, {N_CORES} threads",
        ),
        Row(
            "macenko: TileNormalizer vs torchstain-torch, in-memory tiles, MPix/s",
            f"{cellkd_mpix:.0f}",
            f"{torch_mpix:.1f}",
            f"{cellkd_mpix / torch_mpix:.0f}x",
            ">= 3x",
            met(cellkd_mpix / torch_mpix >= 3),
            f"{tile_note}; cellkd applies the slide fit (1 thread), torchstain fits every tile",
        ),
        Row(
            "macenko: TileNormalizer vs staintools, in-memory tiles, MPix/s",
            f"{cellkd_mpix:.0f}",
            f"{st_mpix:.2f}",
            f"{cellkd_mpix / st_mpix:.0f}x",
            ">= 10x",
            met(cellkd_mpix / st_mpix >= 10),
            f"staintools on {len(st_tiles)} of the tiles (spams lasso per tile)",
        ),
        Row(
            "macenko: max abs output difference vs torchstain, same pixels fitted, grey levels",
            f"{max(diffs_torch)}",
            "torchstain",
            "-",
            "<= 2",
            met(max(diffs_torch) <= 2),
            f"per tile {diffs_torch}; max |HE_cellkd - HE_torchstain| {max(he_torch):.1e}; "
            "torchstain truncates (.int()), cellkd rounds",
        ),
        Row(
            "macenko: max abs output difference vs staintools at cellkd's stain matrix, grey levels",
            f"{max(diffs_st)}",
            "staintools",
            "-",
            "<= 2",
            met(max(diffs_st) <= 2),
            f"per tile {diffs_st} (99th percentile {max(p99_st):.0f}); staintools' concentrations are "
            "non-negative lasso (lambda 0.01), not least squares, and its OD is -log(I / 255) without the +1",
        ),
    ]
