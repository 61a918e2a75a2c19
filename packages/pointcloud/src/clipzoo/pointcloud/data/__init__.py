"""Readers for the 3D datasets as they are distributed, and what they share.

Every reader is a map-style :class:`torch.utils.data.Dataset` built as
``Reader(path, split="test", on_error="raise", **options)`` whose samples are dicts::

    {"points": float32 (N, 3) xyz or (N, 6) xyz+rgb with rgb in [0, 1], as stored in the file
               (not centred, scaled or subsampled: the point tower's preprocessing does that),
     "text": str (a caption, else the class name), "label": int, "id": str, "split": str,
     # optional: "image" (PIL, a rendered view), "normals" (N, 3), "teacher.<modality>" (1-D)}

and which expose ``classnames`` (label order), ``up_axis`` (``"y"`` or ``"z"``: the gravity
axis of the dataset's files, so a tower trained on the other convention can convert) and
``problems`` (rows skipped while the index was built, with ``on_error="skip"``).

Errors follow the core's schema: a bad sample raises
:class:`~clipzoo.core.data.schema.BadSampleError` naming the file (with ``on_error="skip"``
it is logged and ``None`` is returned, which the collator drops); a broken layout raises
:class:`~clipzoo.core.data.schema.DatasetFormatError`; a path from an index file that leaves
the dataset root raises :class:`~clipzoo.core.data.schema.UnsafePathError` whatever the policy.

Pickled ``.npy`` files (OpenShape's per-object dicts, ``xyz_label.npy``) are refused unless
``allow_pickle=True`` is passed: unpickling runs code from the file.

The readers live in submodules (imported on first use, so importing this package does not
pull in h5py or trimesh): :mod:`.off`, :mod:`.meshes`, :mod:`.modelnet`, :mod:`.shapenet`,
:mod:`.scanobjectnn`, :mod:`.objaverse`. :data:`READERS` maps registry names to factories.
"""

from __future__ import annotations

import logging
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from clipzoo.core.data.reader import ReaderBase
from clipzoo.core.data.schema import (
    BadSampleError,
    DatasetFormatError,
    resolve_under,
)
from clipzoo.core.lazy import lazy_attributes

logger = logging.getLogger(__name__)

UP_AXES = ("y", "z")

#: registry name (kind "dataset") -> "module:factory", each factory ``(path, on_error="raise", **options)``
READERS = {
    "pointcloud/modelnet40": "clipzoo.pointcloud.data.modelnet:modelnet40",
    "pointcloud/modelnet40-off": "clipzoo.pointcloud.data.modelnet:modelnet40_off",
    "pointcloud/modelnet40-h5": "clipzoo.pointcloud.data.modelnet:modelnet40_h5",
    "pointcloud/shapenet55": "clipzoo.pointcloud.data.shapenet:shapenet55",
    "pointcloud/scanobjectnn": "clipzoo.pointcloud.data.scanobjectnn:scanobjectnn",
    "pointcloud/objaverse-lvis": "clipzoo.pointcloud.data.objaverse:objaverse_lvis",
    "pointcloud/meshes": "clipzoo.pointcloud.data.meshes:meshes",
}


# -- shared checks ---------------------------------------------------------------------------
def check_up_axis(value: str) -> str:
    """Validate an ``up_axis`` option: ``"y"`` or ``"z"``."""
    if value not in UP_AXES:
        raise ValueError(f"up_axis must be one of {UP_AXES}, got {value!r}")
    return value


def as_points(
    xyz: Any, source: str, row: int | str | None = None, rgb: Any = None, field: str = "points"
) -> np.ndarray:
    """Validate a cloud and return it as float32 ``(N, 3)``, or ``(N, 6)`` when ``rgb`` is given.

    Raises :class:`BadSampleError` (naming ``source``) for a non-numeric or mis-shaped array,
    an empty cloud, NaN/inf coordinates. ``rgb`` (``(N, 3)`` or ``(N, 4)``, alpha dropped) may
    be uint8 or floats on a 0-255 scale (divided by 255) or already in [0, 1].
    """

    def bad(reason: str) -> BadSampleError:
        return BadSampleError(source, row, field, reason)

    arr = np.asarray(xyz)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise bad(f"expected a numeric array of points, got dtype {arr.dtype}")
    if arr.ndim != 2 or arr.shape[1] < 3:
        raise bad(f"expected points of shape (N, 3), got {arr.shape}")
    if arr.shape[0] == 0:
        raise bad("empty cloud (0 points)")
    arr = arr[:, :3].astype(np.float32)
    finite = np.isfinite(arr).all(axis=1)
    if not finite.all():
        first = int(np.flatnonzero(~finite)[0])
        raise bad(f"{int((~finite).sum())} point(s) with NaN or infinite coordinates (first: point {first})")
    if rgb is None:
        return np.ascontiguousarray(arr)
    return np.concatenate([arr, as_rgb(rgb, len(arr), source, row)], axis=1)


def as_rgb(rgb: Any, n: int, source: str, row: int | str | None = None) -> np.ndarray:
    """Colours as float32 ``(n, 3)`` in [0, 1]; see :func:`as_points`."""
    col = np.asarray(rgb)
    if col.dtype == object or not np.issubdtype(col.dtype, np.number):
        raise BadSampleError(source, row, "rgb", f"expected a numeric colour array, got dtype {col.dtype}")
    if col.ndim != 2 or col.shape[0] != n or col.shape[1] not in (3, 4):
        raise BadSampleError(source, row, "rgb", f"expected colours of shape ({n}, 3), got {col.shape}")
    integer = np.issubdtype(col.dtype, np.integer)
    col = col[:, :3].astype(np.float32)
    if not np.isfinite(col).all() or col.min() < 0 or col.max() > 255:
        raise BadSampleError(source, row, "rgb", "colours must be finite, in [0, 1] or on a 0-255 scale")
    if integer or col.max() > 1.0:
        col = col / 255.0
    return col


def sample_seed(seed: int, key: str) -> list[int]:
    """A per-sample seed for ``np.random.default_rng``: stable across runs and splits (keyed
    by the sample's id, not its index)."""
    return [int(seed), zlib.crc32(key.encode("utf-8"))]


def read_npy(path: Path, source: str, row: int | str | None = None, allow_pickle: bool = False) -> Any:
    """The contents of an ``.npy`` file: an array, or (``allow_pickle=True`` only) the object a
    pickled 0-d object array holds (OpenShape writes dicts this way).

    A pickled file without ``allow_pickle`` raises :class:`DatasetFormatError` under any
    ``on_error`` policy: unpickling executes code stored in the file, so it is opt-in.
    """
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" not in str(exc):
            raise BadSampleError(source, row, None, f"{path.name} is not a readable .npy file: {exc}") from exc
        if not allow_pickle:
            raise DatasetFormatError(
                f"{path}: holds pickled Python objects (a dict of arrays, as OpenShape/Uni3D save them). Loading it "
                "unpickles, which runs code stored in the file, so it is refused by default. If you trust where the "
                "file came from, pass allow_pickle=True (or convert it once to plain arrays)."
            ) from None
    except OSError as exc:
        raise BadSampleError(source, row, None, f"cannot read {path.name}: {exc}") from exc
    try:
        value = np.load(path, allow_pickle=True)
    except Exception as exc:  # an unpickling error can be anything
        raise BadSampleError(source, row, None, f"cannot unpickle {path.name}: {type(exc).__name__}: {exc}") from exc
    if isinstance(value, np.ndarray) and value.dtype == object and value.size == 1:
        return value.reshape(()).item()
    return value


class H5Files:
    """Open h5py files, reopened in each process (h5py handles do not survive ``fork``);
    pickles as empty, so a reader holding one can go to DataLoader workers."""

    def __init__(self) -> None:
        self._files: dict[Path, Any] = {}
        self._pid = os.getpid()

    def get(self, path: Path) -> Any:
        import h5py

        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        if path not in self._files:
            try:
                self._files[path] = h5py.File(path, "r")
            except OSError as exc:
                raise DatasetFormatError(f"{path}: not a readable HDF5 file: {exc}") from exc
        return self._files[path]

    def dataset(self, path: Path, key: str) -> Any:
        """``file[key]``; a missing key raises :class:`DatasetFormatError` naming file and key."""
        f = self.get(path)
        if key not in f:
            raise DatasetFormatError(f"{path}: no dataset {key!r} in the HDF5 file; it has {sorted(f.keys())}")
        return f[key]

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__()


def h5_labels(files: H5Files, path: Path, n: int) -> np.ndarray:
    """The ``label`` dataset of an h5 file as int64 ``(n,)``: accepts ``(N,)`` and ``(N, 1)``."""
    raw = np.asarray(files.dataset(path, "label")[()])
    if raw.ndim == 2 and raw.shape[1] == 1:
        raw = raw[:, 0]
    if raw.ndim != 1 or len(raw) != n or not np.issubdtype(raw.dtype, np.integer):
        raise DatasetFormatError(
            f"{path}: dataset 'label' must be integers of shape ({n},) or ({n}, 1) to match 'data', "
            f"got {raw.dtype} {raw.shape}"
        )
    return raw.astype(np.int64)


# -- the base reader --------------------------------------------------------------------------
class PointDataset(ReaderBase):
    """What every point-cloud reader shares beyond the core's :class:`ReaderBase` (the
    ``on_error`` policy, ``problems``, indexing): the gravity axis of its files, label checks.

    Subclasses fill ``self.items`` (one record per sample, in a deterministic order), set
    ``classnames`` and implement :meth:`_load` ``(index) -> sample dict``.
    """

    up_axis: str = "y"

    def __init__(self, path: str | Path, *, split: str | None, on_error: str, up_axis: str) -> None:
        super().__init__(path, split=split, on_error=on_error)
        self.up_axis = check_up_axis(up_axis)

    def check_label(self, label: int, source: str, row: int | str | None) -> int:
        if not 0 <= int(label) < len(self.classnames):
            raise BadSampleError(source, row, "label", f"label {label} is not in [0, {len(self.classnames)})")
        return int(label)


_LAZY = {
    "read_off": "off",
    "parse_off": "off",
    "load_mesh": "meshes",
    "sample_mesh": "meshes",
    "MeshFolder": "meshes",
    "ModelNet40Off": "modelnet",
    "ModelNet40Resampled": "modelnet",
    "ModelNet40H5": "modelnet",
    "MODELNET40_CLASSES": "modelnet",
    "ShapeNet55": "shapenet",
    "ScanObjectNN": "scanobjectnn",
    "SCANOBJECTNN_CLASSES": "scanobjectnn",
    "ObjaverseLVIS": "objaverse",
}


__getattr__ = lazy_attributes(__name__, _LAZY)


__all__ = [
    "READERS",
    "UP_AXES",
    "H5Files",
    "PointDataset",
    "as_points",
    "as_rgb",
    "check_up_axis",
    "read_npy",
    "resolve_under",
    "sample_seed",
    *_LAZY,
]
