"""The paper's evaluation path on this machine: the world's test questions in the benchmark file formats
(VQAv2, GQA, POPE, MME), answered by `dynamic-llava eval`'s code for the dense world model and its
Dynamic-LLaVA fine-tune, scored by the official rules, with the cost per sample side by side.

    python benchmarks/world_formats.py                   # generator seed 0 (the shipped test split)
    python benchmarks/world_formats.py --seed 1000       # a fresh generator seed
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from transformers import AutoProcessor

from dynamic_llava import DynamicLlavaForConditionalGeneration
from dynamic_llava.evaluation.benchmarks import answer_benchmark, read_questions, score_answers
from dynamic_llava.world.export import export_world_benchmarks
from dynamic_llava.world.assets import world_clutter
from dynamic_llava.world.scenes import write_split

HEADLINE = {"vqav2": ("accuracy",), "gqa": ("accuracy",), "pope": ("mean_f1", "mean_accuracy"),
            "mme": ("perception",)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", default="checkpoints")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--questions", type=int, default=1200, help="records in the world split written")
    parser.add_argument("--pairs", type=int, default=300, help="POPE (per category) and MME images")
    parser.add_argument("--output", default="results/world_formats.json")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.checkpoints)
    models = {"dense": (root / "tiny-llava", {"image_keep_rate": 1.0, "text_keep_rate": 1.0}),
              "Dynamic-LLaVA": (root / "tiny-dynamic-llava", {})}
    results: dict = {"seed": args.seed}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        clutter = world_clutter(root / "tiny-dynamic-llava")  # scenes of the world the models were trained in
        write_split(work / "world", "test", args.questions, seed=args.seed, clutter=clutter)
        paths = export_world_benchmarks(work / "world" / "test.json", work / "bench", pope_images=args.pairs,
                                        mme_images=args.pairs, seed=args.seed, clutter=clutter)
        for name, (folder, settings) in models.items():
            model = DynamicLlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32, **settings).eval()
            processor = AutoProcessor.from_pretrained(folder)
            for task, p in paths.items():
                answers = work / f"{task}-{name}.jsonl"
                answer_benchmark(model, processor, read_questions(task, p["questions"]), answers, p["images"],
                                 batch_size=32, max_new_tokens=6, model_id=name, progress=False)
                results.setdefault(task, {})[name] = score_answers(task, answers, p["annotations"], p["questions"])
    print(f"World benchmarks in the paper's formats, generator seed {args.seed}")
    print("| benchmark | metric | dense | Dynamic-LLaVA | image tokens kept (Dynamic / dense) | prefill GFLOPs "
          "(dense / Dynamic) |")
    print("|---|---|---|---|---|---|")
    for task in HEADLINE:
        dense, dyn = results[task]["dense"], results[task]["Dynamic-LLaVA"]
        for metric in HEADLINE[task]:
            kept = f"{dyn['cost']['image_tokens_kept']:.0f} / {dense['cost']['image_tokens_kept']:.0f}"
            flops = f"{dense['cost']['prefill_tflops'] * 1e3:.3f} / {dyn['cost']['prefill_tflops'] * 1e3:.3f}"
            print(f"| {task} ({dense['cost']['answers']} q) | {metric} | {dense[metric]:.1f} | {dyn[metric]:.1f} | {kept} "
                  f"| {flops} |")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"Written to {out}")


if __name__ == "__main__":
    main()
