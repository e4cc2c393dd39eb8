"""The tiny LLaVA of the world: a CLIP-style vision tower and a Llama decoder, trained from scratch."""

from __future__ import annotations

from transformers import LlavaConfig

from .assets import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID


def tiny_llava_config(vocab_size: int, image_size: int = 96, patch_size: int = 12, width: int = 192,
                      layers: int = 4, heads: int = 4) -> LlavaConfig:
    """~2.5M parameters: (96 / 12)^2 = 64 image tokens, K = 2 leaves two sparse layers."""
    return LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model", hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3,
            num_attention_heads=4, image_size=image_size, patch_size=patch_size, projection_dim=width,
        ),
        text_config=dict(
            model_type="llama", hidden_size=width, intermediate_size=int(2.75 * width) // 16 * 16,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab_size,
            max_position_embeddings=2048, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
            tie_word_embeddings=False,
        ),
        image_token_index=IMAGE_ID,
        vision_feature_layer=[0, -1],  # the patch embedding (plain colour) next to the last layer (shape, cell)
        vision_feature_select_strategy="default",
        image_seq_length=(image_size // patch_size) ** 2,
        pad_token_id=PAD_ID,
    )


__all__ = ["tiny_llava_config"]
