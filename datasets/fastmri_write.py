"""Write volumes in the official fastMRI HDF5 layout (read back by fastMRI's ``SliceDataset``).

Layout of one file (one volume)::

    kspace               complex64  (S, C, H, W) multicoil | (S, H, W) singlecoil
    reconstruction_rss   float32    (S, h, w)   train/val (multicoil target)
    reconstruction_esc   float32    (S, h, w)   train/val (singlecoil target)
    mask                 float32/bool (W,)      test/challenge files only
    ismrmrd_header       bytes, ISMRMRD XML (namespace http://www.ismrm.org/ISMRMRD)
    attrs: max, norm, acquisition, patient_id (and any extra ``attrs``)

``H`` is the readout (ISMRMRD ``x``), ``W`` the phase-encode direction (``y``), ``(h, w)`` the
recon size. fastMRI derives the acquired columns of a zero-padded ``W`` from the header:
``padding_left = W // 2 - center`` and ``padding_right = padding_left + maximum + 1`` with
``center``/``maximum`` from ``encodingLimits/kspace_encoding_step_1``.

Files are written to a temporary file in the target folder, flushed to disk, then moved into
place, so a crash never leaves a half-written volume under the final name.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import h5py
import numpy as np

__all__ = [
    "ISMRMRD_NAMESPACE",
    "atomic_h5_file",
    "ismrmrd_header_xml",
    "temp_file_beside",
    "write_fastmri_volume",
]

ISMRMRD_NAMESPACE = "http://www.ismrm.org/ISMRMRD"
_GAMMA_HZ_PER_T = 42.577478e6
_RESERVED_ATTRS = ("max", "norm", "acquisition", "patient_id")


def temp_file_beside(path: Path) -> Path:
    """Create an empty hidden temporary file in ``path``'s folder and return its path.

    Unlike ``tempfile.mkstemp`` (always mode 0600) the file is created with mode 0666 less
    the umask, like any ``open(..., "w")``: a dataset written by one user stays readable by
    the colleagues and services that share its folder once it is moved into place.
    """
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"cannot create a temporary file next to {path}")


@contextlib.contextmanager
def atomic_h5_file(path: str | os.PathLike, overwrite: bool = False) -> Iterator[h5py.File]:
    """Open a temporary HDF5 file next to ``path``; move it to ``path`` only on success.

    The temporary file is fsync'ed before the move; on any exception it is removed and
    ``path`` is left untouched. Without ``overwrite`` an existing ``path`` is an error (checked
    first, and again when the file is moved into place: a hard link never clobbers).
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file_beside(path)
    try:
        with h5py.File(tmp, "w") as hf:
            yield hf
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _move_into_place(tmp, path, overwrite)
    finally:
        tmp.unlink(missing_ok=True)


def _move_into_place(tmp: Path, path: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic and never replaces an existing file
    except FileExistsError:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it") from None
    except OSError:  # file system without hard links
        if path.exists():
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it") from None
        os.replace(tmp, path)


def ismrmrd_header_xml(encoding_size: Sequence[int], recon_size: Sequence[int],
                       acquired_columns: tuple[int, int], n_slices: int,
                       acquisition: str = "CORPD_FBK",
                       voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
                       field_strength_t: float = 3.0) -> str:
    """A minimal, schema-ordered ISMRMRD header with the fields fastMRI reads.

    Parameters
    ----------
    encoding_size : (x, y, z)
        Encoded matrix: ``x = H`` (readout), ``y = W`` (phase encode), ``z = 1`` for 2D.
    recon_size : (x, y) or (x, y, z)
        Recon matrix ``(h, w[, 1])``.
    acquired_columns : (start, stop)
        Half-open range of phase-encode columns that were acquired (the rest of ``W`` is
        zero padding); written as ``kspace_encoding_step_1`` limits so that fastMRI's
        ``padding_left``/``padding_right`` equal ``start``/``stop``.
    n_slices : int
        Number of slices (``encodingLimits/slice``).
    acquisition : str
        Protocol name (e.g. ``CORPD_FBK``, ``AXT2``).
    voxel_size_mm : (dx, dy, dz)
        Voxel size used for both fields of view (the encoded and the recon voxel agree in
        the fastMRI files).
    field_strength_t : float
        B0 in tesla, written as the proton resonance frequency.
    """
    enc = [int(v) for v in encoding_size]
    rec = [int(v) for v in recon_size] + [1] * (3 - len(recon_size))
    start, stop = (int(v) for v in acquired_columns)
    width = enc[1]
    if not 0 <= start < stop <= width:
        raise ValueError(f"argument 'acquired_columns' must satisfy 0 <= start < stop <= "
                         f"{width} (the encoded width); got {(start, stop)}")
    center, maximum = width // 2 - start, stop - start - 1
    vox = [float(v) for v in voxel_size_mm]

    def triple(tag: str, values: Sequence[float]) -> str:
        return (f"<{tag}><x>{values[0]:g}</x><y>{values[1]:g}</y><z>{values[2]:g}</z></{tag}>")

    def limits(tag: str, lo: int, hi: int, mid: int) -> str:
        return (f"<{tag}><minimum>{lo}</minimum><maximum>{hi}</maximum>"
                f"<center>{mid}</center></{tag}>")

    enc_fov = [enc[i] * vox[i] for i in range(3)]
    rec_fov = [rec[i] * vox[i] for i in range(3)]
    return (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        f'<ismrmrdHeader xmlns="{ISMRMRD_NAMESPACE}" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
        f'xsi:schemaLocation="{ISMRMRD_NAMESPACE} ismrmrd.xsd">'
        f"<measurementInformation><protocolName>{escape(acquisition)}</protocolName>"
        "</measurementInformation>"
        "<experimentalConditions><H1resonanceFrequency_Hz>"
        f"{round(field_strength_t * _GAMMA_HZ_PER_T)}</H1resonanceFrequency_Hz>"
        "</experimentalConditions>"
        "<encoding>"
        f"<encodedSpace>{triple('matrixSize', enc)}{triple('fieldOfView_mm', enc_fov)}"
        "</encodedSpace>"
        f"<reconSpace>{triple('matrixSize', rec)}{triple('fieldOfView_mm', rec_fov)}"
        "</reconSpace>"
        "<encodingLimits>"
        f"{limits('kspace_encoding_step_0', 0, enc[0] - 1, enc[0] // 2)}"
        f"{limits('kspace_encoding_step_1', 0, maximum, center)}"
        f"{limits('kspace_encoding_step_2', 0, 0, 0)}"
        f"{limits('slice', 0, max(n_slices - 1, 0), max(n_slices - 1, 0) // 2)}"
        "</encodingLimits>"
        "<trajectory>cartesian</trajectory>"
        "</encoding>"
        "</ismrmrdHeader>"
    )


def _check_target(name: str, value: Any, n_slices: int,
                  recon_size: tuple[int, int]) -> np.ndarray | None:
    if value is None:
        return None
    arr = np.asarray(value)
    want = (n_slices, *recon_size)
    if np.iscomplexobj(arr) or not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"argument '{name}' must be a real float array {want}; got {arr.dtype}")
    if arr.shape != want:
        raise ValueError(f"argument '{name}' must have shape (S, h, w) = {want} (S from "
                         f"'kspace', (h, w) = 'recon_size'); got {arr.shape}")
    return arr.astype(np.float32, copy=False)


def _acquired_columns(kspace: np.ndarray) -> tuple[int, int]:
    """First and one-past-last column with any nonzero sample (the zero padding's edges)."""
    nonzero = np.flatnonzero(np.any(kspace != 0, axis=tuple(range(kspace.ndim - 1))))
    if nonzero.size == 0:
        return 0, kspace.shape[-1]
    return int(nonzero[0]), int(nonzero[-1]) + 1


def write_fastmri_volume(
    path: str | os.PathLike,
    kspace: np.ndarray,
    *,
    reconstruction_rss: np.ndarray | None = None,
    reconstruction_esc: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    acquisition: str = "CORPD_FBK",
    recon_size: tuple[int, int] = (320, 320),
    encoding_size: tuple[int, int, int] | None = None,
    max_value: float | None = None,
    patient_id: str | None = None,
    overwrite: bool = False,
    attrs: Mapping[str, Any] | None = None,
    acquired_columns: tuple[int, int] | None = None,
    voxel_size_mm: Sequence[float] = (1.0, 1.0, 1.0),
) -> Path:
    """Write one volume as an official fastMRI HDF5 file, atomically.

    Parameters
    ----------
    path : path
        Destination ``.h5`` file; its folder is created.
    kspace : ndarray
        Complex ``(S, C, H, W)`` (multicoil) or ``(S, H, W)`` (singlecoil), centred
        (``fft2c`` convention); stored as complex64. For test/challenge files (``mask`` given)
        pass the already undersampled k-space: it is stored as given.
    reconstruction_rss, reconstruction_esc : ndarray, optional
        Real ``(S, h, w)`` targets with ``(h, w) = recon_size``; stored as float32.
    mask : ndarray, optional
        ``(W,)`` float or bool sampling mask of a test/challenge file.
    acquisition : str
        Protocol (``CORPD_FBK``, ``CORPDFS_FBK``, ``AXT2``, ...): attribute and header.
    recon_size : (h, w)
        ``reconSpace/matrixSize``; the default crop of the loaders.
    encoding_size : (x, y, z), optional
        ``encodedSpace/matrixSize``; default ``(H, W, 1)``. ``y`` must equal ``W``.
    max_value : float, optional
        ``attrs['max']``; default: the maximum of the target (``reconstruction_esc`` for
        singlecoil k-space when given, else ``reconstruction_rss``). Without a target and
        without ``max_value`` no ``max``/``norm`` attribute is written (as in test files).
    patient_id : str, optional
        ``attrs['patient_id']`` (written only when given).
    overwrite : bool
        Replace an existing file; otherwise an existing ``path`` raises ``FileExistsError``.
    attrs : mapping, optional
        Extra file attributes (e.g. ``acceleration``, ``num_low_frequency`` of test files);
        they must not repeat the attributes set by the other arguments.
    acquired_columns : (start, stop), optional
        Acquired phase-encode columns; sets the header's encoding limits. Default for fully
        sampled k-space: the range of columns with nonzero k-space (so zero padding on both
        sides is detected). Default with ``mask`` (undersampled k-space, where an unsampled
        column cannot be told from padding): the whole width ``(0, W)``; pass the true
        range for zero-padded test volumes.
    voxel_size_mm : (dx, dy, dz)
        Voxel size for the header's fields of view.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    ksp = np.asarray(kspace)
    if ksp.ndim not in (3, 4):
        raise ValueError("argument 'kspace' must have shape (S, C, H, W) (multicoil) or "
                         f"(S, H, W) (singlecoil); got {ksp.shape}")
    if not np.iscomplexobj(ksp):
        raise TypeError(f"argument 'kspace' must be complex (complex64); got {ksp.dtype}")
    if min(ksp.shape) < 1:
        raise ValueError(f"argument 'kspace' must not be empty; got shape {ksp.shape}")
    ksp = ksp.astype(np.complex64, copy=False)
    n_slices, height, width = ksp.shape[0], ksp.shape[-2], ksp.shape[-1]
    recon = tuple(int(v) for v in recon_size)
    if len(recon) != 2 or min(recon) < 1:
        raise ValueError(f"argument 'recon_size' must be (h, w) > 0; got {recon_size}")
    enc = (height, width, 1) if encoding_size is None else tuple(int(v) for v in encoding_size)
    if len(enc) != 3 or enc[1] != width:
        raise ValueError(f"argument 'encoding_size' must be (x, y, z) with y = W = {width} "
                         f"(the k-space width); got {encoding_size}")
    rss_t = _check_target("reconstruction_rss", reconstruction_rss, n_slices, recon)
    esc_t = _check_target("reconstruction_esc", reconstruction_esc, n_slices, recon)
    mask_arr = None
    if mask is not None:
        mask_arr = np.asarray(mask)
        if mask_arr.shape != (width,):
            raise ValueError(f"argument 'mask' must have shape (W,) = ({width},); "
                             f"got {mask_arr.shape}")
        if mask_arr.dtype != np.bool_:
            if np.iscomplexobj(mask_arr) or not np.issubdtype(mask_arr.dtype, np.number):
                raise TypeError(f"argument 'mask' must be float or bool; got {mask_arr.dtype}")
            mask_arr = mask_arr.astype(np.float32)
    if acquired_columns is not None:
        cols = acquired_columns
    elif mask_arr is not None:  # the first/last sampled line is not where acquisition began
        cols = (0, width)
    else:
        cols = _acquired_columns(ksp)

    file_attrs: dict[str, Any] = {"acquisition": str(acquisition)}
    target = esc_t if (ksp.ndim == 3 and esc_t is not None) or rss_t is None else rss_t
    if max_value is not None:
        file_attrs["max"] = float(max_value)
    elif target is not None:
        file_attrs["max"] = float(target.max())
    if target is not None:
        file_attrs["norm"] = float(np.linalg.norm(target))
    if patient_id is not None:
        file_attrs["patient_id"] = str(patient_id)
    for key, value in (attrs or {}).items():
        if key in _RESERVED_ATTRS:
            raise ValueError(f"argument 'attrs' must not set {key!r}: it is set by the "
                             f"arguments of write_fastmri_volume")
        file_attrs[str(key)] = value

    header = ismrmrd_header_xml(enc, recon, cols, n_slices, acquisition, voxel_size_mm)
    with atomic_h5_file(path, overwrite=overwrite) as hf:
        hf.create_dataset("kspace", data=ksp)
        if rss_t is not None:
            hf.create_dataset("reconstruction_rss", data=rss_t)
        if esc_t is not None:
            hf.create_dataset("reconstruction_esc", data=esc_t)
        if mask_arr is not None:
            hf.create_dataset("mask", data=mask_arr)
        hf.create_dataset("ismrmrd_header", data=np.bytes_(header.encode("utf-8")))
        for key, value in file_attrs.items():
            hf.attrs[key] = value
    return path
