"""HDF5 stores shared between rules, written atomically.

Every store is plain HDF5 compressed with Blosc (zstd; ``cellkd.store.compression``, the one setting for
all). Outside cellkd, ``import hdf5plugin`` before reading one with h5py (it registers the Blosc filter
with HDF5); importing this package does that for every cellkd reader.

Layouts (all images uint8 RGB (H, W, 3); masks uint8 0/1 (H, W, C), C = classes in config order):

fragment store ``results/fragments/{stain}/{slide}.h5`` (``cellkd.store.fragments``)
    attrs: complete, slide, source, stain, mpp (µm per stored px: the working resolution; NaN when unknown),
        slide_mpp (the slide's level-0 µm/px), slide_scale (level-0 slide px per stored px),
        slide_mpp_assumed (slide_mpp is mpp_fallback), downsamples [1, 2, 4],
        slide_size (level-0 width, height; 0, 0 when unknown); ``SlideGeometry`` reads them
    ``/fragments/{name}`` attrs x, y, width, height (bounding box in working px: level-0 slide px / slide_scale)
    ``/fragments/{name}/level{k}`` dataset (ceil(height/d), ceil(width/d), 3), chunked 256²

mask store ``results/masks/{slide}.h5`` (``cellkd.annotations``)
    attrs: complete, slide, classes (names), annotation_sets (e.g. ssa, wsa, ea, truth)
    ``/fragments/{name}/{set}/level{k}`` dataset uint8 (H_k, W_k, C), same H_k, W_k as the fragment level

patch store ``results/patches/{stain}/{source}.h5`` (``cellkd.store.patches``)
    attrs: complete, source, stain, patch_size, classes, annotation_sets, split_names, split_ratios, levels,
        seed, split_block_size (level-0 px edge of the area blocks a split is drawn for)
        pixels (how to read a patch without cellkd)
    no pixels: an index into the fragment and mask stores the patches were cut from
    ``stores/fragments``, ``stores/masks`` (M,) str: each slide's stores, relative to the patch store's
    folder (mask "" when cut without masks); ``stores/slide``, ``stores/fragment_boxes`` (M,) str: what
    the reader checks the stores against (JSON ``[[name, x, y, width, height], ...]``)
    provenance 1-D (N,): ``store`` (int32, row of ``stores/*``), ``slide`` (str), ``fragment`` (str),
    ``level`` (int8), ``x``, ``y`` (int32, patch origin in that level's fragment pixels), ``split`` (int8:
    0 train, 1 val, 2 test; one per area block, so a patch and its views at other levels share it)
    patch i = (P, P) window at (y, x) of the fragment level (masks: ``fragments/{name}/{set}/level{k}`` of
    the mask store), zero-padded past the edge (``cellkd.store.patches.PatchStore``)

nuclei store ``results/nuclei/{stain}/{slide}.h5`` (``cellkd.store.nuclei``; full layout there)
    attrs: complete, slide, stain, classes (``"background"`` last), label_sets, crop_size,
        multiscale_size, split_names, and the extraction settings
    one row per nucleus: ``fragment``, ``centroid_x``, ``centroid_y``, ``area``, ``bbox``, ``split``,
    ``labels/{set}`` (int8, -1 unlabelled), ``crops/level{0,1,2}`` uint8 (N, S, S, 3), ``geometry`` (WKB)
"""

from cellkd.store.atomic import atomic_h5, atomic_path, atomic_write_text, require_complete
from cellkd.store.compression import COMPRESSION

__all__ = ["COMPRESSION", "atomic_h5", "atomic_path", "atomic_write_text", "require_complete"]
