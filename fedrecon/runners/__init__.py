"""fedrecon.runners: the embedded simulation runner (and, later, Flower)."""
