"""``_cpu_spmm.workspace``: per-thread reusable buffers; large ones come from a private
anonymous mapping with transparent huge pages requested (``_mapped``)."""

from __future__ import annotations

import mmap
import os
import sys
import threading

import numpy as np
import pytest
from fedrecon.operators import _cpu_spmm


def test_workspace_reuse_shape_and_threads():
    a = _cpu_spmm.workspace("t_ws", (3, 5), np.float32)
    assert a.shape == (3, 5) and a.dtype == np.float32 and a.flags["C_CONTIGUOUS"]
    assert _cpu_spmm.workspace("t_ws", (3, 5), np.float32) is a  # reused
    b = _cpu_spmm.workspace("t_ws", (4, 5), np.float32)  # a new shape replaces it
    assert b is not a and b.shape == (4, 5)
    other = []
    thread = threading.Thread(target=lambda: other.append(_cpu_spmm.workspace("t_ws", (4, 5), np.float32)))
    thread.start()
    thread.join()
    assert other[0] is not b  # one buffer per thread
    _cpu_spmm.release_workspace("t_ws")
    assert _cpu_spmm.workspace("t_ws", (4, 5), np.float32) is not b
    _cpu_spmm.release_workspace("t_ws")


def test_large_workspace_is_mapped_writable_and_private():
    shape = (3, 1 << 20)  # 24 MiB of complex64: above _HUGE_BYTES
    a = _cpu_spmm.workspace("t_big", shape, np.complex64)
    assert a.shape == shape and a.dtype == np.complex64 and a.flags["C_CONTIGUOUS"]
    assert a.flags["WRITEABLE"] and a.ctypes.data % 4096 == 0
    a[...] = 1 + 2j
    assert complex(a[2, -1]) == 1 + 2j and float(a.real.sum()) == a.size
    if sys.platform.startswith("linux") and hasattr(os, "fork"):
        # a forked child writes its copy; the parent's buffer is untouched (MAP_PRIVATE)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            a[...] = 7
            os._exit(0 if complex(a[0, 0]) == 7 else 1)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
        assert complex(a[0, 0]) == 1 + 2j and complex(a[2, -1]) == 1 + 2j
    _cpu_spmm.release_workspace("t_big")


@pytest.mark.skipif(not (sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE")),
                    reason="smaps and MADV_HUGEPAGE are Linux's")
def test_large_workspace_asks_for_huge_pages():
    a = _cpu_spmm.workspace("t_huge", (1 << 22,), np.complex64)  # 32 MiB
    a[...] = 0  # fault it in
    start = a.ctypes.data
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    flags = None
    for i, line in enumerate(lines):
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(v, 16) for v in head.split("-"))
            if lo <= start < hi:
                flags = next(x for x in lines[i + 1:] if x.startswith("VmFlags"))
                break
    assert flags is not None
    assert "hg" in flags.split()  # madvise(MADV_HUGEPAGE) was applied to the mapping
    _cpu_spmm.release_workspace("t_huge")
