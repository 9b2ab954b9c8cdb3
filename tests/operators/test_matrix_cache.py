"""The on-disk cache of CT system matrices: hits, misses, corrupted and foreign files."""

from __future__ import annotations

import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from fedrecon.operators import FanBeam2D, ParallelBeam2D, _matrix_cache, clear_projector_cache, fbp


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh cache folder, every matrix size cached on disk, memory cache empty."""
    monkeypatch.setenv(_matrix_cache.CACHE_ENV_VAR, str(tmp_path))
    monkeypatch.setattr(_matrix_cache, "DISK_MIN_DENSE", 0)
    clear_projector_cache()
    yield tmp_path / "projectors"
    clear_projector_cache()


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*")) if folder.is_dir() else []


def _same_csr(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.shape == b.shape and a.dtype == b.dtype
            and all(torch.equal(p, q) for p, q in zip(
                (a.crow_indices(), a.col_indices(), a.values()),
                (b.crow_indices(), b.col_indices(), b.values()))))


def _fan(**kw) -> FanBeam2D:
    args = {"n_angles": 11, "det_count": 29, "source_distance": 40.0, "detector_distance": 30.0}
    return FanBeam2D(18, **(args | kw))


def test_second_operator_loads_from_disk_identically(cache: Path) -> None:
    first = _fan()
    mat, mat_t = first.matrices(torch.float64)
    assert len(_files(cache)) == 1 and _files(cache)[0].suffix == ".pt"  # no temp leftovers
    clear_projector_cache()  # memory only: the next lookup must come from the file
    second = _fan()
    # a hit leaves the file untouched (a rebuild would rewrite it)
    stamp = _files(cache)[0].stat().st_mtime_ns
    mat2, mat2_t = second.matrices(torch.float64)
    assert _files(cache)[0].stat().st_mtime_ns == stamp
    assert mat2 is not mat and _same_csr(mat, mat2) and _same_csr(mat_t, mat2_t)
    x = torch.randn(2, 18, 18, dtype=torch.float64)
    y = torch.randn(2, *first.range_shape, dtype=torch.float64)
    assert torch.equal(second(x), first(x)) and torch.equal(second.A_adjoint(y), first.A_adjoint(y))


def test_file_holds_the_exact_pair(cache: Path) -> None:
    op = ParallelBeam2D(16, n_angles=9)
    ref = op.matrices(torch.float64)
    clear_projector_cache()
    loaded = _matrix_cache.load_pair(
        _files(cache)[0],
        _matrix_cache.key_text("joseph", op.geometry, _joseph(), (9 * op.det_count, 256),
                               torch.float64),
        (9 * op.det_count, 256), torch.float64)
    assert loaded is not None and _same_csr(loaded[0], ref[0]) and _same_csr(loaded[1], ref[1])


def _joseph():
    from fedrecon.operators import ct

    return ct._joseph_rows


@pytest.mark.parametrize("change", [
    {"source_distance": 41.0}, {"detector_distance": 30.5}, {"det_count": 31},
    {"det_spacing": 1.01}, {"det_offset": 0.25}, {"pixel_spacing": 0.9}, {"n_angles": 12},
])
def test_a_changed_parameter_misses_the_cache(cache: Path, change: dict) -> None:
    base = _fan()
    base.matrices(torch.float64)
    clear_projector_cache()
    other = _fan(**change)
    mat = other.matrices(torch.float64)[0]
    assert len(_files(cache)) == 2  # a second file: the first one was not (mis)used
    clear_projector_cache()
    assert _same_csr(_fan(**change).matrices(torch.float64)[0], mat)


def test_dtype_and_kind_are_part_of_the_key(cache: Path) -> None:
    op = ParallelBeam2D(16, n_angles=9)
    op.matrices(torch.float64)
    op.matrices(torch.float32)
    fbp(op, op(torch.rand(16, 16)))
    names = [f.name for f in _files(cache)]
    assert len(names) == 3 and sum(n.startswith("fbp-") for n in names) == 1


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_corrupted_file_is_detected_and_rebuilt(cache: Path, damage: str) -> None:
    op = ParallelBeam2D(16, n_angles=9)
    good = op.matrices(torch.float64)
    (path,) = _files(cache)
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":  # inside the stored arrays (the last part of the file holds data)
        data[len(data) * 2 // 3] ^= 0xFF
    elif damage == "garbage":
        data = bytearray(b"not a cache file" * 10)
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    clear_projector_cache()
    with pytest.warns(UserWarning, match="not usable"):
        again = op.matrices(torch.float64)
    assert _same_csr(again[0], good[0]) and _same_csr(again[1], good[1])
    clear_projector_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rewritten file: a clean hit now
        assert _same_csr(op.matrices(torch.float64)[0], good[0])


def test_file_of_another_geometry_is_not_used(cache: Path) -> None:
    a, b = ParallelBeam2D(16, n_angles=9), ParallelBeam2D(16, n_angles=9, det_offset=0.5)
    a.matrices(torch.float64)
    b_good = b.matrices(torch.float64)[0]
    file_a, file_b = _files(cache)  # order unknown: swap contents both ways
    tmp = file_a.with_suffix(".swap")
    shutil.copy(file_a, tmp)
    shutil.copy(file_b, file_a)
    shutil.copy(tmp, file_b)
    tmp.unlink()
    clear_projector_cache()
    with pytest.warns(UserWarning, match="key does not match"):
        assert _same_csr(b.matrices(torch.float64)[0], b_good)


def test_disk_cache_can_be_switched_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_matrix_cache.CACHE_ENV_VAR, "off")
    monkeypatch.setattr(_matrix_cache, "DISK_MIN_DENSE", 0)
    assert _matrix_cache.cache_dir() is None
    clear_projector_cache()
    ParallelBeam2D(16, n_angles=9).matrices(torch.float64)
    assert not any(tmp_path.iterdir())
    clear_projector_cache()


def test_default_folder_is_under_the_user_cache(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    monkeypatch.delenv(_matrix_cache.CACHE_ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _matrix_cache.cache_dir() == tmp_path / "fedrecon" / "projectors"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert _matrix_cache.cache_dir() == Path.home() / ".cache" / "fedrecon" / "projectors"


def test_small_matrices_stay_in_memory_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_matrix_cache.CACHE_ENV_VAR, str(tmp_path))
    clear_projector_cache()
    ParallelBeam2D(16, n_angles=9).matrices(torch.float64)
    assert not (tmp_path / "projectors").exists()
    assert math.prod((9 * 24, 256)) < _matrix_cache.DISK_MIN_DENSE
    clear_projector_cache()
