"""fedrecon.operators: differentiable, batched CT and MRI operators (CPU and CUDA).

Usable on its own, like sigpy or torch-radon::

    from fedrecon.operators import ParallelBeam2D, fbp
    ct = ParallelBeam2D(image_size=256, angles=angles, det_count=367)
    sino = ct(x)                  # (..., H, W) -> (..., n_angles, det_count)
    rec = fbp(ct, sino, filter="ramp")
"""

from .base import (
    AdjointOperator,
    ComposedOperator,
    Identity,
    LinearOperator,
    ScaledOperator,
    SumOperator,
    inner,
)
from .registry import OPERATOR_REGISTRY, make_operator, register_operator

# --- CT (section owned by the CT work) ---------------------------------------------------
# --- MRI (section owned by the MRI work) -------------------------------------------------
# --- solvers (section owned by the solvers work) -----------------------------------------

__all__ = [name for name in dir() if not name.startswith("_")]
