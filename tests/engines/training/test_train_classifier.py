"""engines.training.classifier: the metrics, the head trainer (with resume), and LoRA on a tiny real LLaVA."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from engines.classification import classify as C
from engines.classification.prompts import build_question, parse_answer
from engines.classification.vlm import save_tiny_vlm
from engines.training.classifier import (ClassifierSample, ClassifierTrainConfig, classification_metrics, train_head,
                                      train_vlm, vlm_batch, vlm_pairs)

TAX = [{"name": "red", "definition": "a red blob"}, {"name": "blue", "definition": "a blue blob"}]


def test_metrics_per_class_micro_macro_and_exact_match():
    truth = [("a",), ("a", "b"), (), ("c",)]
    pred = [("a",), ("a",), ("b",), ("a", "c")]
    m = classification_metrics(truth, pred, ["a", "b", "c"])
    assert m["per_class"]["a"] == {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2}
    assert m["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["per_class"]["c"]["f1"] == 1.0
    # micro: tp 3, fp 2, fn 1
    assert m["micro_precision"] == pytest.approx(3 / 5) and m["micro_recall"] == pytest.approx(3 / 4)
    assert m["micro_f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.0 + 1.0) / 3)
    assert m["exact_match"] == 0.25 and m["samples"] == 4
    assert classification_metrics([()], [()], ["a"])["macro_f1"] is None  # no class has support


def blob_samples(n, seed, family="f"):
    """64x64 grey noise with a red, a blue, or no blob at a random place; the bbox is the blob's."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = rng.integers(90, 160, (48, 48, 3)).astype(np.uint8)
        kind = ("red", "blue", None)[i % 3]
        y, x = rng.integers(4, 28, 2)
        if kind:
            img[y:y + 14, x:x + 14] = (230, 30, 30) if kind == "red" else (30, 30, 230)
        out.append(ClassifierSample(image=img, bbox=(int(x), int(y), int(x) + 13, int(y) + 13),
                                    classes=(kind,) if kind else (), captions=(f"a {kind} square",) if kind else (),
                                    family=f"{family}{i}"))
    return out


def test_the_head_learns_from_regions_and_resumes(tmp_path):
    torch.manual_seed(0)
    train, val = blob_samples(30, 0), blob_samples(12, 1, "v")
    config = ClassifierTrainConfig(steps=30, batch_size=16, lr=5e-3, eval_every=15, width=8, input_size=32)
    rows = []
    result = train_head(config, TAX, train, val, tmp_path / "run", log=rows.append)
    assert result.steps_done == 30 and not result.stopped
    assert rows[0]["step"] == 0 and rows[0]["micro_f1"] == result.zero_shot["micro_f1"]
    assert result.tuned["micro_f1"] > result.zero_shot["micro_f1"] and result.tuned["micro_f1"] >= 0.8
    best = C.ArtifactClassifier(C.load_classifier(result.best_dir))
    (r,) = best.classify([val[0].image], [[val[0].bbox]])
    assert [p.class_name for p in r.predicted] == ["red"]
    # resume: a longer run in the same folder continues from step 30
    more = train_head(ClassifierTrainConfig(**{**config.__dict__, "steps": 35}), TAX, train, val, tmp_path / "run")
    assert more.steps_done == 35 and [h["step"] for h in more.history][-5:] == list(range(31, 36))
    assert more.zero_shot == result.zero_shot
    saved = json.loads((tmp_path / "run" / "train_classifier.json").read_text())
    assert saved["result"]["steps_done"] == 35
    # a head initialised from another head keeps the backbone; a stop saves and reports
    stopped = train_head(config, TAX + [{"name": "green"}], train, val, tmp_path / "other", init=best.loaded,
                         should_stop=lambda: True)
    assert stopped.stopped and stopped.steps_done == 0
    with pytest.raises(ValueError, match="No training samples"):
        train_head(config, TAX, [], val, tmp_path / "empty")


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return save_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm"), seed=1, image_size=16)


def test_training_pairs_label_only_the_answer(vlm_dir):
    loaded = C.load_classifier(f"vlm:{vlm_dir}", taxonomy=TAX)
    sample = blob_samples(1, 3)[0]
    pairs = vlm_pairs(sample, TAX, "crop", np.random.default_rng(0))
    (picture, question, answer), (_, yes_q, yes_a) = pairs
    assert question == build_question(TAX, "crop")
    assert parse_answer(answer, TAX) == [("red", "a red square")]
    assert yes_q.startswith(build_question(TAX, "crop")) and yes_a in ("yes", "no")
    assert yes_a == "yes" if "option A" in yes_q else yes_a == "no"
    batch = vlm_batch(loaded.model, pairs)
    tok = loaded.model.tokenizer
    for row, (_, _, ans) in zip(range(2), pairs):
        labelled = batch["labels"][row][batch["labels"][row] != -100]
        assert tok.decode(labelled).startswith(ans + "</s>")  # the tiny template ends a turn with "</s>\n"


@pytest.mark.slow
def test_lora_fine_tuning_on_a_tiny_llava_learns_and_saves_a_loadable_checkpoint(vlm_dir, tmp_path):
    loaded = C.load_classifier(f"vlm:{vlm_dir}", taxonomy=TAX)
    base_model = loaded.model.model
    train = blob_samples(6, 0)
    val = blob_samples(3, 5, "v")
    config = ClassifierTrainConfig(steps=12, batch_size=2, lr=2e-2, eval_every=12, lora=True, lora_rank=4)
    rows = []
    result = train_vlm(config, loaded, TAX, train, val, tmp_path / "run", base=str(vlm_dir), log=rows.append)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert np.mean(losses[-4:]) < np.mean(losses[:4])
    assert set(result.zero_shot) >= {"micro_f1", "macro_f1", "exact_match", "per_class"}
    assert result.tuned and result.steps_done == 12
    meta = json.loads((tmp_path / "run" / "best" / "classifier.json").read_text())
    assert meta["family"] == "vlm" and meta["adapter"] == "lora" and meta["base"] == str(vlm_dir)
    # the caller's model is back without adapter layers
    assert loaded.model.model is base_model or not any("lora_" in n for n, _ in loaded.model.model.named_parameters())
    assert not any("lora_" in n for n, _ in loaded.model.model.named_parameters())
    tuned = C.ArtifactClassifier(C.load_classifier(str(tmp_path / "run" / "best")))
    base = C.ArtifactClassifier(C.load_classifier(f"vlm:{vlm_dir}", taxonomy=TAX))
    a = tuned.classify([val[0].image], [[val[0].bbox]], captions=False)[0].probabilities
    b = base.classify([val[0].image], [[val[0].bbox]], captions=False)[0].probabilities
    assert a != b


def test_full_language_model_fine_tuning_saves_a_standalone_checkpoint(vlm_dir, tmp_path):
    loaded = C.load_classifier(f"vlm:{vlm_dir}", taxonomy=TAX)
    before = {n: p.detach().clone() for n, p in loaded.model.model.named_parameters()}
    config = ClassifierTrainConfig(steps=2, batch_size=1, lr=1e-3, eval_every=2, lora=False)
    result = train_vlm(config, loaded, TAX, blob_samples(3, 0), [], tmp_path / "full", base=str(vlm_dir))
    assert result.steps_done == 2 and result.zero_shot == {} and result.tuned == {}
    meta = json.loads((tmp_path / "full" / "best" / "classifier.json").read_text())
    assert meta["adapter"] is None and meta["base"] == str(tmp_path / "full" / "best" / "model")
    tuned = C.load_classifier(str(tmp_path / "full" / "best"))
    changed = [n for n, p in tuned.model.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all("vision" not in n for n in changed)  # the vision tower stays frozen
