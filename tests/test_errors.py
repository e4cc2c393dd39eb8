"""Bad input gets a clear error naming the problem, before any compute."""

import pytest
import torch
from transformers import DynamicCache

from dynamic_llava import DynamicLlavaConfig
from tiny import IMAGE_TOKEN, make_prompts, tiny_config_kwargs, tiny_dynamic


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(image_keep_rate=0.0), r"image_keep_rate=0.0: expected a number in \(0, 1\]"),
        (dict(image_keep_rate=1.5), r"image_keep_rate=1.5: expected a number in \(0, 1\]"),
        (dict(text_keep_rate=-0.1), r"text_keep_rate=-0.1: expected a number in \(0, 1\]"),
        (dict(sparse_layer=0), r"sparse_layer=0: expected an integer in \[1, 3\]"),
        (dict(sparse_layer=4), r"sparse_layer=4: expected an integer in \[1, 3\]"),
        (dict(predictor_dim=15, predictor_heads=2), "predictor_dim=15: expected an even multiple of predictor_heads=2"),
    ],
)
def test_bad_sparsity_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        DynamicLlavaConfig(**tiny_config_kwargs(), **settings)


def test_settings_changed_after_loading_are_checked_on_assignment_and_before_compute():
    model = tiny_dynamic()
    with pytest.raises(ValueError, match=r"image_keep_rate=2.0: expected a number in \(0, 1\]"):
        model.config.image_keep_rate = 2.0
    assert model.config.image_keep_rate == 0.25  # the refused value was not stored
    model.config.__dict__["image_keep_rate"] = 2.0  # bypassing the check: forward still refuses it
    ids, mask, pixels = make_prompts([2], [3])
    with pytest.raises(ValueError, match="image_keep_rate=2.0"):
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels)


def test_placeholders_must_match_images():
    model = tiny_dynamic()
    ids, mask, pixels = make_prompts([2, 3], [3, 1])
    with pytest.raises(ValueError, match="32 image placeholder tokens but 1 image"):
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels[:1])
    with pytest.raises(ValueError, match="16 image placeholder tokens but 0 image"):
        model(input_ids=ids[:1], attention_mask=mask[:1])
    truncated = ids[:1].clone()
    truncated[truncated == IMAGE_TOKEN] = 7
    with pytest.raises(ValueError, match="no image token"):
        model(input_ids=truncated, pixel_values=pixels[:1])


def test_prompt_longer_than_context():
    model = tiny_dynamic()
    limit = model.config.text_config.max_position_embeddings
    ids = torch.full((1, limit + 1), 5)
    with pytest.raises(ValueError, match=f"context is {limit}"):
        model(input_ids=ids)


def test_foreign_cache_and_static_cache_are_refused():
    model = tiny_dynamic()
    ids, mask, pixels = make_prompts([2], [3])
    filled = DynamicCache()
    filled.update(torch.zeros(1, 2, 3, 12), torch.zeros(1, 2, 3, 12), 0)
    with pytest.raises(TypeError, match="DynamicLlavaCache"):
        model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, past_key_values=filled)
    with pytest.raises(ValueError, match="cache_implementation='static'"):
        model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, cache_implementation="static")
