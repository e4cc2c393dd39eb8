"""Models and prompts the benchmarks run on: the trained world model, and a wide random-weight model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..config import DynamicLlavaConfig
from ..evaluation.world import prompt_inputs
from ..modeling import DynamicLlavaForConditionalGeneration
from .speed import Workload

PAD, BOS, EOS = 0, 1, 2


def wide_model(hidden: int = 4096, layers: int = 4, intermediate: int = 11008, heads: int = 32, vocab: int = 32064,
               sparse_layer: int = 2, image_size: int = 336, patch_size: int = 14, max_positions: int = 4096,
               seed: int = 0, dtype: torch.dtype = torch.float32) -> DynamicLlavaForConditionalGeneration:
    """A random-weight LLaVA whose decoder layers have LLaVA-1.5-7B's width (hidden 4096, FFN 11008, 32 heads)
    but only `layers` of them, and a one-layer CLIP tower giving (336 / 14)^2 = 576 image tokens cheaply:
    the prefill cost is the decoder's, as in the real model, without 7B weights in memory."""
    vision_width = 64
    config = DynamicLlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=vision_width, intermediate_size=4 * vision_width,
                           num_hidden_layers=1, num_attention_heads=2, image_size=image_size, patch_size=patch_size,
                           projection_dim=vision_width),
        text_config=dict(model_type="llama", hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         vocab_size=vocab, max_position_embeddings=max_positions, pad_token_id=PAD, bos_token_id=BOS,
                         eos_token_id=EOS),
        image_token_index=min(32000, vocab - 1), vision_feature_layer=-1,
        image_seq_length=(image_size // patch_size) ** 2, sparse_layer=sparse_layer,
    )
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = DynamicLlavaForConditionalGeneration(config)
    return model.to(dtype).eval()


def random_workload(model, batch: int, text_before: int = 20, text_after: int = 20, seed: int = 0) -> Workload:
    """`batch` equal-length prompts of random text around one image of random pixels each."""
    g = torch.Generator().manual_seed(seed)
    config = model.config
    per_image = model.tokens_per_image()
    words = torch.tensor([i for i in range(3, config.text_config.vocab_size) if i != config.image_token_id])

    def text(n):
        return words[torch.randint(len(words), (n,), generator=g)]

    rows = [torch.cat([torch.tensor([BOS]), text(text_before - 1), torch.full((per_image,), config.image_token_id),
                       text(text_after)]) for _ in range(batch)]
    ids = torch.stack(rows)
    size = config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=g).to(model.dtype)
    inputs = {"input_ids": ids, "pixel_values": pixels, "attention_mask": torch.ones_like(ids)}
    return Workload(inputs, ids.shape[1], per_image, batch, PAD, [config.image_token_id])


def world_workload(model, processor, batch: int, question: str = "describe the image .", seed: int = 0) -> Workload:
    """`batch` fresh world scenes with the same question (equal lengths, no padding)."""
    from ..world.scenes import render, sample_scene

    rng = np.random.default_rng([seed, 99])
    images = [render(sample_scene(rng), model.config.vision_config.image_size) for _ in range(batch)]
    inputs = dict(prompt_inputs(processor, [question] * batch, images))
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return Workload(inputs, inputs["input_ids"].shape[1], model.tokens_per_image(), batch,
                    processor.tokenizer.pad_token_id, [model.config.image_token_id])


def load_world_model(folder: str | Path, max_positions: int | None = None, quiet: bool = False):
    """(model, processor) of a world checkpoint; `max_positions` widens the context for long generations;
    `quiet` leaves out the note that a dense checkpoint gets fresh predictors (for policies that do not use them)."""
    import logging

    from transformers import AutoProcessor

    note = logging.getLogger("dynamic_llava.modeling")  # says when a checkpoint gets fresh predictors
    level = note.level
    if quiet:
        note.setLevel(logging.ERROR)
    try:
        model = DynamicLlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    finally:
        note.setLevel(level)
    if max_positions is not None:
        model.config.text_config.max_position_embeddings = max(max_positions,
                                                               model.config.text_config.max_position_embeddings)
    return model, AutoProcessor.from_pretrained(folder)


__all__ = ["load_world_model", "random_workload", "wide_model", "world_workload"]
