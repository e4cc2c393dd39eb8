"""Dense training of the world's LLaVA on cached tower features, with the loss normalised per answer.

The vision tower is frozen (as CLIP is in LLaVA), so its features are computed once for a pool of scenes and
reused: a step costs the projector and the decoder only. Each step draws scenes from the pool and a fresh
question about each, so the decoder sees many more questions than there are pictures. The loss is the mean
cross-entropy of each answer (its tokens and the end token), averaged over the batch: a one-word answer
weighs as much as a 70-token description. A stage runs at a constant learning rate until the held-out
score of every type with a target reaches it (checked every `eval_every` steps) or `max_steps`, then
decays for `decay_steps`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .scenes import LONG_TYPES, Scene, ask, render

logger = logging.getLogger(__name__)


@dataclass
class ScenePool:
    """Scenes and their frozen tower features [scenes, image tokens, tower width] (fp16)."""

    scenes: list[Scene]
    features: torch.Tensor
    listable: np.ndarray = field(init=False)  # scenes that can be listed (3-4 objects)

    def __post_init__(self):
        self.listable = np.array([i for i, s in enumerate(self.scenes) if len(s.objects) >= 3], dtype=np.int64)


@torch.no_grad()
def encode_scenes(model, image_processor, scenes: list[Scene], batch_size: int = 256, progress: bool = True):
    """Tower features as the stock LLaVA selects them (the configured layer, or layers concatenated; CLS
    dropped), before the projector."""
    tower, config = model.model.vision_tower, model.config
    chunks = []
    for start in tqdm(range(0, len(scenes), batch_size), desc="tower features", disable=not progress):
        images = [render(s, tower.config.image_size) for s in scenes[start : start + batch_size]]
        pixels = image_processor(images, return_tensors="pt")["pixel_values"]
        states = tower(pixels, output_hidden_states=True).hidden_states
        layers = config.vision_feature_layer
        hidden = torch.cat([states[i] for i in ([layers] if isinstance(layers, int) else layers)], dim=-1)
        if config.vision_feature_select_strategy == "default":
            hidden = hidden[:, 1:]
        chunks.append(hidden.to(torch.float16))
    return torch.cat(chunks)


class PromptEncoder:
    """Token ids of one single-turn sample exactly as the processor and the chat template give them (the
    image placeholder expanded), and where its answer starts."""

    def __init__(self, processor, image_tokens: int):
        self.tokenizer = processor.tokenizer
        self.processor = processor
        self.image_tokens = image_tokens
        self.image_id = self.tokenizer.convert_tokens_to_ids(processor.image_token)
        self._prompts: dict[str, list[int]] = {}

    def prompt(self, question: str) -> list[int]:
        if question not in self._prompts:
            messages = [{"role": "user", "content": [{"type": "text", "text": question}, {"type": "image"}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
            ids = []
            for token in self.tokenizer(text).input_ids:
                ids.extend([token] * self.image_tokens if token == self.image_id else [token])
            self._prompts[question] = ids
        return self._prompts[question]

    def sample(self, question: str, answer: str) -> tuple[list[int], int]:
        prompt = self.prompt(question)
        answer_ids = self.tokenizer(answer, add_special_tokens=False).input_ids + [self.tokenizer.eos_token_id]
        return prompt + answer_ids, len(prompt)


@dataclass
class Stage:
    """One dense stage: the share of each first-turn type in its batches, its steps and its stopping rule."""

    name: str
    mix: dict[str, float]
    max_steps: int
    learning_rate: float = 1e-3
    batch_size: int = 32
    weight_decay: float = 0.0
    targets: dict[str, float] = field(default_factory=dict)  # type -> held-out score that ends the stage
    eval_every: int = 100
    min_steps: int = 0
    decay_steps: int = 0  # cosine decay to 10% once the targets are met (at the latest over the last steps)
    history: list[dict] = field(default_factory=list)


def _batch(encoder: PromptEncoder, pool: ScenePool, kinds: list[str], size: int, rng: np.random.Generator,
           pad_id: int, shares: np.ndarray | None = None):
    """A batch whose samples draw their type from `kinds` (by `shares`): (ids [B, N], attention [B, N], answer
    mask [B, N] on the positions that predict answer tokens, targets [B, N], tower features [B, T, C])."""
    shares = np.ones(len(kinds)) if shares is None else np.asarray(shares, dtype=float)
    picks, samples = [], []
    while len(samples) < size:
        kind = kinds[rng.choice(len(kinds), p=shares / shares.sum())]
        if kind == "list":
            index = int(pool.listable[rng.integers(len(pool.listable))])
        else:
            index = int(rng.integers(len(pool.scenes)))
        qa = ask(pool.scenes[index], kind, rng)
        if qa is None:
            continue
        picks.append(index)
        samples.append(encoder.sample(*qa))
    length = max(len(ids) for ids, _ in samples)
    ids = torch.full((size, length), pad_id)
    mask = torch.zeros(size, length, dtype=torch.long)
    answer = torch.zeros(size, length, dtype=torch.bool)
    for i, (tokens, start) in enumerate(samples):
        ids[i, : len(tokens)] = torch.tensor(tokens)
        mask[i, : len(tokens)] = 1
        answer[i, start - 1 : len(tokens) - 1] = True  # logits at p predict token p + 1
    targets = torch.roll(ids, -1, dims=1)
    return ids, mask, answer, targets, pool.features[picks]


def _forward(model, ids, mask, features):
    """Logits of the stock LLaVA for ids whose image placeholders take the projected cached features."""
    embeds = model.get_input_embeddings()(ids)
    projected = model.model.multi_modal_projector(features.to(embeds.dtype))
    image = (ids == model.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(image, projected.reshape(-1, projected.shape[-1]))
    hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    return model.lm_head(hidden)


def per_answer_loss(logits, targets, answer) -> torch.Tensor:
    """Mean over the batch of each sample's mean cross-entropy over its answer tokens."""
    nll = nn.functional.cross_entropy(logits.transpose(1, 2).float(), targets, reduction="none")
    return ((nll * answer).sum(1) / answer.sum(1).clamp(min=1)).mean()


@torch.no_grad()
def held_out_accuracy(model, encoder: PromptEncoder, pool: ScenePool, kinds, per_kind: int = 128, seed: int = 0,
                      pad_id: int = 0) -> dict[str, float]:
    """Teacher-forced exact match per type on a held-out pool: every answer token (and the end token) is the
    argmax. For long types, the share of answer tokens that are the argmax."""
    was_training = model.training
    model.eval()
    rng = np.random.default_rng([seed, 99])
    scores = {}
    for kind in kinds:
        ids, mask, answer, targets, features = _batch(encoder, pool, [kind], per_kind, rng, pad_id)
        right = (_forward(model, ids, mask, features).argmax(-1) == targets) | ~answer
        scores[kind] = float(right.all(1).float().mean()) if kind not in LONG_TYPES else float(
            ((right & answer).sum() / answer.sum()))
    model.train(was_training)
    return scores


def train_stage(model, encoder: PromptEncoder, train: ScenePool, held_out: ScenePool, stage: Stage, seed: int = 0,
                progress: bool = True, pad_id: int = 0, checkpoint: str | os.PathLike | None = None) -> dict:
    """Train the projector and the decoder (the tower stays frozen) for one stage; returns its record.

    With `checkpoint` (a file), the stage's state (weights, optimizer, data order, schedule, history) is written
    there at every held-out check, atomically, and a stage started again with the same file continues from it
    exactly."""
    params = [p for n, p in model.named_parameters() if p.requires_grad and "vision_tower" not in n]
    optimizer = torch.optim.AdamW(params, lr=stage.learning_rate, weight_decay=stage.weight_decay, betas=(0.9, 0.98))
    kinds = [k for k, share in stage.mix.items() if share > 0]
    # short questions share batches (a batch of one type tilts every step towards that type's answers);
    # each long type gets batches of its own, which would otherwise be mostly padding
    short = [k for k in kinds if k not in LONG_TYPES]
    groups = ([short] if short else []) + [[k] for k in kinds if k in LONG_TYPES]
    group_shares = np.array([sum(stage.mix[k] for k in g) for g in groups], dtype=float)
    rng = np.random.default_rng([seed, len(stage.name), 7])
    warmup = min(50, stage.max_steps // 10 + 1)
    decay_from = None  # the step where the decay began: the targets were met, or max_steps - decay_steps
    started = time.time()
    total = stage.max_steps
    step = 0
    if checkpoint is not None and Path(checkpoint).is_file():
        state = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["rng"]
        step, total, decay_from, stage.history = state["step"], state["total"], state["decay_from"], state["history"]
        started -= state["seconds"]
        logger.info("dense %s: resumed at step %d", stage.name, step)
    bar = tqdm(total=total, initial=step, desc=f"dense: {stage.name}", disable=not progress)
    model.train()
    while step < total:
        if decay_from is None and step >= stage.max_steps - stage.decay_steps:
            decay_from = step
        scale = min(1.0, (step + 1) / warmup)
        if decay_from is not None:
            done = (step - decay_from) / max(stage.decay_steps, 1)
            scale = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
        for group in optimizer.param_groups:
            group["lr"] = stage.learning_rate * scale
        group = groups[rng.choice(len(groups), p=group_shares / group_shares.sum())]
        ids, mask, answer, targets, features = _batch(encoder, train, group, stage.batch_size, rng, pad_id,
                                                      [stage.mix[k] for k in group])
        loss = per_answer_loss(_forward(model, ids, mask, features), targets, answer)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"dense stage {stage.name!r}: the loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}", batch="/".join(group) if len(group) == 1 else "questions")
        if step % stage.eval_every == 0 or step == total:
            scores = held_out_accuracy(model, encoder, held_out, kinds, seed=seed, pad_id=pad_id)
            stage.history.append({"step": step, "seconds": round(time.time() - started), "lr_scale": round(scale, 3),
                                  **scores})
            line = f"dense {stage.name} step {step}: " + " ".join(f"{k} {v:.3f}" for k, v in scores.items())
            logger.info(line)
            if progress:
                tqdm.write(line)
            met = _targets_met(stage, scores)
            if decay_from is None and step >= stage.min_steps and met:
                decay_from, total = step, min(total, step + stage.decay_steps)
            if checkpoint is not None:
                _save_state(checkpoint, {
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng.bit_generator.state,
                    "step": step, "total": total, "decay_from": decay_from, "history": stage.history,
                    "seconds": time.time() - started,
                })
    bar.close()
    final = stage.history[-1] if stage.history else {}
    return {"name": stage.name, "steps": step, "seconds": round(time.time() - started),
            "reached_targets": _targets_met(stage, final) if stage.targets else None,  # None: a stage without any
            "history": stage.history}


def _targets_met(stage: Stage, scores: dict) -> bool:
    """Every held-out target of the stage reached (a stage without targets never meets them: it runs on)."""
    return bool(stage.targets) and all(scores.get(k, 0.0) >= t for k, t in stage.targets.items())


def _save_state(path, state: dict) -> None:
    """Write to a temporary file beside `path`, then rename: a kill mid-write leaves the previous state."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


__all__ = ["PromptEncoder", "ScenePool", "Stage", "encode_scenes", "held_out_accuracy", "per_answer_loss",
           "train_stage"]
