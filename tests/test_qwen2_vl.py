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
    with pytest.raises(NotImplementedError, match="Training"):
        ours(**batch, labels=batch["input_ids"])
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
