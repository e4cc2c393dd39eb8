"""Per-token decode with the KV cache: Dynamic-LLaVA against the stock transformers model, side by side.

One process, one model shape, random weights (speed does not depend on them): the stock
`LlavaForConditionalGeneration`, ours with every keep rate at 1.0, and ours pruned (image 0.2 by the image
predictor, half of the generated tokens kept out of the cache), all with the same weights and prompts. The
three decode in lockstep, one step each in turn, so a busy machine slows them alike; each figure is the
median step time over a window of steps around a context length, as a ratio to stock. A step's host syncs
and bytes allocated are counted once per method (`dynamic_llava.benchmarking.counters`).

    python benchmarks/decode_vs_stock.py                       # batch 1 and 8, context 256 / 1K / 2K
    python benchmarks/decode_vs_stock.py --quick               # a smoke run
    python benchmarks/decode_vs_stock.py --family qwen2_vl     # the same against stock Qwen2-VL
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration

from dynamic_llava import DynamicLlavaCache, DynamicLlavaConfig, DynamicLlavaForConditionalGeneration
from dynamic_llava.benchmarking.counters import OpCounter
from dynamic_llava.benchmarking.methods import ForcedTextPolicy

IMAGE_TOKEN, PAD = 3, 0
VISION_START, VISION_END, MERGE, PATCH = 5, 6, 2, 4


def configs(args) -> tuple[dict, dict]:
    side = args.image_side
    base = dict(
        vision_config=dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                           num_attention_heads=4, image_size=side * 4, patch_size=4),
        text_config=dict(model_type="llama", hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, vocab_size=args.vocab,
                         max_position_embeddings=args.prompt + max(args.contexts) + 64, pad_token_id=PAD),
        image_token_index=IMAGE_TOKEN, vision_feature_layer=-1, image_seq_length=side * side,
    )
    return base, dict(sparse_layer=2, image_keep_rate=1.0, text_keep_rate=1.0)


def qwen_models(args):
    """(ours, stock) Qwen2-VL with the decoder of `configs` and a small vision tower (speed: the decoder's)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from dynamic_llava import DynamicQwen2VLConfig, DynamicQwen2VLForConditionalGeneration

    head = args.hidden // args.heads
    quarter = head // 2 // 4
    base = dict(
        vision_config=dict(depth=1, embed_dim=64, hidden_size=args.hidden, num_heads=4, patch_size=PATCH,
                           spatial_merge_size=MERGE, temporal_patch_size=2),
        text_config=dict(hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                         vocab_size=args.vocab, max_position_embeddings=args.prompt + max(args.contexts) + 64,
                         pad_token_id=PAD, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                            "mrope_section": [head // 2 - 2 * quarter, quarter, quarter]}),
        image_token_id=IMAGE_TOKEN, video_token_id=4, vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
    )
    torch.manual_seed(0)
    ours = DynamicQwen2VLForConditionalGeneration(DynamicQwen2VLConfig(**base, sparse_layer=2, image_keep_rate=1.0,
                                                                       text_keep_rate=1.0)).eval()
    stock = Qwen2VLForConditionalGeneration(Qwen2VLConfig(**base)).eval()
    missing, _ = stock.load_state_dict(ours.state_dict(), strict=False)
    assert not missing, missing
    return ours, stock


def left_padded(args, batch: int, image_block: list[int], lowest_text_id: int, g: torch.Generator):
    """(ids, mask) of `batch` prompts: random text around one image block, left padded (batch > 1: the samples
    are 4 tokens apart in length)."""
    rows = []
    for b in range(batch):
        text = args.prompt - len(image_block) - (0 if batch == 1 else 4 * b)
        before = text // 3
        rows.append(torch.cat([torch.randint(lowest_text_id, args.vocab, (before,), generator=g),
                               torch.tensor(image_block),
                               torch.randint(lowest_text_id, args.vocab, (text - before,), generator=g)]))
    width = max(len(r) for r in rows)
    ids = torch.full((batch, width), PAD)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, width - len(r):], mask[b, width - len(r):] = r, 1
    return ids, mask


def qwen_prompts(args, batch: int, tokens_per_image: int) -> dict:
    """Qwen2-VL inputs shaped like `prompts`: one image of `tokens_per_image` tokens per sample."""
    g = torch.Generator().manual_seed(0)
    side = int(tokens_per_image ** 0.5) * MERGE  # patches per side
    ids, mask = left_padded(args, batch, [VISION_START, *[IMAGE_TOKEN] * tokens_per_image, VISION_END], 7, g)
    return dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == IMAGE_TOKEN).long(),
                pixel_values=torch.randn(batch * side * side, 3 * 2 * PATCH * PATCH, generator=g),
                image_grid_thw=torch.tensor([[1, side, side]] * batch))


def prompts(args, batch: int, tokens_per_image: int):
    g = torch.Generator().manual_seed(0)
    ids, mask = left_padded(args, batch, [IMAGE_TOKEN] * tokens_per_image, 4, g)
    side = args.image_side * 4
    return ids, mask, torch.randn(batch, 3, side, side, generator=g)


class Runner:
    """One method's decode: its model, cache, last token and step kwargs."""

    def __init__(self, name, model, inputs: dict, **kwargs):
        self.name, self.model, self.kwargs, self.times = name, model, kwargs, []
        self.cache = DynamicLlavaCache.from_config(model.config) if hasattr(model.config, "sparse_layer") else None
        with torch.no_grad():
            out = model(**inputs, past_key_values=self.cache, use_cache=True, **kwargs)
        self.cache = out.past_key_values
        self.mask, self.token = inputs["attention_mask"], out.logits[:, -1:].argmax(-1)
        self.rope_deltas = getattr(model.model, "rope_deltas", None)  # Qwen2-VL: decode positions as generate() makes

    def step(self, counter=None) -> None:
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        positions = {}
        if self.rope_deltas is not None:
            positions["position_ids"] = (self.mask.sum(1, keepdim=True) - 1 + self.rope_deltas).unsqueeze(0).expand(
                3, -1, -1)
        start = time.perf_counter()
        with torch.no_grad(), (counter or contextlib.nullcontext()):
            out = self.model(input_ids=self.token, attention_mask=self.mask, past_key_values=self.cache,
                             use_cache=True, **positions, **self.kwargs)
            self.token = out.logits[:, -1:].argmax(-1)
        self.times.append(time.perf_counter() - start)

    def kv_bytes(self) -> int:
        return self.cache.nbytes() if isinstance(self.cache, DynamicLlavaCache) else sum(
            layer.keys.nbytes + layer.values.nbytes for layer in self.cache.layers)


def run_batch(args, batch: int, stock, ours) -> dict:
    tokens_per_image = args.image_side ** 2
    if args.family == "qwen2_vl":
        inputs = qwen_prompts(args, batch, tokens_per_image)
    else:
        ids, mask, pixels = prompts(args, batch, tokens_per_image)
        inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels)
    mask = inputs["attention_mask"]
    pruned_policy = ForcedTextPolicy(image_keep_rate=0.2, text_keep_rate=0.5)
    runners = [Runner("stock", stock, inputs), Runner("keep-all", ours, inputs),
               Runner("pruned", ours, inputs, sparsity_policy=pruned_policy)]
    counts, steps = {}, max(args.contexts)
    for i in range(steps):
        for r in runners:
            if i == args.contexts[0]:
                counter = OpCounter()
                r.step(counter)
                counts[r.name] = {"host_syncs": counter.host_syncs, "bytes_allocated": counter.bytes_allocated}
            else:
                r.step()
    window = args.window
    out = {"batch": batch, "prompt_tokens": int(mask.sum(dim=1).max()), "per_step": counts, "contexts": {}}
    for context in args.contexts:
        lo, hi = max(context - window, 0), context
        medians = {r.name: statistics.median(r.times[lo:hi]) for r in runners}
        out["contexts"][str(context)] = {
            "stock_ms": round(1000 * medians["stock"], 3),
            **{f"{name}_vs_stock": round(medians[name] / medians["stock"], 3) for name in ("keep-all", "pruned")},
        }
    stock_bytes = runners[0].kv_bytes()
    out["kv_bytes_vs_stock"] = {r.name: round(r.kv_bytes() / stock_bytes, 3) for r in runners[1:]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--image-side", type=int, default=12, help="image tokens per side (12: 144 tokens)")
    p.add_argument("--prompt", type=int, default=200, help="prompt tokens of the longest sample, image included")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--contexts", default="256,1024,2048", help="generated tokens at which steps are timed")
    p.add_argument("--window", type=int, default=64, help="steps timed before each context length")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--family", choices=("llava", "qwen2_vl"), default="llava")
    p.add_argument("--quick", action="store_true", help="contexts 32 / 64, window 16")
    p.add_argument("--output", default="results/decode_vs_stock.json")
    args = p.parse_args()
    args.contexts = [32, 64] if args.quick else [int(c) for c in args.contexts.split(",")]
    args.window = 16 if args.quick else args.window
    torch.set_num_threads(args.threads)
    if args.family == "qwen2_vl":
        ours, stock = qwen_models(args)
    else:
        base, sparsity = configs(args)
        torch.manual_seed(0)
        ours = DynamicLlavaForConditionalGeneration(DynamicLlavaConfig(**base, **sparsity)).eval()
        stock = LlavaForConditionalGeneration(LlavaConfig(**base)).eval()
        missing, _ = stock.load_state_dict(ours.state_dict(), strict=False)
        assert not missing, missing
    report = {"family": args.family,
              "model": {k: getattr(args, k) for k in ("hidden", "layers", "heads", "vocab", "image_side", "prompt")},
              "threads": args.threads, "torch": torch.__version__, "batches": []}
    for batch in (int(b) for b in args.batches.split(",")):
        result = run_batch(args, batch, stock, ours)
        report["batches"].append(result)
        print(json.dumps(result))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2))
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
