"""Pre-training of the world's vision tower, the role CLIP plays for LLaVA-1.5.

LLaVA starts from a vision encoder trained elsewhere and keeps it frozen. The world has no CLIP, so its
tower learns first, on its own, to say what each image patch shows: a patch that an object covers (at
least `COVERED` of it) is labelled with that object's shape, colour, size and grid cell, any other patch
"none"; in a cluttered world, a fifth head labels a patch holding a speck with its colour and kind (a
real encoder encodes what it sees, relevant or not). Linear heads read the features LLaVA takes (the last
layer's hidden states, CLS dropped). So each of an object's few patches tells the whole object, and keeping
any one of them keeps the object. Scenes are drawn fresh for every batch, so the tower never sees the same
picture twice.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .scenes import CELLS, CLUTTER_COLORS, CLUTTER_KINDS, COLORS, COVERED, SHAPES, SIZES, coverage, render, sample_scene

HEADS = {"shape": ("none", *SHAPES), "color": ("none", *COLORS), "size": ("none", *SIZES), "cell": ("none", *CELLS),
         "clutter": ("none", *(f"{c} {k}" for c in CLUTTER_COLORS for k in CLUTTER_KINDS))}


def patch_labels(scene, patches_per_side: int, patch_size: int) -> dict[str, torch.Tensor]:
    """attribute -> long [patches]: the attribute of the object that covers each patch most, if it covers at
    least `COVERED` of it (0: no object); "clutter": the speck in the patch (0: none)."""
    labels = {name: torch.zeros(patches_per_side**2, dtype=torch.long) for name in HEADS}
    for speck in scene.clutter:
        labels["clutter"][speck.patch] = HEADS["clutter"].index(f"{speck.color} {speck.kind}")
    if not scene.objects:
        return labels
    shares = coverage(scene, patches_per_side * patch_size, patch_size)
    best = shares.argmax(axis=0)
    for index in np.flatnonzero(shares.max(axis=0) >= COVERED):
        obj = scene.objects[best[index]]
        for name, value in (("shape", obj.shape), ("color", obj.color), ("size", obj.size), ("cell", CELLS[obj.cell])):
            labels[name][index] = HEADS[name].index(value)
    return labels


def scene_batch(rng: np.random.Generator, image_processor, size: int, image_size: int, patches_per_side: int,
                clutter: int = 0):
    """Fresh scenes (`clutter`: as `sample_scene`): pixel_values [size, 3, H, W] and attribute -> labels
    [size, patches]."""
    scenes = [sample_scene(rng, clutter=clutter) for _ in range(size)]
    pixels = image_processor([render(s, image_size) for s in scenes], return_tensors="pt")["pixel_values"]
    labels = [patch_labels(s, patches_per_side, image_size // patches_per_side) for s in scenes]
    return pixels, {name: torch.stack([lab[name] for lab in labels]) for name in HEADS}


def pretrain_vision_tower(vision_tower, image_processor, steps: int = 1500, batch_size: int = 64, lr: float = 1e-3,
                          seed: int = 0, progress: bool = True, clutter: int = 0) -> dict[str, float]:
    """Train `vision_tower` (a CLIPVisionModel) in place on patch labels of scenes with `clutter` (as
    `sample_scene`; the clutter head only in a cluttered world); returns held-out patch accuracy per attribute
    (on object patches; 'clutter' on the patches of specks; 'empty': "no object" on the patches none covers)."""
    config = vision_tower.config
    side = config.image_size // config.patch_size
    generator = torch.Generator().manual_seed(seed)
    names = [name for name in HEADS if clutter > 0 or name != "clutter"]
    heads = nn.ModuleDict({name: nn.Linear(config.hidden_size, len(HEADS[name])) for name in names})
    for head in heads.values():
        nn.init.normal_(head.weight, std=0.02, generator=generator)
        nn.init.zeros_(head.bias)
    params = [*vision_tower.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 30)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = np.random.default_rng([seed, 17])
    vision_tower.train()

    def features(pixels):
        hidden = vision_tower(pixels, output_hidden_states=True).hidden_states[-1]
        return hidden[:, 1:]

    bar = tqdm(range(steps), desc="vision tower", disable=not progress)
    for _ in bar:
        pixels, labels = scene_batch(rng, image_processor, batch_size, config.image_size, side, clutter)
        hidden = features(pixels)
        loss = sum(nn.functional.cross_entropy(heads[n](hidden).flatten(0, 1), labels[n].flatten()) for n in names)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    vision_tower.eval()
    with torch.no_grad():
        pixels, labels = scene_batch(np.random.default_rng([seed, 18]), image_processor, 256, config.image_size, side,
                                     clutter)
        hidden = features(pixels)
        occupied = labels["shape"] > 0
        report = {n: float((heads[n](hidden).argmax(-1) == labels[n])[occupied].float().mean()) for n in names
                  if n != "clutter"}
        if "clutter" in heads:
            specks = labels["clutter"] > 0
            report["clutter"] = float((heads["clutter"](hidden).argmax(-1) == labels["clutter"])[specks].float().mean())
        report["empty"] = float((heads["shape"](hidden).argmax(-1) == 0)[~occupied].float().mean())
    return report


__all__ = ["HEADS", "patch_labels", "pretrain_vision_tower", "scene_batch"]
