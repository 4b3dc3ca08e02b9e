"""Preprocessing: ``extract_fragments`` (levels 1, 1/2, 1/4) + ``cut_patches`` per synthetic slide size, one fresh
process per size, level-0 MPix per CPU-second and the peak RSS (VmHWM) of that process; and, side by side, reading
the same tissue tiles with cellkd's reader against plain OpenSlide ``read_region`` tiling."""

from __future__ import annotations

import zlib
from pathlib import Path

from harness import Context, Row, Stopwatch, cpu_seconds, met, peak_rss_mib, run_child
from inputs import synthetic_slide

NAME = "preprocess"
ORDER = 20

ISSUE_15_START = "8.8-10.2"
"""Level-0 MPix per CPU-second of extract_fragments + cut_patches when issue 15 was filed (OpenSlide tiles, lzf)."""

TARGET, STRETCH = 30.0, 50.0
"""Issue 15's target and stretch goal, level-0 MPix per CPU-second."""

PEER = "OpenSlide read_region"
"""The peer tiler: histolab and TIAToolbox do not install cleanly next to cellkd (histolab pins
scikit-image < 0.19.4, a source build; TIAToolbox pulls a second torch, Jupyter and more), so the comparison is
the tiling loop both are built on: ``OpenSlide.read_region`` per tile, converted to RGB as histolab does."""


def preprocess_step(slide: str, raw: str, patches: str) -> dict:
    """Child step: preprocess one slide as the workflow does; times, pixel and patch counts, peak RSS."""
    from cellkd.slides import TissueParams, extract_fragments
    from cellkd.store.patches import PatchParams, cut_patches

    imports_rss = peak_rss_mib()
    cpu0 = cpu_seconds()
    with Stopwatch() as wall:
        with Stopwatch() as extract:
            fragments = extract_fragments(slide, raw, Path(slide).stem, TissueParams())
        extract_cpu = cpu_seconds() - cpu0
        n = cut_patches(raw, None, patches, source=Path(slide).stem, params=PatchParams(size=512))
    return {
        "wall_s": wall.seconds,
        "extract_s": extract.seconds,
        "extract_cpu_s": extract_cpu,
        "cpu_s": cpu_seconds() - cpu0,
        "level0_px": sum(f.width * f.height for f in fragments),
        "patches": n,
        "rss_mib": peak_rss_mib(),
        "imports_rss_mib": imports_rss,
    }


def read_tiles_step(slide: str, reader: str) -> dict:
    """Child step: read the level-0 tissue tiles (1024 px) of ``slide`` with ``reader`` ("cellkd" or "openslide").

    Both read the same windows (``extract_fragments``'s, from one tissue detection, not timed); the result has
    the times, the pixel count and a CRC-32 of all tiles in order, which must agree between the two readers.
    """
    import numpy as np
    import openslide

    from cellkd.slides import TissueParams, detect_fragments, open_slide
    from cellkd.slides.extract import TILE, iter_tissue_tiles
    from cellkd.store.fragments import iter_windows

    with open_slide(slide) as cellkd_slide:
        fragments = detect_fragments(cellkd_slide, TissueParams())
    windows = [(f.x + x, f.y + y, w, h) for f in fragments for y, x, h, w in iter_windows(f.height, f.width, TILE)]
    crc, pixels = 0, 0
    cpu0 = cpu_seconds()
    with Stopwatch() as wall:
        if reader == "cellkd":
            with open_slide(slide) as cellkd_slide:
                for _, _, _, (tile,) in iter_tissue_tiles(cellkd_slide, fragments, tile=TILE, levels=1):
                    crc, pixels = zlib.crc32(tile, crc), pixels + tile.shape[0] * tile.shape[1]
        elif reader == "openslide":
            with openslide.OpenSlide(slide) as peer:
                for x, y, w, h in windows:
                    tile = np.asarray(peer.read_region((x, y), 0, (w, h)).convert("RGB"))
                    crc, pixels = zlib.crc32(tile, crc), pixels + tile.shape[0] * tile.shape[1]
        else:
            raise ValueError(f"reader={reader!r}: expected 'cellkd' or 'openslide'")
    return {"wall_s": wall.seconds, "cpu_s": cpu_seconds() - cpu0, "pixels": pixels, "crc32": crc}


def tile_reading_row(slide: Path, label: str) -> Row:
    """cellkd's tissue-tile reading against the ``PEER`` on ``slide``, level-0 MPix per CPU-second and the ratio."""
    mine = run_child(read_tiles_step, slide=str(slide), reader="cellkd")
    peer = run_child(read_tiles_step, slide=str(slide), reader="openslide")
    if (mine["pixels"], mine["crc32"]) != (peer["pixels"], peer["crc32"]):
        raise RuntimeError(f"{slide}: cellkd and {PEER} read different tiles ({mine} vs {peer})")
    mpix = mine["pixels"] / 1e6
    per_cpu, peer_per_cpu = mpix / mine["cpu_s"], mpix / peer["cpu_s"]
    return Row(
        f"preprocess {label}: read the tissue tiles (level 0, 1024 px), MPix per CPU-s",
        f"{per_cpu:.0f}",
        f"{peer_per_cpu:.0f} ({PEER})",
        f"{per_cpu / peer_per_cpu:.1f}x",
        "faster than the peer",
        met(per_cpu > peer_per_cpu),
        f"same {mpix:.0f} MPix, identical pixels (CRC-32); cellkd {mine['cpu_s']:.2f} CPU-s, {mine['wall_s']:.2f} s "
        f"wall (tifffile + imagecodecs tiles, decoding threads); {PEER} {peer['cpu_s']:.2f} CPU-s, "
        f"{peer['wall_s']:.2f} s wall (one thread); wall ratio {peer['wall_s'] / mine['wall_s']:.1f}x",
    )


def run(ctx: Context) -> list[Row]:
    sizes = [(2048, 1024), (4096, 2048)] if ctx.quick else [(10_000, 5_000), (20_000, 10_000), (40_000, 20_000)]
    rows, rss = [], []
    for width, height in sizes:
        slide = synthetic_slide(ctx, width, height)
        out = ctx.work / "preprocess"
        out.mkdir(parents=True, exist_ok=True)
        raw, patches = out / f"raw_{width}x{height}.h5", out / f"patches_{width}x{height}.h5"
        result = run_child(preprocess_step, slide=str(slide), raw=str(raw), patches=str(patches))
        raw.unlink(missing_ok=True)
        patches.unlink(missing_ok=True)
        per_cpu = result["level0_px"] / result["cpu_s"] / 1e6
        wall = result["level0_px"] / result["wall_s"] / 1e6
        rss.append(result["rss_mib"])
        rows.append(
            Row(
                f"preprocess {width}x{height}: extract_fragments + cut_patches, level-0 MPix per CPU-s",
                f"{per_cpu:.1f}",
                f"{ISSUE_15_START} (issue 15 start)",
                "-",
                f">= {TARGET:.0f} (stretch {STRETCH:.0f})",
                met(per_cpu >= TARGET),
                f"{result['level0_px'] / 1e6:.0f} MPix of fragments, {result['wall_s']:.1f} s wall "
                f"({wall:.1f} MPix/s; extract {result['extract_s']:.1f} s), {result['cpu_s']:.1f} CPU-s "
                f"(extract {result['extract_cpu_s']:.1f}: "
                f"{result['level0_px'] / 1e6 / result['extract_cpu_s']:.1f} MPix per CPU-s), "
                f"{result['patches']} patches",
            )
        )
        rows.append(
            Row(
                f"preprocess {width}x{height}: peak RSS, MiB",
                f"{result['rss_mib']:.0f}",
                "-",
                "-",
                "< 2048, flat",
                met(result["rss_mib"] < 2048 and result["rss_mib"] <= 1.25 * rss[0]),
                f"fresh process per size (VmHWM); {result['imports_rss_mib']:.0f} MiB of it "
                "before the step (interpreter + imports)",
            )
        )
        rows.append(tile_reading_row(slide, f"{width}x{height}"))
    return rows
