"""Classification (SynArtifact): an artifact class and a caption per image or region, from a
vision-language model, a light head on image features, or the demo classifier.

May import: engines.models, engines.checkpoints, engines.progress, engines.images, engines.detection.
"""
