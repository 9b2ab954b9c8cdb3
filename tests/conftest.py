"""Shared test fixtures: the devices to run on (CUDA tests auto-skip without a GPU)."""

from __future__ import annotations

import pytest
import torch

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param(
        "cuda",
        id="cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
        ],
    ),
]


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


# Folders whose tests train tiny models (16-48 px): torch's intra-op threads only add
# synchronization there, and on a loaded 2-core machine they slow a 16 px conv ~100x.
ONE_THREAD_FOLDERS = frozenset({"runners", "privacy", "flower", "efficient", "cli"})
ONE_THREAD_FILES = frozenset({"test_audit_models.py", "test_audit_training.py"})


@pytest.fixture(autouse=True)
def one_thread(request: pytest.FixtureRequest):
    path = request.node.path
    if not (ONE_THREAD_FOLDERS & set(path.parts) or path.name in ONE_THREAD_FILES):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
