"""Shared fixtures: the offline demo pipeline, built once per test session, and a loaded engine.

Heavy imports (torch, diffusers) happen inside the fixtures, so tests that do not use them
(store, architecture, e2e) do not pay for them.
"""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH_THREADS = 2


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (opt in with `pytestmark = pytest.mark.usefixtures("one_thread")`):
    the tiny models run fastest on one thread and far slower with two threads on two shared, busy
    cores. The previous setting is restored after the module."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory) -> Path:
    """A data directory that holds the demo pipeline (seed 0), built once via ensure_demo_pipeline."""
    from engines.models import ensure_demo_pipeline

    data_dir = tmp_path_factory.mktemp("demo-data")
    ensure_demo_pipeline(data_dir)
    return data_dir


@pytest.fixture(scope="session")
def demo_dir(demo_data_dir) -> Path:
    """The saved demo pipeline folder (with model_index.json and the demo marker)."""
    from engines.models import DEMO_MARKER, demo_dir as demo_folder

    folder = demo_folder(demo_data_dir)
    assert (folder / DEMO_MARKER).is_file() and (folder / "model_index.json").is_file()
    return folder


@pytest.fixture(scope="session")
def text2image(demo_data_dir):
    """A TextToImage engine over the demo pipeline, loaded once on CPU in float32."""
    import torch

    from engines.generation.generate import TextToImage
    from engines.models import load_text2image

    torch.set_num_threads(TORCH_THREADS)
    return TextToImage(load_text2image("demo", data_dir=demo_data_dir, device="cpu"))


@pytest.fixture(scope="session")
def trajectory_generation(text2image):
    """(plain, traced): one 2-image, 4-step, 64x64 demo request run without and with record_trajectory."""
    from engines.generation.generate import GenerateParams

    base = dict(prompt="a cat", seed=5, num_inference_steps=4, width=64, height=64, num_images=2)
    return (text2image.generate(GenerateParams(**base)),
            text2image.generate(GenerateParams(**base, record_trajectory=True)))


@pytest.fixture(scope="session")
def untrained_detector_dir(tmp_path_factory) -> Path:
    """The tiny config-built UperNet with random weights (input 256; logits spread so its heatmap spans
    [0, 1]) as a checkpoint folder. For tests of detection, repair and tuning *mechanics*: it fires on
    arbitrary images, where the trained demo detector (clean for anything but corruptions) would leave
    nothing to act on. What the trained demo detector means is tested in tests/engines/test_demo_models.py."""
    from engines.detection.detectors import save_untrained_demo_detector

    return save_untrained_demo_detector(tmp_path_factory.mktemp("untrained-detector") / "detector")
