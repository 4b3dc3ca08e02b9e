"""Training data of the nucleus classifiers: rows of the concatenated nuclei stores, their crops, augmentation.

Several nuclei stores (``cellkd.store.nuclei``, read only through ``NucleiStore``) are
concatenated in the order given; a "row" is an index into that concatenation. Crops are read in
chunks of ``_READ_CHUNK`` rows, so memory stays bounded however large the stores are.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from cellkd.errors import StoreError
from cellkd.models import INPUT_SHAPES, create_model
from cellkd.models.classifiers import INPUT_LEVELS
from cellkd.store.nuclei import NucleiStore
from cellkd.types import PathLike

_READ_CHUNK = 4096  # rows read from HDF5 at a time: bounded memory however large the store


@dataclass(frozen=True)
class NucleusRows:
    """Concatenated stores: rows per store, stains, class names, split (N,) and labels (N,) of one set (-1 = none)."""

    paths: tuple[str, ...]
    sizes: tuple[int, ...]
    stains: tuple[str, ...]
    classes: tuple[str, ...]
    split: npt.NDArray[np.int8]
    labels: npt.NDArray[np.int64]

    @property
    def offsets(self) -> npt.NDArray[np.int64]:
        return np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)


def read_nucleus_rows(nuclei_stores: Sequence[PathLike], label_set: str | None) -> NucleusRows:
    """Metadata of the concatenated stores; ``label_set`` None reads no labels (all -1)."""
    if not nuclei_stores:
        raise StoreError("no nuclei stores given; pass at least one results/nuclei/{stain}/{slide}.h5")
    sizes, stains, classes, splits, labels = [], [], None, [], []
    for path in nuclei_stores:
        with NucleiStore(path) as store:
            names = tuple(store.classes)
            if classes is None:
                classes = names
            elif names != classes:
                msg = f"{path}: classes {list(names)} differ from {list(classes)} of {nuclei_stores[0]}; rebuild stores"
                raise StoreError(msg)
            n = len(store)
            if label_set is not None:
                labels.append(store.labels(label_set).astype(np.int64))
            else:
                labels.append(np.full(n, -1, dtype=np.int64))
            sizes.append(n)
            stains.append(store.stain)
            splits.append(store.split.astype(np.int8))
    if not classes:
        raise StoreError(f"{nuclei_stores[0]}: nuclei store has no 'classes' attribute; rebuild it")
    all_labels = np.concatenate(labels)
    if all_labels.size and all_labels.max() >= len(classes):
        raise StoreError(
            f"{list(map(str, nuclei_stores))}: label {all_labels.max()} in set {label_set!r} is outside the "
            f"{len(classes)} classes {list(classes)}; rebuild the stores"
        )
    paths = tuple(str(p) for p in nuclei_stores)
    return NucleusRows(paths, tuple(sizes), tuple(stains), classes, np.concatenate(splits), all_labels)


def _crop_levels(input_kind: str) -> tuple[int, ...]:
    """The store's crop levels a network of ``input_kind`` reads (see ``cellkd.models.classifiers``)."""
    if input_kind not in INPUT_LEVELS:
        raise ValueError(f"input_kind {input_kind!r} is unknown; expected one of {sorted(INPUT_LEVELS)}")
    return INPUT_LEVELS[input_kind]


def iter_store_chunks(rows: NucleusRows, input_kind: str, chunk: int) -> Iterator[tuple[int, npt.NDArray[np.uint8]]]:
    """(first global row, crops uint8 (n, S, S, C)) for consecutive chunks of every store, in order."""
    levels = _crop_levels(input_kind)
    for path, offset in zip(rows.paths, rows.offsets[:-1], strict=True):
        with NucleiStore(path) as store:
            n = len(store)
            for start in range(0, n, chunk):
                yield int(offset) + start, store.crop_rows(levels, start, min(start + chunk, n))


def load_crops(rows: NucleusRows, selected: npt.NDArray[np.int64], input_kind: str) -> torch.Tensor:
    """uint8 (len(selected), S, S, C) crops of the global rows ``selected`` (any order), read chunk by chunk.

    Each chunk goes straight to its rows of one preallocated array: the crops are held once, not as a list of
    parts plus their concatenation plus a reordered copy (3x the crops at the peak of a paper-size slide).
    """
    levels = _crop_levels(input_kind)
    order = np.argsort(selected, kind="stable")
    ordered = selected[order]
    channels, height, width = INPUT_SHAPES[input_kind]
    out = np.empty((len(selected), height, width, channels), dtype=np.uint8)
    filled = 0  # rows are visited in ascending order, so the k-th one read belongs at order[k]
    for path, lo, hi in zip(rows.paths, rows.offsets[:-1], rows.offsets[1:], strict=True):
        mine = ordered[(ordered >= lo) & (ordered < hi)] - lo
        if not mine.size:
            continue
        with NucleiStore(path) as store:
            for start in range(0, int(mine.max()) + 1, _READ_CHUNK):
                wanted = mine[(mine >= start) & (mine < start + _READ_CHUNK)]
                if wanted.size:
                    block = store.crop_rows(levels, start, int(wanted.max()) + 1)
                    out[order[filled : filled + wanted.size]] = block[wanted - start]
                    filled += wanted.size
    if filled != len(selected):
        raise IndexError(f"rows {selected.min()}..{selected.max()} fall outside the {rows.offsets[-1]} nuclei rows")
    return torch.from_numpy(out)


def input_kind_of(arch: str, num_classes: int) -> str:
    """``input_kind`` of ``arch``, read off a throwaway instance built without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        return str(create_model(arch, num_classes=num_classes).input_kind)


def augment_dihedral(crops: torch.Tensor, rot: npt.NDArray[np.int64], flip: npt.NDArray[np.int64]) -> torch.Tensor:
    """Rotate crop i (B, S, S, C) by ``rot[i]`` x 90 degrees, then mirror it when ``flip[i]``: the dihedral group."""
    out = torch.empty_like(crops)
    for k in range(4):
        for f in range(2):
            chosen = np.flatnonzero((rot == k) & (flip == f))
            if not chosen.size:
                continue
            index = torch.from_numpy(chosen).to(crops.device)
            part = torch.rot90(crops[index], k, dims=(1, 2))
            out[index] = part.flip(2) if f else part
    return out


def draw_stain_jitter(
    rng: np.random.Generator, n: int, strength: float
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Per-crop HED scales ``U(1 - strength, 1 + strength)`` and shifts ``U(-strength, strength)``, each (n, 3)."""
    scale = rng.uniform(1 - strength, 1 + strength, size=(n, 3)).astype(np.float32)
    shift = rng.uniform(-strength, strength, size=(n, 3)).astype(np.float32)
    return scale, shift


def augment_stain(crops: torch.Tensor, scale: npt.NDArray[np.float32], shift: npt.NDArray[np.float32]) -> torch.Tensor:
    """HED stain jitter (Tellez et al. 2018): crop i's stain concentrations become ``c * scale[i] + shift[i]``.

    ``crops``: uint8 (B, S, S, C) with C a multiple of 3 (the multiscale crops stack two RGB levels: both get
    crop i's jitter, as they are one nucleus on one slide). Each RGB pixel goes to optical density
    ``-ln((I + 1) / 256)``, is unmixed into hematoxylin, eosin and residual (DAB) concentrations with
    scikit-image's Ruifrok-Johnston matrix, jittered, mixed back and rounded to uint8. Scale 1 and shift 0 give
    the crops back. Returns a new uint8 tensor of the same shape on the same device.
    """
    # Imported here: scikit-image's colour module costs every classifier job start-up time, and only this
    # (off by default) augmentation needs its matrices.
    from skimage.color import hed_from_rgb, rgb_from_hed

    b, height, width, channels = crops.shape
    if channels % 3:
        raise ValueError(f"stain augmentation needs RGB crops (channels a multiple of 3), got {channels} channels")
    device = crops.device
    to_hed = torch.as_tensor(hed_from_rgb, dtype=torch.float32, device=device)
    to_rgb = torch.as_tensor(rgb_from_hed, dtype=torch.float32, device=device)
    od = -torch.log((crops.reshape(b, height, width, channels // 3, 3).float() + 1) / 256)
    stains = od @ to_hed  # row vectors, scikit-image's convention (rgb2hed / hed2rgb)
    stains = stains * torch.from_numpy(scale).to(device).view(b, 1, 1, 1, 3)
    stains = stains + torch.from_numpy(shift).to(device).view(b, 1, 1, 1, 3)
    rgb = 256 * torch.exp(-(stains @ to_rgb)) - 1
    return rgb.round_().clamp_(0, 255).to(torch.uint8).reshape(crops.shape)


def cap_per_class(
    selected: npt.NDArray[np.int64], targets: npt.NDArray[np.int64], cap: int | None, seed: int
) -> npt.NDArray[np.int64]:
    """At most ``cap`` of ``selected`` per target class, drawn without replacement with ``seed``; order kept."""
    if cap is None:
        return selected
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x6361]))  # own stream: independent of shuffling
    keep = np.zeros(len(selected), dtype=bool)
    for c in np.unique(targets):
        members = np.flatnonzero(targets == c)
        keep[members if len(members) <= cap else rng.choice(members, size=cap, replace=False)] = True
    return selected[keep]
