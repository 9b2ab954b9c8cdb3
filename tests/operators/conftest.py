"""Operator tests never write to the user's projector cache: each session gets its own."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _private_projector_cache(tmp_path_factory: pytest.TempPathFactory):
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDRECON_CACHE_DIR", str(tmp_path_factory.mktemp("fedrecon-cache")))
    yield
    mp.undo()
