"""Switching a LoRA on and off for a diffusers pipeline (`apply_lora`), and the adapter a tuner trains: the
pipeline check (`check_pipeline`), LoRA on the UNet's attention projections (`add_lora_adapter`) and
saving it in diffusers' LoRA format (`save_lora`). Used by `tune` and `feedback`; imports no sibling module.
"""
from __future__ import annotations

import os
from pathlib import Path

ADAPTER = "studio_tune"
LORA_ADAPTER = "studio"
LORA_SUBDIR = "lora"
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def apply_lora(pipe, lora_dir: str | os.PathLike | None, scale: float = 1.0) -> None:
    """Switch a LoRA on (`lora_dir`, weighted by `scale`) or off (None) for a diffusers pipeline.

    Any LoRA loaded before is unloaded first, so calling this again replaces it; switching off
    removes every LoRA layer, so the pipeline gives exactly its original pixels again.
    """
    if lora_dir is None:
        pipe.unload_lora_weights()
        return
    folder = Path(lora_dir).expanduser()
    if not folder.is_dir() or not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ValueError(f"LoRA folder '{lora_dir}' does not exist or holds no LoRA weights (*.safetensors).")
    if not -10.0 <= float(scale) <= 10.0:
        raise ValueError(f"LoRA scale must be between -10 and 10, got {scale}.")
    from safetensors import SafetensorError

    pipe.unload_lora_weights()
    try:
        pipe.load_lora_weights(str(folder), adapter_name=LORA_ADAPTER)
    except (SafetensorError, OSError, EOFError) as exc:
        pipe.unload_lora_weights()
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise ValueError(f"The LoRA weights in '{lora_dir}' are damaged or truncated ({reason}).") from None
    pipe.set_adapters([LORA_ADAPTER], adapter_weights=[float(scale)])


def check_pipeline(pipe) -> None:
    for name in ("unet", "vae", "scheduler", "encode_prompt"):
        if getattr(pipe, name, None) is None:
            raise ValueError(f"LoRA tuning needs a Stable-Diffusion-style pipeline with a UNet; "
                             f"{type(pipe).__name__} has no {name}.")
    if getattr(pipe.unet.config, "addition_embed_type", None) or getattr(pipe, "text_encoder_2", None) is not None:
        raise ValueError(f"LoRA tuning supports Stable Diffusion 1.x/2.x-style pipelines; {type(pipe).__name__} "
                         "(SDXL-style, with added conditioning) is not supported yet.")
    if getattr(pipe.unet, "peft_config", None):
        raise ValueError("The pipeline already has a LoRA loaded; switch it off (apply_lora(pipe, None)) before tuning.")


def add_lora_adapter(unet, config) -> list:
    """LoRA on the attention projections; returns the trainable (LoRA) parameters, cast to float32.
    `config`: anything with `rank` and `alpha` (a TuneConfig, a FeedbackConfig)."""
    from peft import LoraConfig

    lora = LoraConfig(r=int(config.rank), lora_alpha=float(config.alpha), init_lora_weights="gaussian",
                      target_modules=list(LORA_TARGETS))
    unet.requires_grad_(False)
    unet.add_adapter(lora, adapter_name=ADAPTER)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    if not params:
        raise ValueError("The UNet has no attention projections (to_q/to_k/to_v/to_out.0) to put LoRA adapters on.")
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def save_lora(pipe, lora_dir: Path) -> None:
    """Diffusers LoRA format (`pytorch_lora_weights.safetensors`), with rank/alpha metadata; written to a
    temporary sibling and renamed, so a reader never sees half a LoRA."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet = pipe.unet
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=ADAPTER))
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    metadata = unet.peft_config[ADAPTER].to_dict()
    saver = type(pipe) if hasattr(type(pipe), "save_lora_weights") else StableDiffusionPipeline
    tmp = lora_dir.with_name(f".{lora_dir.name}.tmp-{os.getpid()}")
    _remove(tmp)
    saver.save_lora_weights(str(tmp), unet_lora_layers=state, safe_serialization=True,
                            unet_lora_adapter_metadata=metadata)
    _remove(lora_dir)
    os.replace(tmp, lora_dir)


def _remove(path: Path) -> None:
    import shutil

    if path.exists():
        shutil.rmtree(path)
