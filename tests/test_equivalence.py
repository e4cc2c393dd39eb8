"""Keep rates 1.0: the Dynamic-LLaVA model is the stock LlavaForConditionalGeneration."""

import pytest
import torch

from tiny import IMAGE_TOKEN, make_prompts, stock_copy, tiny_dynamic

ATTN = ["sdpa", "eager"]


def dense_pair(attn):
    model = tiny_dynamic(attn=attn, image_keep_rate=1.0, text_keep_rate=1.0)
    return model, stock_copy(model, attn)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("batch", [1, 3])
def test_logits_match_stock(attn, batch):
    model, stock = dense_pair(attn)
    ids, mask, pixels = make_prompts([3, 6, 1][:batch], [4, 2, 7][:batch])
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        theirs = stock(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    assert ours.kept_index is None
    assert ours.logits.shape == theirs.logits.shape
    real = mask.bool()  # padding positions carry no meaning in either model
    torch.testing.assert_close(ours.logits[real], theirs.logits[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
def test_greedy_tokens_match_stock(attn, use_cache, batch):
    model, stock = dense_pair(attn)
    ids, mask, pixels = make_prompts([2, 5, 1][:batch], [3, 1, 6][:batch], seed=1)
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=8, do_sample=False,
                  suppress_tokens=[IMAGE_TOKEN])
    with torch.no_grad():
        ours = model.generate(**kwargs, use_cache=use_cache)
        theirs = stock.generate(**kwargs, use_cache=use_cache)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("attn", ATTN)
def test_decode_step_logits_match_stock(attn):
    """Logits of every decoding step with cache, not only the argmax, equal the stock model's."""
    model, stock = dense_pair(attn)
    ids, mask, pixels = make_prompts([2, 5, 1], [3, 1, 6], seed=2)
    kwargs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=6, do_sample=False,
                  output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ours = model.generate(**kwargs)
        theirs = stock.generate(**kwargs)
    for a, b in zip(ours.logits, theirs.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
