"""Crash-safe state of a simulation run: a round-versioned store for the sites' LOCAL state,
the checkpoint file and the RNG states it carries.

Why versions: a site writes its LOCAL state (DC layers, FiLM, personal models) at the end of
its ``fit``, in the middle of a round; the server's checkpoint is written once the round is
over. A crash in between would leave LOCAL states from the unfinished round next to a
checkpoint of the round before, and a resumed run would start that round again from the
wrong LOCAL state. So every write is a new file tagged with the round it belongs to, and a
version is trusted only once a checkpoint that covers its round exists:

``<root>/<site_id>/<v:06d>.pt`` with ``v = round + 1`` for writes during round ``round``
(``v = 0``: a LOCAL state the site had before the run). With ``c`` rounds committed in the
checkpoint, versions ``<= c`` are trusted; :meth:`RoundStore.rollback` deletes newer ones
on resume, and :meth:`RoundStore.prune` keeps only the newest trusted version per site.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedrecon.federated import LocalStore, atomic_torch_save

__all__ = ["CHECKPOINT_FORMAT", "RoundStore", "capture_rng", "loader_generators", "restore_rng"]

CHECKPOINT_FORMAT = 1
_VERSION = re.compile(r"^(\d{6})\.pt$")


class RoundStore(LocalStore):
    """Sites' LOCAL state on disk, one file per (site, round) it was written in.

    ``round`` is the round being run: :meth:`put` writes version ``round + 1`` and
    :meth:`get` reads the newest version ``<= round + 1`` (so a site evaluated after its fit
    sees the state it just wrote). Set it with :meth:`set_round`.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.round = -1

    def set_round(self, round: int) -> None:
        self.round = int(round)

    def _dir(self, site_id: str) -> Path:
        if not site_id or "/" in site_id or site_id.startswith("."):
            raise ValueError(f"invalid site id {site_id!r} for a folder name")
        return self.root / site_id

    def versions(self, site_id: str) -> list[int]:
        folder = self._dir(site_id)
        if not folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _VERSION.match(p.name)))

    def _path(self, site_id: str, version: int) -> Path:
        return self._dir(site_id) / f"{version:06d}.pt"

    def get(self, site_id: str) -> dict[str, Any] | None:
        usable = [v for v in self.versions(site_id) if v <= self.round + 1]
        if not usable:
            return None
        path = self._path(site_id, usable[-1])
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # atomic writes cannot leave a truncated file
            raise OSError(f"{path}: cannot read the site's local state ({err})") from err

    def put(self, site_id: str, state: dict[str, Any]) -> None:
        atomic_torch_save(state, self._path(site_id, self.round + 1))

    def put_initial(self, site_id: str, state: dict[str, Any]) -> None:
        """A LOCAL state the site had before round 0 (version 0)."""
        atomic_torch_save(state, self._path(site_id, 0))

    def site_ids(self) -> list[str]:
        return sorted(p.name for p in self._site_dirs() if self.versions(p.name))

    def _site_dirs(self) -> Iterator[Path]:
        # folders no site can own (``.ipynb_checkpoints``, ``.DS_Store``...) are not ours
        return (p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def rollback(self, committed: int) -> int:
        """Delete versions newer than ``committed`` rounds and stale temp files (after a
        crash); returns how many files were removed."""
        removed = 0
        for folder in self._site_dirs():
            for p in folder.iterdir():
                m = _VERSION.match(p.name)
                if (m and int(m.group(1)) > committed) or p.name.endswith(".tmp"):
                    p.unlink()
                    removed += 1
        return removed

    def prune(self, committed: int, site_ids: Iterable[str] | None = None) -> None:
        """Keep only the newest version ``<= committed`` (and any newer) of each site."""
        folders = (self._dir(s) for s in site_ids) if site_ids is not None else self._site_dirs()
        for folder in folders:
            if not folder.is_dir():
                continue
            trusted = [v for v in self.versions(folder.name) if v <= committed]
            for v in trusted[:-1]:
                self._path(folder.name, v).unlink(missing_ok=True)


def capture_rng() -> dict[str, Any]:
    """Python, NumPy and torch (CPU, CUDA) global RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def loader_generators(loader: Any) -> list[torch.Generator]:
    """The ``torch.Generator`` s a loader shuffles with (a DataLoader's ``generator``; the
    member loaders of a round-robin loader), so the checkpoint can carry their states."""
    found: list[torch.Generator] = []
    gen = getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator):
        found.append(gen)
    for member in getattr(loader, "loaders", ()) or ():
        found.extend(loader_generators(member))
    return found
