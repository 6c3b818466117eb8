"""Convert UperNet checkpoints trained with mmsegmentation into transformers' UperNetForSemanticSegmentation keys.

Pure key mapping on a dict of tensors: mmseg/mmcv are never imported. The mapping is keyed by structure
(stage, block and branch indices are read from each key, widths from each tensor), so any depth or width of the
two supported backbones converts with the same code:

    "swin-tiny"      mmseg.models.backbones.SwinTransformer (+ UPerHead)
    "convnext-tiny"  mmpretrain (or mmcls) ConvNeXt v1, as used by mmseg's `type='mmpretrain.ConvNeXt'` configs

What changes besides names:
- Swin attention: mmseg's fused `qkv` linear is split into transformers' separate q/k/v projections.
- Swin patch merging: mmseg groups each 2x2 neighbourhood with `nn.Unfold` (channel index c*4 + kh*2 + kw);
  transformers concatenates the four sub-grids as (0,0), (1,0), (0,1), (1,1) (index k*C + c). The input
  columns of `downsample.reduction` and the entries of `downsample.norm` are permuted to match.
- Swin's `relative_position_index` buffers are dropped (transformers computes its own, not saved);
  the unused final `swin.layernorm` of transformers' backbone (mmseg has no such layer) is set to identity.
- `auxiliary_head.*` is dropped: the transformers model is built with `use_auxiliary_head=False`.
Every other key must map, or `ValueError` names the ones that do not.
"""
from __future__ import annotations

import re
from typing import Callable

from torch import Tensor

BACKBONES = ("swin-tiny", "convnext-tiny")

# Sub-grid order of transformers' SwinPatchMerging, as indices into mmseg's Unfold kernel order (kh*2 + kw).
_UNFOLD_TO_HF = (0, 2, 1, 3)

_Handler = Callable[[re.Match, Tensor], dict[str, Tensor]]


def _to(template: str) -> _Handler:
    """A rename: `template` may use the pattern's groups as \\1, \\2, ..."""
    return lambda match, tensor: {match.expand(template): tensor}


def _drop(match: re.Match, tensor: Tensor) -> dict[str, Tensor]:
    return {}


def _split_qkv(match: re.Match, tensor: Tensor) -> dict[str, Tensor]:
    """mmseg's fused qkv (3*C rows, in q, k, v order) -> three C-row projections."""
    prefix, param = match.expand(r"backbone.swin.encoder.layers.\1.blocks.\2.attention."), match.group(3)
    query, key, value = tensor.chunk(3, dim=0)
    return {f"{prefix}q_proj.{param}": query.clone(), f"{prefix}k_proj.{param}": key.clone(),
            f"{prefix}v_proj.{param}": value.clone()}


def _unfold_to_hf_order(tensor: Tensor) -> Tensor:
    """Permute the last dim (4*C features of a 2x2 patch) from mmseg's Unfold order to transformers' order."""
    channels = tensor.shape[-1] // 4
    grouped = tensor.reshape(*tensor.shape[:-1], channels, 4)[..., list(_UNFOLD_TO_HF)]  # [..., C, 4 (hf order)]
    return grouped.transpose(-1, -2).reshape(tensor.shape).contiguous()                # [..., 4, C] -> [..., 4C]


def _patch_merging(match: re.Match, tensor: Tensor) -> dict[str, Tensor]:
    return {match.expand(r"backbone.swin.encoder.layers.\1.downsample.\2.\3"): _unfold_to_hf_order(tensor)}


_BLOCK = r"backbone\.stages\.(\d+)\.blocks\.(\d+)\."
_HF_BLOCK = r"backbone.swin.encoder.layers.\1.blocks.\2."
_SWIN_RULES: list[tuple[str, _Handler]] = [
    (r"backbone\.patch_embed\.projection\.(weight|bias)",
     _to(r"backbone.swin.embeddings.patch_embeddings.projection.\1")),
    (r"backbone\.patch_embed\.norm\.(weight|bias)", _to(r"backbone.swin.embeddings.norm.\1")),
    (_BLOCK + r"norm1\.(weight|bias)", _to(_HF_BLOCK + r"layernorm_before.\3")),
    (_BLOCK + r"norm2\.(weight|bias)", _to(_HF_BLOCK + r"layernorm_after.\3")),
    (_BLOCK + r"attn\.w_msa\.qkv\.(weight|bias)", _split_qkv),
    (_BLOCK + r"attn\.w_msa\.proj\.(weight|bias)", _to(_HF_BLOCK + r"attention.o_proj.\3")),
    (_BLOCK + r"attn\.w_msa\.relative_position_bias_table",
     _to(_HF_BLOCK + "attention.relative_position_bias.relative_position_bias_table")),
    (_BLOCK + r"attn\.w_msa\.relative_position_index", _drop),
    (_BLOCK + r"ffn\.layers\.0\.0\.(weight|bias)", _to(_HF_BLOCK + r"mlp.fc1.\3")),
    (_BLOCK + r"ffn\.layers\.1\.(weight|bias)", _to(_HF_BLOCK + r"mlp.fc2.\3")),
    (r"backbone\.stages\.(\d+)\.downsample\.(reduction|norm)\.(weight|bias)", _patch_merging),
]

_CONVNEXT_BLOCK_PARTS = {"depthwise_conv": "dwconv", "norm": "layernorm", "pointwise_conv1": "pwconv1",
                         "pointwise_conv2": "pwconv2"}
_CONVNEXT_RULES: list[tuple[str, _Handler]] = [
    (r"backbone\.downsample_layers\.0\.0\.(weight|bias)", _to(r"backbone.embeddings.patch_embeddings.\1")),
    (r"backbone\.downsample_layers\.0\.1\.(weight|bias)", _to(r"backbone.embeddings.layernorm.\1")),
    (r"backbone\.downsample_layers\.([1-9]\d*)\.([01])\.(weight|bias)",
     _to(r"backbone.encoder.stages.\1.downsampling_layer.\2.\3")),
    (r"backbone\.stages\.(\d+)\.(\d+)\.gamma", _to(r"backbone.encoder.stages.\1.layers.\2.layer_scale_parameter")),
] + [
    (rf"backbone\.stages\.(\d+)\.(\d+)\.{old}\.(weight|bias)", _to(rf"backbone.encoder.stages.\1.layers.\2.{new}.\3"))
    for old, new in _CONVNEXT_BLOCK_PARTS.items()
]

_CONV_MODULE = r"decode_head\.(psp_modules\.\d+\.1|bottleneck|lateral_convs\.\d+|fpn_convs\.\d+|fpn_bottleneck)\."
_COMMON_RULES: list[tuple[str, _Handler]] = [
    (r"backbone\.norm(\d+)\.(weight|bias)", lambda m, t: {f"backbone.hidden_states_norms.stage{int(m.group(1)) + 1}."
                                                          f"{m.group(2)}": t}),
    (_CONV_MODULE + r"conv\.(weight|bias)", _to(r"decode_head.\1.conv.\2")),
    (_CONV_MODULE + r"bn\.(weight|bias|running_mean|running_var|num_batches_tracked)",
     _to(r"decode_head.\1.batch_norm.\2")),
    (r"decode_head\.conv_seg\.(weight|bias)", _to(r"decode_head.classifier.\1")),
    (r"auxiliary_head\..+", _drop),
]

_RULES = {"swin-tiny": _SWIN_RULES + _COMMON_RULES, "convnext-tiny": _CONVNEXT_RULES + _COMMON_RULES}


def convert_mmseg_upernet(state: dict[str, Tensor], backbone: str) -> tuple[dict[str, Tensor], int]:
    """Map an mmsegmentation UperNet state dict (EncoderDecoder keys `backbone.*`, `decode_head.*`,
    `auxiliary_head.*`, optionally inside a checkpoint's "state_dict") to the keys of transformers'
    `UperNetForSemanticSegmentation` with a Swin or ConvNeXt backbone.

    Returns (converted state dict, num_labels), num_labels being the rows of `decode_head.conv_seg.weight`.
    Raises ValueError for an unknown backbone, a state without a UperNet classifier, or keys that do not map.
    """
    if backbone not in _RULES:
        raise ValueError(f"Unknown mmseg UperNet backbone '{backbone}'; use one of: {', '.join(BACKBONES)}.")
    if isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if state and all(key.startswith("module.") for key in state):  # saved from a DistributedDataParallel wrapper
        state = {key[len("module."):]: value for key, value in state.items()}
    classifier = state.get("decode_head.conv_seg.weight")
    if not isinstance(classifier, Tensor):
        raise ValueError("The checkpoint has no 'decode_head.conv_seg.weight', so it is not an mmsegmentation "
                         "UperNet (EncoderDecoder with a UPerHead) state dict.")

    rules = [(re.compile(pattern), handler) for pattern, handler in _RULES[backbone]]
    converted: dict[str, Tensor] = {}
    unmapped: list[str] = []
    for key, value in state.items():
        handler_match = next(((handler, m) for pattern, handler in rules if (m := pattern.fullmatch(key))), None)
        if handler_match is None or not isinstance(value, Tensor):
            unmapped.append(key)
            continue
        handler, match = handler_match
        converted.update(handler(match, value))
    if unmapped:
        shown = ", ".join(unmapped[:5]) + (", ..." if len(unmapped) > 5 else "")
        raise ValueError(f"{len(unmapped)} key(s) of the mmsegmentation checkpoint do not map to a transformers "
                         f"UperNet with a {backbone} backbone: {shown}.")
    if backbone == "swin-tiny":
        _add_identity_final_norm(converted)
    return converted, int(classifier.shape[0])


def _add_identity_final_norm(converted: dict[str, Tensor]) -> None:
    """transformers' SwinBackbone owns a final `swin.layernorm` that its outputs never use and mmseg lacks:
    give it the identity parameters a fresh LayerNorm has, so a strict load succeeds."""
    import torch

    layer = re.compile(r"backbone\.swin\.encoder\.layers\.(\d+)\.blocks\.\d+\.layernorm_before\.weight")
    stages = [(int(m.group(1)), value) for key, value in converted.items() if (m := layer.fullmatch(key))]
    if not stages:
        return
    width = max(stages, key=lambda item: item[0])[1].shape[0]
    dtype = stages[0][1].dtype
    converted["backbone.swin.layernorm.weight"] = torch.ones(width, dtype=dtype)
    converted["backbone.swin.layernorm.bias"] = torch.zeros(width, dtype=dtype)
