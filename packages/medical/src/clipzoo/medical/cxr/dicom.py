"""Chest X-ray DICOM files -> a float32 grey image in [0, 1], through pydicom.

The grayscale pipeline of DICOM PS3.4 §N.2 ("Grayscale Transformations") is applied in its
order: stored values -> Modality LUT (``RescaleSlope`` / ``RescaleIntercept``) -> VOI LUT
(optional: a ``VOILUTSequence`` or ``WindowCenter`` / ``WindowWidth``, through
:func:`pydicom.pixels.apply_modality_lut` and :func:`pydicom.pixels.apply_voi_lut`) ->
presentation (``MONOCHROME1`` means "minimum value displayed white", so it is inverted, as
torchxrayvision's ``utils.read_xray_dcm`` does).

The output is scaled by the range the values can take, never by the image's own min/max (so
intensities mean the same across files): ``[0, 2**BitsStored - 1]`` for unsigned stored values
(``[-2**(BitsStored-1), 2**(BitsStored-1) - 1]`` for signed), mapped through the rescale when
there is one; after a window, the output range pydicom's ``apply_windowing`` maps to (the same
range); after a VOI LUT sequence, ``[0, 2**n - 1]`` with ``n`` the LUT's bits per entry
(third value of its ``LUTDescriptor``). Without ``voi_lut`` and without a rescale this is
``stored / (2**BitsStored - 1)``, torchxrayvision's scaling (its ``normalize(img, maxval)``
then maps [0, 1] to [-1024, 1024]).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clipzoo.core.data.schema import BadSampleError


def read_xray_dicom(path: str | Path, voi_lut: bool = False) -> np.ndarray:
    """One single-frame grey DICOM image as float32 ``(H, W)`` in [0, 1], 1 = bright (MONOCHROME2
    sense). See the module docstring for the steps.

    Raises :class:`BadSampleError` naming the file (and the field) for an unreadable file, no
    pixel data, a multi-frame or colour image, or stored values beyond ``BitsStored``. pydicom
    masks the bits above ``BitsStored`` when it decodes, so for uncompressed data the check reads
    the raw words: a value there beyond ``2**BitsStored - 1`` means a wrong header (or the retired
    practice of overlays in the unused high bits), and masking would silently wrap intensities.
    """
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    path = Path(path)
    source = str(path)

    def bad(field: str | None, reason: str) -> BadSampleError:
        return BadSampleError(source, None, field, reason)

    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:  # pydicom raises many types on a damaged file; all mean "unreadable"
        raise bad(None, f"not a readable DICOM file: {type(exc).__name__}: {exc}") from exc
    if "PixelData" not in ds:
        raise bad("PixelData", "no pixel data (not an image, or not a DICOM file)")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise bad(
            "PhotometricInterpretation", f"expected a grey image (MONOCHROME1 or MONOCHROME2), got {photometric!r}"
        )
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise bad("SamplesPerPixel", f"expected 1 sample per pixel, got {ds.SamplesPerPixel}")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise bad("NumberOfFrames", f"expected a single-frame radiograph, got {frames} frames")
    bits = ds.get("BitsStored")
    if bits is None or not 1 <= int(bits) <= 32:
        raise bad("BitsStored", f"missing or invalid BitsStored: {bits!r}")
    bits = int(bits)
    try:
        stored = ds.pixel_array
    except Exception as exc:  # a missing decoder plugin, truncated pixel data, ...
        raise bad("PixelData", f"cannot decode the pixel data: {type(exc).__name__}: {exc}") from exc
    if stored.ndim != 2:
        raise bad("PixelData", f"expected a 2-D grey image, got an array of shape {stored.shape}")
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    raw = _native_values(ds)  # pydicom masks bits above BitsStored; a wrong header shows in the raw words
    check = raw if raw is not None else stored
    if check.size and (int(check.min()) < lo or int(check.max()) > hi):
        stored = check
        raise bad(
            "BitsStored",
            f"stored values span [{int(stored.min())}, {int(stored.max())}], beyond the [{lo}, {hi}] "
            f"that BitsStored={bits} allows",
        )

    rescaled = "ModalityLUTSequence" in ds or (
        ds.get("RescaleSlope") is not None and ds.get("RescaleIntercept") is not None
    )
    if rescaled:
        if "ModalityLUTSequence" in ds:
            lut_bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
            lo, hi = 0, 2**lut_bits - 1
        else:
            slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
            if slope == 0:
                raise bad("RescaleSlope", "RescaleSlope is 0")
            lo, hi = sorted((lo * slope + intercept, hi * slope + intercept))
        values = apply_modality_lut(stored, ds)
    else:
        values = stored

    has_voi = bool(ds.get("VOILUTSequence")) or (
        ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    )
    if voi_lut and has_voi:
        if ds.get("VOILUTSequence"):
            # a LUT is indexed by integer modality values
            values = np.rint(values).astype(np.int64) if values.dtype.kind == "f" else values
            lo, hi = 0, 2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1
        try:
            values = apply_voi_lut(values, ds, index=0)
        except (ValueError, NotImplementedError, AttributeError) as exc:
            raise bad("VOILUTSequence", f"cannot apply the VOI LUT: {exc}") from exc

    image = (np.asarray(values, dtype=np.float64) - lo) / (hi - lo)
    image = np.clip(image, 0.0, 1.0)
    if photometric == "MONOCHROME1":
        image = 1.0 - image
    return image.astype(np.float32)


def _native_values(ds) -> np.ndarray | None:
    """The stored words of uncompressed unsigned pixel data as read from the file (before pydicom
    masks the bits above ``BitsStored``), or ``None`` where that does not apply."""
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    allocated = int(ds.get("BitsAllocated", 0) or 0)
    if syntax is None or syntax.is_compressed or allocated not in (8, 16, 32) or ds.get("PixelRepresentation", 0):
        return None
    dtype = np.dtype(f"u{allocated // 8}").newbyteorder("<" if syntax.is_little_endian else ">")
    data = ds.PixelData
    n = len(data) // dtype.itemsize
    return np.frombuffer(data, dtype=dtype, count=n)


__all__ = ["read_xray_dicom"]
