"""Where a site's LOCAL state lives between rounds: in memory or on disk (one file per site,
atomic writes), so a simulation of 100+ sites never holds 100 models at once."""

from __future__ import annotations

import os
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

__all__ = ["DiskStore", "LocalStore", "MemoryStore", "atomic_torch_save", "atomic_write_text"]


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``.<name>.tmp`` next to ``path``, fsync, ``os.replace``, then
    fsync the folder: after a crash ``path`` holds the old or the new text, never a part."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temp file in the same folder, fsync, ``os.replace``, then fsync the
    folder, so that after a power cut the file is the old or the new one, never empty."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


class LocalStore(ABC):
    """``get(site_id) -> dict | None`` and ``put(site_id, dict)`` for a site's private state
    (LOCAL tensors, personal models, RNG state). Nothing here is ever sent."""

    @abstractmethod
    def get(self, site_id: str) -> dict[str, Any] | None: ...

    @abstractmethod
    def put(self, site_id: str, state: dict[str, Any]) -> None: ...

    @abstractmethod
    def site_ids(self) -> list[str]: ...


class MemoryStore(LocalStore):
    def __init__(self) -> None:
        self._data: dict[str, dict[str, Any]] = {}

    def get(self, site_id: str) -> dict[str, Any] | None:
        return self._data.get(site_id)

    def put(self, site_id: str, state: dict[str, Any]) -> None:
        self._data[site_id] = state

    def site_ids(self) -> list[str]:
        return sorted(self._data)


class DiskStore(LocalStore):
    """One ``<root>/<site_id>.pt`` per site, written atomically."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, site_id: str) -> Path:
        if not site_id or "/" in site_id or site_id.startswith("."):
            raise ValueError(f"invalid site id {site_id!r} for a file name")
        return self.root / f"{site_id}.pt"

    def get(self, site_id: str) -> dict[str, Any] | None:
        path = self._path(site_id)
        if not path.exists():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # a truncated file cannot come from atomic writes
            raise OSError(f"{path}: cannot read the site's local state ({err})") from err

    def put(self, site_id: str, state: dict[str, Any]) -> None:
        atomic_torch_save(state, self._path(site_id))

    def site_ids(self) -> list[str]:
        return sorted(p.stem for p in self.root.glob("*.pt"))
