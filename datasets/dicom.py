"""Import a CT DICOM series into the HDF5 CT volume layout of :mod:`fedrecon.datasets.ct`.

Needs ``pydicom`` (imported when called). Every file of the folder (hidden files and
``DICOMDIR`` aside) must be a single-frame CT image of one series. Stored values become HU
through ``RescaleSlope`` / ``RescaleIntercept`` (defaults 1 and 0). Slices are sorted by
``ImagePositionPatient`` projected on the slice normal ``row x column`` of
``ImageOrientationPatient``; when any slice lacks position or orientation, by
``InstanceNumber``. Compressed pixel data needs pydicom's decoders (e.g. pylibjpeg).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np

from .ct import write_ct_volume

__all__ = ["import_dicom_series"]


def _pydicom() -> Any:
    try:
        import pydicom
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("import_dicom_series needs pydicom: pip install pydicom") from err
    return pydicom


def _read(pydicom: Any, path: Path) -> Any:
    try:
        return pydicom.dcmread(path)
    except Exception as err:  # InvalidDicomError, truncated files, ...
        raise ValueError(f"import_dicom_series: '{path}' is not a readable DICOM file ({err}); "
                         f"expected only CT slices of one series in the folder") from err


def _slice_position(ds: Any) -> float | None:
    ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if ipp is None or iop is None or len(ipp) != 3 or len(iop) != 6:
        return None
    iop = np.asarray(iop, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    return float(np.dot(normal, np.asarray(ipp, dtype=np.float64)))


def import_dicom_series(series_dir: str | Path, out_path: str | Path, *,
                        overwrite: bool = False) -> Path:
    """Convert the CT series in ``series_dir`` to one HDF5 volume (units HU) at ``out_path``.

    Raises ``ValueError`` naming the offending file for non-DICOM or non-CT files, a second
    series, multi-frame images, duplicate slice positions, and slices whose
    ``Rows``/``Columns``/``PixelSpacing`` differ from the first file's.
    """
    pydicom = _pydicom()
    series_dir, out_path = Path(series_dir), Path(out_path)
    if not series_dir.is_dir():
        raise FileNotFoundError(f"import_dicom_series: '{series_dir}' is not a folder")
    files = sorted(p for p in series_dir.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR")
    if not files:
        raise FileNotFoundError(f"import_dicom_series: folder '{series_dir}' has no DICOM files")
    if out_path.exists() and not overwrite:
        raise FileExistsError(f"import_dicom_series: '{out_path}' exists; pass overwrite=True "
                              f"to replace it")

    slices: list[tuple[Path, Any]] = []
    ref: dict[str, Any] = {}
    for path in files:
        ds = _read(pydicom, path)
        modality = ds.get("Modality")
        if modality is not None and modality != "CT":
            raise ValueError(f"import_dicom_series: '{path}' has Modality {modality!r}; "
                             f"expected 'CT'")
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise ValueError(f"import_dicom_series: '{path}' is a multi-frame image; expected "
                             f"single-frame CT slices")
        for key in ("Rows", "Columns", "PixelSpacing", "PixelData"):
            if key not in ds:
                raise ValueError(f"import_dicom_series: '{path}' lacks {key}; expected a CT image")
        found = {
            "SeriesInstanceUID": ds.get("SeriesInstanceUID"),
            "size": (int(ds.Rows), int(ds.Columns)),
            "PixelSpacing": tuple(round(float(v), 6) for v in ds.PixelSpacing),
        }
        if not ref:
            ref = dict(found, file=path)
        for key, value in found.items():
            if value != ref[key]:
                what = "(Rows, Columns)" if key == "size" else key
                raise ValueError(f"import_dicom_series: '{path}' has {what} {value}; expected "
                                 f"{ref[key]} as in '{ref['file']}' (one series, one slice size)")
        slices.append((path, ds))

    positions = [_slice_position(ds) for _, ds in slices]
    if all(p is not None for p in positions):
        keys: list[float] = positions  # type: ignore[assignment]
        by = "ImagePositionPatient"
    else:
        missing = [p for (p, ds) in slices if ds.get("InstanceNumber") is None]
        if missing:
            raise ValueError(f"import_dicom_series: '{missing[0]}' has neither "
                             f"ImagePositionPatient/ImageOrientationPatient nor InstanceNumber; "
                             f"cannot order the slices")
        keys = [float(ds.InstanceNumber) for _, ds in slices]
        by = "InstanceNumber"
    order = np.argsort(np.asarray(keys), kind="stable")
    for a, b in itertools.pairwise(order):
        if abs(keys[a] - keys[b]) < 1e-4:
            raise ValueError(f"import_dicom_series: '{slices[b][0]}' and '{slices[a][0]}' share "
                             f"{by} {keys[a]:g}; expected one slice per position")

    volume = np.empty((len(slices), *ref["size"]), dtype=np.float32)
    for k, i in enumerate(order):
        path, ds = slices[i]
        try:
            stored = ds.pixel_array
        except Exception as err:
            raise ValueError(f"import_dicom_series: cannot decode the pixel data of '{path}' "
                             f"({err})") from err
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        volume[k] = stored.astype(np.float64) * slope + intercept

    first = slices[0][1]
    patient_id = str(first.get("PatientID", "") or series_dir.name)
    return write_ct_volume(
        out_path, volume, units="HU", pixel_spacing=ref["PixelSpacing"],
        slice_positions=[keys[i] for i in order] if by == "ImagePositionPatient" else None,
        patient_id=patient_id, overwrite=overwrite,
    )
