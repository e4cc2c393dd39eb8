"""Cost model and predictor sizes against the paper and against torch's own FLOP counter."""

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from dynamic_llava import DynamicLlavaConfig, ImagePredictor, TextPredictor, costs
from dynamic_llava.costs import llama_layer_flops, paper_prefill_flops


def test_paper_prefill_flops_for_llava_7b():
    dense = paper_prefill_flops(32, 4096, 2, kept_image_tokens=576)
    sparse = paper_prefill_flops(32, 4096, 2, kept_image_tokens=115)
    assert round(dense / 1e12, 1) == 10.1
    assert round(sparse / 1e12, 1) == 2.5


def test_exact_layer_flops_match_torch_counter():
    config = LlamaConfig(hidden_size=64, intermediate_size=160, num_attention_heads=8, num_key_value_heads=2,
                         num_hidden_layers=1, vocab_size=32)
    config._attn_implementation = "eager"
    layer = LlamaDecoderLayer(config, 0).eval()
    x = torch.randn(1, 10, 64)
    pos = torch.arange(10).unsqueeze(0)
    cos_sin = LlamaRotaryEmbedding(config)(x, pos)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        layer(x, attention_mask=None, position_embeddings=cos_sin, position_ids=pos)
    assert counter.get_total_flops() == llama_layer_flops(10, 10, config, causal=False)


def test_default_predictor_widths_are_the_papers_at_7b():
    config = DynamicLlavaConfig(text_config=dict(model_type="llama", hidden_size=4096, num_hidden_layers=32))
    assert (config.predictor_dim, config.predictor_mlp_dim) == (512, 2048)
    assert config.predictor_head_dims == [256, 128] and config.text_predictor_dims == [512, 256, 128]
    with torch.device("meta"):
        image = ImagePredictor(4096, config.predictor_dim, config.predictor_heads, config.predictor_mlp_dim,
                               config.predictor_blocks, config.predictor_head_dims)
        text = TextPredictor(4096, config.text_predictor_dims)
    # paper: about 8.6M and 2.3M parameters
    assert round(sum(p.numel() for p in image.parameters()) / 1e6, 1) == 8.6
    assert round(sum(p.numel() for p in text.parameters()) / 1e6, 1) == 2.3


def test_estimate_for_the_llava_15_7b_config_on_the_meta_device():
    from dynamic_llava import DynamicLlavaForConditionalGeneration
    from dynamic_llava.costs import estimate

    # llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14 at 336 px (feature layer -2) and a Vicuna-7B (Llama) decoder
    config = DynamicLlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096,
                           num_hidden_layers=24, num_attention_heads=16, image_size=336, patch_size=14,
                           projection_dim=768),
        text_config=dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32064),
        image_token_index=32000, vision_feature_layer=-2, image_seq_length=576,
    )
    with torch.device("meta"):
        model = DynamicLlavaForConditionalGeneration(config)  # the config builds a model: no weights needed
    assert model.tokens_per_image() == 576
    costs = estimate(model.config, text_tokens=40, new_tokens=64)
    assert costs["image_tokens_kept"] == 115
    assert round(costs["paper_prefill"]["dense"] / 1e12, 1) == 10.1
    assert round(costs["paper_prefill"]["sparse"] / 1e12, 1) == 2.5
    for part in ("prefill", "decode_with_cache", "decode_without_cache"):
        assert 0 < costs[part]["sparse"] < costs[part]["dense"]
    # exact prefill: language model over 616 tokens plus the vision tower (~0.35 TFLOPs at 336 px)
    assert 8e12 < costs["prefill"]["dense"] < 9.5e12
    # KV at the end, fp16: layers < K dense; layers >= K hold 40 text + 115 image + 50% of 63 generated tokens
    per_layer = 2 * 4096 * 2
    assert costs["kv_bytes_per_layer"]["dense"] == [(616 + 63) * per_layer] * 32
    assert costs["kv_bytes_per_layer"]["sparse"] == [(616 + 63) * per_layer] * 2 + [(155 + 31) * per_layer] * 30


def test_projector_flops_follow_the_concatenated_feature_layers():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from dynamic_llava.world.models import tiny_llava_config

    several = tiny_llava_config(40, width=32, layers=2)  # vision_feature_layer [0, -1]
    one = LlavaConfig(**{**several.to_dict(), "vision_feature_layer": -1})
    projector = LlavaForConditionalGeneration(several).model.multi_modal_projector.linear_1
    tokens = (several.vision_config.image_size // several.vision_config.patch_size) ** 2
    extra = costs.vision_flops(several) - costs.vision_flops(one)
    assert projector.in_features == 2 * several.vision_config.hidden_size
    assert extra == 2 * tokens * several.vision_config.hidden_size * several.text_config.hidden_size
