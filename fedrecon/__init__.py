"""fedrecon: physics-informed federated learning of medical image reconstruction.

The physics stays at the site, the prior travels. Subpackages:

- :mod:`fedrecon.operators` -- differentiable CT and MRI forward/adjoint operators, solvers.
- :mod:`fedrecon.datasets` -- fastMRI-format data, CT data, heterogeneous site simulation.
"""

__version__ = "0.1.0"
