"""LLaVA-OneVision (images, Qwen2 decoder): keep-all equals the stock class; each image keeps its own share;
a batch equals its samples. Inputs are built without its processor (which needs torchvision for videos)."""

import math

import pytest
import torch
from tiny import sparse_and_stock
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

import dynamic_llava
from dynamic_llava import DynamicLlavaOnevisionConfig, DynamicLlavaOnevisionForConditionalGeneration, SparsityStats

CONFIG = dict(
    vision_config=dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, image_size=16, patch_size=4),
    text_config=dict(model_type="qwen2", hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64, max_position_embeddings=1024,
                     pad_token_id=0),
    image_token_index=3, video_token_index=4, image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]],
    vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
)
SIZES = [(12, 30), (30, 12), (20, 20)]  # (height, width): wide, tall, square


def pair(**sparsity):
    return sparse_and_stock(DynamicLlavaOnevisionConfig, DynamicLlavaOnevisionForConditionalGeneration,
                            LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, CONFIG, **sparsity)


def batch_for(stock, owners: list[list[int]]):
    """Left-padded prompts; prompt i holds the images `owners[i]` (indices into SIZES) with their own tokens."""
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(len(SIZES), 5, 3, 16, 16, generator=g)
    sizes = torch.tensor(SIZES)
    with torch.no_grad():
        features = stock.model.get_image_features(pixels, sizes, vision_feature_layer=-1,
                                                  vision_feature_select_strategy="full",
                                                  vision_aspect_ratio="anyres_max_9").pooler_output
    counts = [len(f) for f in features]
    rows = []
    for i, images in enumerate(owners):
        row = torch.randint(7, 64, (2 + i,), generator=g).tolist()
        for j in images:
            row += [3] * counts[j] + [8]
        rows.append(row + [9, 10])
    width = max(len(r) for r in rows)
    ids, mask = torch.zeros(len(rows), width, dtype=torch.long), torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = torch.tensor(r), 1
    used = [j for images in owners for j in images]
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels[used], image_sizes=sizes[used]), counts


def sample(batch: dict, owners: list[list[int]], i: int) -> dict:
    """Prompt i of `batch_for(stock, owners)` alone: its tokens without padding, its own images."""
    mask = batch["attention_mask"][i].bool()
    out = dict(input_ids=batch["input_ids"][i : i + 1, mask], attention_mask=batch["attention_mask"][i : i + 1, mask])
    start = sum(len(images) for images in owners[:i])
    if owners[i]:
        images = slice(start, start + len(owners[i]))
        out.update(pixel_values=batch["pixel_values"][images], image_sizes=batch["image_sizes"][images])
    return out


def test_keep_all_equals_stock():
    ours, stock = pair(image_keep_rate=1.0, text_keep_rate=1.0)
    batch, _ = batch_for(stock, [[0], [1, 2], []])
    with torch.no_grad():
        torch.testing.assert_close(ours(**batch).logits, stock(**batch).logits, atol=1e-5, rtol=1e-5)
        for cache in (True, False):
            assert torch.equal(ours.generate(**batch, max_new_tokens=5, do_sample=False, use_cache=cache),
                               stock.generate(**batch, max_new_tokens=5, do_sample=False, use_cache=cache))


def test_each_image_keeps_its_own_share_and_batches_equal_samples(tmp_path):
    ours, stock = pair()
    owners = [[0], [1, 2], []]
    batch, counts = batch_for(stock, owners)
    assert len(set(counts)) > 1
    stats = SparsityStats()
    with torch.no_grad():
        ours(**batch, sparsity_stats=stats)
        together = ours.generate(**batch, max_new_tokens=6, do_sample=False)
        for i in range(len(owners)):
            alone = ours.generate(**sample(batch, owners, i), max_new_tokens=6, do_sample=False)
            assert torch.equal(together[i, -6:], alone[0, -6:]), i
    kept = [math.floor(0.25 * c) for c in counts]
    assert stats.image_tokens_kept.tolist() == [kept[0], kept[1] + kept[2], 0]
    stock.save_pretrained(tmp_path / "onevision")
    loaded = dynamic_llava.from_pretrained(tmp_path / "onevision")
    assert type(loaded).__name__ == "DynamicLlavaOnevisionForConditionalGeneration"


def test_videos_are_refused_clearly():
    ours, stock = pair()
    batch, _ = batch_for(stock, [[0]])
    with pytest.raises(NotImplementedError, match="Videos"):
        ours(**batch, pixel_values_videos=torch.zeros(1, 2, 3, 16, 16))
