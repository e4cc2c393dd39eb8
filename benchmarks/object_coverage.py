"""Which objects each image policy keeps on the world's scenes: the share of objects with at least one
(and at least two) kept patches, and the share of kept tokens that show an object at all, at equal budgets.
It tells whether a budget tests coverage (an object with no kept patch cannot be read) or reading.

    python benchmarks/object_coverage.py                        # 400 fresh scenes, image keep 0.1 and 0.2
    python benchmarks/object_coverage.py --seed 7 --scenes 1000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from dynamic_llava.benchmarking.accuracy import kept_image_tokens
from dynamic_llava.benchmarking.workloads import load_world_model
from dynamic_llava.policies import CDPrunerPolicy, DARTPolicy, FastVPolicy, LearnedPolicy, RandomPolicy
from dynamic_llava.world.assets import world_clutter
from dynamic_llava.world.scenes import object_patches, random_keep_loss_rate, render, sample_scene

QUESTION = "how many objects are there ?"  # every object matters to the answer


def coverage(masks: list[list[int]], scenes_patches: list[list[list[int]]]) -> dict[str, float]:
    objects = one = two = kept = on_objects = 0
    for kept_index, patches in zip(masks, scenes_patches, strict=True):
        chosen, shown = set(kept_index), {p for ps in patches for p in ps}
        for ps in patches:
            hits = len(chosen & set(ps))
            objects, one, two = objects + 1, one + (hits >= 1), two + (hits >= 2)
        kept, on_objects = kept + len(chosen), on_objects + len(chosen & shown)
    return {"objects_with_a_kept_patch": one / objects, "objects_with_two": two / objects,
            "kept_tokens_on_objects": on_objects / max(kept, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", default="checkpoints")
    parser.add_argument("--seed", type=int, default=4242, help="generator seed of the scenes")
    parser.add_argument("--scenes", type=int, default=400)
    parser.add_argument("--rates", default="0.1,0.2")
    parser.add_argument("--output", default="results/object_coverage.json")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.scenes < 1:
        parser.error("--scenes must be at least 1")
    try:
        rates = [float(r) for r in args.rates.split(",")]
    except ValueError:
        parser.error(f"--rates {args.rates!r}: expected comma-separated numbers in (0, 1]")
    if not all(0 < r <= 1 for r in rates):
        parser.error(f"--rates {args.rates!r}: every rate must be in (0, 1]")
    torch.set_num_threads(args.threads)
    root = Path(args.checkpoints)
    dynamic, processor = load_world_model(root / "tiny-dynamic-llava")
    dense, _ = load_world_model(root / "tiny-llava", quiet=True)  # the training-free methods run on the dense model
    rng = np.random.default_rng(args.seed)
    clutter = world_clutter(root / "tiny-dynamic-llava")  # scenes of the world the models were trained in
    scenes = [sample_scene(rng, clutter=clutter) for _ in range(args.scenes)]
    patches = [object_patches(scene) for scene in scenes]
    images = [render(scene, dynamic.config.vision_config.image_size) for scene in scenes]
    results: dict = {"seed": args.seed, "scenes": args.scenes, "objects": sum(map(len, patches)), "rates": {}}
    for rate in rates:
        runs = [(dynamic, {"Dynamic-LLaVA": LearnedPolicy(image_keep_rate=rate)}),
                (dense, {"CDPruner-style": CDPrunerPolicy(image_keep_rate=rate),
                         "DART-style": DARTPolicy(image_keep_rate=rate), "FastV": FastVPolicy(image_keep_rate=rate),
                         "random (seed 0)": RandomPolicy(image_keep_rate=rate, seed=0)})]
        row = {}
        for model, policies in runs:
            kept = [kept_image_tokens(model, processor, image, QUESTION, policies) for image in images]
            for name in policies:
                row[name] = coverage([k[name].nonzero().flatten().tolist() for k in kept], patches)
        row["uniform random, exact"] = {"objects_with_a_kept_patch": 1 - random_keep_loss_rate(scenes, rate)}
        results["rates"][str(rate)] = row
    print(f"Objects of {args.scenes} fresh scenes (seed {args.seed}, {results['objects']} objects) and the image "
          "tokens each method keeps")
    print("| image keep | method | objects with a kept patch | with two or more | kept tokens showing an object |")
    print("|---|---|---|---|---|")
    for rate, row in results["rates"].items():
        for name, c in row.items():
            two = f"{c['objects_with_two']:.1%}" if "objects_with_two" in c else ""
            on = f"{c['kept_tokens_on_objects']:.1%}" if "kept_tokens_on_objects" in c else ""
            print(f"| {rate} | {name} | {c['objects_with_a_kept_patch']:.1%} | {two} | {on} |")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(results, indent=2))
    print(f"Written to {args.output}")


if __name__ == "__main__":
    main()
