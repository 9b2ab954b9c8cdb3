"""The runner tests train tiny models (16-32 px): torch's intra-op threads only add
synchronization there, and on a loaded 2-core machine they slow a 16 px conv ~100x."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
