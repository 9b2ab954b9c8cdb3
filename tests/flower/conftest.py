"""Flower tests: skipped when flwr is not installed; one torch thread in this process (the
Flower processes get theirs from the site configs and OMP_NUM_THREADS)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr")


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
