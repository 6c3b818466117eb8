"""The science: models, generation, detection, segmentation, corruption, training, classification.

No gradio, no sqlite, no argv, no environment lookups, never `studio` or `app` (tests/test_architecture.py).
Shared by every capability here: `images` (RGB uint8 HWC in, one-sentence errors), `progress` (progress and
cancel callables), `checkpoints` (safe reading), `models` (loading pipelines and the offline demo set) and
`registry` (a model kind -> its loader). A capability package may import these and the packages listed in
its own docstring; no import circles.
"""
