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


def _llava_parts(hidden: int, layers: int, intermediate: int, heads: int, vocab: int, image_size: int,
                 patch_size: int, max_positions: int) -> dict:
    """Config parts of a LLaVA-style model with a wide Llama decoder and a one-layer CLIP tower (cheap features)."""
    vision_width = 64
    return dict(
        vision_config=dict(model_type="clip_vision_model", hidden_size=vision_width, intermediate_size=4 * vision_width,
                           num_hidden_layers=1, num_attention_heads=2, image_size=image_size, patch_size=patch_size,
                           projection_dim=vision_width),
        text_config=dict(model_type="llama", hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         vocab_size=vocab, max_position_embeddings=max_positions, pad_token_id=PAD, bos_token_id=BOS,
                         eos_token_id=EOS),
        image_token_index=min(32000, vocab - 1), vision_feature_layer=-1,
        image_seq_length=(image_size // patch_size) ** 2,
    )


def wide_model(hidden: int = 4096, layers: int = 4, intermediate: int = 11008, heads: int = 32, vocab: int = 32064,
               sparse_layer: int = 2, image_size: int = 336, patch_size: int = 14, max_positions: int = 4096,
               seed: int = 0, dtype: torch.dtype = torch.float32) -> DynamicLlavaForConditionalGeneration:
    """A random-weight LLaVA whose decoder layers have LLaVA-1.5-7B's width (hidden 4096, FFN 11008, 32 heads)
    but only `layers` of them, and a one-layer CLIP tower giving (336 / 14)^2 = 576 image tokens cheaply:
    the prefill cost is the decoder's, as in the real model, without 7B weights in memory."""
    config = DynamicLlavaConfig(**_llava_parts(hidden, layers, intermediate, heads, vocab, image_size, patch_size,
                                               max_positions), sparse_layer=sparse_layer)
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = DynamicLlavaForConditionalGeneration(config)
    return model.to(dtype).eval()


def wide_qwen_model(hidden: int = 3584, layers: int = 4, intermediate: int = 18944, heads: int = 28,
                    kv_heads: int = 4, vocab: int = 32064, sparse_layer: int = 2, max_positions: int = 4096,
                    seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-weight Qwen2-VL whose decoder layers have Qwen2-VL-7B's width (hidden 3584, FFN 18944, 28 query
    and 4 KV heads, multimodal RoPE) but only `layers` of them, and a one-layer vision tower: the prefill cost is
    the decoder's."""
    from ..qwen2_vl import DynamicQwen2VLConfig, DynamicQwen2VLForConditionalGeneration

    head = hidden // heads
    quarter = head // 2 // 4
    config = DynamicQwen2VLConfig(
        vision_config=dict(depth=1, embed_dim=64, hidden_size=hidden, num_heads=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        text_config=dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                         max_position_embeddings=max_positions, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [head // 2 - 2 * quarter, quarter, quarter]}),
        image_token_id=vocab - 4, video_token_id=vocab - 3, vision_start_token_id=vocab - 2,
        vision_end_token_id=vocab - 1, sparse_layer=sparse_layer,
    )
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = DynamicQwen2VLForConditionalGeneration(config)
    return model.to(dtype).eval()


def wide_next_model(hidden: int = 4096, layers: int = 4, intermediate: int = 11008, heads: int = 32,
                    vocab: int = 32064, sparse_layer: int = 2, tile: int = 224, patch_size: int = 14,
                    max_positions: int = 8192, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random-weight LLaVA-NeXT (anyres) whose decoder layers have LLaVA-NeXT-7B's width (Vicuna: hidden 4096,
    FFN 11008, 32 heads) but only `layers` of them, and a one-layer CLIP tower on `tile`-px tiles (224: 256 tokens
    a tile, so an image of two tiles is 800 tokens with its overview and row ends)."""
    from ..llava_next import DynamicLlavaNextConfig, DynamicLlavaNextForConditionalGeneration

    config = DynamicLlavaNextConfig(
        **_llava_parts(hidden, layers, intermediate, heads, vocab, tile, patch_size, max_positions),
        vision_feature_select_strategy="default", sparse_layer=sparse_layer,
        image_grid_pinpoints=[[tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]],
    )
    torch.manual_seed(seed)
    with torch.device("cpu"):
        model = DynamicLlavaNextForConditionalGeneration(config)
    return model.to(dtype).eval()


def next_random_workload(model, batch: int, text_before: int = 20, text_after: int = 20,
                         image_size: tuple[int, int] | None = None, seed: int = 0) -> Workload:
    """`batch` equal-length LLaVA-NeXT (or LLaVA-OneVision) prompts: random text around one image of random pixels
    each, of `image_size` (height, width; default: two tiles side by side), cut into anyres tiles as the processor
    does."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    g = torch.Generator().manual_seed(seed)
    config = model.config
    tile = config.vision_config.image_size
    height, width = image_size or (tile, 2 * tile)
    tiles = image_size_to_num_patches((height, width), config.image_grid_pinpoints, tile)
    pixels = torch.randn(batch, tiles, 3, tile, tile, generator=g).to(model.dtype)
    sizes = torch.tensor([[height, width]] * batch)
    with torch.no_grad():  # the image token count of this size: what the processor would expand to
        per_image = len(model.model.get_image_features(pixels[:1], sizes[:1]).pooler_output[0])
    words = torch.tensor([i for i in range(3, config.text_config.vocab_size) if i != config.image_token_id])

    def text(n):
        return words[torch.randint(len(words), (n,), generator=g)]

    ids = torch.stack([torch.cat([torch.tensor([BOS]), text(text_before - 1),
                                  torch.full((per_image,), config.image_token_id), text(text_after)])
                       for _ in range(batch)])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels, "image_sizes": sizes}
    return Workload(inputs, ids.shape[1], per_image, batch, PAD, [config.image_token_id], vision_passes=tiles)


def qwen_random_workload(model, batch: int, text_before: int = 20, text_after: int = 20, image_side: int = 24,
                         seed: int = 0) -> Workload:
    """`batch` equal-length Qwen-VL prompts: random text around one image of ``image_side``^2 tokens (random
    pixels at ``image_side * merge`` patches a side), with the processor's ``mm_token_type_ids``."""
    g = torch.Generator().manual_seed(seed)
    config, vision = model.config, model.config.vision_config
    special = {config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id}
    words = torch.tensor([i for i in range(3, config.text_config.vocab_size) if i not in special])

    def text(n):
        return words[torch.randint(len(words), (n,), generator=g)]

    block = torch.tensor([config.vision_start_token_id, *[config.image_token_id] * image_side ** 2,
                          config.vision_end_token_id])
    ids = torch.stack([torch.cat([text(text_before), block, text(text_after)]) for _ in range(batch)])
    patches = image_side * vision.spatial_merge_size
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "mm_token_type_ids": (ids == config.image_token_id).long(),
              "pixel_values": torch.randn(batch * patches * patches, width, generator=g).to(model.dtype),
              "image_grid_thw": torch.tensor([[1, patches, patches]] * batch)}
    return Workload(inputs, ids.shape[1], image_side ** 2, batch, PAD, sorted(special))


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
