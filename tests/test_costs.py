"""Cost model and predictor sizes against the paper and against torch's own FLOP counter."""

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from dynamic_llava import DynamicLlavaConfig, ImagePredictor, TextPredictor
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
