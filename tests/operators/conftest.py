"""Operator tests never write to the user's projector cache: each session gets its own."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from fedrecon.operators import _cpu_spmm
from fedrecon.operators.ct import clear_projector_cache


@pytest.fixture(autouse=True, scope="session")
def _private_projector_cache(tmp_path_factory: pytest.TempPathFactory):
    mp = pytest.MonkeyPatch()
    mp.setenv("FEDRECON_CACHE_DIR", str(tmp_path_factory.mktemp("fedrecon-cache")))
    yield
    mp.undo()


@pytest.fixture(params=["one-chunk", "many-chunks"])
def cpu_kernel(request, monkeypatch):
    """Small matrices through the CPU kernel (``_cpu_spmm``); ``many-chunks`` splits the
    columns every few."""
    monkeypatch.delenv(_cpu_spmm.ENV_VAR, raising=False)
    monkeypatch.setattr(_cpu_spmm, "MIN_NNZ", 0)
    if request.param == "many-chunks":
        monkeypatch.setattr(_cpu_spmm, "CHUNK_BYTES", 5 * 8 * 8)
    clear_projector_cache()  # no chunk layout memoised under another setting
    yield request.param
    clear_projector_cache()


def _dense_reference(op, t: torch.Tensor, transpose: bool) -> torch.Tensor:
    mat = op.matrices(torch.float64)[0].to_dense()
    if transpose:
        mat = mat.T
    in_shape, out_shape = (op.range_shape, op.domain_shape) if transpose else (op.domain_shape,
                                                                                op.range_shape)
    batch = t.shape[: t.ndim - 2]
    flat = t.to(torch.float64).reshape(-1, in_shape[0] * in_shape[1])
    return (flat @ mat.T).reshape(*batch, *out_shape)


@pytest.fixture
def dense_ref():
    """``dense_ref(op, t, transpose)``: a CT projector's float64 dense system matrix (built by
    the plain path) applied to ``t (..., *in_shape)``, the independent reference."""
    return _dense_reference


_INTERPRETER_PREAMBLE = textwrap.dedent('''
    import numpy as np
    from triton.runtime import interpreter as _interp

    # Triton 3.6's interpreter calls int() on 1-element arrays, an error under NumPy >= 2.5
    _orig = _interp._patch_lang_tensor
    def _patched(tensor, scope):
        _orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))
    _interp._patch_lang_tensor = _patched
''')


@pytest.fixture
def assert_adjoint():
    """``assert_adjoint(op)``: ``<A x, y> = <x, A^T y>`` to 1e-12 in float64 for a batch of 5
    random pairs."""
    def check(op) -> None:
        x = torch.randn(5, *op.domain_shape, dtype=torch.float64)
        y = torch.randn(5, *op.range_shape, dtype=torch.float64)
        lhs = (op.A(x) * y).sum()
        rhs = (x * op.A_adjoint(y)).sum()
        assert abs(float(lhs - rhs)) <= 1e-12 * float(lhs.abs() + rhs.abs())
    return check


@pytest.fixture
def run_interpreted():
    """Run a script in a fresh process, by default under Triton's interpreter
    (``TRITON_INTERPRET=1``, set before Triton is imported); it must print ``ok`` last."""
    def run(script: str, interpret: bool = True) -> None:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        if interpret:
            env["TRITON_INTERPRET"] = "1"
            script = _INTERPRETER_PREAMBLE + script
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                             text=True, check=False, timeout=600)
        assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
    return run
