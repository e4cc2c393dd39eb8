"""One entry point for every family: `dynamic_llava.from_pretrained(path, **sparsity_settings)`."""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoints import check_checkpoint_folder


def _families() -> dict:
    from .llava_next import DynamicLlavaNextForConditionalGeneration, DynamicLlavaOnevisionForConditionalGeneration
    from .modeling import DynamicLlavaForConditionalGeneration
    from .qwen2_vl import (
        DynamicQwen2_5_VLForConditionalGeneration,
        DynamicQwen2VLForConditionalGeneration,
        DynamicQwen3VLForConditionalGeneration,
    )

    classes = (DynamicLlavaForConditionalGeneration, DynamicLlavaNextForConditionalGeneration,
               DynamicLlavaOnevisionForConditionalGeneration, DynamicQwen2VLForConditionalGeneration,
               DynamicQwen2_5_VLForConditionalGeneration, DynamicQwen3VLForConditionalGeneration)
    return {t: cls for cls in classes for t in (cls.config_class.model_type, *cls.config_class.base_model_types)}


def model_class_for(path):
    """The Dynamic class that loads the checkpoint folder `path` (from its config.json's model type)."""
    check_checkpoint_folder(path)
    config = Path(path) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"No config.json in {path}: pass a checkpoint folder.")
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except ValueError as error:
        raise ValueError(f"{config} is not valid JSON: {error}.") from None
    families = _families()
    if model_type not in families:
        raise ValueError(
            f"{path} holds a {model_type!r} model; Dynamic-LLaVA loads {', '.join(sorted(families))} checkpoints "
            "(`dynamic-llava convert` turns the original LLaVA-1.5 and the authors' releases into one)."
        )
    return families[model_type]


def from_pretrained(path, **kwargs):
    """Load any supported checkpoint (LLaVA-1.5 / llava-hf, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL,
    Qwen3-VL, or their Dynamic versions) with the class its model type names; sparsity settings
    (``image_keep_rate=0.2``, ...) and the usual `from_pretrained` options pass through."""
    return model_class_for(path).from_pretrained(path, **kwargs)


def load_for_inference(path, device: str | None = None, dtype=None, **settings):
    """(model in eval mode on `device`, its processor) from a checkpoint folder: the GPU when there is one, in
    float16 there and float32 on the CPU unless `dtype` says otherwise; sparsity `settings` pass through."""
    import torch
    from transformers import AutoProcessor

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float16 if device == "cuda" else torch.float32)
    model = from_pretrained(path, dtype=dtype, **settings).to(device).eval()
    return model, AutoProcessor.from_pretrained(path)


__all__ = ["from_pretrained", "load_for_inference", "model_class_for"]
