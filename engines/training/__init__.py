"""Training: the artifact detector and region selector (`detector`, with `data`, `recipes`,
`resume` for checkpoints and resuming, and `parallel` for accelerate), the artifact classifier (`classifier`), and
tuning the diffusion model with a detector's map (`tune`, DiffDoctor stage 2, with `lora` for the adapter and
`tune_eval` for prompt splits, the loss and scoring) or a classifier's reward (`feedback`, DDPO on LoRA weights).

May import: engines.models, engines.checkpoints, engines.progress, engines.images, engines.generation,
engines.detection, engines.classification.
"""
