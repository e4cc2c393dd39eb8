"""Reading what a local checkpoint holds (from safetensors headers only), for clear loading messages."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .predictors import ImagePredictor, TextPredictor

PREDICTOR_NAMES = ("image_predictor", "text_predictor")


def checkpoint_tensor_shapes(path) -> dict[str, list[int]] | None:
    """Tensor name -> shape for a local safetensors checkpoint directory; None if it is not one."""
    root = Path(path)
    if not root.is_dir():
        return None
    index = root / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (root / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return None
    shapes = {}
    for name in files:
        with safe_open(root / name, framework="pt") as f:
            for key in f.keys():
                shapes[key] = list(f.get_slice(key).get_shape())
    return shapes


def predictor_shapes(config) -> dict[str, list[int]]:
    """'image_predictor.<param>' / 'text_predictor.<param>' -> shape the config asks for (no allocation)."""
    width = config.text_config.hidden_size
    shapes = {}
    with torch.device("meta"):
        modules = {}
        if config.use_image_predictor:
            modules["image_predictor"] = ImagePredictor(
                width,
                config.predictor_dim,
                config.predictor_heads,
                config.predictor_mlp_dim,
                config.predictor_blocks,
                config.predictor_head_dims,
            )
        if config.use_text_predictor:
            modules["text_predictor"] = TextPredictor(width, config.text_predictor_dims)
    for prefix, module in modules.items():
        for name, tensor in module.state_dict().items():
            shapes[f"{prefix}.{name}"] = list(tensor.shape)
    return shapes


def stored_predictor_shapes(shapes: dict[str, list[int]]) -> dict[str, list[int]]:
    """Checkpoint predictor tensors under their short names ('image_predictor.proj.0.weight')."""
    out = {}
    for key, shape in shapes.items():
        for name in PREDICTOR_NAMES:
            if f"{name}." in key:
                out[name + "." + key.split(f"{name}.", 1)[1]] = shape
    return out


def predictor_mismatches(config, shapes: dict[str, list[int]]) -> list[str]:
    """Human-readable lines for predictor tensors whose checkpoint shape differs from the config's."""
    expected = predictor_shapes(config)
    stored = stored_predictor_shapes(shapes)
    return [
        f"{key}: checkpoint {stored[key]}, config expects {shape}"
        for key, shape in expected.items()
        if key in stored and stored[key] != shape
    ]


__all__ = ["checkpoint_tensor_shapes", "predictor_mismatches", "predictor_shapes", "stored_predictor_shapes"]
