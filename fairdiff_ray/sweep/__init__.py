"""Sweeps: a base config plus a search space over any config path, run with Ray Tune (dist/tune.py)."""
