"""Matrix-free projectors: the 3D cone beam (torch path on CPU, checked against analytic
line integrals) and the Triton CUDA kernels, checked on the GPU itself against the CPU path
(same function, same inputs). The CUDA tests run in ``scripts/gpu_check.sh``."""

from __future__ import annotations

import math

import pytest
import torch
from fedrecon.operators import ConeBeam3D, FanBeam2D, ParallelBeam2D, _triton_ct


def needs_triton_cuda(fn):
    """Marks a test ``cuda`` (run by scripts/gpu_check.sh) and skips it without CUDA + Triton."""
    fn = pytest.mark.skipif(not _triton_ct.available(), reason="needs CUDA and Triton")(fn)
    return pytest.mark.cuda(fn)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _ball(n: int, radius: float, supersample: int = 4) -> torch.Tensor:
    c = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
    zz, yy, xx = torch.meshgrid(c, c, c, indexing="ij")
    acc = torch.zeros(n, n, n, dtype=torch.float64)
    offs = (torch.arange(supersample, dtype=torch.float64) + 0.5) / supersample - 0.5
    for a in offs:
        for b in offs:
            for d in offs:
                acc += ((xx + a) ** 2 + (yy + b) ** 2 + (zz + d) ** 2 <= radius**2).double()
    return acc / supersample**3


@pytest.mark.parametrize("stepping", ["ray", "view"])
def test_cone_beam_matches_chord_lengths_of_a_ball(stepping):
    """Line integrals of a (supersampled) ball of radius R are chord lengths 2 sqrt(R^2 - d^2)."""
    n, radius = 40, 12.0
    op = ConeBeam3D(n, n_angles=4, det_shape=(24, 30), det_spacing=2.0, source_distance=80.0,
                    detector_distance=40.0, backend="torch", stepping=stepping,
                    angles=[0.3, 0.7, 0.785, 2.0])
    proj = op.A(_ball(n, radius)[None])[0]
    src, d = op.geometry.rays(torch.device("cpu"))
    closest = src - (src * d).sum(1, keepdim=True) * d
    dist = closest.norm(dim=1).reshape(proj.shape)
    chord = 2 * torch.sqrt(torch.clamp(radius**2 - dist**2, min=0))
    inside = chord > 4  # away from the partial-volume rim
    assert inside.sum() > 200
    assert _rel(proj[inside], chord[inside]) < 0.03
    far = dist > radius + 2  # rays that pass the ball by more than the interpolation reach
    assert far.sum() > 200 and float(proj[far].abs().max()) == 0.0


def test_cone_beam_off_centre_detector_and_shifted_ball():
    """A ball off the rotation axis projects where the geometry says (centre of mass)."""
    n = 32
    op = ConeBeam3D((24, n, n), n_angles=3, det_shape=(30, 40), source_distance=60.0,
                    detector_distance=30.0, det_offset=(1.5, -2.0), backend="torch")
    vol = torch.zeros(24, n, n, dtype=torch.float64)
    vol[14:17, 8:11, 20:23] = 1.0  # centre voxel (15, 9, 21)
    proj = op.A(vol[None])[0]
    g = op.geometry
    centre = torch.tensor([21 - (n - 1) / 2, (n - 1) / 2 - 9, 15 - (24 - 1) / 2], dtype=torch.float64)
    for a, th in enumerate(g.angles):
        r = torch.tensor([math.sin(th), -math.cos(th), 0.0], dtype=torch.float64)
        u = torch.tensor([math.cos(th), math.sin(th), 0.0], dtype=torch.float64)
        lam = (g.source_distance + g.detector_distance) / (g.source_distance + centre @ r)
        col = (lam * (centre @ u) - g.det_offset[1]) / g.det_spacing[1] + (g.det_cols - 1) / 2
        row = (lam * centre[2] - g.det_offset[0]) / g.det_spacing[0] + (g.det_rows - 1) / 2
        p = proj[a]
        m_row = float((p.sum(1) * torch.arange(g.det_rows)).sum() / p.sum())
        m_col = float((p.sum(0) * torch.arange(g.det_cols)).sum() / p.sum())
        assert abs(m_row - row) < 0.3 and abs(m_col - col) < 0.3


@pytest.mark.parametrize("stepping", ["ray", "view"])
def test_cone_beam_gradient_is_the_adjoint(stepping):
    op = ConeBeam3D((5, 6, 7), n_angles=3, det_shape=(6, 8), source_distance=15.0,
                    detector_distance=9.0, backend="torch", stepping=stepping).double()
    x = torch.randn(2, 5, 6, 7, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    (op.A(x) * y).sum().backward()
    torch.testing.assert_close(x.grad, op.A_adjoint(y), rtol=1e-12, atol=1e-12)


def test_cone_beam_view_stepping_differs_only_where_rays_cross_the_diagonals():
    """stepping='view' (ASTRA's rule: one stepping axis per view, the central ray's) equals
    per-ray stepping in views whose rays all share the central ray's axis, and differs in a
    view at 45 degrees, where half the rays are x-major and half y-major."""
    kw = {"det_shape": (10, 16), "source_distance": 40.0, "detector_distance": 20.0,
          "backend": "torch"}
    x = torch.rand(1, 12, 14, 14, dtype=torch.float64)
    narrow = [0.05, 1.5, 3.3]  # fan half-angle ~11 degrees: no ray crosses a diagonal
    a = ConeBeam3D((12, 14, 14), angles=narrow, **kw).A(x)
    b = ConeBeam3D((12, 14, 14), angles=narrow, stepping="view", **kw).A(x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    diag = [math.pi / 4 + 0.01]
    op_r = ConeBeam3D((12, 14, 14), angles=diag, **kw)
    op_v = ConeBeam3D((12, 14, 14), angles=diag, stepping="view", **kw)
    pr, pv = op_r.A(x), op_v.A(x)
    ax_r = _triton_ct.ray_table_3d(op_r.geometry, torch.device("cpu")).axis
    ax_v = _triton_ct.ray_table_3d(op_v.geometry, torch.device("cpu")).axis
    same = (ax_r == ax_v).reshape(pr.shape[1:])
    assert 0 < int(same.sum()) < same.numel()
    torch.testing.assert_close(pr[0][same], pv[0][same], rtol=0, atol=0)
    assert float((pr[0][~same] - pv[0][~same]).abs().max()) > 1e-3
    assert _rel(pv, pr) < 0.05  # two discretizations of the same line integrals


@pytest.mark.parametrize("kwargs, message", [
    ({"volume_size": 8, "source_distance": 50.0, "detector_distance": 5.0, "stepping": "astra"}, "stepping"),
    ({"volume_size": 8, "source_distance": 5.0, "detector_distance": 5.0}, "source_distance"),
    ({"volume_size": (8, 8), "source_distance": 50.0, "detector_distance": 5.0}, "volume_size"),
    ({"volume_size": 8, "source_distance": 50.0, "detector_distance": 5.0, "backend": "cuda"}, "backend"),
    ({"volume_size": 8, "source_distance": 50.0, "detector_distance": -1.0}, "detector_distance"),
])
def test_cone_beam_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ConeBeam3D(**kwargs)


def test_triton_backend_refused_without_cuda():
    op = ParallelBeam2D(16, n_angles=8, backend="triton")
    with pytest.raises(RuntimeError, match="backend='triton'"):
        op.A(torch.zeros(16, 16))


# ---------------------------------------------------------------------------------------
# CUDA: the Triton kernels against the CPU path
# ---------------------------------------------------------------------------------------
GEOMETRIES_2D = {
    "parallel": lambda: ParallelBeam2D((48, 40), n_angles=37),
    "parallel_offset": lambda: ParallelBeam2D(
        33, angles=torch.tensor([0.0, 0.3, math.pi / 4, 1.2, math.pi / 2, 2.0, 3.0]),
        det_count=31, det_spacing=1.3, det_offset=0.7, pixel_spacing=0.9),
    "fan": lambda: FanBeam2D((40, 52), n_angles=45, source_distance=90.0, detector_distance=60.0),
    "fan_short": lambda: FanBeam2D(36, n_angles=30, det_count=120, det_spacing=0.8,
                                   source_distance=28.0, detector_distance=14.0, det_offset=-1.1),
}


@pytest.mark.parametrize("name", sorted(GEOMETRIES_2D))
@pytest.mark.parametrize("batch", [1, 3, 11])
@needs_triton_cuda
def test_triton_2d_equals_sparse_cpu(name, batch):
    gen = torch.Generator().manual_seed(batch)
    cpu = GEOMETRIES_2D[name]()
    gpu = GEOMETRIES_2D[name]().cuda()
    gpu.backend = "triton"
    x = torch.randn(batch, *cpu.domain_shape, generator=gen)
    y = torch.randn(batch, *cpu.range_shape, generator=gen)
    fwd = gpu.A(x.cuda()).cpu()
    adj = gpu.A_adjoint(y.cuda()).cpu()
    assert _rel(fwd, cpu.A(x)) < 1e-5
    assert _rel(adj, cpu.A_adjoint(y)) < 1e-5
    # the 2D adjoint is a gather: bitwise reproducible
    assert torch.equal(gpu.A_adjoint(y.cuda()).cpu(), adj)
    lhs = float((fwd.double() * y.double()).sum())
    rhs = float((x.double() * adj.double()).sum())
    assert abs(lhs - rhs) <= 1e-5 * (fwd.double() * y.double()).abs().sum()


def _each_launch_shape(monkeypatch, attr: str, fn) -> list[torch.Tensor]:
    """``fn()`` once per launch shape of ``_triton_ct.<attr>``, the tuner held to that shape."""
    outs = []
    for cfg in getattr(_triton_ct, attr):
        with monkeypatch.context() as m:
            m.setattr(_triton_ct, "_TUNED", {})
            m.setattr(_triton_ct, attr, (cfg,))
            outs.append(fn().cpu())
    return outs


@pytest.mark.parametrize("name", ["parallel_offset", "fan_short"])
@needs_triton_cuda
def test_triton_2d_every_launch_shape_and_split(name, monkeypatch):
    """Each launch shape the tuner may pick gives the same result to float rounding (not
    bitwise: each shape compiles to different arithmetic code); the loop split
    into chunks (partial sums added in a fixed order) matches the CPU path too."""
    gen = torch.Generator().manual_seed(5)
    cpu = GEOMETRIES_2D[name]()
    g = cpu.geometry
    x = torch.randn(11, *cpu.domain_shape, generator=gen)
    y = torch.randn(11, *cpu.range_shape, generator=gen)
    cases = (("_FP2D_CONFIGS", lambda: _triton_ct.joseph2d_forward(g, x.cuda()), cpu.A(x)),
             ("_BP2D_CONFIGS", lambda: _triton_ct.joseph2d_adjoint(g, y.cuda()), cpu.A_adjoint(y)))
    for split in (1, 3):
        monkeypatch.setattr(_triton_ct, "SPLIT", split)
        for attr, fn, ref in cases:
            outs = _each_launch_shape(monkeypatch, attr, fn)
            assert max(_rel(o, ref) for o in outs) < 1e-5, (split, attr)
            assert max(_rel(o, outs[0]) for o in outs) < 1e-6, (split, attr)


@needs_triton_cuda
def test_triton_cone_every_launch_shape(monkeypatch):
    kw = {"n_angles": 5, "det_shape": (14, 18), "source_distance": 50.0, "detector_distance": 25.0}
    cpu = ConeBeam3D((10, 12, 14), backend="torch", **kw)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(3, *cpu.domain_shape, generator=gen)
    y = torch.randn(3, *cpu.range_shape, generator=gen)
    g = cpu.geometry
    for fn, ref in ((lambda: _triton_ct.joseph3d_forward(g, x.cuda()), cpu.A(x)),
                    (lambda: _triton_ct.joseph3d_adjoint(g, y.cuda()), cpu.A_adjoint(y))):
        outs = _each_launch_shape(monkeypatch, "_CONE_CONFIGS", fn)
        assert max(_rel(o, ref) for o in outs) < 1e-5


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@needs_triton_cuda
def test_triton_2d_half_precision_storage(dtype, tol):
    cpu = FanBeam2D(64, n_angles=60, source_distance=200.0, detector_distance=100.0)
    gpu = FanBeam2D(64, n_angles=60, source_distance=200.0, detector_distance=100.0).cuda()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 64, 64, generator=gen)
    y = torch.rand(4, *cpu.range_shape, generator=gen)
    out = gpu.A(x.cuda().to(dtype))
    assert out.dtype == dtype
    # the reference sees the same rounded inputs; the error left is the output rounding
    assert _rel(out.cpu().float(), cpu.A(x.to(dtype).float())) < tol
    assert _rel(gpu.A_adjoint(y.cuda().to(dtype)).cpu().float(), cpu.A_adjoint(y.to(dtype).float())) < tol


@needs_triton_cuda
def test_triton_2d_clinical_size_and_autograd():
    cpu = ParallelBeam2D(256, n_angles=180)
    gpu = ParallelBeam2D(256, n_angles=180).cuda()
    x = torch.randn(2, 256, 256, generator=torch.Generator().manual_seed(1))
    assert _rel(gpu.A(x.cuda()).cpu(), cpu.A(x)) < 1e-5
    xg = x.cuda().requires_grad_(True)
    y = torch.randn(2, *cpu.range_shape, device="cuda")
    (gpu.A(xg) * y).sum().backward()
    torch.testing.assert_close(xg.grad, gpu.A_adjoint(y), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("shape, det, stepping", [((6, 9, 8), (9, 13), "ray"),
                                                  ((20, 24, 28), (30, 44), "ray"),
                                                  ((20, 24, 28), (30, 44), "view")])
@needs_triton_cuda
def test_triton_cone_equals_torch_cpu(shape, det, stepping):
    kw = {"n_angles": 11, "det_shape": det, "source_distance": 60.0, "detector_distance": 30.0,
          "det_offset": (0.4, -0.7), "stepping": stepping}
    cpu = ConeBeam3D(shape, backend="torch", **kw)
    gpu = ConeBeam3D(shape, backend="triton", **kw).cuda()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, *shape, generator=gen)
    y = torch.randn(3, *cpu.range_shape, generator=gen)
    fwd = gpu.A(x.cuda()).cpu()
    adj = gpu.A_adjoint(y.cuda()).cpu()
    assert _rel(fwd, cpu.A(x)) < 1e-5
    assert _rel(adj, cpu.A_adjoint(y)) < 1e-5
    lhs = float((fwd.double() * y.double()).sum())
    rhs = float((x.double() * adj.double()).sum())
    assert abs(lhs - rhs) <= 1e-5 * (fwd.double() * y.double()).abs().sum()


@needs_triton_cuda
def test_triton_cone_ball_and_bf16():
    n, radius = 40, 12.0
    op = ConeBeam3D(n, n_angles=4, det_shape=(24, 30), det_spacing=2.0, source_distance=80.0,
                    detector_distance=40.0, backend="triton").cuda()
    ball = _ball(n, radius).float()[None].cuda()
    ref = ConeBeam3D(n, n_angles=4, det_shape=(24, 30), det_spacing=2.0, source_distance=80.0,
                     detector_distance=40.0, backend="torch").A(ball.cpu())
    assert _rel(op.A(ball).cpu(), ref) < 1e-5
    assert _rel(op.A(ball.bfloat16()).float().cpu(), ref) < 1e-2
