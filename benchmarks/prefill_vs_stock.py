"""Prefill against the stock transformers model, side by side, with the FLOPs ideal: LLaVA or Qwen2-VL shapes.

One process, random weights shared by the stock class and ours (`load_state_dict(assign=True)`: one copy in
memory), a tiny vision tower so that the decoder is what is timed. Three methods run in turn, pass after pass
(a busy machine slows them alike): stock, ours with every keep rate at 1.0, ours pruned (image 0.2 by the image
predictor). Reported per batch: median prefill time of each, the measured speed-up of pruned over stock, the
decoder's FLOPs ideal (`costs.prefill_flops`, dense over pruned, the image predictor included) and their ratio.

    python benchmarks/prefill_vs_stock.py --family qwen2_vl --hidden 3584 --heads 28 --kv-heads 4 \\
        --intermediate 18944 --layers 8 --image-side 24 --threads 2 --output results/prefill_vs_stock_qwen2_vl.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from dynamic_llava import costs
from dynamic_llava.policies import LearnedPolicy

IMAGE, PAD, VIDEO, START, END = 3, 0, 4, 5, 6
MERGE, PATCH = 2, 4


def text_config(args, **extra) -> dict:
    return dict(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                max_position_embeddings=args.text + args.image_side ** 2 + 64, pad_token_id=PAD, **extra)


def models(args):
    """(ours, stock) with the same weights, in the same tensors."""
    sparsity = dict(sparse_layer=2, image_keep_rate=1.0, text_keep_rate=1.0)
    if args.family == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        from dynamic_llava import DynamicQwen2VLConfig, DynamicQwen2VLForConditionalGeneration

        head = args.hidden // args.heads
        quarter = head // 2 // 4
        rope = {"rope_type": "default", "rope_theta": 1000000.0,
                "mrope_section": [head // 2 - 2 * quarter, quarter, quarter]}
        base = dict(vision_config=dict(depth=1, embed_dim=64, hidden_size=args.hidden, num_heads=4, patch_size=PATCH,
                                       spatial_merge_size=MERGE, temporal_patch_size=2),
                    text_config=text_config(args, rope_parameters=rope), image_token_id=IMAGE, video_token_id=VIDEO,
                    vision_start_token_id=START, vision_end_token_id=END)
        ours_class, ours_config, stock_class, stock_config = (DynamicQwen2VLForConditionalGeneration,
                                                              DynamicQwen2VLConfig, Qwen2VLForConditionalGeneration,
                                                              Qwen2VLConfig)
    else:
        from transformers import LlavaConfig, LlavaForConditionalGeneration

        from dynamic_llava import DynamicLlavaConfig, DynamicLlavaForConditionalGeneration

        side = args.image_side
        base = dict(vision_config=dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=1, num_attention_heads=4, image_size=side * 4, patch_size=4),
                    text_config=dict(model_type="llama", **text_config(args)), image_token_index=IMAGE,
                    vision_feature_layer=-1, image_seq_length=side * side)
        ours_class, ours_config, stock_class, stock_config = (DynamicLlavaForConditionalGeneration, DynamicLlavaConfig,
                                                              LlavaForConditionalGeneration, LlavaConfig)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    ours = ours_class(ours_config(**base, **sparsity)).to(dtype).eval()
    with torch.device("meta"):
        stock = stock_class(stock_config(**base))
    missing, _ = stock.load_state_dict(ours.state_dict(), strict=False, assign=True)
    assert not missing, missing
    stock.eval()
    theirs = dict(ours.named_buffers())
    for name, buffer in list(stock.named_buffers()):  # buffers outside the state dict (rotary): ours, same names
        if buffer.is_meta:
            owner, _, leaf = name.rpartition(".")
            stock.get_submodule(owner).register_buffer(leaf, theirs[name], persistent=False)
    for module in stock.modules():  # rotary embeddings keep a second reference to their frequencies
        if hasattr(module, "original_inv_freq") and getattr(module, "original_inv_freq").is_meta:
            module.original_inv_freq = module.inv_freq
    return ours, stock


def inputs_for(args, batch: int) -> dict:
    g = torch.Generator().manual_seed(0)
    tokens = args.image_side ** 2
    if args.family == "qwen2_vl":
        block = [START, *[IMAGE] * tokens, END]
    else:
        block = [IMAGE] * tokens
    rows = [torch.cat([torch.randint(7, args.vocab, (args.text // 2,), generator=g), torch.tensor(block),
                       torch.randint(7, args.vocab, (args.text - args.text // 2,), generator=g)]) for _ in range(batch)]
    ids = torch.stack(rows)
    mask = torch.ones_like(ids)
    if args.family == "qwen2_vl":
        side = args.image_side * MERGE
        return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == IMAGE).long(),
                    pixel_values=torch.randn(batch * side * side, 3 * 2 * PATCH * PATCH, generator=g),
                    image_grid_thw=torch.tensor([[1, side, side]] * batch))
    side = args.image_side * 4
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(batch, 3, side, side, generator=g))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--family", choices=("llava", "qwen2_vl"), default="qwen2_vl")
    p.add_argument("--hidden", type=int, default=3584)
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=18944)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--image-side", type=int, default=24, help="image tokens per side (24: 576 tokens)")
    p.add_argument("--text", type=int, default=64, help="text tokens around the image")
    p.add_argument("--batches", default="1")
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--output", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ours, stock = models(args)
    pruned = LearnedPolicy(image_keep_rate=0.2)
    config = ours.config
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        inputs = inputs_for(args, batch)
        runs = {"stock": (stock, {}), "keep-all": (ours, {}), "pruned": (ours, {"sparsity_policy": pruned})}
        times = {name: [] for name in runs}
        with torch.inference_mode():
            logits = {}
            for name, (model, extra) in runs.items():  # warm-up, untimed; keep-all must give stock's logits
                logits[name] = model(**inputs, use_cache=True, logits_to_keep=1, **extra).logits[:, -1].float()
            gap = float((logits["keep-all"] - logits["stock"]).abs().max())
            scale = float(logits["stock"].abs().max())
            if gap > 1e-3 * max(scale, 1.0) * (1 if args.dtype == "float32" else 50):
                raise SystemExit(f"keep-all logits differ from stock by {gap:.3g}: not the same model")
            for i in range(args.passes):
                for name, (model, extra) in runs.items():
                    start = time.perf_counter()
                    model(**inputs, use_cache=True, logits_to_keep=1, **extra)
                    times[name].append(time.perf_counter() - start)
                print(f"batch {batch}: pass {i + 1}/{args.passes}: "
                      + ", ".join(f"{n} {t[-1]:.2f} s" for n, t in times.items()), flush=True)
        tokens = int(inputs["input_ids"].shape[1])
        image_tokens = args.image_side ** 2
        kept = tokens - image_tokens + max(1, int(0.2 * image_tokens + 1e-6))
        dense_flops = costs.prefill_flops(config.text_config, tokens, config.sparse_layer)
        pruned_flops = (costs.prefill_flops(config.text_config, tokens, config.sparse_layer, kept)
                        + costs.image_predictor_flops(config, image_tokens))
        median = {n: statistics.median(t) for n, t in times.items()}
        ideal = dense_flops / pruned_flops
        measured = median["stock"] / median["pruned"]
        row = {"batch": batch, "tokens": tokens, "image_tokens": image_tokens, "kept_tokens": kept,
               "stock_s": median["stock"], "keep_all_s": median["keep-all"], "pruned_s": median["pruned"],
               "keep_all_vs_stock": median["keep-all"] / median["stock"], "speedup_vs_stock": measured,
               "flops_ideal": ideal, "measured_over_ideal": measured / ideal, "all_s": times}
        rows.append(row)
        print(f"batch {batch}, {tokens} tokens ({image_tokens} image, {kept} kept): stock {median['stock']:.2f} s, "
              f"keep-all {median['keep-all']:.2f} s ({row['keep_all_vs_stock']:.2f}x), pruned {median['pruned']:.2f} s: "
              f"{measured:.2f}x faster than stock for a FLOPs ideal of {ideal:.2f}x (measured / ideal "
              f"{measured / ideal:.2f})", flush=True)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
