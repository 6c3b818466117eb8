"""Datasets made from sessions: leak-free family splits (`splits`), training samples for the detector and
the classifier, export to PNG/COCO/HF/SynArtifact/mmseg/VLM and import of masks made elsewhere, captions
files.

May import: studio.store, studio.safeio, engines.
"""
