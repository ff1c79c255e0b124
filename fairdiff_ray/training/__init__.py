"""Training-side model code: the fairness loss (loss.py) on top of the pure math in fairdiff_ray.core."""
