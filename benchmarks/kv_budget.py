"""KV memory budgets at equal bytes on the trained world model: Dynamic-LLaVA's budget controller (per-request
`kv_budget_tokens`: the stored image or generated token with the lowest learned keep score goes first) against
H2O heavy hitters and a StreamingLLM window sized to hold the same number of tokens.

Long answers only (descriptions and listings of fresh scenes, generator seed `--seed`). Each method holds, in the
layers >= K, `fraction` of the tokens a dense model holds there at the end of the reference answer (layers < K
keep the whole context in every method: that is the design of all three here). Every method prunes the images
alike (the model's own image keep rate, by the image predictor), so what differs is which tokens are evicted.
Reported: the K/V bytes each held (all layers, measured from the cache, as a share of dense); the teacher-forced
perplexity (with the cache) of the reference descriptions, of the listings, and of the listings' second part
(the objects backwards: it can only be read from the tokens generated before, so it is what eviction harms);
and the chrF of greedy descriptions and listings.

    python benchmarks/kv_budget.py --seed 0 --output results/kv_budget_seed0.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

from dynamic_llava import ComposedPolicy, H2OPolicy, LearnedPolicy, SparsityRequest, StreamingLLMPolicy
from dynamic_llava.benchmarking.workloads import load_world_model
from dynamic_llava.evaluation import first_turns
from dynamic_llava.evaluation.metrics import chrf
from dynamic_llava.evaluation.world import BACKWARDS, answer_perplexities, answer_questions, batch_inputs
from dynamic_llava.world.assets import world_clutter
from dynamic_llava.world.scenes import write_split


def kv_share(stats_list, model) -> float:
    """Bytes held at the end over what a dense cache of the same tokens holds, over all batches."""
    held = sum(s.total_kv_bytes for s in stats_list)
    dense = sum(s.dense_kv_bytes for s in stats_list)
    return held / dense


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="checkpoints/tiny-dynamic-llava")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=240, help="descriptions + listings")
    parser.add_argument("--fractions", default="0.25,0.5")
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, processor = load_world_model(args.checkpoint)
    tokenizer = processor.tokenizer
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        items = first_turns(json.loads(write_split(root, "test", args.samples, mix={"describe": 0.5, "list": 0.5},
                                                   seed=args.seed, clutter=world_clutter(args.checkpoint)).read_text()))
        images = root / "images"
        prompt = [int(batch_inputs(processor, [item], images)["attention_mask"].sum()) for item in items]
        answer = [len(tokenizer(item["answer"], add_special_tokens=False).input_ids) + 1 for item in items]
        image_tokens = model.tokens_per_image()
        image_kept = max(1, int(model.config.image_keep_rate * image_tokens + 1e-6))
        # what a dense model holds in layers >= K at the end of the reference answer (the last token is not fed)
        held = [p + a - 1 for p, a in zip(prompt, answer)]
        text = [p - image_tokens for p in prompt]
        descriptions = [i for i, item in enumerate(items) if item["type"] == "describe"]
        listings = [i for i, item in enumerate(items) if item["type"] == "list"]

        def measure(label, fraction, policy=None, requests=None):
            stats, row = [], {"method": label, "fraction": fraction}
            for kind, chosen in (("describe", descriptions), ("list", listings)):
                subset = [items[i] for i in chosen]
                asked = None if requests is None else [requests[i] for i in chosen]
                whole, tail = answer_perplexities(model, processor, subset, images, args.batch_size, policy, False,
                                                  stats, after=BACKWARDS if kind == "list" else None, requests=asked)
                predictions = answer_questions(model, processor, subset, images, args.batch_size, 90,
                                               policy=policy, progress=False, requests=asked)
                row[f"{kind}_ppl"] = whole
                if kind == "list":
                    row["list_second_part_ppl"] = tail
                row[f"{kind}_chrf"] = chrf([p["prediction"] for p in predictions], [p["answer"] for p in predictions])
            row["kv_share_all_layers"] = kv_share(stats, model)
            rows.append(row)
            print(f"{label:34} f={fraction:<5} KV {row['kv_share_all_layers']:6.1%} of dense | PPL describe "
                  f"{row['describe_ppl']:6.3f} list {row['list_ppl']:6.3f} 2nd part {row['list_second_part_ppl']:6.3f} "
                  f"| chrF describe {row['describe_chrf']:5.1f} list {row['list_chrf']:5.1f}", flush=True)

        measure("dense (keep all)", 1.0, requests=[SparsityRequest(image_keep_rate=1.0, text_keep_threshold=0.0)] * len(items))
        measure("Dynamic-LLaVA, no budget", 1.0)
        for fraction in [float(f) for f in args.fractions.split(",")]:
            budgets = [max(round(fraction * h), t + 1) for h, t in zip(held, text)]
            mean_budget = statistics.mean(budgets)
            window = max(1, round(mean_budget - statistics.mean(text) - image_kept))
            measure("Dynamic-LLaVA budget", fraction,
                    requests=[SparsityRequest(kv_budget_tokens=b, text_keep_threshold=0.0) for b in budgets])
            measure("Dynamic-LLaVA budget + text gate", fraction,
                    requests=[SparsityRequest(kv_budget_tokens=b) for b in budgets])
            heavy = window // 2
            measure(f"H2O (heavy {heavy}, recent {window - heavy})", fraction,
                    ComposedPolicy(images=LearnedPolicy(), evict=H2OPolicy(heavy=heavy, recent=max(window - heavy, 1))))
            measure(f"StreamingLLM (window {window})", fraction,
                    ComposedPolicy(images=LearnedPolicy(), evict=StreamingLLMPolicy(window=window)))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"seed": args.seed, "samples": len(items), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
