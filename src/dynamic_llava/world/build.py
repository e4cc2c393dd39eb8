"""One command from nothing to the shipped world checkpoints: data, dense LLaVA, Dynamic-LLaVA, report.

0. pre-train the vision tower on patch labels (`vision.py`: what CLIP is to LLaVA), then freeze it;
1. cache its features for a pool of training scenes and a held-out pool (`dense.py`);
2. train the projector and decoder of the tiny dense LLaVA (stock `LlavaForConditionalGeneration`) on
   short questions, the loss normalised per answer, at a constant learning rate until every question type
   reaches its held-out target; then on questions, descriptions and listings together, ending with a
   decay once the targets hold; then a polish at a lower, decaying learning rate with counting (the
   hardest type) weighted up;
3. fine-tune Dynamic-LLaVA I|T from it with the sparsification-aware recipe (`training.train`), the dense
   model also its teacher (`distill_weight` on the answer's logits, `hidden_distill_weight` on the last hidden
   states of the text tokens);
4. save both (fp16 weights, with the processor) and evaluate them on the test split and on a fresh
   generator seed.

Every stage writes its result under `work/` before the next begins, and a dense stage also saves its
state at every held-out check; a rerun of the same command reuses what is there (the tower, each
finished dense stage, a dense stage's last state, the fine-tune's checkpoints), so a stopped build
resumes where it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoProcessor, LlavaForConditionalGeneration

from ..evaluation import evaluate_world
from ..modeling import DynamicLlavaForConditionalGeneration
from ..training import TrainingRecipe, train
from ..validation import check_rate_range
from .assets import build_processor, world_clutter, write_world_settings
from .dense import PromptEncoder, ScenePool, Stage, encode_scenes, train_stage
from .models import tiny_llava_config
from .scenes import QUESTION_TYPES, random_keep_loss_rate, sample_scene, write_split
from .vision import pretrain_vision_tower

logger = logging.getLogger(__name__)

DENSE_DIR, DYNAMIC_DIR = "tiny-llava", "tiny-dynamic-llava"
FRESH_SEED_OFFSET = 1000  # the report's second test split: generator seed = seed + this


@dataclass
class WorldRecipe:
    output: str = "checkpoints"
    work: str = "runs/world"
    seed: int = 0
    clutter: int = 0  # > 0: a cluttered world, clutter // 2 to clutter specks per scene (`scenes.sample_scene`)
    vision_steps: int = 1200
    vision_batch_size: int = 64
    vision_tower: str | None = None  # a tower saved by an earlier build (work/vision_tower): reused, stage 0 skipped
    dense: str | None = None  # a dense model saved by an earlier build (output/tiny-llava): stages 0-2 skipped
    pool_size: int = 20000  # training scenes whose tower features are cached for the dense stages
    held_out_size: int = 1000
    question_steps: int = 4000  # at most; the stage ends once every question type reaches question_target
    question_target: float = 0.98
    long_steps: int = 1500  # at most: questions, descriptions and listings together
    long_decay_steps: int = 300
    polish_steps: int = 800  # counting weighted up, the learning rate decaying from polish_learning_rate
    polish_learning_rate: float = 3e-4
    batch_size: int = 32
    dense_learning_rate: float = 1e-3
    dense_weight_decay: float = 0.0
    decoder_heads: int = 4
    train_size: int = 8000  # records (with images) for the Dynamic-LLaVA fine-tune
    test_size: int = 1200
    dynamic_steps: int = 800
    dynamic_learning_rate: float = 2e-4
    predictor_learning_rate: float = 2e-3
    image_keep_rate: float = 0.2
    text_keep_rate: float = 0.5
    min_answer_tokens: int = 30  # long answers (descriptions, listings) have their generated tokens judged
    dynamic_max_grad_norm: float = 5.0
    dynamic_loss_average: str = "token"  # "answer" (as the dense stages) scored no better here, with worse descriptions
    dynamic_image_mask_sampling: str = "gumbel"  # or "top_share": the fine-tune's image masks as inference's
    dynamic_image_selection: str = "diverse"  # which tokens the learned scores keep ("top": the paper's top-k)
    dynamic_image_keep_range: tuple[float, float] | None = None  # each fine-tune step at a rate drawn from it
    dynamic_distill_weight: float = 1.0  # KL to the dense model on the answer tokens (0: the paper's loss alone)
    dynamic_hidden_distill_weight: float = 5.0  # its last hidden states matched on the text tokens (0: off)
    eval_limit: int | None = None


DENSE_FIELDS = ("seed", "vision_steps", "vision_batch_size", "pool_size", "held_out_size", "batch_size",
                "dense_learning_rate", "dense_weight_decay", "decoder_heads")  # shape every dense stage
STAGE_FIELDS = (("question_steps", "question_target"), ("long_steps", "long_decay_steps"),
                ("polish_steps", "polish_learning_rate"))  # shape dense stage k and every later one


def _dense_fingerprint(recipe: WorldRecipe, stage: int | None = None) -> dict:
    """The recipe's settings that shape dense stage `stage` (0-based; None: the last), as saved beside it."""
    fields = [*DENSE_FIELDS, *(f for own in STAGE_FIELDS[: None if stage is None else stage + 1] for f in own)]
    found = {k: getattr(recipe, k) for k in fields}
    return {**found, "clutter": recipe.clutter} if recipe.clutter else found  # plain-world builds keep their stamps


def _check_same_run(found: dict, recipe: WorldRecipe, where: Path, stage: int | None = None) -> None:
    """Refuse to reuse dense stage `stage` if another recipe wrote it, naming the settings that differ."""
    wanted = _dense_fingerprint(recipe, stage)
    differ = {k: (found.get(k), v) for k, v in wanted.items() if found.get(k) != v}
    if differ:
        listed = ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in differ.items())
        raise ValueError(f"{where} was written by another world build ({listed}): pass another --work folder, or "
                         "delete it to build again.")


def _pools(model, processor, recipe: WorldRecipe) -> tuple[ScenePool, ScenePool]:
    rng = np.random.default_rng([recipe.seed, 31])
    train_scenes = [sample_scene(rng, clutter=recipe.clutter) for _ in range(recipe.pool_size)]
    rng = np.random.default_rng([recipe.seed, 32])
    held_out = [sample_scene(rng, clutter=recipe.clutter) for _ in range(recipe.held_out_size)]
    return (ScenePool(train_scenes, encode_scenes(model, processor.image_processor, train_scenes)),
            ScenePool(held_out, encode_scenes(model, processor.image_processor, held_out)))


def _vision_tower(dense, processor, recipe: WorldRecipe, work: Path) -> tuple[dict, int | None]:
    """Stage 0, or the tower an earlier build saved: its patch accuracy and the seconds its training took."""
    source = Path(recipe.vision_tower) if recipe.vision_tower else work / "vision_tower"
    if (source / "model.safetensors").is_file():
        accuracy = json.loads((source / "patch_accuracy.json").read_text())
        if ("clutter" in accuracy) != (recipe.clutter > 0):  # only a cluttered world's tower reads specks
            worlds = ("a plain", "a cluttered") if recipe.clutter else ("a cluttered", "a plain")
            raise ValueError(f"{source} holds the tower of {worlds[0]} world, and this build is of {worlds[1]} one "
                             "(--clutter): pass another --work folder or --vision-tower, or delete it.")
        dense.model.vision_tower.load_state_dict(load_file(source / "model.safetensors"))
        seconds = source / "seconds.json"
        return accuracy, json.loads(seconds.read_text()) if seconds.is_file() else None
    started = time.time()
    report = pretrain_vision_tower(dense.model.vision_tower, processor.image_processor, recipe.vision_steps,
                                   recipe.vision_batch_size, seed=recipe.seed, clutter=recipe.clutter)
    staging = work / "vision_tower.partial"
    staging.mkdir(parents=True, exist_ok=True)
    save_file(dense.model.vision_tower.state_dict(), staging / "model.safetensors")
    (staging / "patch_accuracy.json").write_text(json.dumps(report))
    seconds = round(time.time() - started)
    (staging / "seconds.json").write_text(json.dumps(seconds))
    staging.rename(source)
    return report, seconds


def _dense_stages(recipe: WorldRecipe) -> list[Stage]:
    short = {kind: 1.0 for kind in QUESTION_TYPES}
    targets = {kind: recipe.question_target for kind in QUESTION_TYPES}
    return [
        Stage("questions", short, recipe.question_steps, recipe.dense_learning_rate, recipe.batch_size,
              recipe.dense_weight_decay, targets=targets),
        Stage("long answers", {**{k: 0.1 for k in QUESTION_TYPES}, "describe": 0.25, "list": 0.25},
              recipe.long_steps, recipe.dense_learning_rate, recipe.batch_size, recipe.dense_weight_decay,
              targets={**targets, "describe": 0.99}, min_steps=300, decay_steps=recipe.long_decay_steps),
        Stage("polish", {"color": 0.1, "shape": 0.1, "count": 0.3, "exist": 0.15, "position": 0.1, "describe": 0.125,
                         "list": 0.125}, recipe.polish_steps, recipe.polish_learning_rate, recipe.batch_size,
              recipe.dense_weight_decay, decay_steps=recipe.polish_steps),
    ]


def train_dense(recipe: WorldRecipe, processor, log=logger.info) -> tuple[LlavaForConditionalGeneration, dict]:
    """Stages 0-2: the trained dense model and its record (tower accuracy, each stage's held-out history)."""
    work = Path(recipe.work)
    torch.manual_seed(recipe.seed)
    dense = LlavaForConditionalGeneration(tiny_llava_config(len(processor.tokenizer), heads=recipe.decoder_heads))
    accuracy, vision_seconds = _vision_tower(dense, processor, recipe, work)
    record = {"vision_tower_patch_accuracy": accuracy, "vision_seconds": vision_seconds, "stages": []}
    log(f"vision tower patch accuracy: {record['vision_tower_patch_accuracy']}")
    dense.model.vision_tower.requires_grad_(False)  # frozen from here on, as CLIP in LLaVA
    pools = None
    encoder = PromptEncoder(processor, dense.config.image_seq_length)
    for index, stage in enumerate(_dense_stages(recipe)):
        folder = work / f"dense-{index + 1}"
        if (folder / "stage.json").is_file():  # done by an earlier run of this build
            done = json.loads((folder / "stage.json").read_text())
            _check_same_run(done.get("recipe", {}), recipe, folder, index)
            dense.load_state_dict(load_file(folder / "model.safetensors"))
            record["stages"].append(done)
            continue
        pools = pools or _pools(dense, processor, recipe)
        work.mkdir(parents=True, exist_ok=True)
        resume = work / f"dense-{index + 1}.state.pt"  # a stopped build continues the stage from its last check
        stamp = work / f"dense-{index + 1}.recipe.json"
        if resume.is_file() and stamp.is_file():
            _check_same_run(json.loads(stamp.read_text()), recipe, resume, index)
        stamp.write_text(json.dumps(_dense_fingerprint(recipe, index)))
        result = train_stage(dense, encoder, *pools, stage, seed=recipe.seed, pad_id=processor.tokenizer.pad_token_id,
                             checkpoint=resume)
        met = "" if result["reached_targets"] is None else f", targets met: {result['reached_targets']}"
        log(f"dense stage {stage.name!r}: {result['steps']} steps, {result['seconds']} s{met}")
        staging = work / f"dense-{index + 1}.partial"
        staging.mkdir(parents=True, exist_ok=True)
        save_file(dense.state_dict(), staging / "model.safetensors")
        (staging / "stage.json").write_text(json.dumps({**result, "recipe": _dense_fingerprint(recipe, index)}))
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
        resume.unlink(missing_ok=True)
        stamp.unlink(missing_ok=True)
        record["stages"].append(result)
    return dense, record


def _save_fp16(model, processor, folder: Path, clutter: int = 0) -> None:
    """Write to a staging folder, then swap it in: a failed save leaves the previous checkpoint. A cluttered
    world's checkpoint records its `clutter` (`assets.WORLD_FILE`)."""
    staging = folder.with_name(folder.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    model.to(torch.float16).save_pretrained(staging)
    processor.save_pretrained(staging)
    if clutter:
        write_world_settings(staging, clutter)
    model.to(torch.float32)
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)


FINE_TUNE_FIELDS = ("seed", "batch_size", "train_size", "dynamic_steps", "dynamic_learning_rate",
                    "predictor_learning_rate", "image_keep_rate", "text_keep_rate", "min_answer_tokens",
                    "dynamic_max_grad_norm", "dynamic_loss_average", "dynamic_image_mask_sampling",
                    "dynamic_image_selection", "dynamic_distill_weight", "dynamic_hidden_distill_weight",
                    "dynamic_image_keep_range")


def dynamic_folder(recipe: WorldRecipe) -> Path:
    """Where the fine-tune runs: named by the dense model's settings (or, with `recipe.dense`, by its weights) and
    by the fine-tune's own settings, so a rerun after another dense build, or with another fine-tune recipe,
    starts afresh beside the earlier run instead of resuming (or refusing) its checkpoints."""
    if recipe.dense:
        dense = hashlib.sha256((Path(recipe.dense) / "model.safetensors").read_bytes()).hexdigest()[:10]
    else:
        dense = hashlib.sha256(json.dumps(_dense_fingerprint(recipe), sort_keys=True).encode()).hexdigest()[:10]
    settings = {k: getattr(recipe, k) for k in FINE_TUNE_FIELDS}
    if settings["dynamic_image_keep_range"] is None:  # unused: named as before the option, so such runs resume
        del settings["dynamic_image_keep_range"]
    tune = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return Path(recipe.work) / f"dynamic-{dense}-{tune}"


def load_dense(recipe: WorldRecipe) -> tuple[LlavaForConditionalGeneration, object, dict]:
    """The dense model of an earlier build (`recipe.dense`) in fp32, its processor, and the record of its stages
    from the `world_report.json` beside it (empty if there is none)."""
    folder = Path(recipe.dense)
    if (clutter := world_clutter(folder)) != recipe.clutter:
        raise ValueError(f"{folder} was built in a world with --clutter {clutter}, and this build has --clutter "
                         f"{recipe.clutter}: pass --clutter {clutter} to fine-tune it on its own world.")
    dense = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32)
    earlier = folder.parent / "world_report.json"
    record = {"dense_checkpoint": str(folder)}
    if earlier.is_file():
        found = json.loads(earlier.read_text())
        record.update({k: found[k] for k in ("vision_tower_patch_accuracy", "vision_seconds", "stages") if k in found})
    return dense, AutoProcessor.from_pretrained(folder), record


def world_splits(root: Path, recipe: WorldRecipe) -> dict[str, Path]:
    """The fine-tune's training records and the two test splits (the build's seed and a fresh one)."""
    return {
        "train": write_split(root, "train", recipe.train_size, seed=recipe.seed, clutter=recipe.clutter),
        "test": write_split(root, "test", recipe.test_size, seed=recipe.seed, clutter=recipe.clutter),
        "fresh": write_split(root / "fresh", "test", recipe.test_size, seed=recipe.seed + FRESH_SEED_OFFSET,
                             clutter=recipe.clutter),
    }


def build_world(recipe: WorldRecipe, log=logger.info) -> dict:
    """Run every step; returns the evaluation report (also written to `output/world_report.json`)."""
    if recipe.dynamic_image_keep_range is not None:  # refused now, not after the dense stages
        check_rate_range("dynamic_image_keep_range", recipe.dynamic_image_keep_range)
    work, output = Path(recipe.work), Path(recipe.output)
    if recipe.dense:
        dense, processor, record = load_dense(recipe)
        log(f"dense model from {recipe.dense}: stages 0-2 skipped")
    else:
        processor = build_processor()
        dense, record = train_dense(recipe, processor, log)
    dense_seconds = _dense_seconds(record)
    splits = world_splits(work / "data", recipe)
    report = finish_world(recipe, dense, processor, splits)
    rng = np.random.default_rng([recipe.seed, 33])
    scenes = [sample_scene(rng, clutter=recipe.clutter) for _ in range(2000)]
    train_seconds = None if dense_seconds is None else dense_seconds + report["dynamic_seconds"]
    report.update(dense_seconds=dense_seconds, train_seconds=train_seconds,
                  random_keep_object_loss={str(r): random_keep_loss_rate(scenes, r) for r in (0.1, 0.2, 0.5)},
                  **record)
    output.mkdir(parents=True, exist_ok=True)
    (output / "world_report.json").write_text(json.dumps(report, indent=2))
    return report


def _dense_seconds(record: dict) -> int | None:
    """The seconds stages 0-2 took when they were trained, summed from their records: a build that resumed or
    reused them (`--dense`) reports what training them cost, not its own time. None where a figure is missing."""
    seconds = [record.get("vision_seconds")] + [stage.get("seconds") for stage in record.get("stages", [])]
    return None if None in seconds else round(sum(seconds))


def finish_world(recipe: WorldRecipe, dense, processor, splits: dict[str, Path]) -> dict:
    """From the trained dense model on: fine-tune Dynamic-LLaVA, save both in fp16, evaluate both."""
    started = time.time()
    work, output = Path(recipe.work), Path(recipe.output)
    dense_dir = work / DENSE_DIR
    dense.save_pretrained(dense_dir)
    processor.save_pretrained(dense_dir)
    final = train(TrainingRecipe(
        model=str(dense_dir), data=str(splits["train"]), images=str(splits["train"].parent / "images"),
        output_dir=str(dynamic_folder(recipe)), trainable="full", learning_rate=recipe.dynamic_learning_rate,
        predictor_learning_rate=recipe.predictor_learning_rate, max_steps=recipe.dynamic_steps,
        batch_size=recipe.batch_size, save_steps=max(recipe.dynamic_steps // 4, 1), logging_steps=25,
        seed=recipe.seed, resume=True, max_grad_norm=recipe.dynamic_max_grad_norm,
        loss_average=recipe.dynamic_loss_average, distill_weight=recipe.dynamic_distill_weight,
        hidden_distill_weight=recipe.dynamic_hidden_distill_weight,
        image_keep_rate_range=recipe.dynamic_image_keep_range,
        sparsity={"image_keep_rate": recipe.image_keep_rate, "text_keep_rate": recipe.text_keep_rate,
                  "min_answer_tokens": recipe.min_answer_tokens,
                  "image_mask_sampling": recipe.dynamic_image_mask_sampling,
                  "image_selection": recipe.dynamic_image_selection},
    ))
    _save_fp16(dense, processor, output / DENSE_DIR, recipe.clutter)  # a plain llava-hf checkpoint
    _save_fp16(DynamicLlavaForConditionalGeneration.from_pretrained(final), processor, output / DYNAMIC_DIR,
               recipe.clutter)
    report = {"recipe": asdict(recipe), "dynamic_seconds": round(time.time() - started)}
    for name, dense_mode in ((DENSE_DIR, True), (DYNAMIC_DIR, False)):
        rates = {"image_keep_rate": 1.0, "text_keep_rate": 1.0} if dense_mode else {}
        model = DynamicLlavaForConditionalGeneration.from_pretrained(output / name, dtype=torch.float32, **rates)
        report[name] = {
            split: evaluate_world(model.eval(), processor, splits[split], splits[split].parent / "images",
                                  limit=recipe.eval_limit)
            for split in ("test", "fresh")
        }
    return report


__all__ = ["WorldRecipe", "build_world", "dynamic_folder", "finish_world", "load_dense", "train_dense", "world_splits", "DENSE_DIR", "DYNAMIC_DIR"]
