"""The one contract suite: every registered operator, on every device, in float32 and float64.

Checks: dot-product adjoint test, ``A_normal == A_adjoint(A(.))``, linearity, autograd VJP
equals the adjoint, batch invariance, ``norm()`` against the dense matrix's largest
singular value, device and dtype moves, and the operator algebra (``.H``, ``@``, scaling).
"""

from __future__ import annotations

import pytest
import torch

from fedrecon.operators import OPERATOR_REGISTRY, LinearOperator, make_operator

NAMES = sorted(OPERATOR_REGISTRY)
DTYPES = [pytest.param(torch.float64, id="f64"), pytest.param(torch.float32, id="f32")]
TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


def _inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.conj() * b).sum()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _sample(op: LinearOperator, *lead: int, rng: int = 0, dtype=torch.float64, range_=False):
    gen = torch.Generator(device=op.device).manual_seed(rng)
    shape = (*lead, *op.batch_shape)
    fn = op.randn_range if range_ else op.randn_domain
    return fn(*shape, generator=gen, dtype=dtype)


def _variants(op: LinearOperator) -> dict[str, LinearOperator]:
    scale = 1.5 - 0.5j if (op.domain_complex or op.range_complex) else -1.75
    return {"plain": op, "adjoint": op.H, "scaled": scale * op, "normal": op.H @ op,
            "sum": op + 0.5 * op}


@pytest.fixture(params=NAMES)
def name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
def test_dot_product_adjoint(name: str, device: torch.device, dtype: torch.dtype) -> None:
    base = make_operator(name, device=device, dtype=dtype)
    for label, op in _variants(base).items():
        x = _sample(op, 2, rng=1, dtype=dtype)
        y = _sample(op, 2, rng=2, dtype=dtype, range_=True)
        lhs, rhs = _inner(op.A(x), y), _inner(x, op.A_adjoint(y))
        scale = torch.linalg.vector_norm(op.A(x)) * torch.linalg.vector_norm(y)
        err = float((lhs - rhs).abs() / scale)
        assert err < TOL[dtype], f"{name}/{label}: adjoint mismatch {err:.2e}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_normal_equals_adjoint_of_forward(name: str, device: torch.device, dtype: torch.dtype) -> None:
    op = make_operator(name, device=device, dtype=dtype)
    x = _sample(op, 3, rng=3, dtype=dtype)
    assert _rel(op.A_normal(x), op.A_adjoint(op.A(x))) < 10 * TOL[dtype]


def test_linearity(name: str, device: torch.device) -> None:
    op = make_operator(name, device=device, dtype=torch.float64)
    x1, x2 = _sample(op, 2, rng=4), _sample(op, 2, rng=5)
    a, b = (0.3 - 2j, 1.7 + 0.5j) if op.domain_complex else (0.3, -1.7)
    assert _rel(op.A(a * x1 + b * x2), a * op.A(x1) + b * op.A(x2)) < 1e-12
    y1, y2 = _sample(op, 2, rng=6, range_=True), _sample(op, 2, rng=7, range_=True)
    if not op.range_complex:
        a, b = 0.3, -1.7
    assert _rel(op.A_adjoint(a * y1 + b * y2), a * op.A_adjoint(y1) + b * op.A_adjoint(y2)) < 1e-12


def test_autograd_vjp_is_adjoint(name: str, device: torch.device) -> None:
    base = make_operator(name, device=device, dtype=torch.float64)
    for label, op in _variants(base).items():
        x = _sample(op, 2, rng=8).requires_grad_(True)
        v = _sample(op, 2, rng=9, range_=True)
        (g,) = torch.autograd.grad(op.A(x), x, grad_outputs=v)
        assert _rel(g, op.A_adjoint(v)) < 1e-10, f"{name}/{label}"
        y = _sample(op, 2, rng=10, range_=True).requires_grad_(True)
        w = _sample(op, 2, rng=11)
        (gy,) = torch.autograd.grad(op.A_adjoint(y), y, grad_outputs=w)
        assert _rel(gy, op.A(w)) < 1e-10, f"{name}/{label} (adjoint's VJP)"


def test_batch_invariance(name: str, device: torch.device) -> None:
    op = make_operator(name, device=device, dtype=torch.float64)
    x = _sample(op, 3, rng=12)
    y = _sample(op, 3, rng=13, range_=True)
    fx, by = op.A(x), op.A_adjoint(y)
    assert fx.shape == (3, *op.batch_shape, *op.range_shape)
    assert by.shape == (3, *op.batch_shape, *op.domain_shape)
    for k in range(3):
        assert _rel(op.A(x[k]), fx[k]) < 1e-12
        assert _rel(op.A_adjoint(y[k]), by[k]) < 1e-12
    # two extra leading dims behave like one
    x4 = x.reshape(1, 3, *x.shape[1:])
    assert _rel(op.A(x4)[0], fx) < 1e-12


def _dense(op: LinearOperator) -> torch.Tensor:
    """Dense matrices ``(*batch_shape, M, N)`` by applying ``op`` to the standard basis."""
    n = 1
    for s in op.domain_shape:
        n *= s
    eye = torch.eye(n, dtype=op.domain_dtype(torch.float64), device=op.device)
    basis = eye.reshape(n, *([1] * len(op.batch_shape)), *op.domain_shape)
    basis = basis.expand(n, *op.batch_shape, *op.domain_shape)
    cols = op.A(basis).reshape(n, *op.batch_shape, -1)  # (N, *batch, M)
    return cols.movedim(0, -1)


def test_norm_matches_largest_singular_value(name: str, device: torch.device) -> None:
    op = make_operator(name, device=device, dtype=torch.float64)
    sigma = torch.linalg.matrix_norm(_dense(op), ord=2)
    est = op.norm(n_iter=500, tol=1e-12, generator=torch.Generator(device=op.device).manual_seed(0))
    assert est.shape == sigma.shape
    assert torch.allclose(est, sigma, rtol=1e-3), (est, sigma)


def test_device_and_dtype_moves(name: str, device: torch.device) -> None:
    op64 = make_operator(name, device="cpu", dtype=torch.float64)
    x = _sample(op64, 2, rng=14)
    ref = op64.A(x)
    moved = op64.to(device)
    out = moved.A(x.to(device))
    assert out.device.type == device.type
    assert _rel(out.cpu(), ref) < 1e-10
    op32 = make_operator(name, device=device, dtype=torch.float32)
    op32.load_state_dict(op64.state_dict())  # same parameters, cast to the float32 buffers
    x32 = x.to(device=device, dtype=op32.domain_dtype(torch.float32))
    out32 = op32.A(x32)
    assert out32.dtype == op32.range_dtype(torch.float32)
    assert _rel(out32.cpu().to(ref.dtype), ref) < 1e-4
    # buffers travel in the state dict: a fresh instance loads them
    fresh = make_operator(name, device="cpu", dtype=torch.float64)
    fresh.load_state_dict(op64.cpu().state_dict())
    assert _rel(fresh.A(x), ref) < 1e-12


def test_algebra_identities(name: str) -> None:
    op = make_operator(name, device="cpu", dtype=torch.float64)
    assert op.H.H is op
    x = _sample(op, 2, rng=15)
    assert _rel((op.H @ op).A(x), op.A_normal(x)) < 1e-10
    assert _rel((op @ x), op.A(x)) < 1e-14
    assert _rel((op - op).A(x) + op.A(x), op.A(x)) < 1e-10


def test_norm_bound_bounds_the_norm(name: str) -> None:
    op = make_operator(name, device="cpu", dtype=torch.float64)
    sigma = float(torch.linalg.matrix_norm(_dense(op), ord=2).max())
    bound = op.norm_bound()
    assert bound >= sigma * (1 - 1e-3), (bound, sigma)
    assert bound == op.norm_bound()  # cached / deterministic
