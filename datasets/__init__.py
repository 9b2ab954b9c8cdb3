"""fedrecon.datasets: fastMRI-format loading, CT data and heterogeneous site simulation."""

# --- fastMRI (owned by the fastMRI work) ---
# --- synthetic + sites (owned by the sites work) ---
# --- CT (owned by the CT work) ---

__all__ = [name for name in dir() if not name.startswith("_")]
