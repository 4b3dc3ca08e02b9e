"""Exception types raised for bad input; each message names the file and the fix."""


class CellkdError(Exception):
    """Base class for every error cellkd raises on purpose."""


class ConfigError(CellkdError):
    """The workflow config or the slide sheet is invalid."""


class SlideError(CellkdError):
    """A slide cannot be read, or holds no usable tissue."""


class AnnotationError(CellkdError):
    """A GeoJSON / XML / .mat annotation file is invalid or does not match its slide."""


class StainError(CellkdError):
    """Stain normalization cannot be fitted or applied."""


class StoreError(CellkdError):
    """An HDF5 store is missing, incomplete or has an unexpected layout."""
