"""On-disk cache of sparse system matrices (CSR pairs), keyed by everything that defines them.

A file holds one matrix and its transpose as CSR arrays plus a header. The file name is a
hash of the key text: a format version, the matrix kind (``joseph``, ``fbp``), a fingerprint
of the source code of the function that builds the rows (so changing the builder
invalidates old files), ``repr`` of the geometry (every parameter, floats exact), the dtype
and the shape. On load the header's key text must equal the requested one and every array's
CRC-32 must match; anything else (truncated, corrupted, foreign or stale file) is reported
with a warning and the matrix is rebuilt, never used. Writes go to a temporary file in the
same folder, are fsynced and renamed into place, so a reader never sees a partial file.

Folder: ``$FEDRECON_CACHE_DIR/projectors``, default ``$XDG_CACHE_HOME/fedrecon/projectors``
or ``~/.cache/fedrecon/projectors``; ``FEDRECON_CACHE_DIR=off`` disables the disk cache.
Matrices whose dense size is below ``DISK_MIN_DENSE`` entries are not written: they build
in milliseconds.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import tempfile
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["CACHE_ENV_VAR", "cache_dir", "cache_path", "load_pair", "save_pair"]

FORMAT_VERSION = 1
CACHE_ENV_VAR = "FEDRECON_CACHE_DIR"
DISK_MIN_DENSE = 2**27  # rows * cols below this: not worth a file
_OFF = {"off", "none", "0", "false", "no"}
_ARRAYS = ("crow", "col", "val", "crow_t", "col_t", "val_t")


def cache_dir() -> Path | None:
    """The projector cache folder, or None when the disk cache is off."""
    raw = os.environ.get(CACHE_ENV_VAR, "").strip()
    if raw.lower() in _OFF:
        return None
    if raw:
        base = Path(raw).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "fedrecon"
    return base / "projectors"


def _fingerprint(*objs: object) -> str:
    """A hash of the source of the modules defining ``objs`` (empty where unavailable).

    Whole modules, not single functions, so that an edit to a helper the builder calls
    (ray geometry, interpolation) also invalidates the files: conservative, never stale.
    """
    h = hashlib.sha256()
    for obj in objs:
        try:
            h.update(inspect.getsource(inspect.getmodule(obj)).encode())
        except (OSError, TypeError):
            return ""
    return h.hexdigest()[:16]


def key_text(kind: str, geom: object, builder: Callable, shape: tuple[int, int],
             dtype: torch.dtype) -> str:
    return (f"fedrecon-sparse-pair v{FORMAT_VERSION}|{kind}|{builder.__module__}."
            f"{builder.__qualname__}@{_fingerprint(builder, type(geom))}|{geom!r}|{dtype}|{tuple(shape)}")


def cache_path(kind: str, geom: object, builder: Callable, shape: tuple[int, int],
               dtype: torch.dtype) -> Path | None:
    """The file for this key (None when the disk cache is off or the matrix is small)."""
    folder = cache_dir()
    if folder is None or shape[0] * shape[1] < DISK_MIN_DENSE:
        return None
    digest = hashlib.sha256(key_text(kind, geom, builder, shape, dtype).encode()).hexdigest()
    return folder / f"{kind}-{getattr(geom, 'kind', 'geom')}-{digest[:32]}.pt"


def _crc(t: Tensor) -> int:
    return zlib.crc32(memoryview(t.contiguous().numpy()).cast("B"))


def _parts(mat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return mat.crow_indices().cpu(), mat.col_indices().cpu(), mat.values().cpu()


def save_pair(path: Path, key: str, mat: Tensor, mat_t: Tensor) -> None:
    """Write ``mat`` and ``mat_t`` (sparse CSR) atomically; failures only warn."""
    arrays = dict(zip(_ARRAYS, (*_parts(mat), *_parts(mat_t))))
    payload = {
        "key": key,
        "shape": tuple(mat.shape),
        "arrays": arrays,
        "crc": {name: _crc(t) for name, t in arrays.items()},
    }
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        warnings.warn(f"could not write the projector cache file {path}: {err}", stacklevel=3)
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def _check(payload: object, key: str, shape: tuple[int, int], dtype: torch.dtype) -> str | None:
    """Why ``payload`` may not be used, or None when it is sound."""
    if not isinstance(payload, dict) or not {"key", "shape", "arrays", "crc"} <= payload.keys():
        return "not a fedrecon projector cache file"
    if payload["key"] != key:
        return "its key does not match (other geometry, dtype, builder or format version)"
    if tuple(payload["shape"]) != tuple(shape):
        return f"shape {tuple(payload['shape'])}, expected {tuple(shape)}"
    arrays = payload["arrays"]
    if not isinstance(arrays, dict) or set(arrays) != set(_ARRAYS):
        return "arrays missing"
    for name in _ARRAYS:
        t = arrays[name]
        if not isinstance(t, Tensor) or t.ndim != 1:
            return f"array '{name}' is not a 1D tensor"
        if _crc(t) != payload["crc"].get(name):
            return f"array '{name}' fails its CRC-32 check"
    for suffix, (n_rows, n_cols) in (("", shape), ("_t", shape[::-1])):
        crow, col, val = (arrays[n + suffix] for n in ("crow", "col", "val"))
        if val.dtype != dtype:
            return f"values are {val.dtype}, expected {dtype}"
        nnz = val.numel()
        if crow.numel() != n_rows + 1 or col.numel() != nnz or int(crow[-1]) != nnz:
            return "CSR arrays have inconsistent sizes"
    return None


def load_pair(path: Path, key: str, shape: tuple[int, int],
              dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
    """The cached CSR pair from ``path``, or None (missing, or unusable: warned and removed)."""
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        reason = _check(payload, key, shape, dtype)
    except Exception as err:  # noqa: BLE001 - any unreadable file is rebuilt
        reason = f"unreadable ({type(err).__name__}: {err})"
    if reason is not None:
        warnings.warn(f"projector cache file {path} is not usable: {reason}; rebuilding it",
                      stacklevel=3)
        path.unlink(missing_ok=True)
        return None
    a = payload["arrays"]
    mat = torch.sparse_csr_tensor(a["crow"], a["col"], a["val"], size=shape,
                                  check_invariants=False)
    mat_t = torch.sparse_csr_tensor(a["crow_t"], a["col_t"], a["val_t"], size=shape[::-1],
                                    check_invariants=False)
    return mat, mat_t
