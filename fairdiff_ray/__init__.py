"""fairdiff-ray: distributional alignment + adjusted DFT for fair text-to-image diffusion, on Ray."""

__version__ = "0.1.0"
