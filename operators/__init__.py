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
from .ct import CTGeometry, FanBeam2D, ParallelBeam2D, clear_projector_cache
from .cone import ConeBeam3D, ConeGeometry
from .ct_noise import log_transform, simulate_low_dose, simulate_transmission
from .fbp import FILTERS, fbp, filter_sinogram, is_short_scan, parker_weights, ramp_filter
from .phantoms import MODIFIED_SHEPP_LOGAN, ellipse_line_integrals, shepp_logan
# --- MRI (section owned by the MRI work) -------------------------------------------------
from .coils import birdcage_maps, espirit_maps
from .masks import (
    CartesianMask,
    EquispacedFractionMask,
    EquispacedMask,
    MagicFractionMask,
    MagicMask,
    PoissonDiscMask,
    RandomMask,
    SampledMask,
    VariableDensityMask2D,
)
from .mri import MultiCoilMRI, SingleCoilMRI, fft2c, ifft2c, rss
# --- solvers (section owned by the solvers work) -----------------------------------------
from .linops import Diagonal, FiniteDifference2D, MatrixOperator
from .solvers import cg_sense, conjugate_gradient, total_variation, tv_reconstruction

__all__ = [name for name in dir() if not name.startswith("_")]
