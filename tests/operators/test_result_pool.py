"""``_mri_cpu.result_buffer``: recycled result buffers of the CPU SENSE ``A`` (sampled-columns
path). A buffer goes back to the pool only when no tensor uses its memory any more, so a
result the caller keeps is never overwritten by a later call."""

from __future__ import annotations

import gc
import io
import threading

import numpy as np
import pytest
import torch
from fedrecon.operators import MultiCoilMRI, _cpu_spmm, _mri_cpu

BIG = (2, 1 << 20)  # 16 MiB of complex64: pooled (at least 4 MiB)

pytestmark = pytest.mark.skipif(not _cpu_spmm.available(), reason="numba is not installed")


@pytest.fixture(autouse=True)
def _empty_pool(monkeypatch):
    monkeypatch.delenv(_mri_cpu.POOL_ENV_VAR, raising=False)
    _mri_cpu.clear_scratch()
    yield
    gc.collect()
    _mri_cpu.clear_scratch()


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_live_results_never_share_memory_and_dead_ones_are_reused():
    a = _mri_cpu.result_buffer(BIG, torch.complex64)
    b = _mri_cpu.result_buffer(BIG, torch.complex64)
    assert a.shape == BIG and a.dtype == torch.complex64 and a.is_contiguous()
    assert _ptr(a) != _ptr(b)
    a.fill_(1)
    b.fill_(2)
    view = a[1]  # a view keeps the memory in use
    kept = _ptr(a)
    del a
    gc.collect()
    c = _mri_cpu.result_buffer(BIG, torch.complex64)
    assert _ptr(c) not in (kept, _ptr(b))
    assert bool((view == 1).all()) and bool((b == 2).all())
    del view
    gc.collect()
    d = _mri_cpu.result_buffer(BIG, torch.complex64)
    assert _ptr(d) == kept  # the dead buffer, reused
    stats = _mri_cpu.pool_stats()
    assert stats["reused"] >= 1 and stats["free"] == 0
    del b, c, d
    gc.collect()
    assert _mri_cpu.pool_stats()["free"] == _mri_cpu.POOL_KEEP  # 3 died, 2 are kept
    _mri_cpu.clear_scratch()
    assert _mri_cpu.pool_stats()["free"] == 0


def test_numpy_view_and_saved_copy_keep_their_data():
    a = _mri_cpu.result_buffer(BIG, torch.complex64)
    a.fill_(3 + 1j)
    arr = a.numpy()  # holds the tensor
    buf = io.BytesIO()
    torch.save(a, buf)
    del a
    gc.collect()
    b = _mri_cpu.result_buffer(BIG, torch.complex64)
    b.fill_(0)
    assert complex(arr[1, -1]) == 3 + 1j
    buf.seek(0)
    assert bool((torch.load(buf) == 3 + 1j).all())


def test_small_sizes_and_switch_off_are_plain(monkeypatch):
    before = _mri_cpu.pool_stats()
    small = _mri_cpu.result_buffer((4, 8), torch.complex64)
    assert small.shape == (4, 8) and _mri_cpu.pool_stats() == before
    monkeypatch.setenv(_mri_cpu.POOL_ENV_VAR, "off")
    t = _mri_cpu.result_buffer(BIG, torch.complex64)
    del t
    gc.collect()
    assert _mri_cpu.pool_stats() == before


def _column_operator(batch: int = 2, coils: int = 8, size: int = 256, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    maps = torch.randn(batch, coils, size, size, dtype=torch.complex64, generator=gen)
    mask = torch.zeros(size)
    mask[torch.randperm(size, generator=gen)[: size // 4]] = 1
    return MultiCoilMRI(maps, mask), gen


def _reference(op: MultiCoilMRI, x: torch.Tensor) -> torch.Tensor:
    """``M fft2c(S x)`` in complex128 from the definitions."""
    d = (-2, -1)
    z = op.coil_maps.to(torch.complex128) * x.to(torch.complex128)[:, None]
    k = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(z, dim=d), norm="ortho"), dim=d)
    return op.mask.double() * k


def test_kept_results_of_A_are_not_overwritten_by_later_calls():
    op, gen = _column_operator()  # 2 x 8 x 256^2 complex64: 8 MiB results, pooled
    xs = [torch.randn(2, 256, 256, dtype=torch.complex64, generator=gen) for _ in range(4)]
    kept = []
    for i, x in enumerate(xs):
        kept.append(op.A(x))
        op.A(xs[(i + 1) % 4])  # a result dropped at once: its buffer returns to the pool
    assert _mri_cpu.pool_stats()["reused"] >= 2
    assert len({_ptr(k) for k in kept}) == len(kept)
    for x, k in zip(xs, kept):
        ref = _reference(op, x)
        assert float((k - ref).abs().norm() / ref.abs().norm()) < 1e-6


def test_A_from_two_threads():
    op, gen = _column_operator(seed=1)
    xs = [torch.randn(2, 256, 256, dtype=torch.complex64, generator=gen) for _ in range(2)]
    refs = [_reference(op, x) for x in xs]
    errors = []

    def work(i: int) -> None:
        for _ in range(5):
            out = op.A(xs[i])
            errors.append(float((out - refs[i]).abs().norm() / refs[i].abs().norm()))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 10 and max(errors) < 1e-6
    assert np.isfinite(errors).all()


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_forked_child_gets_a_fresh_pool():
    import os
    import signal

    a = _mri_cpu.result_buffer(BIG, torch.complex64)
    del a
    gc.collect()
    assert _mri_cpu.pool_stats()["free"] == 1
    with _mri_cpu._POOL_LOCK:  # held by this thread while forking: the child must not block
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                signal.alarm(20)  # a child blocked on the parent's lock dies, it does not hang
                torch.set_num_threads(1)  # GNU OpenMP's workers do not survive a fork
                ok = _mri_cpu.pool_stats()["free"] == 0
                b = _mri_cpu.result_buffer(BIG, torch.complex64)
                b.fill_(1)
                ok = ok and bool((b == 1).all())
            finally:
                os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_pool_bounds_drop_the_oldest_sizes_first(monkeypatch):
    mib = 1 << 20
    monkeypatch.setattr(_mri_cpu, "POOL_MAX_BYTES", 40 * mib)
    sizes = (8, 12, 16)  # MiB of complex64 each
    bufs = {m: [_mri_cpu.result_buffer((m * mib // 8,), torch.complex64) for _ in range(3)]
            for m in sizes}
    del bufs[8]
    gc.collect()  # three 8 MiB buffers die: two are kept
    assert _mri_cpu.pool_stats()["free_bytes"] == 16 * mib
    del bufs[12]
    gc.collect()  # + two of 12 MiB = 40 MiB
    assert _mri_cpu.pool_stats()["free_bytes"] == 40 * mib
    del bufs[16]
    gc.collect()  # two of 16 MiB come in; the 8 MiB ones go first, then one of 12 MiB
    stats = _mri_cpu.pool_stats()
    assert stats["free_bytes"] == 2 * 16 * mib and stats["free"] == 2
    # a size above the whole budget is never kept
    big = _mri_cpu.result_buffer((48 * mib // 8,), torch.complex64)
    del big
    gc.collect()
    assert _mri_cpu.pool_stats()["free_bytes"] == 2 * 16 * mib
