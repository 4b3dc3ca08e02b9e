"""Nucleus annotations: QuPath GeoJSON in and out, and rasterization to per-class masks.

Geometries are always in level-0 slide pixels (QuPath's image coordinates).
"""

from cellkd.annotations.qupath import (
    check_annotations_fit,
    class_lookup,
    read_qupath_geojson,
    write_qupath_geojson,
)
from cellkd.annotations.rasterize import rasterize_fragment, write_mask_store

__all__ = [
    "check_annotations_fit",
    "class_lookup",
    "rasterize_fragment",
    "read_qupath_geojson",
    "write_mask_store",
    "write_qupath_geojson",
]
