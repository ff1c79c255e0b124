"""The embedded synthetic world (issue 4): procedural portraits with known attributes (render.py), a prompt
vocabulary with skewed per-subject attribute distributions (vocab.py), the biased tiny Stable Diffusion
pretrained on them (pretrain.py), and the world's detector / classifier / feature nets (world.py)."""
