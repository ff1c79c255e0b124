"""Model seams: loading Stable Diffusion, adaptors, faces, classifiers, feature nets."""
