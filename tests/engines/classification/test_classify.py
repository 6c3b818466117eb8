"""engines.classification.classify: SynArtifact's template, option scoring on a tiny real LLaVA, the head, loading errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engines.classification import classify as C
from engines.classification.crops import crop_with_context, draw_box, resize_rgb
from engines.classification.prompts import (ANSWER_PREFIX, NO_SPELLINGS, YES_SPELLINGS, build_question, caption_prefix,
                                            cut_caption, parse_answer, render_answer, yesno_question)
from engines.classification.vlm import save_tiny_vlm
from engines.models import ModelNotFoundError

TAX = [{"name": "blur", "definition": "soft patch"}, {"name": "extra fingers", "definition": "too many"},
       {"name": "glow", "definition": ""}]


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return save_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm"), seed=3)


@pytest.fixture(scope="module")
def vlm(vlm_dir):
    return C.ArtifactClassifier(C.load_classifier(f"vlm:{vlm_dir}", taxonomy=TAX))


def rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------ template and parsing
def test_question_lists_options_with_explanations_and_the_reference_answer():
    q = build_question(TAX)
    assert "A. blur: soft patch" in q and "B. extra fingers: too many" in q and "\nC. glow\n" in q
    reference = q[q.index("reference answer: ") + len("reference answer: "):]
    assert parse_answer(reference, TAX) == [("blur", "where the artifact is and what is wrong")]
    assert "outlined region" in build_question(TAX, "box") and "crop around one region" in build_question(TAX, "crop")
    assert yesno_question(TAX, 1).endswith("does the image show option B (extra fingers)? Answer yes or no.")


def test_answers_render_and_parse_back():
    text = render_answer(TAX, [("glow", "  a halo\naround the lamp "), ("blur", None), ("hands", "six fingers")])
    data = json.loads(text)
    assert data == {"artifacts": [{"option": "C", "class": "glow", "caption": "a halo around the lamp"},
                                  {"option": "A", "class": "blur", "caption": "blur"}], "other": "six fingers"}
    assert parse_answer(text, TAX) == [("glow", "a halo around the lamp"), ("blur", "blur")]
    # letters win over names, names are case-insensitive, unknown items and non-JSON are dropped
    assert parse_answer('x {"artifacts": [{"option": "b"}, {"class": "GLOW", "caption": 3}, {"option": "Q"}]}', TAX) \
        == [("extra fingers", ""), ("glow", "3")]
    assert parse_answer("no json here", TAX) == [] and parse_answer("{broken", TAX) == []
    assert cut_caption('six \\"odd\\" fingers" , "x') == 'six "odd" fingers'
    with pytest.raises(ValueError, match="unique"):
        build_question([{"name": "a"}, {"name": "a"}])


# ------------------------------------------------------------------ option scoring vs a manual log-softmax
def manual_logprobs(vlm, prompt, picture):
    proc = vlm.loaded.model.processor
    from PIL import Image

    inputs = proc(text=[prompt], images=[Image.fromarray(picture)], return_tensors="pt")
    with torch.no_grad():
        logits = vlm.loaded.model.model(**inputs).logits[0, -1].float()
    return torch.log_softmax(logits, -1)


def first_ids(tokenizer, spellings):
    return {tokenizer.encode(s, add_special_tokens=False)[0] for s in spellings}


@pytest.mark.slow
def test_yes_no_scoring_matches_a_manual_log_softmax(vlm):
    image = rgb(40, 50, 1)
    (result,) = vlm.classify([image], captions=False)
    tok = vlm.loaded.model.tokenizer
    yes, no = first_ids(tok, YES_SPELLINGS), first_ids(tok, NO_SPELLINGS)
    yes, no = sorted(yes - no), sorted(no - yes)  # the byte tokenizer shares " " between " yes" and " no"
    assert yes and no and len(yes) == 2  # "y", "Y"
    for k, (name, p) in enumerate(result.probabilities):
        logp = manual_logprobs(vlm, vlm.loaded.model.prompt(yesno_question(TAX, k)), image)
        p_yes, p_no = logp[yes].exp().sum(), logp[no].exp().sum()
        assert name == TAX[k]["name"]
        assert p == pytest.approx(float(p_yes / (p_yes + p_no)), abs=1e-5)
    assert result.predicted == tuple(x for x in result.predicted if x.probability >= 0.5)


def test_letter_scoring_is_a_softmax_over_option_letters_and_captions_continue_the_answer(vlm_dir):
    clf = C.ArtifactClassifier(C.load_classifier(f"vlm:{vlm_dir}#scoring=letter", taxonomy=TAX))
    image = rgb(32, 32, 2)
    (result,) = clf.classify([image])
    vlm = clf.loaded.model
    logp = manual_logprobs(clf, vlm.prompt(build_question(TAX)) + ANSWER_PREFIX, image)
    groups = [first_ids(vlm.tokenizer, [L, " " + L]) for L in "ABC"]
    shared = groups[0] & groups[1]  # " A", " B", " C" all start with the byte token for " "
    assert shared and all(len(g - shared) == 1 for g in groups)
    masses = torch.stack([logp[sorted(g - shared)].exp().sum() for g in groups])
    assert [p for _, p in result.probabilities] == pytest.approx((masses / masses.sum()).tolist(), abs=1e-5)
    (pred,) = result.predicted  # letter scoring predicts the top option
    assert pred.class_name == TAX[int(masses.argmax())]["name"]
    prompt = vlm.prompt(build_question(TAX)) + caption_prefix(TAX, int(masses.argmax()))
    assert pred.caption == cut_caption(vlm.generate([prompt], [image], clf.spec.max_caption_tokens)[0])
    assert '"' not in pred.caption


def test_regions_crop_with_context_or_draw_the_box_and_batching_changes_nothing(vlm, vlm_dir):
    image = rgb(60, 80, 4)
    assert crop_with_context(image, (10, 20, 29, 29), 0.5).shape == (32, 40, 3)  # x 0..39; y 9..40 (min 32 px)
    assert crop_with_context(image, (10, 20, 29, 29), 0.5, min_side=8).shape == (20, 40, 3)  # y 15..34
    assert crop_with_context(image, (40, 30, 40, 30), 0.5, min_side=32).shape == (32, 32, 3)
    boxed = draw_box(image, (10, 20, 29, 29), width=2)
    assert (boxed[20, 15] == [255, 0, 0]).all() and (boxed[25, 15] == image[25, 15]).all()
    regions = [[(10, 20, 29, 29), (0, 0, 79, 59)], []]
    images = [image, rgb(20, 20, 5)]
    one = vlm.classify(images, regions, captions=False, batch_size=1)
    many = vlm.classify(images, regions, captions=False, batch_size=8)
    assert [(r.image_index, r.bbox) for r in many] == [(0, (10, 20, 29, 29)), (0, (0, 0, 79, 59))]
    for a, b in zip(one, many):
        assert [p for _, p in a.probabilities] == pytest.approx([p for _, p in b.probabilities], abs=1e-5)
    vlm.loaded.model.prefix_cache = False  # every question in full: the shared-prefix cache changes nothing
    try:
        full = vlm.classify(images, regions, captions=False, batch_size=8)
    finally:
        vlm.loaded.model.prefix_cache = True
    for a, b in zip(full, many):
        assert [p for _, p in a.probabilities] == pytest.approx([p for _, p in b.probabilities], abs=1e-5)
    assert vlm.loaded.model.shared_prefix
    boxes = C.ArtifactClassifier(C.load_classifier(f"vlm:{vlm_dir}#region=box", taxonomy=TAX))
    (r,) = boxes.classify([image], [[(10, 20, 29, 29)]], captions=False)
    assert r.probabilities != many[0].probabilities  # a different view of the region


def test_bad_input_is_one_clear_sentence(vlm, tmp_path):
    with pytest.raises(ValueError, match="outside the 50x40 image"):
        vlm.classify([rgb(40, 50)], [[(0, 0, 50, 10)]])
    with pytest.raises(ValueError, match="one list of regions per image"):
        vlm.classify([rgb(40, 50)], [])
    with pytest.raises(ValueError, match="uint8"):
        vlm.classify([np.zeros((4, 4, 3), np.float32)])
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1).save_pretrained(tmp_path / "llm")
    with pytest.raises(ValueError, match="is a llama model, not an image-text-to-text model"):
        C.load_classifier(f"vlm:{tmp_path / 'llm'}", taxonomy=TAX)
    with pytest.raises(ModelNotFoundError, match="has no config.json"):
        C.load_classifier(f"vlm:{tmp_path}", taxonomy=TAX)
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        C.load_classifier(f"head:{tmp_path / 'nope'}")
    with pytest.raises(ValueError, match="Unknown classifier"):
        C.load_classifier("clip:x")
    with pytest.raises(ValueError, match="Bad classifier option"):
        C.load_classifier(f"vlm:{tmp_path / 'llm'}#temperature=2")
    with pytest.raises(ValueError, match="Unknown scoring"):
        C.load_classifier("demo#scoring=logits")


# ------------------------------------------------------------------ the head
def test_a_saved_head_loads_and_scores_resized_crops_with_a_sigmoid(tmp_path):
    torch.manual_seed(0)
    net = C.build_crop_net(len(TAX), width=8)
    spec = C.ClassifierSpec(family="head", classes=tuple(TAX), input_size=32, threshold=0.4)
    folder = C.save_head(net, spec, tmp_path / "head", width=8, provenance={"test": True})
    clf = C.ArtifactClassifier(C.load_classifier(f"head:{folder}"))
    assert clf.fixed_classes and clf.spec.threshold == 0.4 and [c["name"] for c in clf.classes(["ignored"])] == ["blur", "extra fingers", "glow"]
    image = rgb(50, 70, 6)
    results = clf.classify([image], [[(20, 10, 39, 29)]])
    crop = resize_rgb(crop_with_context(image, (20, 10, 39, 29), 0.5), 32, 32)
    x = torch.from_numpy(crop).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        expected = torch.sigmoid(net.eval()(x))[0].tolist()
    assert [p for _, p in results[0].probabilities] == pytest.approx(expected, abs=1e-5)
    for pred in results[0].predicted:
        assert pred.probability >= 0.4 and pred.caption.startswith(pred.class_name)
    # the same folder also loads as a plain checkpoint folder
    assert C.load_classifier(str(folder)).extra.family == "head"
    (folder / C.CLASSIFIER_CONFIG).write_text(json.dumps({"family": "head", "classes": TAX[:2], "width": 8}))
    with pytest.raises(ValueError, match="does not fit a CropNet"):
        C.load_classifier(f"head:{folder}")


def test_the_demo_classifier_loads_offline_and_says_it_is_a_demo():
    clf = C.ArtifactClassifier(C.load_classifier("demo"))
    assert clf.loaded.is_demo and "Demo classifier" in clf.loaded.note
    assert [c["name"] for c in clf.classes()] == [c["name"] for c in json.loads(
        (C.DEMO_DIR.parent / "taxonomy.json").read_text())["classes"]]
    image = rgb(64, 64, 7)
    (r,) = clf.classify([image])
    assert r.is_demo and len(r.probabilities) == 13 and 0.0 <= r.artifact_probability <= 1.0
