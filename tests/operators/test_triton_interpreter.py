"""The Triton kernels on the CPU, through Triton's interpreter (``TRITON_INTERPRET=1``), against
the CPU paths: lets a machine without a GPU check kernel changes. Skipped where Triton is not
installed (it is not a dependency; the CUDA tests in test_gpu_projectors.py run the compiled
kernels on a GPU)."""

from __future__ import annotations

import importlib.util
import textwrap

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="Triton not installed")

SCRIPT = textwrap.dedent('''
    import math, torch
    from fedrecon.operators import ConeBeam3D, FanBeam2D, ParallelBeam2D
    from fedrecon.operators import _triton_ct as T
    from fedrecon.operators import cone as C

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    torch.manual_seed(0)
    ops = [ParallelBeam2D((12, 15), n_angles=7),
           ParallelBeam2D(10, angles=torch.tensor([0.0, 0.3, math.pi / 4, 1.2, math.pi / 2, 2.0]),
                          det_count=13, det_spacing=1.3, det_offset=0.7),
           FanBeam2D((11, 14), n_angles=9, det_count=41, source_distance=40.0, detector_distance=30.0)]
    for op in ops:
        g = op.geometry
        x, y = torch.randn(3, *g.image_size), torch.randn(3, g.n_angles, g.det_count)
        assert rel(T.joseph2d_forward(g, x), op.A(x)) < 1e-5, g
        assert rel(T.joseph2d_adjoint(g, y), op.A_adjoint(y)) < 1e-5, g
    # every launch shape the GPU tuner may pick, the loop split into chunks, two batch blocks
    op = FanBeam2D((7, 9), n_angles=6, det_count=17, source_distance=30.0, detector_distance=20.0)
    g = op.geometry
    x, y = torch.randn(5, *g.image_size), torch.randn(5, g.n_angles, g.det_count)
    fp_all, bp_all = T._FP2D_CONFIGS, T._BP2D_CONFIGS
    T.SPLIT = 3
    for fcfg, bcfg in zip(fp_all * 2, bp_all):
        T._FP2D_CONFIGS, T._BP2D_CONFIGS = (fcfg,), (bcfg,)
        T._TUNED.clear()
        assert rel(T.joseph2d_forward(g, x), op.A(x)) < 1e-5, fcfg
        assert rel(T.joseph2d_adjoint(g, y), op.A_adjoint(y)) < 1e-5, bcfg
    T.SPLIT, T._FP2D_CONFIGS, T._BP2D_CONFIGS = None, fp_all, bp_all
    T._TUNED.clear()
    g = ConeBeam3D((5, 7, 6), n_angles=4, det_shape=(7, 9), source_distance=20.0,
                   detector_distance=12.0).geometry
    x, y = torch.randn(2, 5, 7, 6), torch.randn(2, 4, 7, 9)
    assert rel(T.joseph3d_forward(g, x), C.cone_forward_torch(g, x)) < 1e-5
    assert rel(T.joseph3d_adjoint(g, y), C.cone_adjoint_torch(g, y)) < 1e-5
    print("ok")
''')


def test_triton_kernels_in_the_interpreter_match_the_cpu_paths(run_interpreted):
    run_interpreted(SCRIPT)
