"""fedrecon.datasets: fastMRI-format loading, CT data and heterogeneous site simulation."""
