"""Preprocessing: ``extract_fragments`` (levels 1, 1/2, 1/4) + ``cut_patches`` per synthetic slide size, one fresh
process per size, level-0 MPix per CPU-second and the peak RSS (VmHWM) of that process."""

from __future__ import annotations

from pathlib import Path

from harness import Context, Row, Stopwatch, cpu_seconds, met, peak_rss_mib, run_child
from inputs import synthetic_slide

NAME = "preprocess"
ORDER = 20


def preprocess_step(slide: str, raw: str, patches: str) -> dict:
    """Child step: preprocess one slide as the workflow does; times, pixel and patch counts, peak RSS."""
    from cellkd.slides import TissueParams, extract_fragments
    from cellkd.store.patches import PatchParams, cut_patches

    imports_rss = peak_rss_mib()
    cpu0 = cpu_seconds()
    with Stopwatch() as wall:
        with Stopwatch() as extract:
            fragments = extract_fragments(slide, raw, Path(slide).stem, TissueParams())
        n = cut_patches(raw, None, patches, source=Path(slide).stem, params=PatchParams(size=512))
    return {
        "wall_s": wall.seconds,
        "extract_s": extract.seconds,
        "cpu_s": cpu_seconds() - cpu0,
        "level0_px": sum(f.width * f.height for f in fragments),
        "patches": n,
        "rss_mib": peak_rss_mib(),
        "imports_rss_mib": imports_rss,
    }


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
                "-",
                "-",
                ">= 50",
                met(per_cpu >= 50),
                f"{result['level0_px'] / 1e6:.0f} MPix of fragments, {result['wall_s']:.1f} s wall "
                f"({wall:.1f} MPix/s; extract {result['extract_s']:.1f} s), {result['cpu_s']:.1f} CPU-s, "
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
    return rows
