"""Tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL configs, inputs and an image-only Qwen2-VL processor, built
in-process (no downloads)."""

from __future__ import annotations

import torch
from tiny import sparse_and_stock
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)

from dynamic_llava import (
    DynamicQwen2_5_VLConfig,
    DynamicQwen2_5_VLForConditionalGeneration,
    DynamicQwen2VLConfig,
    DynamicQwen2VLForConditionalGeneration,
    DynamicQwen3VLConfig,
    DynamicQwen3VLForConditionalGeneration,
)

PAD, IMAGE, VIDEO, START, END = 0, 3, 4, 5, 6
PATCH, MERGE, TEMPORAL = 4, 2, 2
FAMILIES = {
    "qwen2_vl": (Qwen2VLConfig, Qwen2VLForConditionalGeneration, DynamicQwen2VLConfig,
                 DynamicQwen2VLForConditionalGeneration),
    "qwen2_5_vl": (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, DynamicQwen2_5_VLConfig,
                   DynamicQwen2_5_VLForConditionalGeneration),
    "qwen3_vl": (Qwen3VLConfig, Qwen3VLForConditionalGeneration, DynamicQwen3VLConfig,
                 DynamicQwen3VLForConditionalGeneration),
}


def config_kwargs(family: str) -> dict:
    vision = dict(depth=2, embed_dim=32, hidden_size=48, num_heads=2, patch_size=PATCH, spatial_merge_size=MERGE,
                  temporal_patch_size=TEMPORAL, in_channels=3)
    if family == "qwen2_5_vl":
        vision = dict(depth=2, hidden_size=32, out_hidden_size=48, intermediate_size=64, num_heads=2,
                      patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL, in_channels=3,
                      window_size=16, fullatt_block_indexes=[1])
    if family == "qwen3_vl":  # DeepStack features after text layers 0 and 1 (K = 2 cuts after them)
        vision = dict(depth=2, hidden_size=32, out_hidden_size=48, intermediate_size=64, num_heads=2,
                      patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL,
                      num_position_embeddings=64, deepstack_visual_indexes=[0, 1])
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 2]}
    if family == "qwen3_vl":
        rope["mrope_interleaved"] = True
    text = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=64, max_position_embeddings=512, pad_token_id=PAD,
                rope_parameters=rope, **({"head_dim": 12} if family == "qwen3_vl" else {}))
    return dict(vision_config=vision, text_config=text, image_token_id=IMAGE, video_token_id=VIDEO,
                vision_start_token_id=START, vision_end_token_id=END)


def tiny_pair(family: str = "qwen2_vl", attn: str = "sdpa", seed: int = 0, **sparsity):
    """(ours, stock) with the same weights (the stock class without the predictors)."""
    stock_config_class, stock_class, config_class, model_class = FAMILIES[family]
    return sparse_and_stock(config_class, model_class, stock_config_class, stock_class, config_kwargs(family), attn,
                            seed, **sparsity)


def make_batch(prompts: list[list[tuple[str, object]]], seed: int = 0):
    """Left-padded inputs from prompts of ("text", n tokens) and ("image", (h, w) in patches) parts."""
    g = torch.Generator().manual_seed(seed)
    rows, types, pixels, grids = [], [], [], []
    for prompt in prompts:
        ids, kinds = [], []
        for kind, value in prompt:
            if kind == "text":
                ids += torch.randint(7, 64, (value,), generator=g).tolist()
                kinds += [0] * value
            else:
                h, w = value
                n = h * w // MERGE**2
                ids += [START] + [IMAGE] * n + [END]
                kinds += [0] + [1] * n + [0]
                pixels.append(torch.randn(h * w, 3 * TEMPORAL * PATCH * PATCH, generator=g))
                grids.append([1, h, w])
        rows.append(ids)
        types.append(kinds)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD)
    mm_types = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (r, t) in enumerate(zip(rows, types)):
        input_ids[i, width - len(r):] = torch.tensor(r)
        mm_types[i, width - len(r):] = torch.tensor(t)
        mask[i, width - len(r):] = 1
    out = dict(input_ids=input_ids, attention_mask=mask, mm_token_type_ids=mm_types)
    if pixels:
        out.update(pixel_values=torch.cat(pixels), image_grid_thw=torch.tensor(grids))
    return out


def one(batch: dict, i: int, prompts) -> dict:
    """Sample i of `make_batch(prompts)` alone (padding removed, its own images)."""
    mask = batch["attention_mask"][i].bool()
    out = {k: batch[k][i : i + 1, mask] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if "image_grid_thw" in batch:
        grids = batch["image_grid_thw"]
        sizes = grids.prod(-1).tolist()
        owners = [j for j, p in enumerate(prompts) for kind, _ in p if kind == "image"]
        start = sum(s for s, o in zip(sizes, owners) if o < i)
        mine = [k for k, o in enumerate(owners) if o == i]
        if mine:
            count = sum(sizes[k] for k in mine)
            out["pixel_values"] = batch["pixel_values"][start : start + count]
            out["image_grid_thw"] = grids[mine]
    return out



QWEN_SPECIAL_TOKENS = ["<pad>", "<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                       "<|vision_end|>", "<unk>"]  # ids 0-6 as the tiny configs name them
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_qwen_processor(family: str = "qwen2_vl"):
    """A real Qwen2-VL (or Qwen3-VL) processor for the tiny configs: a BPE tokenizer with Qwen's special tokens, the stock PIL
    image processor with 4-px patches merged 2 x 2, and a Qwen-style chat template."""
    from tiny_processor import CORPUS, without_video_processor

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    tok.decoder = decoders.Metaspace(prepend_scheme="first")
    tok.train_from_iterator(CORPUS + ["user assistant system"], trainers.BpeTrainer(
        vocab_size=64, special_tokens=QWEN_SPECIAL_TOKENS, show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                        unk_token="<unk>", clean_up_tokenization_spaces=False)
    assert tokenizer.convert_tokens_to_ids(["<|image_pad|>", "<|vision_start|>"]) == [IMAGE, START]
    images = Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=MERGE, temporal_patch_size=TEMPORAL,
                                      size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64})
    processor_class = Qwen3VLProcessor if family == "qwen3_vl" else Qwen2VLProcessor  # Qwen2.5-VL's is Qwen2-VL's
    return without_video_processor(processor_class)(image_processor=images, tokenizer=tokenizer,
                                                    chat_template=QWEN_CHAT_TEMPLATE)
