"""Tiny random LLaVA configs and inputs built in-process (no downloads)."""

from __future__ import annotations

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from dynamic_llava import DynamicLlavaConfig, DynamicLlavaForConditionalGeneration

IMAGE_TOKEN = 3
PAD_TOKEN = 0
VOCAB = 64


def tiny_config_kwargs(layers: int = 4, image_size: int = 32, patch: int = 8, attn: str = "sdpa") -> dict:
    return dict(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=patch,
            projection_dim=32,
        ),
        text_config=dict(
            model_type="llama",
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=VOCAB,
            max_position_embeddings=512,
            pad_token_id=PAD_TOKEN,
        ),
        image_token_index=IMAGE_TOKEN,
        vision_feature_layer=-1,
        image_seq_length=(image_size // patch) ** 2,
    )


# the sparsity settings of every tiny model in the tests (predictors sized for hidden 48)
TINY_SPARSITY = dict(sparse_layer=2, image_keep_rate=0.25, text_keep_rate=0.5, predictor_dim=16, predictor_heads=2,
                     predictor_mlp_dim=32, predictor_head_dims=[16, 8], text_predictor_dims=[16, 8])


def sparse_and_stock(config_class, model_class, stock_config_class, stock_class, config_kwargs: dict,
                     attn: str = "sdpa", seed: int = 0, **sparsity):
    """(ours, stock) of one family with the same weights: ours built from `config_kwargs` and the tiny sparsity
    settings (`sparsity` overrides them), stock loaded from ours (the predictors left out)."""
    config = config_class(**config_kwargs, **{**TINY_SPARSITY, **sparsity})
    config._attn_implementation = attn
    torch.manual_seed(seed)
    ours = model_class(config).eval()
    ours.set_attn_implementation(attn)
    stock = stock_class(stock_config_class(**config_kwargs)).eval()
    missing, unexpected = stock.load_state_dict(ours.state_dict(), strict=False)
    assert not missing and all("predictor" in k for k in unexpected), (missing, unexpected)
    stock.set_attn_implementation(attn)
    return ours, stock


def tiny_dynamic(attn: str = "sdpa", seed: int = 0, **sparsity) -> DynamicLlavaForConditionalGeneration:
    config = DynamicLlavaConfig(**tiny_config_kwargs(), **{**TINY_SPARSITY, **sparsity})
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = DynamicLlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation(attn)
    return model


def stock_copy(model: DynamicLlavaForConditionalGeneration, attn: str = "sdpa") -> LlavaForConditionalGeneration:
    """A stock LlavaForConditionalGeneration with the same weights (predictors left out)."""
    config = LlavaConfig(**tiny_config_kwargs())
    stock = LlavaForConditionalGeneration(config).eval()
    missing, unexpected = stock.load_state_dict(model.state_dict(), strict=False)
    assert not missing, missing
    assert all("predictor" in k for k in unexpected), unexpected
    stock.set_attn_implementation(attn)
    return stock


def make_prompts(lengths_before: list[int], lengths_after: list[int], images_per_prompt: int = 1, seed: int = 0,
                 tokens_per_image: int = 16):
    """Left-padded batch of prompts: text, image tokens, text. Returns input_ids, attention_mask, pixel_values."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for before, after in zip(lengths_before, lengths_after):
        parts = [torch.randint(4, VOCAB, (before,), generator=g)]
        for _ in range(images_per_prompt):
            parts.append(torch.full((tokens_per_image,), IMAGE_TOKEN))
            parts.append(torch.randint(4, VOCAB, (2,), generator=g))
        parts.append(torch.randint(4, VOCAB, (after,), generator=g))
        seqs.append(torch.cat(parts))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD_TOKEN)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = s
        mask[i, width - len(s):] = 1
    pixels = torch.randn(len(seqs) * images_per_prompt, 3, 32, 32, generator=g)
    return ids, mask, pixels
