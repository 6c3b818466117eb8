"""Segmentation: click-to-mask with Segment Anything (official and transformers back ends) and an
offline superpixel fallback; one image embedding per image, cached in memory and on disk.

May import: engines.models, engines.checkpoints, engines.images.
"""
