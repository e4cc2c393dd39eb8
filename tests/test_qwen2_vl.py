"""Qwen2-VL and Qwen2.5-VL: keep-all equals the stock class; pruned batches equal their samples one by one."""

import pytest
import torch
from tiny_qwen import FAMILIES, IMAGE, make_batch, one, tiny_pair

from dynamic_llava import DynamicLlavaCache, SparsityStats

# a left-padded batch of 3: one small image; two images of other sizes; text only
PROMPTS = [[("text", 3), ("image", (4, 4)), ("text", 5)],
           [("text", 2), ("image", (4, 8)), ("text", 2), ("image", (8, 8)), ("text", 3)],
           [("text", 6)]]
KEEP_ALL = dict(image_keep_rate=1.0, text_keep_rate=1.0)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_keep_all_equals_stock(family, attn):
    ours, stock = tiny_pair(family, attn=attn, **KEEP_ALL)
    batch = make_batch(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, stock(**batch).logits, atol=1e-5, rtol=1e-5)
        for cache in (True, False):
            mine = ours.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=cache)
            theirs = stock.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=cache)
            assert torch.equal(mine, theirs), cache


@pytest.mark.parametrize("family", list(FAMILIES))
def test_beam_search_equals_stock(family):
    ours, stock = tiny_pair(family, **KEEP_ALL)
    batch = make_batch(PROMPTS[:2])
    with torch.no_grad():
        mine = ours.generate(**batch, max_new_tokens=5, num_beams=3, do_sample=False)
        theirs = stock.generate(**batch, max_new_tokens=5, num_beams=3, do_sample=False)
    assert torch.equal(mine, theirs)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_image_keeps_its_own_share_and_batches_equal_samples(family):
    ours, _ = tiny_pair(family, image_keep_rate=0.25, text_keep_rate=0.5)
    batch = make_batch(PROMPTS)
    stats = SparsityStats()
    with torch.no_grad():
        ours(**batch, sparsity_stats=stats)
    # images of 4, 8 and 16 tokens keep 1, 2 and 4
    assert stats.image_tokens.tolist() == [4, 24, 0] and stats.image_tokens_kept.tolist() == [1, 6, 0]
    with torch.no_grad():
        together = ours.generate(**batch, max_new_tokens=8, do_sample=False)
        recomputed = ours.generate(**batch, max_new_tokens=8, do_sample=False, use_cache=False)
        assert torch.equal(together, recomputed)  # with and without a cache, the same tokens
        for i in range(len(PROMPTS)):
            alone = ours.generate(**one(batch, i, PROMPTS), max_new_tokens=8, do_sample=False)
            assert torch.equal(together[i, -8:], alone[0, -8:]), i


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_cache_holds_only_kept_tokens(family):
    ours, _ = tiny_pair(family, image_keep_rate=0.25, text_keep_rate=1.0)
    batch = make_batch(PROMPTS[:1])
    cache = DynamicLlavaCache.from_config(ours.config)
    with torch.no_grad():
        ours(**batch, past_key_values=cache, use_cache=True)
    lengths = [int(t[0]) for t in cache.layer_lengths()]
    prompt = int(batch["attention_mask"].sum())
    assert lengths[:2] == [prompt, prompt] and lengths[2:] == [prompt - 3] * 2  # 3 of 4 image tokens dropped


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_load_round_trip_and_stock_checkpoints_load(family, tmp_path):
    ours, stock = tiny_pair(family)
    ours.save_pretrained(tmp_path / "ours")
    model_class = FAMILIES[family][3]
    again = model_class.from_pretrained(tmp_path / "ours").eval()
    batch = make_batch(PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, ours(**batch).logits, atol=0, rtol=0)
    stock.save_pretrained(tmp_path / "stock")
    loaded = model_class.from_pretrained(tmp_path / "stock", **KEEP_ALL).eval()
    assert loaded.config.model_type == FAMILIES[family][2].model_type
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, stock(**batch).logits, atol=1e-5, rtol=1e-5)


def test_refusals_name_the_problem():
    ours, _ = tiny_pair("qwen2_vl")
    batch = make_batch(PROMPTS[:1])
    with pytest.raises(NotImplementedError, match="Videos"):
        ours(**batch, pixel_values_videos=batch["pixel_values"], video_grid_thw=batch["image_grid_thw"])
    with pytest.raises(ValueError, match="one label per input token"):
        ours(**batch, labels=batch["input_ids"][:, 1:])
    bad = dict(batch)
    bad["input_ids"] = batch["input_ids"].clone()
    bad["input_ids"][0, -1] = IMAGE  # one image token more than the image has
    bad["mm_token_type_ids"] = batch["mm_token_type_ids"]
    with pytest.raises(ValueError, match="image tokens"):
        ours(**bad)
    with pytest.raises(ValueError, match="image_keep_rat"):
        FAMILIES["qwen2_vl"][3].from_pretrained("unused", image_keep_rat=0.2)


def test_one_entry_point_picks_the_class_from_the_checkpoint(tmp_path):
    import json

    import dynamic_llava
    from tiny import stock_copy, tiny_dynamic

    qwen, qwen_stock = tiny_pair("qwen2_vl")
    qwen_stock.save_pretrained(tmp_path / "qwen2-vl")
    stock_copy(tiny_dynamic()).save_pretrained(tmp_path / "llava-hf")
    loaded = dynamic_llava.from_pretrained(tmp_path / "qwen2-vl", image_keep_rate=0.5)
    assert type(loaded).__name__ == "DynamicQwen2VLForConditionalGeneration" and loaded.config.image_keep_rate == 0.5
    assert type(dynamic_llava.from_pretrained(tmp_path / "llava-hf")).__name__ == "DynamicLlavaForConditionalGeneration"
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="'bert' model; Dynamic-LLaVA loads"):
        dynamic_llava.from_pretrained(tmp_path / "bert")
    with pytest.raises(FileNotFoundError):
        dynamic_llava.from_pretrained(tmp_path / "nothing-here")


def _decode_step_counts(model, context: int, **kwargs):
    """Counts (host syncs, bytes allocated) of one decode step with the cache, after `context` steps."""
    from dynamic_llava.benchmarking.counters import OpCounter

    batch = make_batch(PROMPTS)
    cache = DynamicLlavaCache.from_config(model.config) if hasattr(model.config, "sparse_layer") else None
    with torch.no_grad():
        out = model(**batch, past_key_values=cache, use_cache=True, **kwargs)
        cache, token, mask = out.past_key_values, out.logits[:, -1:].argmax(-1), batch["attention_mask"]
        for _ in range(context + 1):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = ((mask.sum(1, keepdim=True) - 1) + model.model.rope_deltas).unsqueeze(0).expand(3, -1, -1)
            counter = OpCounter()
            with counter:
                out = model(input_ids=token, attention_mask=mask, position_ids=positions, past_key_values=cache,
                            use_cache=True, **kwargs)
            token = out.logits[:, -1:].argmax(-1)
    return counter, token


@pytest.mark.parametrize("family", list(FAMILIES))
def test_decode_step_syncs_and_allocates_no_more_than_stock(family):
    from dynamic_llava.benchmarking.methods import ForcedTextPolicy

    ours, stock = tiny_pair(family, **KEEP_ALL)
    (theirs, their_token), (keep_all, token) = _decode_step_counts(stock, 6), _decode_step_counts(ours, 6)
    pruned, _ = _decode_step_counts(ours, 6, sparsity_policy=ForcedTextPolicy(image_keep_rate=0.25, text_keep_rate=0.5))
    assert torch.equal(token, their_token)
    assert keep_all.host_syncs <= theirs.host_syncs and pruned.host_syncs <= 2, (keep_all.syncs, pruned.syncs)
    assert keep_all.bytes_allocated < theirs.bytes_allocated and pruned.bytes_allocated < theirs.bytes_allocated


@pytest.mark.parametrize("family", list(FAMILIES))
def test_training_path_agrees_with_inference_and_reaches_the_predictors(family):
    ours, _ = tiny_pair(family, image_keep_rate=0.25)
    batch = make_batch(PROMPTS)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        inference = ours(**batch)
        keep = torch.zeros_like(mask, dtype=torch.float32).scatter_(1, inference.kept_index,
                                                                    inference.kept_valid.float())
        keep = torch.where(mask.bool(), keep, torch.ones_like(keep))
        fixed = ours(**batch, labels=ids, keep_override=keep)  # the physical decisions, as masks
        decided = ours(**batch, labels=ids)  # eval mode: the predictors' inference decisions
    index, real = inference.kept_index, inference.kept_valid & mask.bool().gather(1, inference.kept_index)
    for training in (fixed, decided):
        kept = training.logits.gather(1, index.unsqueeze(-1).expand(-1, -1, training.logits.shape[-1]))
        torch.testing.assert_close(kept[real], inference.logits[real], atol=1e-5, rtol=0)
    assert decided.image_keep_ratio[:2].tolist() == [0.25, 0.25] and decided.image_keep_ratio[2].isnan()
    ours.train()
    answer = torch.zeros_like(mask, dtype=torch.bool)
    answer[:, -4:] = True
    out = ours(**batch, labels=ids, answer_mask=answer & mask.bool(), gumbel_tau=0.5)
    out.loss.backward()
    for part in ("image_predictor", "text_predictor", "layers"):
        grads = [p.grad for n, p in ours.named_parameters() if f"language_model.{part}" in n]
        assert grads and all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0, part


def test_a_short_predictors_only_run_moves_the_image_keep_ratio_toward_its_target():
    ours, _ = tiny_pair("qwen2_vl", image_keep_rate=0.1)
    ours.train()
    for name, p in ours.named_parameters():
        p.requires_grad_("image_predictor" in name)
    optimizer = torch.optim.Adam([p for p in ours.parameters() if p.requires_grad], lr=3e-3)
    batch = make_batch(PROMPTS[:2], seed=4)
    torch.manual_seed(0)
    ratios = []
    for _ in range(40):
        out = ours(**batch, labels=batch["input_ids"], gumbel_tau=1.0)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        ratios.append(float(out.image_keep_ratio.mean()))
    first, last = sum(ratios[:5]) / 5, sum(ratios[-5:]) / 5
    assert last < first - 0.15 and last < 0.3, ratios


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_physical_path_equals_masked_reference(family, attn):
    from reference import qwen_masked_reference_logits

    ours, stock = tiny_pair(family, attn=attn, image_keep_rate=0.3)
    batch = make_batch(PROMPTS)
    with torch.no_grad():
        out = ours(**batch)
        key_kept = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
        key_kept.scatter_(1, out.kept_index, out.kept_valid)
        ref = qwen_masked_reference_logits(stock, batch, key_kept, ours.config.sparse_layer)
    real = out.kept_valid & batch["attention_mask"].bool().gather(1, out.kept_index)
    ref_kept = ref.gather(1, out.kept_index.unsqueeze(-1).expand(-1, -1, ref.shape[-1]))
    torch.testing.assert_close(out.logits[real], ref_kept[real], atol=1e-5, rtol=0)
    image = batch["input_ids"] == IMAGE
    assert int((key_kept & image).sum()) == 1 + 2 + 4  # floor(0.3 * 4), floor(0.3 * 8), floor(0.3 * 16)


@pytest.mark.parametrize("policy_name", ["fastv", "h2o", "random"])
def test_training_free_policies_run_on_qwen_and_batches_equal_samples(policy_name):
    from dynamic_llava import FastVPolicy, H2OPolicy, RandomPolicy

    policy = {"fastv": FastVPolicy(image_keep_rate=0.5), "h2o": H2OPolicy(heavy=2, recent=2),
              "random": RandomPolicy(image_keep_rate=0.5, text_keep_rate=0.5, seed=3)}[policy_name]
    ours, _ = tiny_pair("qwen2_vl", image_keep_rate=1.0 if policy_name == "h2o" else 0.5, text_keep_rate=1.0)
    batch = make_batch(PROMPTS)
    with torch.no_grad():
        together = ours.generate(**batch, max_new_tokens=8, do_sample=False, sparsity_policy=policy)
        for i in range(len(PROMPTS)):
            alone = ours.generate(**one(batch, i, PROMPTS), max_new_tokens=8, do_sample=False, sparsity_policy=policy)
            assert torch.equal(together[i, -8:], alone[0, -8:]), i


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_qwen3_deepstack_features_reach_the_kept_tokens_when_k_cuts_through_them(attn):
    """K = 1: DeepStack adds features after layers 0 and 1, so layer 1's go to the kept image tokens only."""
    from reference import qwen_masked_reference_logits

    ours, stock = tiny_pair("qwen3_vl", attn=attn, sparse_layer=1, image_keep_rate=0.3)
    batch = make_batch(PROMPTS)
    with torch.no_grad():
        out = ours(**batch)
        key_kept = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
        key_kept.scatter_(1, out.kept_index, out.kept_valid)
        ref = qwen_masked_reference_logits(stock, batch, key_kept, 1)
        together = ours.generate(**batch, max_new_tokens=6, do_sample=False)
        for i in range(len(PROMPTS)):
            alone = ours.generate(**one(batch, i, PROMPTS), max_new_tokens=6, do_sample=False)
            assert torch.equal(together[i, -6:], alone[0, -6:]), i
    real = out.kept_valid & batch["attention_mask"].bool().gather(1, out.kept_index)
    ref_kept = ref.gather(1, out.kept_index.unsqueeze(-1).expand(-1, -1, ref.shape[-1]))
    torch.testing.assert_close(out.logits[real], ref_kept[real], atol=1e-5, rtol=0)
