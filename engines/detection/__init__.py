"""Detection: artifact heatmaps, regions, overlays and metrics (`detect`), loading every published
detector family into one shape (`detectors`, with `mmseg_convert` for mmsegmentation checkpoints), and the
RichHF-18k data the detectors are measured on (`richhf` reader, `richhf_prep` the paper's preprocessing).

May import: engines.models, engines.checkpoints, engines.progress, engines.images, engines.generation.
"""
