"""Slides: readers for OpenSlide formats and plain images, tissue detection, fragment extraction.

>>> with open_slide("slide.svs") as slide:
...     fragments = detect_fragments(slide, TissueParams())
>>> extract_fragments("slide.svs", "results/fragments/raw/s1.h5", "s1", TissueParams())
"""

from cellkd.slides.downsample import block_mean
from cellkd.slides.extract import extract_fragments
from cellkd.slides.reader import (
    ImageReader,
    OpenSlideReader,
    SlideReader,
    TiffTileReader,
    open_slide,
    resolve_mpp,
)
from cellkd.slides.tissue import MPP_FALLBACK, TissueParams, detect_fragments, merge_boxes, tissue_mask

__all__ = [
    "MPP_FALLBACK",
    "ImageReader",
    "OpenSlideReader",
    "SlideReader",
    "TiffTileReader",
    "TissueParams",
    "block_mean",
    "detect_fragments",
    "extract_fragments",
    "merge_boxes",
    "open_slide",
    "resolve_mpp",
    "tissue_mask",
]
