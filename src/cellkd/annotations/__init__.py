"""Nucleus annotations: QuPath GeoJSON in and out, point labels, rasterization to per-class masks, public datasets.

Geometries are always in level-0 slide pixels (QuPath's image coordinates).
"""

from cellkd.annotations.points import PointLabels, label_nuclei_by_points
from cellkd.annotations.public import (
    PUBLIC_KINDS,
    PublicKind,
    find_pairs,
    import_public_dataset,
    instance_masks,
    polygon_masks,
    public_store_dir,
    read_lizard_mat,
    read_monuseg_annotation,
    read_monuseg_xml,
    write_image_stores,
)
from cellkd.annotations.qupath import (
    AnnotationOptions,
    QuPathAnnotations,
    QuPathGeoJSONWriter,
    check_annotations_fit,
    class_lookup,
    open_qupath_geojson,
    read_qupath_annotations,
    read_qupath_geojson,
    write_qupath_geojson,
)
from cellkd.annotations.qupath_decode import QuPathObjects, decode_qupath_geojson
from cellkd.annotations.rasterize import rasterize_fragment, write_mask_store

__all__ = [
    "PUBLIC_KINDS",
    "AnnotationOptions",
    "PointLabels",
    "PublicKind",
    "QuPathAnnotations",
    "QuPathGeoJSONWriter",
    "QuPathObjects",
    "check_annotations_fit",
    "class_lookup",
    "decode_qupath_geojson",
    "find_pairs",
    "import_public_dataset",
    "instance_masks",
    "label_nuclei_by_points",
    "open_qupath_geojson",
    "polygon_masks",
    "public_store_dir",
    "rasterize_fragment",
    "read_lizard_mat",
    "read_monuseg_annotation",
    "read_monuseg_xml",
    "read_qupath_annotations",
    "read_qupath_geojson",
    "write_image_stores",
    "write_mask_store",
    "write_qupath_geojson",
]
