"""The README's demo on the shipped world checkpoints: dense and Dynamic-LLaVA answer side by side."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from rich import box
from rich.console import Console
from rich.table import Table

from ..costs import kv_bytes_per_token
from ..control import SparsityRequest
from ..evaluation import answer_questions, exact_match, first_turns
from ..evaluation.world import listing_correct
from ..modeling import DynamicLlavaForConditionalGeneration
from .build import DENSE_DIR, DYNAMIC_DIR
from .assets import world_clutter
from .scenes import write_split


def checkpoints_present(folder: str | Path) -> bool:
    return all((Path(folder) / name / "config.json").is_file() for name in (DENSE_DIR, DYNAMIC_DIR))


def load_pair(folder: str | Path):
    """(dense, dynamic, processor): the dense LLaVA runs through the engine with every keep rate at 1.0."""
    from transformers import AutoProcessor

    folder = Path(folder)
    quiet = logging.getLogger("dynamic_llava.modeling")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the dense checkpoint has no predictors, and needs none at keep rate 1.0
    try:
        dense = DynamicLlavaForConditionalGeneration.from_pretrained(
            folder / DENSE_DIR, dtype=torch.float32, image_keep_rate=1.0, text_keep_rate=1.0
        ).eval()
    finally:
        quiet.setLevel(level)
    dynamic = DynamicLlavaForConditionalGeneration.from_pretrained(folder / DYNAMIC_DIR, dtype=torch.float32).eval()
    return dense, dynamic, AutoProcessor.from_pretrained(folder / DYNAMIC_DIR)


def run_world_demo(checkpoints: str | Path = "checkpoints", image_keep_rate: float | None = None, samples: int = 96,
                   seed: int = 7, show: bool = True, console: Console | None = None) -> dict:
    """Answer `samples` fresh scenes with both models; print examples, accuracy per type, tokens kept and KV.
    `image_keep_rate` overrides the Dynamic-LLaVA model's own (None: keep it)."""
    console = console or Console()
    dense, dynamic, processor = load_pair(checkpoints)
    text = dynamic.config.text_config
    bytes_per_token = kv_bytes_per_token(text, dtype_bytes=4)  # K and V, fp32, one layer
    clutter = world_clutter(Path(checkpoints) / DYNAMIC_DIR)  # scenes of the world they were trained in
    with tempfile.TemporaryDirectory() as tmp:
        items = first_turns(json.loads(write_split(Path(tmp), "test", samples, seed=seed, clutter=clutter).read_text()))
        runs = {}
        for name, model in (("dense", dense), ("Dynamic-LLaVA", dynamic)):
            started = time.time()
            requests = None  # the Dynamic-LLaVA model's own rate, or the one asked for, per request (config untouched)
            if image_keep_rate is not None and model is dynamic:
                requests = [SparsityRequest(image_keep_rate=image_keep_rate)] * len(items)
            runs[name] = answer_questions(model, processor, items, Path(tmp) / "images", batch_size=32,
                                          max_new_tokens=90, progress=show, requests=requests)
            runs[name + " seconds"] = time.time() - started
    result = {"samples": samples, "accuracy": {}, "image_tokens_kept": {}, "generated_kept_share": {}, "kv_bytes": {}}
    for name in ("dense", "Dynamic-LLaVA"):
        answers = runs[name]
        by_type = defaultdict(list)
        for a in answers:
            right = listing_correct if a["type"] == "list" else exact_match
            by_type[a["type"]].append(right(a["prediction"], a["answer"]))
        result["accuracy"][name] = {t: sum(v) / len(v) for t, v in sorted(by_type.items())}
        result["image_tokens_kept"][name] = sum(a["image_tokens_kept"] for a in answers) / len(answers)
        result["kv_bytes"][name] = sum(a["kv_tokens"] for a in answers) * bytes_per_token / len(answers)
        judged = sum(a["generated"] or 0 for a in answers)
        kept = sum(a["generated_kept"] or 0 for a in answers)
        result["generated_kept_share"][name] = kept / judged if judged else 1.0
        result[name + " seconds"] = runs[name + " seconds"]
    if show:
        _print(console, items, runs, result)
    return result


def _short(text: str) -> str:
    return text if len(text) < 70 else text[:67] + "..."


def _print(console: Console, items, runs, result) -> None:
    table = Table(title="A few questions, answered by both models", box=box.SIMPLE_HEAVY)
    for column in ("question", "reference", "dense", "Dynamic-LLaVA"):
        table.add_column(column, overflow="fold")
    shown = set()
    for i, item in enumerate(items):
        if item["type"] in shown:
            continue
        shown.add(item["type"])
        table.add_row(item["question"], _short(item["answer"]), _short(runs["dense"][i]["prediction"]),
                      _short(runs["Dynamic-LLaVA"][i]["prediction"]))
    console.print(table)
    table = Table(title=f"Exact match on {result['samples']} fresh scenes", box=box.SIMPLE_HEAVY)
    table.add_column("question type")
    table.add_column("dense", justify="right")
    table.add_column("Dynamic-LLaVA", justify="right")
    for kind, acc in result["accuracy"]["dense"].items():
        table.add_row(kind, f"{acc:.0%}", f"{result['accuracy']['Dynamic-LLaVA'].get(kind, 0):.0%}")
    console.print(table)
    dense_kv, dyn_kv = result["kv_bytes"]["dense"], result["kv_bytes"]["Dynamic-LLaVA"]
    console.print(
        f"Image tokens reaching layers >= K: {result['image_tokens_kept']['dense']:.0f} dense, "
        f"{result['image_tokens_kept']['Dynamic-LLaVA']:.0f} Dynamic-LLaVA per image.\n"
        f"Generated tokens whose K/V layers >= K keep: {result['generated_kept_share']['dense']:.0%} dense, "
        f"{result['generated_kept_share']['Dynamic-LLaVA']:.0%} Dynamic-LLaVA.\n"
        f"KV cache per sample at the end of generation: {dense_kv / 1024:.1f} KiB dense, {dyn_kv / 1024:.1f} KiB "
        f"Dynamic-LLaVA ([green]{1 - dyn_kv / dense_kv:.0%} less[/]).\n"
        f"Wall time: {result['dense seconds']:.1f} s dense, {result['Dynamic-LLaVA seconds']:.1f} s Dynamic-LLaVA."
    )


__all__ = ["checkpoints_present", "load_pair", "run_world_demo"]
