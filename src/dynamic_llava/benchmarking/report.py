"""Tables and figures of the accuracy benchmark."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.table import Table

from ..policies import CDPrunerPolicy, DARTPolicy, FastVPolicy, LearnedPolicy, RandomPolicy


def accuracy_tables(report: dict) -> list[Table]:
    """Image-budget table (accuracy per type, perplexity, FLOPs) and text-budget table (perplexity, share held)."""
    types = sorted({t for p in report["image_sweep"] for t in p["accuracy"]})
    per_type = ", ".join(f"{t} {n}" for t, n in report.get("questions_per_type", {}).items())
    image = Table(title=f"Accuracy vs image-token budget (generator seed {report['settings']['seed']}; "
                        f"{report['short_questions']} questions: {per_type}; {report['descriptions']} descriptions; "
                        f"generated tokens all kept)", title_justify="left")
    for column in ("keep", "method", "tokens", *types, "all", "descr. PPL", "prefill GFLOPs"):
        image.add_column(column, justify="left" if column == "method" else "right")
    last = None
    for p in report["image_sweep"]:
        if p["image_keep_rate"] != last:
            image.add_section()
            last = p["image_keep_rate"]
        image.add_row(f"{p['image_keep_rate']:g}", p["method"], f"{p['image_tokens_kept']}/{report['image_tokens']}",
                      *[f"{100 * p['accuracy'].get(t, float('nan')):.1f}" for t in types],
                      f"{100 * p['accuracy_all']:.1f}", f"{p['describe_ppl']:.4f}", f"{p['prefill_flops'] / 1e9:.3f}")
    text = Table(title=f"Listing perplexity vs generated-token budget ({report.get('listings', 0)} listings, teacher "
                       "forced, KV cache; image tokens all kept)", title_justify="left")
    for column in ("keep", "method", "held at end", "listing PPL", "2nd part PPL", "window"):
        text.add_column(column, justify="left" if column == "method" else "right")
    last = None
    for p in report["text_sweep"]:
        if p["text_keep_rate"] != last:
            text.add_section()
            last = p["text_keep_rate"]
        text.add_row(f"{p['text_keep_rate']:g}", p["method"], f"{p['held_share_at_end']:.0%}",
                     f"{p['list_ppl']:.4f}", f"{p['list_backwards_ppl']:.4f}",
                     "-" if p["window"] is None else str(p["window"]))
    return [image, text]


def kept_overlay_figure(checkpoint: str | Path, path: str | Path, rate: float = 0.2, seed: int = 5) -> Path:
    """Which image tokens each image policy keeps on one fresh world scene, as a PNG."""
    from ..world.assets import world_clutter
    from ..world.scenes import DESCRIBE_PROMPT, render, sample_scene
    from .accuracy import kept_image_tokens
    from .plots import kept_overlay
    from .workloads import load_world_model

    model, processor = load_world_model(checkpoint)
    scene = sample_scene(np.random.default_rng(seed), clutter=world_clutter(checkpoint))
    image = render(scene, model.config.vision_config.image_size)
    policies = {"dynamic-llava": LearnedPolicy(image_keep_rate=rate), "fastv": FastVPolicy(image_keep_rate=rate),
                "cdpruner": CDPrunerPolicy(image_keep_rate=rate), "dart": DARTPolicy(image_keep_rate=rate),
                "random": RandomPolicy(image_keep_rate=rate)}
    masks = kept_image_tokens(model, processor, image, DESCRIBE_PROMPT, policies)
    grid = int(round(model.tokens_per_image() ** 0.5))
    return kept_overlay(image, masks, grid, path)


__all__ = ["accuracy_tables", "kept_overlay_figure"]
