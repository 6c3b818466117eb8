"""What makes a detector training run resumable: checkpoint folders swapped in by rename
(`save_checkpoint`), the trainer state read back on resume (`existing_last`, `read_state`, the optimizer's
tensors flattened to safetensors and back), `metrics.jsonl` cut back to the resumed step
(`truncate_metrics`), and torch's RNG seeded per step (`step_rng`, `step_seed`) so no RNG state is saved.

Checkpoints are our detector format (`save_detector`: model.safetensors + detector.json, loadable by
`load_detector(folder)`; the provenance holds the full config, its recipe name and the device); `last`
also holds the trainer state: `optimizer.safetensors` (AdamW tensors) and `trainer_state.json`. Folders
are swapped in by rename, so a killed run leaves a whole checkpoint. Metric rows go to `log(row)` and
`out_dir/metrics.jsonl`.

All randomness is a function of (seed, step): the sampler and the augmentation use
`numpy.random.default_rng([seed, step, ...])`, and the model's own randomness (drop-path in Swin) runs
under `torch.random.fork_rng` seeded from (seed, step), so the caller's global RNG is untouched and no
RNG state needs saving: a run stopped at any step and resumed (`resume=True`, same config and data)
gives the same parameters as an uninterrupted run (bit-exact on CPU; on CUDA up to cuDNN's
nondeterministic kernels unless the caller enables torch's deterministic mode). Resuming with a
different config (other than `steps`, `eval_every`, `log_every`) or different data raises ValueError;
`resume=False` starts over in the same folder.

Used by `detector`; imports no sibling module.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

LAST, BEST = "last", "best"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RESUMABLE_CHANGES = ("steps", "eval_every", "log_every")


def save_checkpoint(folder: Path, model, spec, provenance: dict, optimizer=None, state: dict | None = None) -> None:
    """Write a detector (plus optional trainer state) into a staging folder, then swap it in by rename."""
    from safetensors.torch import save_file

    from engines.detection.detectors import save_detector

    staging = folder.with_name(f".{folder.name}.staging-{os.getpid()}")
    save_detector(model, spec, staging, provenance)
    if optimizer is not None:
        save_file(_optimizer_to_flat(optimizer), str(staging / OPTIMIZER_FILE))
        (staging / STATE_FILE).write_text(json.dumps(state, indent=2))
    old = folder.with_name(f".{folder.name}.old")
    remove_path(old)
    if folder.exists():
        os.replace(folder, old)
    os.replace(staging, folder)
    remove_path(old)


def existing_last(out: Path) -> Path | None:
    """out/last, or out/.last.old when a run was killed between the two renames of a save."""
    for folder in (out / LAST, out / f".{LAST}.old"):
        if (folder / STATE_FILE).is_file() and (folder / OPTIMIZER_FILE).is_file():
            return folder
    return None


def read_state(folder: Path, config, fingerprint: str) -> dict | None:  # config: a detector.TrainConfig
    state = json.loads((folder / STATE_FILE).read_text())
    saved = {k: v for k, v in state["config"].items() if k not in RESUMABLE_CHANGES}
    now = {k: v for k, v in config.to_json().items() if k not in RESUMABLE_CHANGES}
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        raise ValueError(f"'{folder}' was trained with a different config ({', '.join(changed)} changed); resume with the "
                         "same config, or pass resume=False / a new folder to start over.")
    if state["data_fingerprint"] != fingerprint:
        raise ValueError(f"'{folder}' was trained on different images or masks; resume with the same data, or pass "
                         "resume=False / a new folder (or fine-tune with arch=that folder).")
    if int(state["step"]) > config.steps:
        raise ValueError(f"'{folder}' has already trained {state['step']} steps, more than the {config.steps} asked for.")
    return state


def _optimizer_to_flat(optimizer) -> dict:
    flat = {}
    for idx, values in optimizer.state_dict()["state"].items():
        for name, tensor in values.items():
            flat[f"{idx}.{name}"] = tensor.detach().cpu().contiguous()
    return flat


def param_groups_json(optimizer) -> list:
    return json.loads(json.dumps(optimizer.state_dict()["param_groups"], default=list))


def optimizer_from_flat(optimizer, flat: dict, param_groups: list) -> dict:
    state: dict[int, dict] = {}
    for key, tensor in flat.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = tensor
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in param_groups]
    return {"state": state, "param_groups": groups}


def truncate_metrics(path: Path, step: int) -> list[dict]:
    """Rows of metrics.jsonl up to `step` (rows of a killed session after its last checkpoint are dropped)."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    keep = [r for r in rows if r["step"] <= step]
    if len(keep) != len(rows):
        path.write_text("".join(json.dumps(r) + "\n" for r in keep))
    return keep


def step_rng(seed: int, cuda_index: int | None):
    """Context in which torch's CPU (and the training GPU's) RNG is seeded with `seed`; the caller's
    RNG states are restored afterwards."""
    import contextlib

    import torch

    stack = contextlib.ExitStack()
    stack.enter_context(torch.random.fork_rng(devices=[] if cuda_index is None else [cuda_index]))
    torch.default_generator.manual_seed(seed)
    if cuda_index is not None:
        with torch.cuda.device(cuda_index):
            torch.cuda.manual_seed(seed)
    return stack


def step_seed(seed: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, step, 2]).generate_state(1, np.uint64)[0] >> 1)


def remove_path(path: Path) -> None:
    from engines.models import remove_tree

    if path.is_dir():
        remove_tree(path)
    elif path.exists():
        path.unlink()
