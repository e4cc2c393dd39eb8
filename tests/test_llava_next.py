"""LLaVA-NeXT (anyres): keep-all equals the stock class; each image keeps its own share; batches equal samples."""

import math

import pytest
import torch
from tiny import IMAGE_TOKEN
from tiny_next import picture, tiny_next_pair, tiny_next_processor

from dynamic_llava import SparsityStats

TEXTS = ["USER: <image>\nwhat is in the picture? ASSISTANT:", "USER: <image>\n<image>\nis there a dog? ASSISTANT:",
         "USER: describe the image ASSISTANT:"]
IMAGES = [(30, 12), (12, 30), (28, 28)]  # wide, tall, square: different tile grids and token counts
KEEP_ALL = dict(image_keep_rate=1.0, text_keep_rate=1.0)


def inputs_for(texts, sizes, seed=0):
    processor = tiny_next_processor()
    images = [picture(w, h, seed + i) for i, (w, h) in enumerate(sizes)]
    return processor(images=images or None, text=texts, padding=True, return_tensors="pt")


@pytest.mark.parametrize("text_model", ["llama", "mistral"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_keep_all_equals_stock(text_model, attn):
    ours, stock = tiny_next_pair(text_model, attn=attn, **KEEP_ALL)
    batch = inputs_for(TEXTS, IMAGES)
    assert len(set((batch["input_ids"] == IMAGE_TOKEN).sum(1).tolist())) == 3  # the prompts differ in image tokens
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, stock(**batch).logits, atol=1e-5, rtol=1e-5)
        for cache in (True, False):
            mine = ours.generate(**batch, max_new_tokens=5, do_sample=False, use_cache=cache)
            theirs = stock.generate(**batch, max_new_tokens=5, do_sample=False, use_cache=cache)
            assert torch.equal(mine, theirs), cache
        mine = ours.generate(**batch, max_new_tokens=4, num_beams=2, do_sample=False)
        theirs = stock.generate(**batch, max_new_tokens=4, num_beams=2, do_sample=False)
    assert torch.equal(mine, theirs)


def test_each_image_keeps_its_own_share_and_batches_equal_samples():
    ours, _ = tiny_next_pair(image_keep_rate=0.25, text_keep_rate=0.5)
    batch = inputs_for(TEXTS, IMAGES)
    with torch.no_grad():
        encoded = ours.model.get_image_features(batch["pixel_values"], batch["image_sizes"], vision_feature_layer=-1,
                                                vision_feature_select_strategy="default", return_dict=True)
        counts = [len(f) for f in encoded.pooler_output]
        stats = SparsityStats()
        ours(**batch, sparsity_stats=stats)
    assert len(set(counts)) > 1
    kept = [math.floor(0.25 * c) for c in counts]
    assert stats.image_tokens.tolist() == [counts[0], counts[1] + counts[2], 0]
    assert stats.image_tokens_kept.tolist() == [kept[0], kept[1] + kept[2], 0]
    with torch.no_grad():
        together = ours.generate(**batch, max_new_tokens=8, do_sample=False)
        assert torch.equal(together, ours.generate(**batch, max_new_tokens=8, do_sample=False, use_cache=False))
        owners = [[0], [1, 2], []]
        for i, text in enumerate(TEXTS):
            alone = ours.generate(**inputs_for([text], [IMAGES[j] for j in owners[i]], seed=owners[i][0] if owners[i]
                                               else 0), max_new_tokens=8, do_sample=False)
            assert torch.equal(together[i, -8:], alone[0, -8:]), i


def test_training_path_in_eval_mode_gives_the_inference_decisions(tmp_path):
    ours, stock = tiny_next_pair(image_keep_rate=0.25)
    batch = inputs_for(TEXTS[:2], IMAGES)
    with torch.no_grad():
        inference = ours(**batch)
        training = ours(**batch, labels=batch["input_ids"])
    index, mask = inference.kept_index, batch["attention_mask"].bool()
    real = inference.kept_valid & mask.gather(1, index)
    kept = training.logits.gather(1, index.unsqueeze(-1).expand(-1, -1, training.logits.shape[-1]))
    torch.testing.assert_close(kept[real], inference.logits[real], atol=1e-5, rtol=0)
    # a stock LLaVA-NeXT checkpoint loads (fresh predictors) through the one entry point
    import dynamic_llava

    stock.save_pretrained(tmp_path / "llava-next")
    loaded = dynamic_llava.from_pretrained(tmp_path / "llava-next", **KEEP_ALL).eval()
    assert type(loaded).__name__ == "DynamicLlavaNextForConditionalGeneration"
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, stock(**batch).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_physical_path_equals_masked_reference_and_the_cache_holds_kept_tokens(attn):
    from reference import masked_reference_logits

    from dynamic_llava import DynamicLlavaCache

    ours, stock = tiny_next_pair(attn=attn, image_keep_rate=0.3, text_keep_rate=1.0)
    batch = inputs_for(TEXTS, IMAGES)
    cache = DynamicLlavaCache.from_config(ours.config)
    with torch.no_grad():
        out = ours(**batch, past_key_values=cache, use_cache=True)
        key_kept = torch.zeros_like(batch["attention_mask"], dtype=torch.bool)
        key_kept.scatter_(1, out.kept_index, out.kept_valid)
        features = stock.model.get_image_features(batch["pixel_values"], batch["image_sizes"], vision_feature_layer=-1,
                                                  vision_feature_select_strategy="default").pooler_output
        ref = masked_reference_logits(stock, batch["input_ids"], batch["attention_mask"], None, key_kept,
                                      ours.config.sparse_layer, features=features)
    real = out.kept_valid & batch["attention_mask"].bool().gather(1, out.kept_index)
    ref_kept = ref.gather(1, out.kept_index.unsqueeze(-1).expand(-1, -1, ref.shape[-1]))
    torch.testing.assert_close(out.logits[real], ref_kept[real], atol=1e-5, rtol=0)
    image = batch["input_ids"] == IMAGE_TOKEN
    valid = batch["attention_mask"].bool()
    dropped = (image & ~key_kept).sum(dim=1)
    lengths = cache.layer_lengths()
    assert lengths[0].tolist() == [valid.shape[1]] * 3  # layers < K: the padded batch, as stock
    assert torch.equal(lengths[-1], valid.sum(dim=1) - dropped)  # layers >= K: each sample's kept tokens only
