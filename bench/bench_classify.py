"""Classifier throughput: batched `ArtifactClassifier.classify` vs one-by-one on the same model.

VLM (a tiny config-built LLaVA, or --vlm FOLDER_OR_HUB_ID): yes/no option scoring of R regions x C classes.
- ours: `classify(images, regions, batch_size=R)`: per region, the C questions' common prefix (image,
  question, options) runs once with a KV cache and the C differing tails run as one batch on copies of it.
- ours without the shared prefix: all R x C full prompts in one padded forward.
- one-by-one: the same prompts, one full forward each (prompt, crop) -> next-token log-probs, as a plain
  script would.
Head (the demo CropNet): R crops in one forward vs one forward per crop. Both are interleaved in one run and the
results are checked to agree; the printed ratio is one-by-one time / batched time (higher = batching helps more).

    .venv/bin/python bench/bench_classify.py [--regions 8] [--classes 13] [--repeats 3] [--vlm FOLDER]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engines.classification import classify as C
from engines.classification.crops import crop_with_context, resize_rgb
from engines.classification.prompts import NO_SPELLINGS, YES_SPELLINGS, yesno_question
from engines.classification.vlm import option_probabilities, save_tiny_vlm


def one_by_one_vlm(clf: C.ArtifactClassifier, image, boxes, taxonomy) -> np.ndarray:
    vlm = clf.loaded.model
    yes_no = vlm.first_tokens([list(YES_SPELLINGS), list(NO_SPELLINGS)])
    out = []
    with torch.inference_mode():
        for box in boxes:
            crop = crop_with_context(image, box, clf.spec.context)
            row = []
            for k in range(len(taxonomy)):
                logp = vlm.next_token_logprobs([vlm.prompt(yesno_question(taxonomy, k, "crop"))], [crop])[0]
                row.append(option_probabilities(logp, yes_no)[0])
            out.append(row)
    return np.array(out)


def one_by_one_head(clf: C.ArtifactClassifier, image, boxes) -> np.ndarray:
    size, out = clf.spec.input_size, []
    with torch.inference_mode():
        for box in boxes:
            crop = resize_rgb(crop_with_context(image, box, clf.spec.context), size, size)
            x = torch.from_numpy(np.array(crop)).permute(2, 0, 1)[None].float() / 127.5 - 1
            out.append(torch.sigmoid(clf.loaded.model(x))[0].numpy())
    return np.array(out)


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regions", type=int, default=8)
    parser.add_argument("--classes", type=int, default=13, help="first N classes of the default taxonomy")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vlm", default=None, help="a real VLM folder or hub id (default: a tiny config-built LLaVA)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(__file__).resolve().parent.parent
    taxonomy = [{"name": c["name"], "definition": c["definition"]}
                for c in json.loads((root / "assets" / "taxonomy.json").read_text())["classes"][:args.classes]]
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    boxes = [tuple(int(v) for v in (x, y, x + 40, y + 40)) for x, y in rng.integers(0, 200, (args.regions, 2))]
    with tempfile.TemporaryDirectory() as tmp:
        source = args.vlm or str(save_tiny_vlm(Path(tmp) / "vlm", hidden_size=64, layers=2))
        vlm = C.ArtifactClassifier(C.load_classifier(f"vlm:{source}", taxonomy=taxonomy))
        batched = lambda: vlm.classify([image], [boxes], captions=False, batch_size=len(boxes))  # noqa: E731
        one = lambda: one_by_one_vlm(vlm, image, boxes, taxonomy)  # noqa: E731
        timed(batched, 1)  # warm-up
        t_one, ref = timed(one, args.repeats)
        t_batch, ours = timed(batched, args.repeats)
        vlm.loaded.model.prefix_cache = False
        t_plain, plain = timed(batched, args.repeats)
        vlm.loaded.model.prefix_cache = True
        diff = max(np.abs(np.array([[p for _, p in r.probabilities] for r in res]) - ref).max() for res in (ours, plain))
        print(f"VLM {'tiny LLaVA' if not args.vlm else args.vlm}: {args.regions} regions x {len(taxonomy)} classes "
              f"= {args.regions * len(taxonomy)} yes/no prompts")
        print(f"  one-by-one {t_one:.3f} s · batched {t_batch:.3f} s · ratio {t_one / t_batch:.2f}x · max |dp| {diff:.2e}")
        print(f"  (batched without the shared prefix: {t_plain:.3f} s, ratio {t_one / t_plain:.2f}x)")
    head = C.ArtifactClassifier(C.load_classifier("demo"))
    many = [tuple(int(v) for v in (x, y, x + 40, y + 40)) for x, y in rng.integers(0, 200, (64, 2))]
    batched = lambda: head.classify([image], [many], captions=False, batch_size=64)  # noqa: E731
    one = lambda: one_by_one_head(head, image, many)  # noqa: E731
    timed(batched, 1)
    t_one, ref = timed(one, args.repeats)
    t_batch, ours = timed(batched, args.repeats)
    diff = np.abs(np.array([[p for _, p in r.probabilities] for r in ours]) - ref).max()
    print(f"head (demo CropNet): 64 regions")
    print(f"  one-by-one {t_one:.3f} s · batched {t_batch:.3f} s · ratio {t_one / t_batch:.2f}x · max |dp| {diff:.2e}")


if __name__ == "__main__":
    main()
