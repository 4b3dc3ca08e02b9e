"""Decode a QuPath GeoJSON export, streamed in bounded memory, into compact per-feature arrays.

Only what cellkd uses is kept: each feature's geometry (as shapely, level-0 pixels), its class name
and its QuPath object type. Everything else, above all the ~30 ``measurements`` of every cell (most
of a cell export's bytes, as a list in QuPath 0.2-0.3 or a dict in 0.4+), is skipped by the decoder
without being built. Which geometry counts:

- a **cell** uses its ``nucleusGeometry`` (a top-level Feature key, or under ``properties`` in some
  versions), because cellkd's classes are nucleus classes; a cell without one falls back to its
  cell boundary (listed in ``cells_without_nucleus``);
- a **detection** or an **annotation** uses its ``geometry``.

The object type comes from ``properties.objectType`` (QuPath 0.3+) or, in QuPath 0.2, from the
feature ``id`` (``PathCellObject``, ``PathDetectionObject``, ``PathAnnotationObject``...).
The class name is ``classification.name``, ``classification.names`` joined with ``": "`` (derived
classes, as QuPath displays them) or a bare string; ``None`` when the feature is unclassified.

How it stays fast and bounded: QuPath writes ``{"type":"FeatureCollection","features":[...]}`` (or
a bare list of features in 0.2 scripts). The file is read in blocks of ``BLOCK_BYTES``; each block
is cut after the last complete feature and decoded with typed msgspec Structs; the cut is proven
right by the decoder itself (a cut inside a feature leaves unbalanced JSON, which fails exactly at
the cut, and the previous candidate is tried). Polygon coordinates are parsed in bulk into one
float array per block and turned into shapely polygons in vectorized calls. Peak memory is one
block plus the result. Files of another layout (a single Feature, other top-level keys first) are
decoded whole with the same Structs.

Why msgspec and not ijson (``benchmarks/qupath_parse.py``, 2 loaded cores): on a QuPath 0.5 cell
export of 470,563 cells (1.13 GB) this module reads 53.6k cells/s wall, ~80k per CPU-second, shapely
polygons included, at a peak RSS of 0.68 GiB (``json.load``: 8.0 GiB). ``ijson.items`` with its C
backend streams in little memory but builds every feature dict, measurements included: 27k
features per CPU-second before any geometry is made.
"""

from __future__ import annotations

import contextlib
import gc
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt
import shapely
import shapely.geometry

from cellkd.errors import AnnotationError

EXPORT_HINT = (
    "export the detections from QuPath with File > Export objects as GeoJSON "
    "(QuPath 0.4+; File > Object data > Export as GeoJSON in 0.3), objects 'detections' or 'cells'"
)
GEOMETRY_TYPES = (
    "Polygon",
    "MultiPolygon",
    "GeometryCollection",
    "Point",
    "MultiPoint",
    "LineString",
    "MultiLineString",
)
BLOCK_BYTES = 16 * 2**20
"""Bytes read and decoded at once: ~7k QuPath cells with 30 measurements each."""

_QUPATH_02_IDS = {
    "PathCellObject": "cell",
    "PathDetectionObject": "detection",
    "PathAnnotationObject": "annotation",
    "PathTileObject": "tile",
}
"""QuPath 0.2 names the object type in the feature ``id``; 0.3+ writes ``properties.objectType``."""

_WHITESPACE = b" \t\r\n"
_COORDINATES_TO_NUMBERS = bytes.maketrans(b"[]|", b"  ,")
_COLLECTION_START = re.compile(rb'\A\s*\{\s*"type"\s*:\s*"FeatureCollection"\s*,\s*"features"\s*:\s*\[')
_LIST_START = re.compile(rb"\A\s*\[")
_COLLECTION_END = re.compile(rb"\]\s*\}\s*\Z")
_LIST_END = re.compile(rb"\]\s*\Z")
# The end of one feature and the start of the next, as QuPath (Gson) writes them, compact or pretty.
_NEXT_FEATURE = re.compile(rb'\}\s*,\s*\{\s*"type"\s*:\s*"Feature"')
_BYTE_OFFSET = re.compile(r"\(byte (\d+)\)")
_FEATURE_PATH = re.compile(r"at `\$\[(\d+)\](.*)`")


# --------------------------------------------------------------------------- typed decoding


class _Geometry(msgspec.Struct):
    """A GeoJSON geometry; coordinates stay raw bytes until the polygons of a block are parsed in bulk."""

    type: Any = None
    coordinates: msgspec.Raw = msgspec.Raw()
    geometries: msgspec.Raw = msgspec.Raw()


class _Classification(msgspec.Struct):
    name: Any = None
    names: Any = None


class _Properties(msgspec.Struct):
    objectType: Any = None  # noqa: N815 (QuPath's key)
    # Raw: a file has a handful of distinct classifications, each decoded once (``_Builder.class_code_of``).
    classification: msgspec.Raw = msgspec.Raw()
    nucleusGeometry: _Geometry | None = None  # noqa: N815 (some QuPath versions put it here)


class _Feature(msgspec.Struct):
    """The fields of a QuPath feature that cellkd reads; ``measurements`` and the rest are skipped."""

    type: Any = None
    id: Any = None
    geometry: _Geometry | None = None
    nucleusGeometry: _Geometry | None = None  # noqa: N815 (QuPath's key)
    properties: _Properties | None = None


class _Document(msgspec.Struct):
    """A whole file that is not streamed: a FeatureCollection or a single Feature."""

    type: Any = None
    features: list[_Feature] | None = None
    id: Any = None
    geometry: _Geometry | None = None
    nucleusGeometry: _Geometry | None = None  # noqa: N815
    properties: _Properties | None = None


_FEATURES = msgspec.json.Decoder(list[_Feature])
_CLASSIFICATION = msgspec.json.Decoder(_Classification | str | None)
_DOCUMENT = msgspec.json.Decoder(_Document | list[_Feature])
_FLOATS = msgspec.json.Decoder(list[float])
_ANY = msgspec.json.Decoder()


# --------------------------------------------------------------------------- the result


@dataclass
class QuPathObjects:
    """The features of one QuPath GeoJSON file, compactly: one row per feature with a geometry.

    ``geometry``: shapely geometries (2-D, level-0 pixels, as written: not yet repaired);
    ``feature_index``: position of each in the file; ``class_code``: index into ``class_names``,
    -1 when unclassified; ``object_type``: index into ``object_types`` ("" when the file does not
    say). ``no_geometry`` and ``cells_without_nucleus`` list feature positions.
    """

    path: Path
    n_features: int
    geometry: npt.NDArray[np.object_]
    feature_index: npt.NDArray[np.int64]
    class_code: npt.NDArray[np.int32]
    class_names: list[str]
    object_type: npt.NDArray[np.int16]
    object_types: list[str]
    no_geometry: list[int] = field(default_factory=list)
    cells_without_nucleus: list[int] = field(default_factory=list)

    def is_object_type(self, name: str) -> npt.NDArray[np.bool_]:
        """bool (N,): which rows have QuPath object type ``name``."""
        if name not in self.object_types:
            return np.zeros(len(self.geometry), dtype=bool)
        return self.object_type == self.object_types.index(name)


class _Codes:
    """Small integer codes for repeated strings (class names, object types)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._codes: dict[str, int] = {}

    def code(self, name: str) -> int:
        found = self._codes.get(name)
        if found is None:
            found = self._codes[name] = len(self.names)
            self.names.append(name)
        return found


@dataclass
class _Builder:
    """Accumulates decoded blocks into the arrays of ``QuPathObjects``."""

    path: Path
    n_features: int = 0
    geometries: list[np.ndarray] = field(default_factory=list)
    feature_index: list[int] = field(default_factory=list)
    class_code: list[int] = field(default_factory=list)
    object_type: list[int] = field(default_factory=list)
    classes: _Codes = field(default_factory=_Codes)
    types: _Codes = field(default_factory=_Codes)
    no_geometry: list[int] = field(default_factory=list)
    cells_without_nucleus: list[int] = field(default_factory=list)
    _classifications: dict[bytes, int] = field(default_factory=dict)

    def class_code_of(self, properties: _Properties | None, position: int) -> int:
        """Code of the feature's class name in ``classes`` (-1: unclassified), decoded once per distinct JSON."""
        raw = bytes(properties.classification) if properties is not None else b""
        code = self._classifications.get(raw)
        if code is None:
            try:
                classification = _CLASSIFICATION.decode(raw) if raw else None
            except msgspec.ValidationError as err:
                msg = (
                    f"{self.path}: feature {position} has an invalid properties.classification ({err}); "
                    f'expected {{"name": ..., "color": [r, g, b]}}; {EXPORT_HINT}'
                )
                raise AnnotationError(msg) from err
            name = _class_name(classification)
            code = self._classifications[raw] = -1 if name is None else self.classes.code(name)
        return code

    def add(self, features: Sequence[_Feature]) -> None:
        """Sort one block of decoded features; their file positions start at ``self.n_features``."""
        first = self.n_features
        self.n_features += len(features)
        chosen: list[_Geometry] = []
        positions: list[int] = []
        for i, feature in enumerate(features, start=first):
            if feature.type != "Feature":
                found = feature.type
                msg = f"{self.path}: not GeoJSON: feature {i} is a {found!r}, not a 'Feature'; {EXPORT_HINT}"
                raise AnnotationError(msg)
            properties = feature.properties
            object_type = properties.objectType if properties is not None else None
            if not isinstance(object_type, str):
                object_type = _QUPATH_02_IDS.get(feature.id, "") if isinstance(feature.id, str) else ""
            geometry = feature.nucleusGeometry
            if geometry is None and properties is not None:
                geometry = properties.nucleusGeometry
            if geometry is None:
                geometry = feature.geometry
                if object_type == "cell":
                    self.cells_without_nucleus.append(i)
            if geometry is None:
                self.no_geometry.append(i)
                continue
            if geometry.type not in GEOMETRY_TYPES:
                msg = f"{self.path}: feature {i} has unknown geometry type {geometry.type!r}; {EXPORT_HINT}"
                raise AnnotationError(msg)
            chosen.append(geometry)
            positions.append(i)
            self.class_code.append(self.class_code_of(properties, i))
            self.object_type.append(self.types.code(object_type))
        self.feature_index.extend(positions)
        self.geometries.append(_build_geometries(self.path, chosen, positions))

    def result(self) -> QuPathObjects:
        geometry = np.concatenate(self.geometries) if self.geometries else np.empty(0, dtype=object)
        if len(geometry) and shapely.has_z(geometry).any():
            geometry = shapely.force_2d(geometry)
        return QuPathObjects(
            path=self.path,
            n_features=self.n_features,
            geometry=geometry,
            feature_index=np.asarray(self.feature_index, dtype=np.int64),
            class_code=np.asarray(self.class_code, dtype=np.int32),
            class_names=self.classes.names,
            object_type=np.asarray(self.object_type, dtype=np.int16),
            object_types=self.types.names,
            no_geometry=self.no_geometry,
            cells_without_nucleus=self.cells_without_nucleus,
        )


def _class_name(classification: _Classification | str | None) -> str | None:
    """QuPath class name of a feature's classification, or None when it is unclassified."""
    if isinstance(classification, str) or classification is None:
        return classification
    if isinstance(classification.name, str):
        return classification.name
    names = classification.names  # derived classes ("Tumor: Positive") in QuPath 0.4+
    if isinstance(names, list) and names:
        return ": ".join(str(n) for n in names)
    return None


# --------------------------------------------------------------------------- geometry


def _single_ring_polygons(coordinates: Sequence[msgspec.Raw]) -> np.ndarray | None:
    """Shapely Polygons for raw ``Polygon.coordinates`` of one ring of 2-D points each, in bulk.

    None when any of them has holes, vertices other than ``[x, y]``, short rings or bad numbers:
    the caller then builds them one by one (which also names a malformed feature).
    """
    if not coordinates:
        return np.empty(0, dtype=object)
    text = b"|".join(coordinates).translate(None, _WHITESPACE)
    if b"]],[[" in text:  # an interior ring (hole)
        return None
    chars = np.frombuffer(text, dtype=np.uint8)
    # A vertex is an innermost [...]: a "[" not followed by "[" up to a "]" not preceded by "]".
    opens, closes = np.flatnonzero(chars == ord("[")), np.flatnonzero(chars == ord("]"))
    vertex_open = opens[chars[opens + 1] != ord("[")]
    vertex_close = closes[chars[closes - 1] != ord("]")]
    if len(vertex_open) != len(vertex_close):
        return None
    # Exactly one comma inside each vertex (x, y): a 3-D or 1-D vertex must not shift the others.
    commas = np.flatnonzero(chars == ord(","))
    inner = commas[chars[commas - 1] != ord("]")]
    if np.any(np.searchsorted(inner, vertex_close) - np.searchsorted(inner, vertex_open) != 1):
        return None
    bounds = np.concatenate([[0], np.flatnonzero(chars == ord("|")), [len(chars)]])
    per_polygon = np.diff(np.searchsorted(vertex_open, bounds))
    if per_polygon.min() < 4:
        return None  # an empty ring or one too short for a polygon
    try:
        numbers = _FLOATS.decode(b"[" + text.translate(_COORDINATES_TO_NUMBERS) + b"]")
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    if len(numbers) != 2 * len(vertex_open):
        return None
    xy = np.asarray(numbers, dtype=np.float64).reshape(-1, 2)
    try:
        rings = shapely.linearrings(xy, indices=np.repeat(np.arange(len(per_polygon)), per_polygon))
        return shapely.polygons(rings)
    except (ValueError, shapely.errors.GEOSException):
        return None


def _one_geometry(path: Path, geometry: _Geometry, position: int) -> shapely.Geometry:
    """One geometry through shapely's GeoJSON reader; AnnotationError names a malformed feature."""
    try:
        if geometry.type == "GeometryCollection":
            parts = _ANY.decode(geometry.geometries) if len(geometry.geometries) else []
            return shapely.geometry.shape({"type": "GeometryCollection", "geometries": parts})
        coordinates = _ANY.decode(geometry.coordinates) if len(geometry.coordinates) else None
        return shapely.geometry.shape({"type": geometry.type, "coordinates": coordinates})
    except Exception as err:  # msgspec and shapely raise many types on malformed input
        msg = f"{path}: feature {position} has malformed {geometry.type} coordinates ({err}); {EXPORT_HINT}"
        raise AnnotationError(msg) from err


def _build_geometries(path: Path, geometries: Sequence[_Geometry], positions: Sequence[int]) -> np.ndarray:
    """Shapely geometries for one block: simple polygons in bulk, everything else one by one."""
    out = np.empty(len(geometries), dtype=object)
    simple = [k for k, g in enumerate(geometries) if g.type == "Polygon"]
    built = _single_ring_polygons([geometries[k].coordinates for k in simple])
    if built is not None:
        out[simple] = built
        rest = np.ones(len(geometries), dtype=bool)
        rest[simple] = False
        others = np.flatnonzero(rest).tolist()
    else:
        others = range(len(geometries))
    for k in others:
        out[k] = _one_geometry(path, geometries[k], positions[k])
    return out


# --------------------------------------------------------------------------- streaming


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while building millions of small containers.

    Decoding a QuPath export creates ~10^7 lists and objects without reference cycles; the collector
    would re-traverse all of them again and again as they are allocated (8x slower).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _NotStreamable(Exception):
    """The file is not laid out as QuPath writes it; it is decoded whole instead."""


def _decode_error(path: Path, err: Exception, file_offset: int, first_feature: int) -> AnnotationError:
    """AnnotationError for a msgspec error in a segment at byte ``file_offset`` starting with ``first_feature``."""
    text = str(err)
    if isinstance(err, msgspec.ValidationError):
        where = _FEATURE_PATH.search(text)
        if where is None:
            return AnnotationError(f"{path}: not QuPath GeoJSON ({text}); {EXPORT_HINT}")
        index, inner = int(where.group(1)) + first_feature, where.group(2).lstrip(".")
        reason = text.split(" - at ")[0]
        if not inner:
            msg = f"{path}: not GeoJSON: feature {index} is not a Feature object ({reason}); {EXPORT_HINT}"
        else:
            msg = f"{path}: feature {index} has an invalid {inner} ({reason}); {EXPORT_HINT}"
        return AnnotationError(msg)
    offset = _BYTE_OFFSET.search(text)
    where = f" near byte {file_offset + int(offset.group(1))}" if offset else ""
    reason = _BYTE_OFFSET.sub("", text).strip()
    if "truncated" in text:
        fix = "the file is empty or cut short (an interrupted export or copy): export or copy it again"
    elif "UTF-8" in text:
        fix = "save the file as UTF-8 (QuPath writes UTF-8; some editors re-encode class names)"
    else:
        fix = EXPORT_HINT
    return AnnotationError(f"{path}: not valid JSON ({reason}{where}); {fix}")


def _decode_features(buffer: bytearray, end: int) -> list[_Feature]:
    """Decode ``buffer[:end + 1]`` as a list of features, ``buffer[0]`` and ``buffer[end]`` set to ``[`` and ``]``.

    In place: the bytes there (a comma or whitespace between features) are overwritten, and
    ``buffer[end]`` is restored when decoding fails. No copy of the block is made.
    """
    kept = buffer[end]
    buffer[0], buffer[end] = ord("["), ord("]")
    try:
        return _FEATURES.decode(memoryview(buffer)[: end + 1])
    except (msgspec.DecodeError, msgspec.ValidationError):
        buffer[end] = kept
        raise


def _cut_at_a_feature_end(buffer: bytearray) -> tuple[int, list[_Feature]] | None:
    """(cut, features): the whole features in ``buffer[1:cut]``, decoded; None when no feature is whole.

    ``buffer[0]`` is the byte before the first feature. Candidate cuts are the feature boundaries
    QuPath writes; the decoder proves one right (a cut inside a feature fails at the cut, so the
    previous candidate is tried). An error before the cut is genuine and raised.
    """
    window = 2**20
    while True:
        start = max(0, len(buffer) - window)
        candidates = [m.start() + 1 for m in _NEXT_FEATURE.finditer(buffer, start)]
        for cut in reversed(candidates):
            try:
                return cut, _decode_features(buffer, cut)
            except msgspec.DecodeError as err:
                offset = _BYTE_OFFSET.search(str(err))
                if offset is None or int(offset.group(1)) < cut:
                    raise
        if start == 0:
            return None
        window *= 4


def _decode_last_block(buffer: bytearray, end: re.Pattern[bytes], builder: _Builder) -> None:
    """Decode the features of the file's last block, which ends with the array's ``]`` (and ``}``).

    Raises ``_NotStreamable`` when other keys follow the features (the file is then decoded whole)
    and msgspec's error when the file is truncated or malformed.
    """
    # Searched in the last bytes only: a regex search from the start would try every "]" of the block.
    closing = end.search(buffer, max(0, len(buffer.rstrip()) - 1024))
    if closing is None:
        if buffer.rstrip().endswith(b"}"):
            raise _NotStreamable  # other keys after "features", e.g. "bbox": {...}
        buffer[0] = ord("[")
        _FEATURES.decode(memoryview(buffer))  # truncated: raises with the position
        raise _NotStreamable
    try:
        features = _decode_features(buffer, closing.start())
    except msgspec.DecodeError as err:
        if "trailing characters" in str(err):
            raise _NotStreamable from err  # that "]}" closed another key after "features", e.g. "bbox": [..]}
        raise
    builder.add(features)


def _stream(path: Path, stream: Any, head: bytes, builder: _Builder) -> None:
    """Decode a FeatureCollection or bare list whose first block is ``head``, block by block."""
    start = _COLLECTION_START.match(head) or _LIST_START.match(head)
    if start is None:
        raise _NotStreamable
    end = _COLLECTION_END if start.re is _COLLECTION_START else _LIST_END
    # buffer[0] is always the byte before the next feature (the array's "[", a comma or a space).
    offset = start.end() - 1
    buffer = bytearray(head[offset:])
    at_end = False
    while True:
        if not at_end and len(buffer) < BLOCK_BYTES:
            more = stream.read(BLOCK_BYTES)
            at_end = not more
            buffer += more
            continue
        try:
            if at_end:
                _decode_last_block(buffer, end, builder)
                return
            found = _cut_at_a_feature_end(buffer)
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            raise _decode_error(path, err, offset, builder.n_features) from err
        if found is None:  # one feature longer than the buffer: read on
            more = stream.read(BLOCK_BYTES)
            at_end = not more
            buffer += more
            continue
        cut, features = found
        builder.add(features)
        del features  # its raw coordinates point into this buffer
        next_feature = buffer.index(b"{", cut)
        offset += next_feature - 1
        buffer = buffer[next_feature - 1 :]


def _decode_whole(path: Path, data: bytes, builder: _Builder) -> None:
    """Decode a file of another layout at once (single Feature, other key order, trailing keys)."""
    try:
        document = _DOCUMENT.decode(data)
    except msgspec.ValidationError as err:
        text = str(err)
        if "at `$.features`" in text:
            msg = f"{path}: not GeoJSON: the FeatureCollection has no 'features' list; {EXPORT_HINT}"
            raise AnnotationError(msg) from err
        if "at `$[" in text:
            raise _decode_error(path, err, 0, 0) from err
        found = text.split("got `")[-1].split("`")[0] if "got `" in text else "?"
        msg = f"{path}: not GeoJSON: expected a FeatureCollection or a list of Features, found {found!r}; {EXPORT_HINT}"
        raise AnnotationError(msg) from err
    except msgspec.DecodeError as err:
        raise _decode_error(path, err, 0, 0) from err
    if isinstance(document, list):
        builder.add(document)
    elif document.type == "FeatureCollection":
        if document.features is None:
            msg = f"{path}: not GeoJSON: the FeatureCollection has no 'features' list; {EXPORT_HINT}"
            raise AnnotationError(msg)
        builder.add(document.features)
    elif document.type == "Feature":
        feature = _Feature(document.type, document.id, document.geometry, document.nucleusGeometry, document.properties)
        builder.add([feature])
    else:
        found = document.type
        msg = f"{path}: not GeoJSON: expected a FeatureCollection or a list of Features, found {found!r}; {EXPORT_HINT}"
        raise AnnotationError(msg)


def decode_qupath_geojson(path: str | Path) -> QuPathObjects:
    """Decode a QuPath GeoJSON file (QuPath 0.2-0.6; see the module docstring) into ``QuPathObjects``.

    Raises ``AnnotationError`` naming the file and the fix when it cannot be read, is not JSON or is
    not GeoJSON, or when a feature has an unknown or malformed geometry.
    """
    path = Path(path)
    builder = _Builder(path)
    try:
        with gc_paused(), path.open("rb") as stream:
            head = stream.read(BLOCK_BYTES)
            if head.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark, written by some Windows editors
                head = head[3:]
            try:
                _stream(path, stream, head, builder)
            except _NotStreamable:
                stream.seek(0)
                data = stream.read()
                builder = _Builder(path)
                _decode_whole(path, data[3:] if data.startswith(b"\xef\xbb\xbf") else data, builder)
    except FileNotFoundError as err:
        raise AnnotationError(f"{path}: annotation file does not exist; check its path in the slide sheet") from err
    except IsADirectoryError as err:
        raise AnnotationError(f"{path}: cannot read the annotation file (it is a folder); check its path") from err
    except OSError as err:
        msg = f"{path}: cannot read the annotation file ({err}); check its path and permissions"
        raise AnnotationError(msg) from err
    return builder.result()
