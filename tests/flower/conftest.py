"""Flower tests: skipped when flwr is not installed (one torch thread in this process: see
tests/conftest.py; the Flower processes get theirs from the site configs and
OMP_NUM_THREADS)."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr")
