"""Per-request sparsity (`SparsityRequest`): one batch mixing settings equals each sample run alone with its own,
KV budgets hold, nothing on the config changes; composed policies; the controller's modes and memory rule."""

import copy

import pytest
import torch

from dynamic_llava import (
    ComposedPolicy,
    DynamicLlavaCache,
    FastVPolicy,
    LearnedPolicy,
    RandomPolicy,
    SparsityController,
    SparsityRequest,
    SparsityStats,
    StreamingLLMPolicy,
)
from dynamic_llava import costs
from dynamic_llava.control import control_tensor
from tiny import IMAGE_TOKEN, make_prompts, tiny_dynamic
from tiny_qwen import make_batch, one, tiny_pair

GEN = dict(max_new_tokens=12, do_sample=False, suppress_tokens=[IMAGE_TOKEN])
MIXED = [
    SparsityRequest(image_keep_rate=0.5),
    SparsityRequest(image_keep_rate=1.0, text_keep_threshold=0.0),
    SparsityRequest(kv_budget_tokens=14),
    SparsityRequest(text_keep_threshold=0.7, kv_budget_tokens=12),
]


def unpad(ids, mask, i):
    n = int(mask[i].sum())
    return ids[i : i + 1, -n:], mask[i : i + 1, -n:]


def no_budget(request):
    return SparsityRequest(image_keep_rate=request.image_keep_rate, text_keep_threshold=request.text_keep_threshold)


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("policy", [None, RandomPolicy(seed=2)], ids=["learned", "random"])
def test_mixed_requests_batched_equal_one_by_one(use_cache, policy):
    model = tiny_dynamic()
    before = model.config.to_dict()
    ids, mask, pixels = make_prompts([3, 6, 1, 4], [4, 2, 7, 1], seed=4)
    requests = MIXED if use_cache else [no_budget(r) for r in MIXED]
    stats = SparsityStats()
    with torch.no_grad():
        batched = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=use_cache,
                                 sparsity_requests=requests, sparsity_policy=policy, sparsity_stats=stats, **GEN)
        kept = stats.summary()["image_tokens_kept"]
        assert kept[0] == 8 and kept[1] == 16  # rates 0.5 and 1.0 of 16 tokens; the model's own rate is 0.25
        for i in range(ids.shape[0]):
            one_ids, one_mask = unpad(ids, mask, i)
            alone = model.generate(input_ids=one_ids, attention_mask=one_mask, pixel_values=pixels[i : i + 1],
                                   use_cache=use_cache, sparsity_requests=requests[i], sparsity_policy=policy, **GEN)
            assert torch.equal(alone[0, one_ids.shape[1] :], batched[i, ids.shape[1] :]), f"sample {i}"
    assert model.config.to_dict() == before  # nothing mutated at run time


def test_mixed_requests_beam_search_equal_one_by_one():
    model = tiny_dynamic()
    ids, mask, pixels = make_prompts([3, 6, 1], [4, 2, 7], images_per_prompt=2, seed=7)
    requests = MIXED[:3]
    beams = dict(GEN, num_beams=3, num_return_sequences=2)
    with torch.no_grad():
        batched = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, sparsity_requests=requests,
                                 **beams)
        for i in range(ids.shape[0]):
            one_ids, one_mask = unpad(ids, mask, i)
            alone = model.generate(input_ids=one_ids, attention_mask=one_mask, pixel_values=pixels[2 * i : 2 * i + 2],
                                   sparsity_requests=requests[i], **beams)
            mine, theirs = alone[:, one_ids.shape[1] :], batched[2 * i : 2 * i + 2, ids.shape[1] :]
            # a batch's shorter beams are padded after their end token, with the end token
            assert torch.equal(mine, theirs[:, : mine.shape[1]]), f"sample {i}"
            assert bool((theirs[:, mine.shape[1] :] == model.generation_config.eos_token_id).all()), f"sample {i}"


def test_requests_equal_the_config_settings_they_replace():
    ids, mask, pixels = make_prompts([3, 6], [4, 2], seed=3)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, **GEN)
    model = tiny_dynamic()
    configured = tiny_dynamic(image_keep_rate=0.5, text_keep_rate=1.0)  # same seed, same weights
    with torch.no_grad():
        by_config = configured.generate(**inputs)
        by_request = model.generate(**inputs, sparsity_requests=SparsityRequest(image_keep_rate=0.5,
                                                                                text_keep_threshold=0.0))
        assert torch.equal(by_config, by_request)
        # the trained rule (keep logit > drop logit) is threshold 0.5
        assert torch.equal(model.generate(**inputs),
                           model.generate(**inputs, sparsity_requests=SparsityRequest(text_keep_threshold=0.5)))


def test_text_threshold_moves_the_share_kept():
    model = tiny_dynamic()
    ids, mask, pixels = make_prompts([3], [4], seed=1)
    kept = []
    for threshold in (0.0, 0.3, 0.5, 0.7, 1.0):
        stats = SparsityStats()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, sparsity_stats=stats,
                           sparsity_requests=SparsityRequest(text_keep_threshold=threshold), **GEN)
        summary = stats.summary()
        kept.append(summary["generated_tokens_kept"][0])
    assert kept == sorted(kept, reverse=True) and kept[0] == summary["generated_tokens"][0] and kept[-1] == 0


def test_kv_budget_bounds_the_sparse_layers_and_keeps_the_prompt_text():
    model = tiny_dynamic(image_keep_rate=1.0, text_keep_rate=1.0)
    ids, mask, pixels = make_prompts([3, 6, 2], [4, 2, 5], images_per_prompt=2, seed=8)
    text = (mask.sum(dim=1) - (ids == IMAGE_TOKEN).sum(dim=1)).tolist()
    budgets = [text[0] + 3, text[1] + 20, text[2] + 1]
    cache = DynamicLlavaCache.from_config(model.config)
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, past_key_values=cache,
                       sparsity_requests=[SparsityRequest(kv_budget_tokens=b) for b in budgets],
                       **dict(GEN, max_new_tokens=30))
    lengths = cache.table.lengths.tolist()
    assert lengths == budgets  # 30 new tokens fill every budget, none is passed
    width = cache.table.width
    held = cache.table.valid_mask(width)
    scores = cache.table.scores[:, :width]
    prompt_text = (torch.isinf(scores) & held).sum(dim=1).tolist()
    assert prompt_text == text  # prompt text is never dropped
    full = cache.layer_lengths()[0].tolist()
    assert all(f > length for f, length in zip(full, lengths))  # layers < K hold everything


def test_kv_budget_at_prefill_keeps_the_top_scored_image_tokens():
    """A budget below the prompt keeps the image tokens the learned predictor ranks highest: for one image, the
    same tokens as the keep rate that leaves that many."""
    model = tiny_dynamic(image_keep_rate=1.0)
    ids, mask, pixels = make_prompts([3], [4], seed=2)
    text = int(mask.sum() - (ids == IMAGE_TOKEN).sum())
    with torch.no_grad():
        budgeted = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=True,
                         sparsity_requests=SparsityRequest(kv_budget_tokens=text + 5, image_keep_rate=1.0))
        by_rate = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_cache=True,
                        sparsity_requests=SparsityRequest(image_keep_rate=5 / 16))
    assert torch.equal(budgeted.kept_index, by_rate.kept_index)
    assert budgeted.past_key_values.table.lengths.tolist() == [text + 5]


def test_kv_budget_in_bytes_covers_every_layer():
    model = tiny_dynamic(image_keep_rate=1.0)
    ids, mask, pixels = make_prompts([3], [4], seed=2)
    new = 20
    per_token = costs.kv_bytes_per_token(model.config.text_config, model.dtype.itemsize)
    layers, k_layer = model.config.text_config.num_hidden_layers, model.config.sparse_layer
    context = int(mask.sum()) + new
    budget = per_token * (k_layer * context + (layers - k_layer) * 15)  # room for 15 tokens in layers >= K
    control = control_tensor(model, [SparsityRequest(kv_budget_bytes=budget)], 1, context_tokens=[context])
    assert control[0, 2].item() == 15
    cache = DynamicLlavaCache.from_config(model.config)
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, past_key_values=cache,
                       sparsity_requests=SparsityRequest(kv_budget_bytes=budget), **dict(GEN, max_new_tokens=new))
    held = sum(length[0].item() for length in cache.layer_lengths()) * per_token
    assert held <= budget and cache.table.lengths.item() == 15


@pytest.mark.parametrize(
    "requests, kwargs, message",
    [
        (SparsityRequest(kv_budget_tokens=3), {}, "never dropped"),
        (SparsityRequest(kv_budget_tokens=40), {"use_cache": False}, "needs a KV cache"),
        ([SparsityRequest()] * 3, {}, "one per sample"),
        ({"image_rate": 0.5}, {}, "Unknown sparsity setting"),
        (SparsityRequest(kv_budget_bytes=10), {}, "kv_budget_bytes=10"),
        ("fast", {}, "sparsity_requests must be"),
    ],
)
def test_bad_requests_are_refused_before_any_work(requests, kwargs, message):
    model = tiny_dynamic()
    ids, mask, pixels = make_prompts([3, 6], [4, 2], seed=3)
    with pytest.raises((ValueError, TypeError), match=message):
        model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, sparsity_requests=requests,
                       **dict(GEN, **kwargs))


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(image_keep_rate=0.0), "image_keep_rate"),
        (dict(text_keep_threshold=1.5), "text_keep_threshold"),
        (dict(kv_budget_tokens=0), "kv_budget_tokens"),
        (dict(kv_budget_tokens=8, kv_budget_bytes=1000), "not both"),
        (dict(kv_budget_tokens=2.5), "kv_budget_tokens"),
    ],
)
def test_bad_request_fields(fields, message):
    with pytest.raises((ValueError, TypeError), match=message):
        SparsityRequest(**fields)


def test_composed_policy_asks_each_part_its_own_question():
    model = tiny_dynamic()
    ids, mask, pixels = make_prompts([3, 6, 1], [4, 2, 7], seed=5)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels, **GEN)
    with torch.no_grad():
        assert torch.equal(model.generate(**inputs, sparsity_policy=FastVPolicy()),
                           model.generate(**inputs, sparsity_policy=ComposedPolicy(images=FastVPolicy())))
        assert torch.equal(model.generate(**inputs),
                           model.generate(**inputs, sparsity_policy=ComposedPolicy(images=LearnedPolicy(),
                                                                                   text=LearnedPolicy())))
        mixed = ComposedPolicy(images=RandomPolicy(seed=1), text=LearnedPolicy(), evict=StreamingLLMPolicy(window=3))
        assert mixed.evicts_text and not mixed.needs_attention
        with_cache = model.generate(**inputs, sparsity_policy=mixed)
        without = model.generate(**inputs, sparsity_policy=mixed, use_cache=False)
        assert torch.equal(with_cache, without)
        for i in range(ids.shape[0]):
            one_ids, one_mask = unpad(ids, mask, i)
            alone = model.generate(input_ids=one_ids, attention_mask=one_mask, pixel_values=pixels[i : i + 1],
                                   sparsity_policy=mixed, **GEN)
            assert torch.equal(alone[0, one_ids.shape[1] :], with_cache[i, ids.shape[1] :]), f"sample {i}"
    with pytest.raises(TypeError, match="ComposedPolicy parts"):
        ComposedPolicy(images=ComposedPolicy())
    with pytest.raises(TypeError, match="TokenPolicy instance"):
        ComposedPolicy(text="learned")


def test_qwen_mixed_requests_batched_equal_one_by_one():
    model, _ = tiny_pair("qwen2_vl")
    prompts = [[("text", 3), ("image", (4, 8)), ("text", 2)], [("text", 5), ("image", (8, 8)), ("text", 1)],
               [("text", 2), ("image", (4, 4)), ("text", 4)]]
    batch = make_batch(prompts, seed=1)
    requests = [SparsityRequest(image_keep_rate=0.5), SparsityRequest(image_keep_rate=1.0, text_keep_threshold=0.0),
                SparsityRequest(kv_budget_tokens=10)]
    gen = dict(max_new_tokens=8, do_sample=False, suppress_tokens=[3, 4, 5, 6])
    with torch.no_grad():
        batched = model.generate(**batch, sparsity_requests=requests, **gen)
        width = batch["input_ids"].shape[1]
        for i in range(len(prompts)):
            alone_inputs = one(batch, i, prompts)
            alone = model.generate(**alone_inputs, sparsity_requests=requests[i], **gen)
            assert torch.equal(alone[0, alone_inputs["input_ids"].shape[1] :], batched[i, width:]), f"sample {i}"


def test_controller_modes_and_memory_rule():
    controller = SparsityController(defaults={"decode_cache": SparsityRequest(kv_budget_tokens=64,
                                                                              text_keep_threshold=0.6)})
    assert controller.resolve(None, "decode_cache") == SparsityRequest(kv_budget_tokens=64, text_keep_threshold=0.6)
    # a request's own settings win; a budget counts as one setting
    resolved = controller.resolve(SparsityRequest(kv_budget_bytes=4096), "decode_cache")
    assert resolved.kv_budget_tokens is None and resolved.kv_budget_bytes == 4096 and resolved.text_keep_threshold == 0.6
    assert controller.resolve(None, "decode_no_cache") == SparsityRequest()  # no cache: no budget to apply
    with pytest.raises(ValueError, match="needs decoding with a KV cache"):
        controller.resolve(SparsityRequest(kv_budget_tokens=8), "prefill")
    with pytest.raises(ValueError, match="Unknown mode"):
        SparsityController(defaults={"decode": SparsityRequest()})
    model = tiny_dynamic()
    assert SparsityController.from_memory(model, fraction=0.25, free_bytes=8 * 2**30).kv_budget_bytes == 2 * 2**30
    measured = SparsityController.from_memory(model)  # the host's available memory, read now
    assert 0 < measured.kv_budget_bytes
    with pytest.raises(ValueError, match="fraction"):
        SparsityController.from_memory(model, fraction=1.5, free_bytes=1024)


def test_requests_leave_a_copy_of_the_config_equal():
    model = tiny_dynamic()
    config = copy.deepcopy(model.config.to_dict())
    ids, mask, pixels = make_prompts([3], [4], seed=3)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels,
              sparsity_requests=SparsityRequest(image_keep_rate=0.9, text_keep_threshold=0.1))
    assert model.config.to_dict() == config
