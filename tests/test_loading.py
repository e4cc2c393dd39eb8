"""Checkpoints: round trips are bit-exact, plain llava-hf directories load, mismatches fail clearly."""

import logging

import pytest
import torch
from transformers import AutoModelForImageTextToText

from dynamic_llava import DynamicLlavaConfig, DynamicLlavaForConditionalGeneration
from tiny import make_prompts, stock_copy, tiny_dynamic


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = tiny_dynamic(sparse_layer=1, image_keep_rate=0.3, text_keep_rate=0.7)
    model.save_pretrained(tmp_path)
    loaded = DynamicLlavaForConditionalGeneration.from_pretrained(tmp_path)
    assert isinstance(loaded.config, DynamicLlavaConfig)
    assert loaded.config.sparsity_dict() == model.config.sparsity_dict()
    theirs = loaded.state_dict()
    ours = model.state_dict()
    assert ours.keys() == theirs.keys()
    assert any("image_predictor" in k for k in ours) and any("text_predictor" in k for k in ours)
    for key, value in ours.items():
        assert torch.equal(value, theirs[key]), key
    auto = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert isinstance(auto, DynamicLlavaForConditionalGeneration)


def test_saved_layout_is_the_llava_hf_layout(tmp_path):
    """A Dynamic-LLaVA checkpoint is a llava-hf checkpoint plus predictors: the stock class loads it."""
    from transformers import LlavaForConditionalGeneration

    model = tiny_dynamic()
    model.save_pretrained(tmp_path)
    stock, info = LlavaForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    assert info["unexpected_keys"] and all("predictor" in k for k in info["unexpected_keys"])
    ours = model.state_dict()
    for key, value in stock.state_dict().items():
        assert torch.equal(value, ours[key]), key


def test_plain_llava_checkpoint_loads_with_fresh_predictors(tmp_path, caplog):
    model = tiny_dynamic()
    stock = stock_copy(model)
    stock.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        loaded = DynamicLlavaForConditionalGeneration.from_pretrained(tmp_path, image_keep_rate=0.5)
    notes = [r.getMessage() for r in caplog.records if "predictor" in r.getMessage()]
    assert len(notes) == 1 and "initialised fresh" in notes[0], notes
    assert loaded.config.image_keep_rate == 0.5
    stock_state = stock.state_dict()
    for key, value in loaded.state_dict().items():
        if "predictor" not in key:
            assert torch.equal(value, stock_state[key]), key
    # and with every keep rate at 1.0 it is the stock model
    loaded.config.image_keep_rate = 1.0
    loaded.config.text_keep_rate = 1.0
    ids, mask, pixels = make_prompts([2, 4], [3, 1])
    with torch.no_grad():
        ours = loaded(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        theirs = stock(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-5, rtol=0)


def test_predictor_width_mismatch_is_a_clear_error(tmp_path):
    tiny_dynamic().save_pretrained(tmp_path)  # predictor_dim=16
    with pytest.raises(ValueError, match="predictor weights .* do not match the predictor widths"):
        DynamicLlavaForConditionalGeneration.from_pretrained(tmp_path, predictor_dim=32)
