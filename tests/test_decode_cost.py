"""Guards on what a decode step costs, in counts (host syncs, bytes allocated), never in time."""

import pytest
import torch

from dynamic_llava import DynamicLlavaCache
from dynamic_llava.benchmarking.counters import OpCounter
from dynamic_llava.benchmarking.methods import ForcedTextPolicy
from tiny import make_prompts, stock_copy, tiny_dynamic


def test_counter_sees_syncs_and_allocations():
    t = torch.tensor([1, 0, 2])
    with OpCounter() as c:
        bool(t.all()), t.tolist(), t.nonzero(), t[t > 0]
    assert c.host_syncs == 4
    with OpCounter() as c:
        t.view(3, 1), t.add_(1)
    assert c.host_syncs == 0 and c.bytes_allocated == 0
    with OpCounter() as c:
        torch.zeros(10, dtype=torch.float32) + 1
    assert c.bytes_allocated >= 40


def decode_step_counts(model, context: int, **kwargs) -> OpCounter:
    """Counts for one decode step of a left-padded batch of 3, after `context` steps."""
    ids, mask, pixels = make_prompts([3, 6, 1], [4, 2, 7], seed=2)
    cache = DynamicLlavaCache.from_config(model.config) if hasattr(model.config, "sparse_layer") else None
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, past_key_values=cache, use_cache=True,
                    **kwargs)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        for step in range(context + 1):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            counter = OpCounter()
            with counter:
                out = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True, **kwargs)
            token = out.logits[:, -1:].argmax(-1)
    return counter


PRUNED = dict(sparsity_policy=ForcedTextPolicy(image_keep_rate=0.25, text_keep_rate=0.5))


@pytest.mark.parametrize("context", [2, 24])
def test_decode_step_syncs_at_most_stock_plus_one_and_allocates_less(context):
    model = tiny_dynamic(image_keep_rate=1.0, text_keep_rate=1.0)
    stock = decode_step_counts(stock_copy(model), context)
    keep_all = decode_step_counts(model, context)
    pruned = decode_step_counts(model, context, **PRUNED)
    assert stock.host_syncs == 1  # the padding check of the causal mask
    assert keep_all.host_syncs <= stock.host_syncs, keep_all.syncs  # nothing dropped: no width to read
    assert pruned.host_syncs <= 2, pruned.syncs  # the same, and the longest sample's length
    assert keep_all.bytes_allocated < stock.bytes_allocated
    assert pruned.bytes_allocated < stock.bytes_allocated


def test_sparse_layers_allocate_nothing_that_grows_with_the_context():
    """Only layers < K grow their K/V by concatenation (as stock does); the sparse layers write in place."""
    model = tiny_dynamic(image_keep_rate=1.0, text_keep_rate=1.0)
    short, long = decode_step_counts(model, 4, **PRUNED), decode_step_counts(model, 36, **PRUNED)
    cfg = model.config.text_config
    per_token = 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4 * 3  # K+V, fp32, B=3
    dense_growth = model.config.sparse_layer * per_token * 32  # the dense layers' cat over 32 more tokens
    assert long.bytes_allocated - short.bytes_allocated <= dense_growth + 4096


def test_generate_grows_the_buffers_once():
    model = tiny_dynamic()
    ids, mask, pixels = make_prompts([3, 6, 1], [4, 2, 7], seed=2)
    cache, new = DynamicLlavaCache.from_config(model.config), 20
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, past_key_values=cache,
                       max_new_tokens=new, min_new_tokens=new, do_sample=False)
    layer = cache.layers[model.config.sparse_layer]
    per_image = model.tokens_per_image()
    prefill = ids.shape[1] - per_image + int(model.config.image_keep_rate * per_image)  # tokens entering layer K
    assert cache.table.capacity == prefill + 1 + new  # the prefill, a spare slot and the reservation: no regrowth
    assert layer.key_buffer.shape[2] == cache.table.capacity
    assert cache.allocated_nbytes() > cache.nbytes()  # room left over, not counted as held


@pytest.mark.parametrize("context", [2, 24])
def test_per_request_settings_keep_the_sync_bound(context):
    """Per-request control rows (one batch, mixed settings) cost no extra host sync in a decode step."""
    from dynamic_llava import SparsityRequest
    from dynamic_llava.control import control_tensor

    model = tiny_dynamic(image_keep_rate=1.0, text_keep_rate=1.0)
    stock = decode_step_counts(stock_copy(model), context)
    every = [SparsityRequest(image_keep_rate=1.0, text_keep_threshold=0.0)] * 3
    mixed = [SparsityRequest(image_keep_rate=0.5), SparsityRequest(text_keep_threshold=0.6, kv_budget_tokens=20),
             SparsityRequest(kv_budget_tokens=30)]
    for requests, bound in ((every, stock.host_syncs), (mixed, 2)):
        counts = decode_step_counts(model, context, sparsity_control=control_tensor(model, requests, 3))
        assert counts.host_syncs <= bound, (requests, counts.syncs)


def test_batch_one_keep_all_decode_skips_the_sparse_mask_and_equals_stock():
    """No padding and nothing dropped: layers >= K attend without a mask, as stock's do, with stock's logits."""
    from unittest import mock

    import dynamic_llava.decoder as decoder

    model = tiny_dynamic(image_keep_rate=1.0, text_keep_rate=1.0)
    stock = stock_copy(model)
    ids, mask, pixels = make_prompts([5], [3], seed=4)
    cache = DynamicLlavaCache.from_config(model.config)
    with torch.no_grad():
        ours = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, past_key_values=cache, use_cache=True)
        theirs = stock(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=True)
        stock_cache, token = theirs.past_key_values, theirs.logits[:, -1:].argmax(-1)
        for _ in range(6):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            with mock.patch.object(decoder, "create_causal_mask", wraps=decoder.create_causal_mask) as masks:
                ours = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
            theirs = stock(input_ids=token, attention_mask=mask, past_key_values=stock_cache, use_cache=True)
            assert masks.call_count == 1  # the full layers' mask only
            torch.testing.assert_close(ours.logits[:, -1], theirs.logits[:, -1], atol=1e-5, rtol=0)
            token = theirs.logits[:, -1:].argmax(-1)
    assert cache.table.complete
