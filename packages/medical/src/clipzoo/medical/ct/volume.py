"""The CT volume a reader hands to a volume tower: Hounsfield units, an affine, a source.

Convention (NIfTI / nibabel): ``hu`` is a float32 array indexed ``[i, j, k]`` in the order the
file stores voxels, and ``affine`` (4x4) maps voxel indices ``(i, j, k, 1)`` to world
coordinates in millimetres in **RAS+**: +x towards the patient's right, +y anterior, +z
superior (head), as NIfTI and nibabel define it. DICOM patient coordinates are LPS+ (+x
left, +y posterior, +z superior), so a DICOM affine becomes RAS+ by negating its first two
rows (:func:`lps_to_ras`). The tower's preprocessing (MONAI ``Orientation``) reorients the
voxels to the axis codes stored in its ``preprocess`` block, so a volume may come in any voxel
order as long as its affine says which.

A volume knows where it came from (``source``) and a content identity (``identity``: path,
size and modification time of the file(s), or a generator seed) so that the preprocessing
cache (:mod:`clipzoo.medical.ct.transforms`) can key resampled copies on it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clipzoo.core.data.schema import BadSampleError


@dataclass
class CTVolume:
    """A CT volume in Hounsfield units with its voxel-to-RAS affine.

    ``hu``: float32 ``(I, J, K)``; ``affine``: float64 ``(4, 4)``, voxel index -> RAS+ mm;
    ``source``: the file or folder it was read from (named in errors); ``identity``: a string
    that changes when the content changes (see :func:`file_identity`); ``cache_dir``: where the
    tower's transform may cache preprocessed copies (``None``: no cache unless the
    ``CLIPZOO_CT_CACHE`` environment variable names one).
    """

    hu: np.ndarray
    affine: np.ndarray
    source: str
    identity: str
    cache_dir: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along the array's three axes (the affine's column norms)."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.hu.shape)

    def __repr__(self) -> str:
        sp = ", ".join(f"{s:.3g}" for s in self.spacing)
        return f"CTVolume({self.source!r}, shape={self.shape}, spacing=({sp}) mm)"


def file_identity(*paths: Path) -> str:
    """``path:size:mtime_ns`` of each file, joined: changes when a file is rewritten."""
    parts = []
    for path in paths:
        st = os.stat(path)
        parts.append(f"{Path(path).resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def check_hu(array: Any, source: str, row: int | str | None = None, field: str = "volume") -> np.ndarray:
    """``array`` as float32 ``(I, J, K)`` Hounsfield units; a non-3D or non-numeric array, or any
    NaN/inf voxel, raises :class:`BadSampleError` naming ``source``."""
    arr = np.asarray(array)
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.number):
        raise BadSampleError(source, row, field, f"expected a numeric voxel array, got dtype {arr.dtype}")
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3 or min(arr.shape) < 1:
        raise BadSampleError(source, row, field, f"expected a 3-D volume, got shape {arr.shape}")
    arr = arr.astype(np.float32, copy=False)
    bad = ~np.isfinite(arr)
    if bad.any():
        first = tuple(int(v) for v in np.argwhere(bad)[0])
        raise BadSampleError(source, row, field, f"{int(bad.sum())} voxel(s) are NaN or infinite (first at index {first})")
    return arr


def lps_to_ras(affine: np.ndarray) -> np.ndarray:
    """A DICOM (LPS+) voxel-to-world affine as RAS+ (first two world rows negated)."""
    out = np.array(affine, dtype=np.float64, copy=True)
    out[:2, :] *= -1.0
    return out


def with_spacing(affine: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """``affine`` with its voxel axes rescaled to ``spacing`` mm (directions and origin kept)."""
    out = np.array(affine, dtype=np.float64, copy=True)
    norms = np.linalg.norm(out[:3, :3], axis=0)
    norms[norms == 0] = 1.0
    out[:3, :3] = out[:3, :3] / norms * np.asarray(spacing, dtype=np.float64)
    return out


def read_nifti(path: Path, source: str, row: int | str | None = None, scaled: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(voxels, affine)`` of a ``.nii`` / ``.nii.gz`` file (nibabel). ``scaled``: apply the
    header's ``scl_slope`` / ``scl_inter`` (nibabel's default); ``False`` gives the stored
    values, for callers that apply a slope and intercept from elsewhere (CT-RATE's metadata)."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj) if scaled else img.dataobj.get_unscaled()
        affine = np.asarray(img.affine, dtype=np.float64)
    except FileNotFoundError as exc:
        raise BadSampleError(source, row, "volume", f"no such file {path}") from exc
    except Exception as exc:  # nibabel raises many types for a corrupt or truncated file
        raise BadSampleError(source, row, "volume", f"cannot read {path.name} as NIfTI: {type(exc).__name__}: {exc}") from exc
    return np.asarray(data), affine
