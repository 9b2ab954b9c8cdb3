"""The wheel installs operators/ and datasets/ inside fedrecon, never as bare top-level names."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_public_api_names_exist() -> None:
    import fedrecon.operators as ops

    for name in ("ParallelBeam2D", "FanBeam2D", "MultiCoilMRI", "SingleCoilMRI", "fbp", "fft2c",
                 "ifft2c", "rss", "RandomMask", "EquispacedMask", "conjugate_gradient",
                 "cg_sense", "tv_reconstruction", "LinearOperator", "espirit_maps",
                 "birdcage_maps", "simulate_low_dose", "log_transform"):
        assert hasattr(ops, name), name


def test_wheel_has_no_bare_top_level_packages(tmp_path: Path) -> None:
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("fedrecon-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"fedrecon"}, tops
    assert "fedrecon/operators/ct.py" in names
    assert "fedrecon/datasets/__init__.py" in names
    assert not any(n.startswith(("operators/", "datasets/", "tests/", "scripts/")) for n in names)
