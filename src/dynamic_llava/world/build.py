"""One command from nothing to the shipped world checkpoints: data, dense LLaVA, Dynamic-LLaVA, report.

1. write the train / validation / test splits (deterministic by seed);
2. pre-train the vision tower on patch labels (`vision.py`: what CLIP is to LLaVA), then freeze it;
3. train the rest of the tiny dense LLaVA from scratch (stock `LlavaForConditionalGeneration`, HF
   Trainer): a description stage (every answer a full scene description), then all question types
   with 30% descriptions, then a questions stage with 10% descriptions (short answers carry little of
   the token-averaged loss while descriptions are in the mix);
4. fine-tune Dynamic-LLaVA I|T from it with the sparsification-aware recipe (`training.train`);
5. save both (fp16 weights, with the processor) and evaluate them on the test split.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration, Trainer, TrainingArguments

from ..data import LlavaCollator, LlavaConversationDataset
from ..evaluation import evaluate_world
from ..modeling import DynamicLlavaForConditionalGeneration
from ..training import TrainingRecipe, train
from .assets import build_processor
from .models import tiny_llava_config
from .scenes import write_split
from .vision import pretrain_vision_tower

logger = logging.getLogger(__name__)

DENSE_DIR, DYNAMIC_DIR = "tiny-llava", "tiny-dynamic-llava"


@dataclass
class WorldRecipe:
    output: str = "checkpoints"
    work: str = "runs/world"
    seed: int = 0
    train_size: int = 20000
    test_size: int = 600
    vision_steps: int = 1500
    vision_batch_size: int = 64
    vision_tower: str | None = None  # a tower saved by an earlier build (work/vision_tower): reused, stage 0 skipped
    describe_steps: int = 400
    dense_steps: int = 1200
    question_steps: int = 1200
    dynamic_steps: int = 400
    batch_size: int = 32
    dense_learning_rate: float = 1e-3
    dynamic_learning_rate: float = 2e-4
    predictor_learning_rate: float = 2e-3
    image_keep_rate: float = 0.2
    text_keep_rate: float = 0.5
    dynamic_max_grad_norm: float = 5.0
    eval_limit: int | None = None


class _DenseCollator(LlavaCollator):
    """The stock model takes no answer mask."""

    def __call__(self, samples):
        batch = super().__call__(samples)
        batch.pop("answer_mask")
        return batch


def _dense_stage(model, processor, data: Path, images: Path, steps: int, lr: float, recipe: WorldRecipe, run: Path):
    dataset = LlavaConversationDataset(data, images, processor, min_answer_tokens=50)
    args = TrainingArguments(
        output_dir=str(run), per_device_train_batch_size=recipe.batch_size, learning_rate=lr, max_steps=steps,
        lr_scheduler_type="cosine", warmup_steps=0.03, weight_decay=0.0, logging_steps=50, save_strategy="no",
        report_to=[], use_cpu=not torch.cuda.is_available(), remove_unused_columns=False, seed=recipe.seed,
    )
    Trainer(model=model, args=args, train_dataset=dataset, data_collator=_DenseCollator(0)).train()


def _save_fp16(model, processor, folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    model.to(torch.float16).save_pretrained(folder)
    processor.save_pretrained(folder)
    model.to(torch.float32)


def build_world(recipe: WorldRecipe) -> dict:
    """Run every step; returns the evaluation report (also written to `output/world_report.json`)."""
    started = time.time()
    work, output = Path(recipe.work), Path(recipe.output)
    data = work / "data"
    splits = {split: write_split(data, split, size, describe_share=share, seed=recipe.seed)
              for split, size, share in (("train", recipe.train_size, 0.3), ("test", recipe.test_size, 0.3))}
    describe_only = write_split(data / "describe", "train", recipe.train_size // 4, describe_share=1.0,
                                seed=recipe.seed)
    processor = build_processor()
    torch.manual_seed(recipe.seed)
    dense = LlavaForConditionalGeneration(tiny_llava_config(len(processor.tokenizer)))
    if recipe.vision_tower:
        dense.model.vision_tower.load_state_dict(load_file(Path(recipe.vision_tower) / "model.safetensors"))
        vision_report = json.loads((Path(recipe.vision_tower) / "patch_accuracy.json").read_text())
    else:
        vision_report = pretrain_vision_tower(dense.model.vision_tower, processor.image_processor,
                                              recipe.vision_steps, recipe.vision_batch_size, seed=recipe.seed)
        tower = work / "vision_tower"
        tower.mkdir(parents=True, exist_ok=True)
        save_file(dense.model.vision_tower.state_dict(), tower / "model.safetensors")
        (tower / "patch_accuracy.json").write_text(json.dumps(vision_report))
    logger.info("vision tower patch accuracy: %s", vision_report)
    dense.model.vision_tower.requires_grad_(False)  # frozen from here on, as CLIP in LLaVA
    _dense_stage(dense, processor, describe_only, data / "describe" / "images", recipe.describe_steps,
                 recipe.dense_learning_rate, recipe, work / "dense-describe")
    _dense_stage(dense, processor, splits["train"], data / "images", recipe.dense_steps,
                 recipe.dense_learning_rate, recipe, work / "dense")
    if recipe.question_steps > 0:
        questions = write_split(data / "questions", "train", recipe.train_size, describe_share=0.1, seed=recipe.seed)
        _dense_stage(dense, processor, questions, data / "questions" / "images", recipe.question_steps,
                     recipe.dense_learning_rate, recipe, work / "dense-questions")
    dense_seconds = round(time.time() - started)
    report = finish_world(recipe, dense, processor, splits)
    report.update(dense_seconds=dense_seconds, train_seconds=dense_seconds + report["dynamic_seconds"],
                  vision_tower_patch_accuracy=vision_report)
    (output / "world_report.json").write_text(json.dumps(report, indent=2))
    return report


def finish_world(recipe: WorldRecipe, dense, processor, splits: dict[str, Path]) -> dict:
    """From the trained dense model on: fine-tune Dynamic-LLaVA, save both in fp16, evaluate both."""
    started = time.time()
    work, output = Path(recipe.work), Path(recipe.output)
    data = splits["train"].parent
    dense_dir = work / DENSE_DIR
    dense.save_pretrained(dense_dir)
    processor.save_pretrained(dense_dir)
    final = train(TrainingRecipe(
        model=str(dense_dir), data=str(splits["train"]), images=str(data / "images"),
        output_dir=str(work / "dynamic"), trainable="full", learning_rate=recipe.dynamic_learning_rate,
        predictor_learning_rate=recipe.predictor_learning_rate, max_steps=recipe.dynamic_steps,
        batch_size=recipe.batch_size, save_steps=max(recipe.dynamic_steps // 3, 1), logging_steps=25,
        seed=recipe.seed, resume=False, max_grad_norm=recipe.dynamic_max_grad_norm,
        sparsity={"image_keep_rate": recipe.image_keep_rate, "text_keep_rate": recipe.text_keep_rate},
    ))
    _save_fp16(dense, processor, output / DENSE_DIR)  # a plain llava-hf checkpoint
    _save_fp16(DynamicLlavaForConditionalGeneration.from_pretrained(final), processor, output / DYNAMIC_DIR)
    report = {"recipe": asdict(recipe), "dynamic_seconds": round(time.time() - started)}
    for name, dense_mode in ((DENSE_DIR, True), (DYNAMIC_DIR, False)):
        rates = {"image_keep_rate": 1.0, "text_keep_rate": 1.0} if dense_mode else {}
        model = DynamicLlavaForConditionalGeneration.from_pretrained(output / name, dtype=torch.float32, **rates)
        report[name] = evaluate_world(model.eval(), processor, splits["test"], data / "images",
                                      limit=recipe.eval_limit)
    return report


__all__ = ["WorldRecipe", "build_world", "finish_world", "DENSE_DIR", "DYNAMIC_DIR"]
