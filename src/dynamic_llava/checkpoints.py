"""Reading what a local checkpoint holds (from safetensors headers only), for clear loading messages."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from .predictors import ImagePredictor, TextPredictor

PREDICTOR_NAMES = ("image_predictor", "text_predictor")


def looks_local(path) -> bool:
    """Whether ``path`` can only mean a local folder (not a hub id such as ``llava-hf/llava-1.5-7b-hf``)."""
    text = str(path)
    return (
        Path(text).is_absolute() or text.startswith((".", "~")) or text.count("/") > 1 or "\\" in text
        or Path(text).exists()
    )


def check_checkpoint_folder(path) -> None:
    """Raise a clear error when ``path`` is meant as a local checkpoint folder but cannot be one."""
    root = Path(path)
    if root.is_file():
        raise NotADirectoryError(
            f"{path} is a file: pass the checkpoint folder that holds config.json and model.safetensors"
            + (f" ({root.parent})." if root.name == "config.json" else ".")
        )
    if root.is_dir():
        if not (root / "config.json").is_file():
            raise FileNotFoundError(
                f"No config.json in {path}: pass a llava-hf or Dynamic-LLaVA checkpoint folder "
                "(save_pretrained writes one)."
            )
        return
    if looks_local(path):
        raise FileNotFoundError(f"Checkpoint folder not found: {path}.")


def checkpoint_tensor_shapes(path) -> dict[str, list[int]] | None:
    """Tensor name -> shape for a local safetensors checkpoint directory; None if it is not one.

    A weight file that is missing, empty or truncated raises `OSError` naming it (read from headers only)."""
    root = Path(path)
    if not root.is_dir():
        return None
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as error:
            raise OSError(f"{index} is not a safetensors index (a JSON with a weight_map): {error}.") from error
    elif (root / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return None
    shapes = {}
    for name in files:
        shapes.update(_header_shapes(root / name))
    return shapes


def _header_shapes(file: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from one safetensors file (safetensors checks the header against the file's size)."""
    if not file.is_file():
        raise FileNotFoundError(f"Weight file missing: {file} (listed in the checkpoint's index).")
    size = file.stat().st_size
    try:
        with safe_open(file, framework="pt") as f:
            shapes = {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as error:  # safetensors raises its own error type (and OSError) for unreadable files
        raise OSError(
            f"{file} ({size} bytes) is not a readable safetensors file ({error}): it may be empty or truncated by an "
            "interrupted copy or save; copy or save it again."
        ) from error
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


__all__ = [
    "check_checkpoint_folder",
    "checkpoint_tensor_shapes",
    "looks_local",
    "predictor_mismatches",
    "predictor_shapes",
    "stored_predictor_shapes",
]
