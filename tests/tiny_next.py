"""A tiny random LLaVA-NeXT (anyres) and a real llava-hf processor for it, built in-process."""

from __future__ import annotations

import numpy as np
from PIL import Image
from tiny import IMAGE_TOKEN, PAD_TOKEN, VOCAB, sparse_and_stock
from tiny_processor import tiny_tokenizer
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from dynamic_llava import DynamicLlavaNextConfig, DynamicLlavaNextForConditionalGeneration

TILE, PATCH = 16, 4  # a 16 px tile is (16 / 4)^2 = 16 tokens
PINPOINTS = [[16, 32], [32, 16], [32, 32]]


def config_kwargs(text_model: str = "llama") -> dict:
    return dict(
        vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, image_size=TILE, patch_size=PATCH, projection_dim=32),
        text_config=dict(model_type=text_model, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=1024,
                         pad_token_id=PAD_TOKEN, **({"sliding_window": None} if text_model == "mistral" else {})),
        image_token_index=IMAGE_TOKEN, image_grid_pinpoints=PINPOINTS, vision_feature_layer=-1,
        vision_feature_select_strategy="default", image_seq_length=16,
    )


def tiny_next_pair(text_model: str = "llama", attn: str = "sdpa", seed: int = 0, **sparsity):
    return sparse_and_stock(DynamicLlavaNextConfig, DynamicLlavaNextForConditionalGeneration, LlavaNextConfig,
                            LlavaNextForConditionalGeneration, config_kwargs(text_model), attn, seed, **sparsity)


def tiny_next_processor() -> LlavaNextProcessor:
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE},
                                                 image_grid_pinpoints=PINPOINTS)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer(), patch_size=PATCH,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
    processor.tokenizer.padding_side = "left"
    return processor


def picture(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
