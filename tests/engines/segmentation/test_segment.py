"""engines/segmentation/segment.py: SAM-shaped click-to-mask with an embedding cache, on tiny real models.

Tiny components (fixed seeds, CPU, well under a second each): a segment-anything `Sam` with a
2-block ViT at 256 px, a transformers `SamModel` with a 2-layer vision encoder at 256 px saved with
save_pretrained, and the weight-free superpixel fallback on a synthetic two-rectangle image.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from engines.models import ModelNotFoundError
from engines.segmentation.backend import MaskProposal
from engines.segmentation.sam_backends import load_sam_checkpoint, sam_type_from_name
from engines.segmentation.segment import SamMasker, SuperpixelMasker, load_segmenter, load_segmenter_model

ROOT = Path(__file__).resolve().parents[3]
SIZE = 256  # encoder input of both tiny SAMs -> 16x16 embedding, 64x64 logits


def build_tiny_sam(seed: int = 0):
    """segment-anything's public classes at 256 px: 2-block ViT (64 wide), 32-channel prompts; ~0.19M params."""
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(seed)
    emb = SIZE // 16
    return Sam(
        image_encoder=ImageEncoderViT(img_size=SIZE, patch_size=16, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2,
                                      out_chans=32, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                                      use_rel_pos=True, window_size=4, global_attn_indexes=(1,)),
        prompt_encoder=PromptEncoder(embed_dim=32, image_embedding_size=(emb, emb), input_image_size=(SIZE, SIZE),
                                     mask_in_chans=8),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=32, iou_head_depth=3, iou_head_hidden_dim=32,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64, num_heads=2)),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375],
    ).eval()


def make_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), (40, 120, 200), np.uint8)
    image[height // 6: height // 2, width // 10: width // 2] = (220, 60, 40)
    noise = rng.integers(-20, 21, image.shape)
    return np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module", autouse=True)
def _threads():
    import torch

    torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tiny_sam():
    return build_tiny_sam()


@pytest.fixture(scope="module")
def small():
    return make_image(300, 451)


@pytest.fixture(scope="module")
def sam_masker(tiny_sam, small):
    masker = SamMasker.from_sam(tiny_sam)
    masker.set_image(small)
    return masker


def same_proposals(a: list[MaskProposal], b: list[MaskProposal]) -> None:
    assert len(a) == len(b)
    for p, q in zip(a, b):
        assert np.array_equal(p.mask, q.mask)
        assert p.score == pytest.approx(q.score, abs=1e-6)
        if p.logits is None:
            assert q.logits is None
        else:
            np.testing.assert_allclose(p.logits, q.logits, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# segment-anything backend

def test_one_encoder_call_for_many_clicks_and_values_match_sam_predictor(tiny_sam, small):
    from segment_anything import SamPredictor

    masker = SamMasker.from_sam(tiny_sam)
    masker.set_image(small)
    masker.set_image(small)  # same pixels again: memory hit
    first = masker.predict([(100, 80)], [1])
    masker.predict([(100, 80), (300, 200)], [1, 0], multimask=False)
    masker.predict(box=(20, 30, 400, 280), previous_logits=first[0].logits)
    assert masker.encoder_calls == 1 and masker.memory_hits == 1 and masker.last_source == "memory"
    assert len(first) == 3
    assert [p.score for p in first] == sorted((p.score for p in first), reverse=True)
    for p in first:
        assert p.mask.dtype == bool and p.mask.shape == (300, 451)
        assert p.logits.dtype == np.float32 and p.logits.shape == (1, 64, 64)
    reference = SamPredictor(tiny_sam)
    reference.set_image(small)
    masks, scores, low_res = reference.predict(np.array([[100.0, 80.0]]), np.array([1]), multimask_output=True)
    best = int(np.argmax(scores))
    assert np.array_equal(first[0].mask, masks[best])
    assert first[0].score == pytest.approx(float(scores[best]), abs=1e-6)
    np.testing.assert_allclose(first[0].logits[0], low_res[best], atol=1e-5)
    assert 0.0 < first[0].mask.mean() < 1.0


def test_masks_at_native_size_for_non_square_images(tiny_sam):
    masker = SamMasker.from_sam(tiny_sam)
    tall = make_image(1536, 1024, seed=1)
    masker.set_image(tall)
    assert masker.image_size == (1536, 1024)
    for proposal in masker.predict([(500, 1200)], [1]) + masker.predict(box=(10, 20, 1000, 1500), multimask=False):
        assert proposal.mask.shape == (1536, 1024) and proposal.mask.dtype == bool


def test_predict_before_set_image_raises(tiny_sam):
    with pytest.raises(RuntimeError, match="call set_image first"):
        SamMasker.from_sam(tiny_sam).predict([(1, 1)], [1])
    with pytest.raises(RuntimeError, match="call set_image first"):
        SuperpixelMasker().predict([(1, 1)], [1])


@pytest.mark.parametrize("kwargs,words", [
    (dict(points=[(451, 10)], labels=[1]), "outside the 451x300 image"),
    (dict(points=[(10, -1)], labels=[1]), "outside"),
    (dict(points=[(10, 10), (20, 20)], labels=[1]), "labels has 1 entries but points has 2"),
    (dict(points=[(10, 10)], labels=[2]), "1 (positive) or 0 (negative)"),
    (dict(points=[10, 10], labels=[1]), "(x, y) pixel pairs"),
    (dict(), "needs a prompt"),
    (dict(points=[], labels=[]), "needs a prompt"),
    (dict(labels=[1]), "without points"),
    (dict(box=(50, 50, 40, 90)), "0 <= x0 < x1 <= 451"),
    (dict(box=(0, 0, 452, 100)), "0 <= x0 < x1 <= 451"),
    (dict(box=(0, 0, 10)), "four finite numbers"),
    (dict(points=[(5, 5)], labels=[1], previous_logits=np.zeros((1, 256, 256))), "shape (1, 64, 64)"),
])
def test_bad_prompts_raise_one_sentence(sam_masker, kwargs, words):
    with pytest.raises(ValueError) as info:
        sam_masker.predict(**kwargs)
    message = str(info.value)
    assert words in message and "\n" not in message


def test_bad_images_raise_value_error(sam_masker):
    for bad in (np.zeros((10, 10), np.uint8), np.zeros((10, 10, 3), np.float32), np.zeros((0, 5, 3), np.uint8), "x"):
        with pytest.raises(ValueError, match="RGB uint8|no pixels"):
            sam_masker.set_image(bad)


def test_disk_cache_survives_a_restart_with_identical_masks(tiny_sam, small, tmp_path):
    from safetensors import safe_open

    first = SamMasker.from_sam(tiny_sam, cache_dir=tmp_path)
    first.set_image(small)
    before = first.predict([(100, 80), (300, 200)], [1, 0])
    assert first.flush(timeout=600)
    path = first.cache_path(small)
    with safe_open(str(path), framework="np") as handle:
        assert set(handle.keys()) == {"features", "original_size", "input_size"}
        assert handle.get_tensor("features").shape == (1, 32, 16, 16)
        assert handle.get_tensor("original_size").tolist() == [300, 451]
        assert handle.get_tensor("input_size").tolist() == [170, 256]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp file left behind

    restarted = SamMasker.from_sam(build_tiny_sam(seed=0), cache_dir=tmp_path)  # same weights, new objects
    restarted.set_image(small)
    assert restarted.encoder_calls == 0 and restarted.last_source == "disk" and restarted.disk_hits == 1
    same_proposals(before, restarted.predict([(100, 80), (300, 200)], [1, 0]))

    other_weights = SamMasker.from_sam(build_tiny_sam(seed=1), cache_dir=tmp_path)
    other_weights.set_image(small)  # a different checkpoint must not reuse this embedding
    assert other_weights.encoder_calls == 1 and other_weights.model_key != first.model_key


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other-image"])
def test_corrupt_cache_file_is_ignored_and_recomputed(tiny_sam, small, tmp_path, damage):
    masker = SamMasker.from_sam(tiny_sam, cache_dir=tmp_path)
    masker.set_image(small)
    before = masker.predict([(200, 100)], [1])
    assert masker.flush(timeout=600)
    path = masker.cache_path(small)
    if damage == "garbage":
        path.write_bytes(b"this is not a safetensors file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-100])
    else:
        other = make_image(300, 451, seed=5)
        masker.set_image(other)
        assert masker.flush(timeout=600)
        path.write_bytes(masker.cache_path(other).read_bytes())
    fresh = SamMasker.from_sam(tiny_sam, cache_dir=tmp_path)
    fresh.set_image(small)
    assert fresh.encoder_calls == 1 and fresh.last_source == "encoder" and len(fresh.cache_problems) == 1
    same_proposals(before, fresh.predict([(200, 100)], [1]))
    assert fresh.flush(timeout=600)
    again = SamMasker.from_sam(tiny_sam, cache_dir=tmp_path)  # the file was rewritten
    again.set_image(small)
    assert again.encoder_calls == 0 and again.last_source == "disk"


def test_cold_click_answers_before_the_cache_file_is_written(tiny_sam, small, tmp_path):
    """The disk write happens after set_image returns: a stalled disk never delays the first click."""
    import threading

    masker = SamMasker.from_sam(tiny_sam, cache_dir=tmp_path, memory_entries=0)
    release, writing = threading.Event(), threading.Event()
    real_put = masker._disk_put

    def slow_put(digest, embedding):
        writing.set()
        release.wait(60)
        real_put(digest, embedding)

    masker._disk_put = slow_put
    done = threading.Event()
    answer = []

    def click():
        masker.set_image(small)
        answer.append(masker.predict([(100, 80)], [1]))
        done.set()

    threading.Thread(target=click, daemon=True).start()
    assert done.wait(60), "set_image + predict waited for the disk write"
    assert writing.wait(600) and not masker.cache_path(small).exists() and not masker.flush(timeout=0.05)
    masker.set_image(small)  # memory_entries=0: found among the pending writes, not re-encoded
    assert masker.encoder_calls == 1 and masker.last_source == "memory"
    release.set()
    assert masker.flush(timeout=600) and masker.cache_path(small).is_file()
    restarted = SamMasker.from_sam(tiny_sam, cache_dir=tmp_path)
    restarted.set_image(small)
    assert restarted.last_source == "disk"
    same_proposals(answer[0], restarted.predict([(100, 80)], [1]))


def test_memory_cache_is_lru(tiny_sam):
    masker = SamMasker.from_sam(tiny_sam, memory_entries=2)
    images = [make_image(64, 96, seed=s) for s in range(3)]
    for image in images:
        masker.set_image(image)
    assert masker.encoder_calls == 3
    masker.set_image(images[2])
    masker.set_image(images[1])
    assert masker.encoder_calls == 3 and masker.last_source == "memory"
    masker.set_image(images[0])  # evicted (least recently used)
    assert masker.encoder_calls == 4 and masker.last_source == "encoder"
    masker.set_image(images[1])  # still there; images[2] is now the oldest
    assert masker.encoder_calls == 4
    masker.set_image(images[2])
    assert masker.encoder_calls == 5


def test_prefetch_then_set_image_hits_the_cache(tiny_sam, small, tmp_path):
    masker = SamMasker.from_sam(tiny_sam, cache_dir=tmp_path)
    masker.set_image(small)
    upcoming = [make_image(200, 320, seed=s) for s in (11, 12)]
    assert masker.prefetch(upcoming + [small]) == 2  # the current image is already cached
    clicks_meanwhile = masker.predict([(100, 80)], [1])  # answered while the worker encodes
    assert masker.wait_prefetch(timeout=600)
    assert masker.encoder_calls == 3 and not masker.prefetch_errors
    assert masker.prefetch(upcoming) == 0
    masker.set_image(upcoming[1])
    assert masker.encoder_calls == 3 and masker.last_source == "memory"
    assert all(masker.cache_path(image).is_file() for image in upcoming)
    reference = SamMasker.from_sam(tiny_sam)
    reference.set_image(upcoming[1])
    same_proposals(reference.predict([(50, 60)], [1]), masker.predict([(50, 60)], [1]))
    reference.set_image(small)
    same_proposals(reference.predict([(100, 80)], [1]), clicks_meanwhile)
    masker.close()


def test_official_checkpoint_file_loads_with_a_builder(tiny_sam, small, tmp_path):
    import torch

    path = tmp_path / "sam_vit_b_tiny.pth"
    torch.save(tiny_sam.state_dict(), path)
    sam, model_id, fingerprint = load_sam_checkpoint(path, builder=partial(build_tiny_sam, seed=7))
    assert model_id.startswith("custom:") and len(fingerprint) == 64
    masker = SamMasker.from_checkpoint(path, builder=partial(build_tiny_sam, seed=7), cache_dir=tmp_path / "cache")
    masker.set_image(small)
    reference = SamMasker.from_sam(tiny_sam)
    reference.set_image(small)
    same_proposals(reference.predict([(120, 90)], [1]), masker.predict([(120, 90)], [1]))


def test_sam_type_from_official_file_names():
    assert sam_type_from_name("/m/sam_vit_b_01ec64.pth") == "vit_b"
    assert sam_type_from_name("sam_vit_l_0b3195.pth") == "vit_l"
    assert sam_type_from_name("sam_vit_h_4b8939.pth") == "vit_h"
    assert sam_type_from_name("sam-vit-b.pth") == "vit_b"
    assert sam_type_from_name("model.pth") is None


def test_wrong_architecture_file_gives_one_sentence_naming_keys(tiny_sam, tmp_path):
    import torch

    path = tmp_path / "sam_vit_b_tiny.pth"
    torch.save(tiny_sam.state_dict(), path)
    with pytest.raises(ValueError) as info:  # the real vit_b registry build (checked on the meta device: fast)
        load_segmenter(f"sam:{path}")
    message = str(info.value)
    assert "is not a SAM vit_b checkpoint" in message and "wrong shape" in message
    assert "image_encoder." in message and "\n" not in message
    other = tmp_path / "weights.pth"
    torch.save({"backbone.weight": torch.zeros(3)}, other)
    with pytest.raises(ValueError, match=r"missing \(image_encoder\.pos_embed"):
        load_segmenter(f"sam-vit_b:{other}")
    with pytest.raises(ValueError, match="Cannot tell the SAM model type"):
        load_segmenter(f"sam:{other}")


class _MakesDirectory:
    """Unpickling this runs os.mkdir(target): code execution with a visible trace."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_malicious_pickle_is_refused(tmp_path):
    import torch

    sentinel = tmp_path / "pwned"
    path = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save({"image_encoder.pos_embed": _MakesDirectory(str(sentinel))}, path)
    with pytest.raises(ValueError, match="Refusing to load"):
        load_segmenter(f"sam:{path}")
    assert not sentinel.exists()
    torch.load(path, weights_only=False)  # proof that the file really runs code when unpickled unsafely
    assert sentinel.exists()


def test_missing_files_and_unknown_specs(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_segmenter(f"sam:{tmp_path}/sam_vit_b_01ec64.pth")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_segmenter(f"hf-sam:{tmp_path}/no-such-folder")
    with pytest.raises(ValueError, match="Unknown segmenter 'mobile-sam:x'"):
        load_segmenter("mobile-sam:x")
    with pytest.raises(ValueError, match="names no file"):
        load_segmenter("sam:")


# ----------------------------------------------------------------------------------------------
# transformers backend

@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    import torch
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    config = SamConfig(
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=SIZE, patch_size=16,
                           output_channels=32, window_size=4, global_attn_indexes=[1], mlp_dim=64, num_pos_feats=16),
        prompt_encoder_config=dict(hidden_size=32, image_size=SIZE, patch_size=16, mask_input_channels=8),
        mask_decoder_config=dict(hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2,
                                 iou_head_hidden_dim=32),
    )
    torch.manual_seed(0)
    model = SamModel(config).eval()
    processor = SamProcessor(SamImageProcessor(size={"longest_edge": SIZE}, pad_size={"height": SIZE, "width": SIZE},
                                               mask_size={"longest_edge": SIZE // 4},
                                               mask_pad_size={"height": SIZE // 4, "width": SIZE // 4}))
    folder = tmp_path_factory.mktemp("tiny-hf-sam")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_transformers_sam_from_a_saved_folder(hf_folder, small, tmp_path):
    import torch
    from transformers import SamModel, SamProcessor

    masker = load_segmenter(f"hf-sam:{hf_folder}", cache_dir=tmp_path)
    assert not masker.approximate
    masker.set_image(small)
    proposals = masker.predict([(100, 80)], [1])
    masker.predict(box=(20, 30, 400, 280), multimask=False)
    masker.predict([(100, 80), (300, 200)], [1, 0], previous_logits=proposals[0].logits)
    assert masker.encoder_calls == 1 and len(proposals) == 3
    assert [p.score for p in proposals] == sorted((p.score for p in proposals), reverse=True)
    for p in proposals:
        assert p.mask.shape == (300, 451) and p.mask.dtype == bool and p.logits.shape == (1, 64, 64)

    # the same answer as the documented transformers pipeline (processor -> model -> post_process_masks)
    model, processor = SamModel.from_pretrained(hf_folder), SamProcessor.from_pretrained(hf_folder)
    inputs = processor(images=small, input_points=[[[100, 80]]], input_labels=[[1]], return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=inputs["pixel_values"], input_points=inputs["input_points"],
                    input_labels=inputs["input_labels"])
    masks = processor.post_process_masks(out.pred_masks, inputs["original_sizes"], inputs["reshaped_input_sizes"])[0][0]
    best = int(out.iou_scores[0, 0].argmax())
    assert proposals[0].score == pytest.approx(float(out.iou_scores[0, 0, best]), abs=1e-5)
    assert (masks[best].numpy() == proposals[0].mask).mean() > 0.999

    restarted = load_segmenter(f"hf-sam:{hf_folder}", cache_dir=tmp_path)
    restarted.set_image(small)
    assert restarted.encoder_calls == 0 and restarted.last_source == "disk"
    same_proposals(proposals, restarted.predict([(100, 80)], [1]))

    tall = make_image(1536, 1024, seed=2)
    restarted.set_image(tall)
    assert restarted.predict([(900, 100)], [1])[0].mask.shape == (1536, 1024)


# ----------------------------------------------------------------------------------------------
# superpixel fallback

@pytest.fixture(scope="module")
def rectangles():
    image = np.full((300, 451, 3), (40, 120, 200), np.uint8)
    image[50:200, 40:180] = (220, 60, 40)
    image[100:260, 260:420] = (30, 200, 60)
    a = np.zeros(image.shape[:2], bool)
    a[50:200, 40:180] = True
    b = np.zeros(image.shape[:2], bool)
    b[100:260, 260:420] = True
    return image, a, b


def iou(x: np.ndarray, y: np.ndarray) -> float:
    return float((x & y).sum() / (x | y).sum())


def test_superpixel_clicks_select_flat_regions(rectangles):
    image, a, b = rectangles
    masker = load_segmenter("superpixel")
    assert isinstance(masker, SuperpixelMasker) and masker.approximate and "Approximate" in masker.note
    masker.set_image(image)
    best = masker.predict([(100, 120)], [1])
    assert iou(best[0].mask, a) > 0.9 and best[0].logits is None and best[0].mask.shape == (300, 451)
    assert best[0].score > 0.9 and all(p.score < best[0].score for p in best[1:])
    # three distinct proposals like SAM's, even where the colour levels agree (a flat rectangle)
    assert len(best) == 3 and len({p.mask.tobytes() for p in best}) == 3
    assert any((p.mask | best[0].mask).sum() == p.mask.sum() > best[0].mask.sum() for p in best[1:])  # a grown one
    both = masker.predict([(100, 120), (300, 150)], [1, 1])[0].mask
    assert iou(both, a | b) > 0.9
    minus = masker.predict([(100, 120), (300, 150), (350, 200)], [1, 1, 0])[0].mask
    assert iou(minus, a) > 0.9 and not (minus & b).any()
    boxed = masker.predict(box=(250, 90, 430, 270))[0].mask
    assert iou(boxed, b) > 0.9
    assert len(masker.predict([(100, 120)], [1], multimask=False)) == 1
    assert masker.encoder_calls == 1


def test_superpixel_native_size_and_disk_cache(rectangles, tmp_path):
    from PIL import Image

    image, a, _ = rectangles
    tall = np.asarray(Image.fromarray(image).resize((1024, 1536), Image.NEAREST))
    tall_a = np.asarray(Image.fromarray(a).resize((1024, 1536), Image.NEAREST))
    first = SuperpixelMasker(cache_dir=tmp_path)
    first.set_image(Image.fromarray(tall))  # PIL RGB is accepted too
    before = first.predict([(300, 600)], [1])
    assert before[0].mask.shape == (1536, 1024) and iou(before[0].mask, tall_a) > 0.9
    assert first.flush(timeout=600)
    restarted = SuperpixelMasker(cache_dir=tmp_path)
    restarted.set_image(tall)
    assert restarted.encoder_calls == 0 and restarted.last_source == "disk"
    same_proposals(before, restarted.predict([(300, 600)], [1]))


def test_loaded_model_wrapper(tmp_path):
    loaded = load_segmenter_model(None, data_dir=tmp_path)
    assert loaded.kind == "segmenter" and loaded.is_demo and isinstance(loaded.model, SuperpixelMasker)
    assert loaded.model.cache_dir == tmp_path / "cache" / "segment"


def test_importing_the_engine_is_light():
    code = ("import json, sys, engines.segmentation.segment; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'transformers', 'segment_anything', 'skimage', 'gradio'})))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
