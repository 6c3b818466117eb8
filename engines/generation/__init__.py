"""Generation: text-to-image with seeds, progress and cancel (`generate`), detector-guided repair
(`repair`: detect -> mask -> inpaint -> re-score) and the late-step trajectory map (`trajectory`).

May import: engines.models, engines.progress, engines.images.
"""
