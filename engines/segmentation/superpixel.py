"""The offline segmentation backend: SLIC superpixels merged by colour, no weights (see `SuperpixelMasker`
in engines/segmentation/segment.py for what clicks select).

Implements the backend members of engines/segmentation/backend.py (its only sibling import); images
RGB uint8 HWC, masks bool[H, W] at the image's size. scikit-image and scipy are imported lazily.
"""
from __future__ import annotations

import numpy as np

from engines.segmentation.backend import ImageEmbedding, MaskProposal

SUPERPIXEL_NOTE = ("Approximate masks: no SAM weights are loaded, so clicks select SLIC superpixels merged by "
                   "colour; expect blocky edges. Load a SAM checkpoint (sam:/path/sam_vit_b_01ec64.pth) for real masks.")


class SuperpixelBackend:
    """SLIC over-segmentation + colour merges; see `SuperpixelMasker`. Embedding arrays:

    labels int32[h, w] (superpixel id per working-size pixel), groups int32[2, n] (id of each
    superpixel at the two merged levels), lab_sum/lab_sq float64[n, 3] and count int64[n] (colour
    statistics per superpixel, for scores), edges int32[m, 2] (adjacent superpixel pairs).
    """

    approximate = True
    note = SUPERPIXEL_NOTE
    logits_shape = None

    def __init__(self, *, n_segments: int = 400, compactness: float = 10.0, working_size: int = 512,
                 merge_thresholds: tuple[float, float] = (8.0, 16.0)):
        if n_segments < 2 or compactness <= 0 or working_size < 16 or len(merge_thresholds) != 2:
            raise ValueError("Superpixel settings need n_segments >= 2, compactness > 0, working_size >= 16 and "
                             "two merge thresholds.")
        import skimage

        self.n_segments, self.compactness = int(n_segments), float(compactness)
        self.working_size, self.merge_thresholds = int(working_size), tuple(float(t) for t in merge_thresholds)
        self.model_id = (f"superpixel:slic:n{self.n_segments}:c{self.compactness}:w{self.working_size}:"
                         f"t{self.merge_thresholds}")
        self.fingerprint = f"scikit-image {skimage.__version__}"

    def encode(self, rgb: np.ndarray) -> ImageEmbedding:
        from PIL import Image
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components
        from skimage.color import rgb2lab
        from skimage.segmentation import slic

        height, width = rgb.shape[:2]
        scale = min(1.0, self.working_size / max(height, width))
        h, w = max(1, round(height * scale)), max(1, round(width * scale))
        small = rgb if (h, w) == (height, width) else np.asarray(Image.fromarray(rgb).resize((w, h), Image.BILINEAR))
        raw = slic(small, n_segments=self.n_segments, compactness=self.compactness, start_label=0,
                   convert2lab=True, channel_axis=-1)
        _, labels = np.unique(raw, return_inverse=True)
        labels = labels.reshape(h, w).astype(np.int32)
        n = int(labels.max()) + 1
        lab = rgb2lab(small).reshape(-1, 3)
        flat = labels.ravel()
        count = np.bincount(flat, minlength=n).astype(np.int64)
        lab_sum = np.stack([np.bincount(flat, lab[:, c], minlength=n) for c in range(3)], axis=1)
        lab_sq = np.stack([np.bincount(flat, lab[:, c] ** 2, minlength=n) for c in range(3)], axis=1)
        pairs = np.concatenate([np.stack([labels[:, :-1].ravel(), labels[:, 1:].ravel()], 1),
                                np.stack([labels[:-1, :].ravel(), labels[1:, :].ravel()], 1)])
        pairs = np.sort(pairs[pairs[:, 0] != pairs[:, 1]], axis=1)
        edges = np.unique(pairs, axis=0).astype(np.int32).reshape(-1, 2)
        means = lab_sum / np.maximum(count, 1)[:, None]
        distance = np.linalg.norm(means[edges[:, 0]] - means[edges[:, 1]], axis=1) if len(edges) else np.zeros(0)
        groups = []
        for threshold in self.merge_thresholds:
            keep = edges[distance < threshold]
            graph = coo_matrix((np.ones(len(keep)), (keep[:, 0], keep[:, 1])), shape=(n, n))
            groups.append(connected_components(graph, directed=False)[1].astype(np.int32))
        arrays = {"labels": labels, "groups": np.stack(groups), "count": count, "lab_sum": lab_sum,
                  "lab_sq": lab_sq, "edges": edges}
        return ImageEmbedding(arrays=arrays, original_size=(height, width), input_size=(h, w))

    def check(self, arrays: dict, input_size: tuple[int, int]) -> str | None:
        need = {"labels", "groups", "count", "lab_sum", "lab_sq", "edges"}
        if set(arrays) != need:
            return f"arrays {sorted(arrays)} are not {sorted(need)}"
        labels, n = arrays["labels"], len(arrays["count"])
        if labels.shape != tuple(input_size) or labels.size == 0 or labels.min() < 0 or labels.max() >= n:
            return "label map does not fit"
        if arrays["groups"].shape != (2, n) or arrays["lab_sum"].shape != (n, 3) or arrays["lab_sq"].shape != (n, 3):
            return "segment tables do not fit"
        if arrays["edges"].size and (arrays["edges"].min() < 0 or arrays["edges"].max() >= n):
            return "edge list does not fit"
        return None

    def decode(self, embedding: ImageEmbedding, points, labels_, box, mask_input, multimask) -> list[MaskProposal]:
        arrays = embedding.arrays
        labels, count = arrays["labels"], arrays["count"]
        n = len(count)
        (height, width), (h, w) = embedding.original_size, embedding.input_size
        sy, sx = h / height, w / width
        levels = [np.arange(n, dtype=np.int32), arrays["groups"][0], arrays["groups"][1]]
        pos_ids = neg_ids = np.zeros(0, dtype=np.int32)
        if points is not None:
            rows = np.clip((points[:, 1] * sy).astype(int), 0, h - 1)
            cols = np.clip((points[:, 0] * sx).astype(int), 0, w - 1)
            under = labels[rows, cols]
            pos_ids, neg_ids = under[labels_ == 1], under[labels_ == 0]
        inside = None
        if box is not None:
            x0, x1 = int(np.floor(box[0] * sx)), int(np.ceil(box[2] * sx))
            y0, y1 = int(np.floor(box[1] * sy)), int(np.ceil(box[3] * sy))
            inside = np.bincount(labels[y0:y1, x0:x1].ravel(), minlength=n)
        seen: set[bytes] = set()
        proposals, chosen_sets = [], []
        for level in levels:
            ngroups = int(level.max()) + 1
            chosen = np.zeros(ngroups, dtype=bool)
            chosen[level[pos_ids]] = True
            if inside is not None:
                frac = np.bincount(level, inside, minlength=ngroups) / np.bincount(level, count, minlength=ngroups)
                chosen |= frac > 0.5
            chosen[level[neg_ids]] = False
            selected = chosen[level]  # per superpixel
            if not selected.any() and proposals:
                continue
            signature = np.packbits(selected).tobytes()
            if signature in seen:
                continue
            seen.add(signature)
            mask = self._upsample(selected[labels], height, width, sy, sx, h, w)
            proposals.append(MaskProposal(mask=mask, score=self._contrast(arrays, selected), logits=None))
            chosen_sets.append(selected)
        if multimask and proposals:  # SAM's shape: three proposals; grow the largest by rings of neighbours
            selected = max(chosen_sets, key=lambda sel: int(sel.sum()))
            while len(proposals) < 3 and len(arrays["edges"]):
                grown = selected.copy()
                a, b = selected[arrays["edges"][:, 0]], selected[arrays["edges"][:, 1]]
                grown[arrays["edges"][a, 1]] = True
                grown[arrays["edges"][b, 0]] = True
                if grown.sum() == selected.sum():
                    break
                selected = grown
                signature = np.packbits(selected).tobytes()
                if signature not in seen:
                    seen.add(signature)
                    proposals.append(MaskProposal(mask=self._upsample(selected[labels], height, width, sy, sx, h, w),
                                                  score=self._contrast(arrays, selected), logits=None))
                    chosen_sets.append(selected)
        proposals.sort(key=lambda p: -p.score)
        return proposals[:3] if multimask else proposals[:1]

    @staticmethod
    def _upsample(small: np.ndarray, height: int, width: int, sy: float, sx: float, h: int, w: int) -> np.ndarray:
        rows = np.minimum(((np.arange(height) + 0.5) * sy).astype(int), h - 1)
        cols = np.minimum(((np.arange(width) + 0.5) * sx).astype(int), w - 1)
        return np.take(np.take(small, rows, axis=0), cols, axis=1)

    @staticmethod
    def _contrast(arrays: dict, selected: np.ndarray) -> float:
        """d / (d + sigma_in + sigma_ring + 1): d = Lab distance between the region's mean colour and that of
        the superpixels touching it, sigma = their colour spreads. ~1 for a flat region on a different
        flat background, ~0 for part of a flat area. A heuristic, not a predicted IoU."""
        if not selected.any():
            return 0.0
        edges = arrays["edges"]
        touching = np.zeros_like(selected)
        if len(edges):
            a, b = selected[edges[:, 0]], selected[edges[:, 1]]
            touching[edges[a & ~b, 1]] = True
            touching[edges[b & ~a, 0]] = True
        if not touching.any():
            return 0.0

        def stats(which):
            n = arrays["count"][which].sum()
            mean = arrays["lab_sum"][which].sum(0) / n
            var = np.maximum(arrays["lab_sq"][which].sum(0) / n - mean ** 2, 0.0)
            return mean, float(np.sqrt(var.sum()))

        (mean_in, spread_in), (mean_out, spread_out) = stats(selected), stats(touching)
        d = float(np.linalg.norm(mean_in - mean_out))
        return d / (d + spread_in + spread_out + 1.0)
