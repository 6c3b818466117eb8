"""Region corruption (Menn, Liang, Marculescu): latent inversion (DDIM, ReNoise as published), masked
noise in the region, DDIM resampling, the paper's baselines, labels and confinement metrics.

May import: engines.models, engines.images, engines.progress, engines.generation.
"""
