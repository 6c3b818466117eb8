"""engines.detection.mmseg_convert: mmsegmentation UperNet checkpoints load into transformers' UperNet with equal logits.

Tiny real mmseg models (Swin from mmseg, ConvNeXt from mmpretrain) are built from ConfigDicts with a fixed seed,
saved with torch.save, loaded back through engines.detection.detectors.safe_torch_load, converted, loaded strictly into a
transformers UperNet of the same sizes, and compared on one fixed input.

mmcv-lite has no compiled ops, and `import mmseg.models` imports `mmcv.ops` (its point_sample and
sigmoid_focal_loss, used only by heads and losses we never build). The `mmseg_models` fixture puts a stand-in
`mmcv.ops` into sys.modules for the duration of each test only; the app never patches mmcv. Neither
SwinTransformer, ConvNeXt nor UPerHead calls an mmcv op at runtime (they use mmcv.cnn's pure-PyTorch bricks),
so the models below are the real ones, unmodified. Modules imported under the stand-in stay imported.

ConvNeXt comes from mmpretrain, whose `mmpretrain.models` package imports its `multimodal` subpackage (BLIP,
Flamingo, ...), which fails beside transformers 5 (its BLIP code subclasses an old `PreTrainedModel`:
"NoneType takes no arguments"). The `mmpretrain_models` fixture puts an empty stand-in package (a module with an
empty `__path__`) at `mmpretrain.models.multimodal` in sys.modules while `mmpretrain.models` is first imported, for
that test only; nothing here builds a multimodal model, and `mmpretrain.models.backbones.ConvNeXt` is the real one.
"""
from __future__ import annotations

import importlib.util
import sys
import types

import numpy as np
import pytest
import torch

pytest.importorskip("mmseg")
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning:mmseg"),  # advice about binary heads, losses
              pytest.mark.filterwarnings("ignore::UserWarning:mmcv")]   # "install mmcv rather than mmcv-lite"

from engines.detection.detectors import load_detector, safe_torch_load  # noqa: E402
from engines.detection.mmseg_convert import convert_mmseg_upernet  # noqa: E402

torch.set_num_threads(2)

STAGES = ["stage1", "stage2", "stage3", "stage4"]
HEAD_CHANNELS = 32
NUM_CLASSES = 2
TOLERANCE = 1e-4


def _mmcv_ops_stand_in() -> types.ModuleType:
    """Only what mmseg's import chain needs: two names imported unconditionally (never called by UperNet), and
    ModuleNotFoundError for every other op, which mmseg's optional heads (CCHead, PSAHead, PointHead) catch
    exactly as if mmcv.ops were absent."""
    ops = types.ModuleType("mmcv.ops")
    ops.__doc__ = "Test-only stand-in for mmcv's compiled ops (absent from mmcv-lite)."

    def unavailable(*args, **kwargs):
        raise RuntimeError("mmcv.ops is a test stand-in: compiled mmcv ops are not installed (mmcv-lite).")

    def missing(name: str):
        if name.startswith("_"):
            raise AttributeError(name)  # keep hasattr()/inspect working on the module
        raise ModuleNotFoundError(f"mmcv.ops.{name} needs the compiled mmcv (mmcv-lite is installed).")

    ops.point_sample = unavailable
    ops.sigmoid_focal_loss = unavailable
    ops.__getattr__ = missing
    return ops


@pytest.fixture
def mmseg_models():
    """mmseg's MODELS registry, with a stand-in mmcv.ops in sys.modules for this test only (if mmcv lacks ops)."""
    with pytest.MonkeyPatch.context() as patch:
        if importlib.util.find_spec("mmcv._ext") is None:  # mmcv-lite; also covers imports made while building
            patch.setitem(sys.modules, "mmcv.ops", _mmcv_ops_stand_in())
        import mmseg.models  # noqa: F401  (registers the models)
        from mmseg.registry import MODELS

        yield MODELS


def _multimodal_stand_in() -> types.ModuleType:
    """An empty package in place of mmpretrain.models.multimodal (`from .multimodal import *` then imports nothing)."""
    package = types.ModuleType("mmpretrain.models.multimodal")
    package.__doc__ = "Test-only stand-in: mmpretrain's multimodal models do not import beside transformers 5."
    package.__path__ = []
    return package


@pytest.fixture
def mmpretrain_models(mmseg_models):
    """mmseg's MODELS registry with mmpretrain's models registered too (for `type="mmpretrain.ConvNeXt"`), importing
    `mmpretrain.models` under an empty stand-in for its multimodal subpackage, for this test only."""
    pytest.importorskip("mmpretrain")
    with pytest.MonkeyPatch.context() as patch:
        if "mmpretrain.models" not in sys.modules:
            patch.setitem(sys.modules, "mmpretrain.models.multimodal", _multimodal_stand_in())
        import mmpretrain.models  # noqa: F401  (registers ConvNeXt in mmpretrain's registry)
        from mmpretrain.models.backbones import ConvNeXt

        assert ConvNeXt.__module__ == "mmpretrain.models.backbones.convnext"  # the real backbone, not a stand-in
        yield mmseg_models


# ------------------------------------------------------------------ tiny models on both sides
def _uper_head(in_channels: list[int]) -> dict:
    return dict(type="UPerHead", in_channels=in_channels, in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6),
                channels=HEAD_CHANNELS, dropout_ratio=0.1, num_classes=NUM_CLASSES, norm_cfg=dict(type="BN"),
                align_corners=False, loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0))


def _aux_head(in_channels: int) -> dict:
    return dict(type="FCNHead", in_channels=in_channels, in_index=2, channels=16, num_convs=1, concat_input=False,
                dropout_ratio=0.1, num_classes=NUM_CLASSES, norm_cfg=dict(type="BN"), align_corners=False,
                loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4))


def mmseg_swin_config(depths=(1, 1, 2, 1)):
    from mmengine.config import ConfigDict

    widths = [32 * 2 ** i for i in range(4)]
    return ConfigDict(
        type="EncoderDecoder",
        backbone=dict(type="SwinTransformer", pretrain_img_size=224, embed_dims=32, patch_size=4, window_size=7,
                      mlp_ratio=4, depths=list(depths), num_heads=[1, 2, 4, 8], strides=(4, 2, 2, 2),
                      out_indices=(0, 1, 2, 3), qkv_bias=True, qk_scale=None, patch_norm=True, drop_rate=0.0,
                      attn_drop_rate=0.0, drop_path_rate=0.0, use_abs_pos_embed=False, act_cfg=dict(type="GELU"),
                      norm_cfg=dict(type="LN")),
        decode_head=_uper_head(widths), auxiliary_head=_aux_head(widths[2]),
        train_cfg=dict(), test_cfg=dict(mode="whole"))


def mmseg_convnext_config():
    from mmengine.config import ConfigDict

    widths = [8, 16, 32, 64]
    return ConfigDict(
        type="EncoderDecoder",
        backbone=dict(type="mmpretrain.ConvNeXt", arch=dict(depths=[1, 1, 2, 1], channels=widths),
                      out_indices=[0, 1, 2, 3], drop_path_rate=0.0, layer_scale_init_value=1.0,
                      gap_before_final_norm=False),
        decode_head=_uper_head(widths), auxiliary_head=_aux_head(widths[2]),
        train_cfg=dict(), test_cfg=dict(mode="whole"))


def hf_upernet(backbone_config, num_labels: int = NUM_CLASSES):
    from transformers import UperNetConfig, UperNetForSemanticSegmentation

    config = UperNetConfig(backbone_config=backbone_config, num_labels=num_labels, hidden_size=HEAD_CHANNELS,
                           use_auxiliary_head=False, pool_scales=[1, 2, 3, 6])
    return UperNetForSemanticSegmentation(config).eval()


def build_mmseg(registry, config, seed: int = 0):
    torch.manual_seed(seed)
    model = registry.build(config)  # constructor init is enough (init_weights only logs every tensor)
    _randomise_constant_inits(model)
    return model.eval()


def _randomise_constant_inits(model) -> None:
    """Fresh norms are identity (weight 1, bias 0, stats 0/1) and Swin's relative position tables are zeros
    (init_weights, which would fill them, is not called): constants hide a wrong permutation or mapping, so give
    them distinct random values."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
        for module in model.modules():
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)) or type(module).__name__ == "LayerNorm2d":
                module.weight.copy_(1 + 0.5 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=generator))
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(0.2 * torch.randn(module.running_mean.shape, generator=generator))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=generator))
            if hasattr(module, "gamma") and isinstance(module.gamma, torch.nn.Parameter):  # ConvNeXt layer scale
                module.gamma.copy_(0.5 + torch.rand(module.gamma.shape, generator=generator))


def fixed_input(size: int) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(123))


def mmseg_logits(model, pixels: torch.Tensor) -> torch.Tensor:
    """mmseg's whole-image inference: decode head at 1/4 resolution, resized bilinearly to the input size
    (the same resize transformers' UperNetForSemanticSegmentation applies)."""
    metas = [dict(img_shape=tuple(pixels.shape[-2:]), ori_shape=tuple(pixels.shape[-2:]))]
    with torch.inference_mode():
        return model.encode_decode(pixels, metas)


def hf_logits(model, pixels: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(pixel_values=pixels).logits


def save_and_reload(model, folder, wrap: bool = True) -> dict:
    """Save like mmengine does (a "meta" with numpy scalars next to "state_dict"), read back safely."""
    path = folder / "iter_100.pth"
    state = model.state_dict()
    torch.save({"meta": {"iter": 100, "seed": np.int64(0), "lr": np.float64(0.01)}, "state_dict": state}
               if wrap else state, path)
    return safe_torch_load(path)


def convert_and_compare(mmseg_model, hf_model, backbone: str, tmp_path, size: int) -> float:
    checkpoint = save_and_reload(mmseg_model, tmp_path)
    converted, num_labels = convert_mmseg_upernet(checkpoint, backbone)
    assert num_labels == NUM_CLASSES
    assert not [key for key in converted if key.startswith("auxiliary_head")]
    hf_model.load_state_dict(converted, strict=True)
    pixels = fixed_input(size)
    expected, actual = mmseg_logits(mmseg_model, pixels), hf_logits(hf_model, pixels)
    assert actual.shape == expected.shape == (1, NUM_CLASSES, size, size)
    assert expected.abs().max() > 0.1  # a meaningful signal, not all zeros
    return float((actual - expected).abs().max())


# ------------------------------------------------------------------ the comparisons
@pytest.mark.parametrize("depths, size", [((1, 1, 2, 1), 224), ((1, 1, 2, 2), 256)],
                         ids=["224-shifted-stage3", "256-padded-shifted-stage4"])
def test_swin_upernet_logits_match_after_conversion(mmseg_models, tmp_path, depths, size):
    from transformers import SwinConfig

    mmseg_model = build_mmseg(mmseg_models, mmseg_swin_config(depths))
    hf_model = hf_upernet(SwinConfig(embed_dim=32, depths=list(depths), num_heads=[1, 2, 4, 8], window_size=7,
                                     out_features=STAGES))
    difference = convert_and_compare(mmseg_model, hf_model, "swin-tiny", tmp_path, size)
    print(f"swin {depths} @ {size}: max |logit difference| = {difference:.2e}")
    assert difference < TOLERANCE


def test_convnext_upernet_logits_match_after_conversion(mmpretrain_models, tmp_path):
    from transformers import ConvNextConfig

    mmseg_model = build_mmseg(mmpretrain_models, mmseg_convnext_config())
    assert type(mmseg_model.backbone).__module__ == "mmpretrain.models.backbones.convnext"
    hf_model = hf_upernet(ConvNextConfig(depths=[1, 1, 2, 1], hidden_sizes=[8, 16, 32, 64], out_features=STAGES))
    difference = convert_and_compare(mmseg_model, hf_model, "convnext-tiny", tmp_path, 224)
    print(f"convnext: max |logit difference| = {difference:.2e}")
    assert difference < TOLERANCE


def test_swin_patch_merging_permutation_matters(mmseg_models):
    """Loading the reduction weights without the Unfold -> concat permutation changes the logits: the check above
    would catch a missing or wrong permutation."""
    from transformers import SwinConfig

    mmseg_model = build_mmseg(mmseg_models, mmseg_swin_config())
    state = mmseg_model.state_dict()
    converted, _ = convert_mmseg_upernet(state, "swin-tiny")
    hf_model = hf_upernet(SwinConfig(embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=7,
                                     out_features=STAGES))
    for stage in range(3):
        for part in ("reduction.weight", "norm.weight", "norm.bias"):
            unpermuted = state[f"backbone.stages.{stage}.downsample.{part}"]
            converted[f"backbone.swin.encoder.layers.{stage}.downsample.{part}"] = unpermuted
    hf_model.load_state_dict(converted, strict=True)
    pixels = fixed_input(224)
    assert (hf_logits(hf_model, pixels) - mmseg_logits(mmseg_model, pixels)).abs().max() > 1e-2


# ------------------------------------------------------------------ key handling
@pytest.fixture
def swin_state(mmseg_models) -> dict:
    return build_mmseg(mmseg_models, mmseg_swin_config()).state_dict()


def test_auxiliary_head_keys_are_ignored(swin_state):
    aux = [key for key in swin_state if key.startswith("auxiliary_head.")]
    assert aux, "the tiny mmseg model should carry an auxiliary head"
    extra = dict(swin_state, **{"auxiliary_head.conv_seg.extra_buffer": torch.zeros(3)})
    converted, num_labels = convert_mmseg_upernet(extra, "swin-tiny")
    assert num_labels == NUM_CLASSES
    assert not [key for key in converted if key.startswith("auxiliary_head")]
    without, _ = convert_mmseg_upernet({k: v for k, v in swin_state.items() if k not in aux}, "swin-tiny")
    assert converted.keys() == without.keys() and all(torch.equal(converted[k], without[k]) for k in without)


def test_unknown_key_raises_naming_it(swin_state):
    state = dict(swin_state, **{"backbone.absolute_pos_embed": torch.zeros(1, 3136, 32)})
    with pytest.raises(ValueError, match=r"1 key\(s\).*backbone\.absolute_pos_embed") as info:
        convert_mmseg_upernet(state, "swin-tiny")
    assert "\n" not in str(info.value) and str(info.value).endswith(".")


def test_wrong_backbone_names_the_first_unmapped_keys(swin_state):
    expected = r"convnext-tiny backbone: backbone\.patch_embed\.projection\.weight, .*, \.\.\.\.$"
    with pytest.raises(ValueError, match=expected):
        convert_mmseg_upernet(swin_state, "convnext-tiny")


def test_state_dict_wrapper_and_module_prefix_are_accepted(swin_state):
    plain, _ = convert_mmseg_upernet(swin_state, "swin-tiny")
    wrapped, _ = convert_mmseg_upernet({"meta": {"iter": 1}, "state_dict": swin_state}, "swin-tiny")
    prefixed, _ = convert_mmseg_upernet({f"module.{k}": v for k, v in swin_state.items()}, "swin-tiny")
    assert plain.keys() == wrapped.keys() == prefixed.keys()
    assert all(torch.equal(plain[k], prefixed[k]) for k in plain)


def test_input_is_not_modified_and_one_label_head_gives_num_labels_1(swin_state):
    state = dict(swin_state)
    state["decode_head.conv_seg.weight"] = state["decode_head.conv_seg.weight"][:1].clone()
    state["decode_head.conv_seg.bias"] = state["decode_head.conv_seg.bias"][:1].clone()
    keys = list(state)
    _, num_labels = convert_mmseg_upernet(state, "swin-tiny")
    assert num_labels == 1 and list(state) == keys


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="Unknown mmseg UperNet backbone 'resnet50'"):
        convert_mmseg_upernet({}, "resnet50")
    with pytest.raises(ValueError, match="no 'decode_head.conv_seg.weight'"):
        convert_mmseg_upernet({"backbone.norm0.weight": torch.ones(2)}, "swin-tiny")


# ------------------------------------------------------------------ through the detector registry
@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["swin-tiny", "convnext-tiny"])
def test_full_size_checkpoint_loads_as_detector(request, mmseg_models, tmp_path, backbone):
    """The real-size layouts (Swin-T 2/2/6/2, ConvNeXt-T 3/3/9/3, head 512 channels) go through load_detector's
    `mmseg-upernet-<backbone>:FILE` family (engines.detection.detectors.upernet_config, strict load) with equal logits
    (at 128 px to keep it to seconds; transformers' SwinBackbone keeps shifted 7x7 windows on small stages as
    mmseg does, padding each stage to the window on both sides)."""
    from mmengine.config import ConfigDict

    if backbone == "swin-tiny":
        config = mmseg_swin_config()
        config.backbone.update(embed_dims=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24])
    else:
        mmseg_models = request.getfixturevalue("mmpretrain_models")
        config = mmseg_convnext_config()
        config.backbone.update(arch="tiny", layer_scale_init_value=1e-6)
    config.decode_head = ConfigDict(_uper_head([96, 192, 384, 768]), channels=512)
    config.auxiliary_head = ConfigDict(_aux_head(384))
    mmseg_model = build_mmseg(mmseg_models, config)
    path = tmp_path / "iter_160000.pth"
    torch.save({"meta": {"iter": 160000}, "state_dict": mmseg_model.state_dict()}, path)

    loaded = load_detector(f"mmseg-upernet-{backbone}:{path}", data_dir=tmp_path / "data")
    assert loaded.extra.family == f"mmseg-upernet-{backbone}" and loaded.extra.activation == "softmax"
    pixels = fixed_input(128)
    difference = float((hf_logits(loaded.model, pixels) - mmseg_logits(mmseg_model, pixels)).abs().max())
    print(f"{backbone} full size @ 128: max |logit difference| = {difference:.2e}")
    assert difference < TOLERANCE
