"""With pruning: exact batching, the physical path equals a masking-only reference, the cache really shrinks."""

import math

import pytest
import torch

from dynamic_llava import DynamicLlavaCache, RandomPolicy, SparsityStats
from reference import masked_reference_logits
from tiny import IMAGE_TOKEN, make_prompts, stock_copy, tiny_dynamic

ATTN = ["sdpa", "eager"]
GEN = dict(max_new_tokens=10, do_sample=False, suppress_tokens=[IMAGE_TOKEN])


def unpad(ids, mask, i):
    n = int(mask[i].sum())
    return ids[i : i + 1, -n:], mask[i : i + 1, -n:]


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("policy", [None, RandomPolicy(text_keep_rate=0.5, seed=3)], ids=["learned", "random"])
def test_batched_equals_one_by_one(attn, use_cache, policy):
    model = tiny_dynamic(attn=attn)
    ids, mask, pixels = make_prompts([3, 6, 1, 4], [4, 2, 7, 1], seed=4)
    with torch.no_grad():
        batched = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=use_cache,
                                 sparsity_policy=policy, **GEN)
        for i in range(ids.shape[0]):
            one_ids, one_mask = unpad(ids, mask, i)
            single = model.generate(input_ids=one_ids, attention_mask=one_mask, pixel_values=pixels[i : i + 1],
                                    use_cache=use_cache, sparsity_policy=policy, **GEN)
            assert torch.equal(single[0, one_ids.shape[1] :], batched[i, ids.shape[1] :]), f"sample {i}"


@pytest.mark.parametrize("attn", ATTN)
def test_cache_and_no_cache_decide_alike(attn):
    """Decoding with cache (drop = never stored) and without (drop = removed each step) give the same tokens."""
    model = tiny_dynamic(attn=attn)
    ids, mask, pixels = make_prompts([2, 5, 1], [3, 1, 6], seed=5)
    policy = RandomPolicy(text_keep_rate=0.4, seed=1)
    with torch.no_grad():
        with_cache = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, sparsity_policy=policy, **GEN)
        without = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, sparsity_policy=policy,
                                 use_cache=False, **GEN)
    assert torch.equal(with_cache, without)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("images", [1, 2])
def test_physical_path_equals_masked_reference(attn, images):
    model = tiny_dynamic(attn=attn, image_keep_rate=0.3)
    stock = stock_copy(model, attn)
    ids, mask, pixels = make_prompts([3, 6, 1], [4, 2, 7], images_per_prompt=images, seed=6)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        assert out.kept_index is not None
        key_kept = torch.zeros_like(mask, dtype=torch.bool)
        key_kept.scatter_(1, out.kept_index, out.kept_valid)
        ref = masked_reference_logits(stock, ids, mask, pixels, key_kept, model.config.sparse_layer)
    real = out.kept_valid & mask.bool().gather(1, out.kept_index)
    ref_kept = ref.gather(1, out.kept_index.unsqueeze(-1).expand(-1, -1, ref.shape[-1]))
    torch.testing.assert_close(out.logits[real], ref_kept[real], atol=1e-5, rtol=0)
    # each image keeps exactly floor(rate * tokens) of its own tokens
    per_image = model.tokens_per_image()
    n_keep = math.floor(0.3 * per_image)
    for b in range(ids.shape[0]):
        starts = [int(p) for p in torch.nonzero(ids[b] == IMAGE_TOKEN).flatten() if p == 0 or ids[b, p - 1] != IMAGE_TOKEN]
        assert len(starts) == images
        for s in starts:
            assert int(key_kept[b, s : s + per_image].sum()) == n_keep


def test_prefill_cache_lengths_and_bytes():
    model = tiny_dynamic(image_keep_rate=0.25)
    ids, mask, pixels = make_prompts([3, 6, 1], [4, 2, 7], seed=7)
    cache = DynamicLlavaCache.from_config(model.config)
    stats = SparsityStats()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels, past_key_values=cache, use_cache=True,
              sparsity_stats=stats)
    per_image = model.tokens_per_image()
    kept_images = math.floor(0.25 * per_image)
    real = mask.sum(dim=1)
    expected_sparse = real - per_image + kept_images
    k = model.config.sparse_layer
    for i, lengths in enumerate(cache.layer_lengths()):
        if i < k:
            assert lengths.tolist() == [ids.shape[1]] * ids.shape[0]  # dense layers keep the padded length
        else:
            assert lengths.tolist() == expected_sparse.tolist()
    assert stats.image_tokens.tolist() == [per_image] * 3
    assert stats.image_tokens_kept.tolist() == [kept_images] * 3
    text = model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    bytes_per_slot = 2 * text.num_key_value_heads * head_dim * 4 * ids.shape[0]
    sparse_slots = int(expected_sparse.max())
    expected = k * ids.shape[1] * bytes_per_slot + (text.num_hidden_layers - k) * sparse_slots * bytes_per_slot
    assert cache.nbytes() == expected
    assert cache.nbytes() < cache.dense_nbytes()
    assert stats.total_kv_bytes == cache.nbytes()


def test_decode_cache_holds_only_kept_generated_tokens():
    model = tiny_dynamic(image_keep_rate=0.25)
    ids, mask, pixels = make_prompts([3, 6, 1], [4, 2, 7], seed=8)
    stats = SparsityStats()
    cache = DynamicLlavaCache.from_config(model.config)
    policy = RandomPolicy(text_keep_rate=0.5, seed=2)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, past_key_values=cache,
                             sparsity_policy=policy, sparsity_stats=stats, min_new_tokens=20, max_new_tokens=20,
                             do_sample=False, suppress_tokens=[IMAGE_TOKEN])
    generated = out.shape[1] - ids.shape[1]
    judged = generated - 1  # the last generated token is never fed back
    assert stats.generated_tokens.tolist() == [judged] * 3
    kept = stats.generated_tokens_kept
    assert 0 < int(kept.sum()) < 3 * judged
    per_image = model.tokens_per_image()
    prefill_sparse = mask.sum(dim=1) - per_image + math.floor(0.25 * per_image)
    lengths = cache.layer_lengths()
    k = model.config.sparse_layer
    assert lengths[0].tolist() == [ids.shape[1] + judged] * 3
    for layer in lengths[k:]:
        assert layer.tolist() == (prefill_sparse + kept).tolist()
    # the tensors are as long as the longest sample, no longer
    sparse_layer = cache.layers[k]
    assert sparse_layer.keys.shape[-2] == int((prefill_sparse + kept).max())
    assert cache.nbytes() < cache.dense_nbytes()


def test_text_keep_rate_one_keeps_every_generated_token():
    model = tiny_dynamic(text_keep_rate=1.0)
    ids, mask, pixels = make_prompts([2], [3], seed=9)
    stats = SparsityStats()
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, sparsity_stats=stats, **GEN)
    assert torch.equal(stats.generated_tokens, stats.generated_tokens_kept)


def test_no_state_left_between_calls():
    model = tiny_dynamic()
    ids, mask, pixels = make_prompts([2, 4], [3, 1], seed=10)
    with torch.no_grad():
        first = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=False, **GEN)
        model.generate(input_ids=ids[:1], attention_mask=mask[:1], pixel_values=pixels[:1], use_cache=False,
                       max_new_tokens=3)
        again = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=False, **GEN)
    assert torch.equal(first, again)


def test_sampling_beam_search_and_streamer():
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value)

        def end(self):
            self.ended = True

    model = tiny_dynamic()
    ids, mask, pixels = make_prompts([2, 5], [3, 1], seed=11)
    policy = RandomPolicy(text_keep_rate=0.5)
    common = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, sparsity_policy=policy,
                  suppress_tokens=[IMAGE_TOKEN], max_new_tokens=6)
    with torch.no_grad():
        torch.manual_seed(0)
        a = model.generate(do_sample=True, top_k=5, **common)
        torch.manual_seed(0)
        b = model.generate(do_sample=True, top_k=5, **common)
        assert torch.equal(a, b)
        beams = model.generate(num_beams=3, do_sample=False, **common)
        for i in range(2):
            one_ids, one_mask = unpad(ids, mask, i)
            single = model.generate(input_ids=one_ids, attention_mask=one_mask, pixel_values=pixels[i : i + 1],
                                    sparsity_policy=policy, suppress_tokens=[IMAGE_TOKEN], max_new_tokens=6,
                                    num_beams=3, do_sample=False)
            assert torch.equal(single[0, one_ids.shape[1] :], beams[i, ids.shape[1] :])
        streamer = Collect()
        out = model.generate(input_ids=ids[:1], attention_mask=mask[:1], pixel_values=pixels[:1], streamer=streamer,
                             sparsity_policy=policy, suppress_tokens=[IMAGE_TOKEN], max_new_tokens=5, do_sample=False)
    streamed = torch.cat([c.reshape(-1) for c in streamer.chunks[1:]])
    assert torch.equal(streamed, out[0, ids.shape[1] :])
    assert streamer.ended


@pytest.mark.parametrize("mode", ["beams", "return_sequences"])
def test_several_images_per_prompt_with_beams_equal_stock(mode):
    """generate() encodes the images before repeating the inputs per beam / returned sequence (two images per
    prompt: repeating pixel_values would pair beams with the wrong images)."""
    model = tiny_dynamic(image_keep_rate=1.0, text_keep_rate=1.0)
    stock = stock_copy(model)
    ids, mask, pixels = make_prompts([3, 1, 2], [2, 4, 1], images_per_prompt=2, seed=5)
    extra = dict(num_beams=3) if mode == "beams" else dict(num_beams=2, num_return_sequences=2)
    common = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=6, min_new_tokens=6,
                  do_sample=False, suppress_tokens=[IMAGE_TOKEN], output_scores=True, return_dict_in_generate=True,
                  **extra)
    with torch.no_grad():
        ours, theirs = model.generate(**common), stock.generate(**common)
    assert torch.equal(ours.sequences, theirs.sequences)
    for a, b in zip(ours.scores, theirs.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    pruned = tiny_dynamic()  # with pruning, each beam still equals its prompt run alone
    with torch.no_grad():
        batched = pruned.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=6,
                                  min_new_tokens=6, do_sample=False, suppress_tokens=[IMAGE_TOKEN], num_beams=3)
        for i in range(3):
            n = int(mask[i].sum())
            single = pruned.generate(input_ids=ids[i : i + 1, -n:], attention_mask=mask[i : i + 1, -n:],
                                     pixel_values=pixels[2 * i : 2 * i + 2], max_new_tokens=6, min_new_tokens=6,
                                     do_sample=False, suppress_tokens=[IMAGE_TOKEN], num_beams=3)
            assert torch.equal(single[0, n:], batched[i, ids.shape[1] :])


@pytest.mark.parametrize("attn", ATTN)
def test_a_chunk_after_the_prompt_equals_the_whole_sequence_at_once(attn):
    """Several new tokens on a cache whose samples hold different numbers of kept tokens (a follow-up turn):
    the same logits as the prompt and the chunk run together without a cache."""
    model = tiny_dynamic(attn=attn, image_keep_rate=0.25, text_keep_rate=1.0)
    ids, mask, pixels = make_prompts([3, 6, 1], [4, 2, 7], seed=8)
    chunk = torch.randint(4, 60, (3, 3), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=True)
        cache = first.past_key_values
        assert len(set(cache.layer_lengths()[model.config.sparse_layer].tolist())) > 1
        full_mask = torch.cat([mask, torch.ones_like(chunk)], dim=1)
        after = model(input_ids=chunk, attention_mask=full_mask, past_key_values=cache, use_cache=True)
        whole = model(input_ids=torch.cat([ids, chunk], dim=1), attention_mask=full_mask, pixel_values=pixels)
    assert whole.kept_index is not None and after.kept_index is None  # the chunk is text: every token kept
    torch.testing.assert_close(after.logits, whole.logits[:, -3:], atol=1e-5, rtol=0)  # logits of kept tokens


@pytest.mark.parametrize("attn", ATTN)
def test_diverse_selection_batches_exactly_and_equals_the_masked_reference(attn):
    model = tiny_dynamic(attn=attn, image_keep_rate=0.3, image_selection="diverse")
    top = tiny_dynamic(attn=attn, image_keep_rate=0.3)
    ids, mask, pixels = make_prompts([3, 6, 1], [4, 2, 7], images_per_prompt=2, seed=6)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        key_kept = torch.zeros_like(mask, dtype=torch.bool).scatter_(1, out.kept_index, out.kept_valid)
        ref = masked_reference_logits(stock_copy(model, attn), ids, mask, pixels, key_kept, model.config.sparse_layer)
        by_top = top(input_ids=ids, attention_mask=mask, pixel_values=pixels)
        top_kept = torch.zeros_like(mask, dtype=torch.bool).scatter_(1, by_top.kept_index, by_top.kept_valid)
        batched = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, **GEN)
        for i in range(ids.shape[0]):
            one_ids, one_mask = unpad(ids, mask, i)
            single = model.generate(input_ids=one_ids, attention_mask=one_mask, pixel_values=pixels[2 * i : 2 * i + 2],
                                    **GEN)
            answer = single[0, one_ids.shape[1] :]  # may end early (its end token); the batch pads after it
            assert torch.equal(answer, batched[i, ids.shape[1] : ids.shape[1] + answer.numel()]), f"sample {i}"
    real = out.kept_valid & mask.bool().gather(1, out.kept_index)
    ref_kept = ref.gather(1, out.kept_index.unsqueeze(-1).expand(-1, -1, ref.shape[-1]))
    torch.testing.assert_close(out.logits[real], ref_kept[real], atol=1e-5, rtol=0)
    assert int(key_kept.sum()) == int(top_kept.sum())  # the same count per image ...
    assert not torch.equal(key_kept, top_kept)  # ... but other tokens than the highest scores
