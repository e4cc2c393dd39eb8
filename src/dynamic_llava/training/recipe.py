"""One function from a llava-hf (or Dynamic-LLaVA) checkpoint and LLaVA-format data to a trained Dynamic-LLaVA.

The same call runs single-process or under `torchrun` / `accelerate launch` (the HF Trainer reads
the distributed environment). A run whose output folder holds checkpoints resumes from the newest.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import AutoProcessor, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from ..data import LLAVA_V1_CHAT_TEMPLATE, LlavaCollator, LlavaConversationDataset
from ..modeling import DynamicLlavaForConditionalGeneration
from .trainer import DynamicLlavaTrainer, is_predictor_parameter

logger = logging.getLogger(__name__)

LORA_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
FINAL_DIR = "final"


@dataclass
class TrainingRecipe:
    """Everything one fine-tuning run needs (defaults follow the recipe of Huang et al., ICLR 2025).

    trainable: "predictors" (only the two predictors), "full" (predictors + language model, the
    authors' choice) or "lora" (predictors + LoRA adapters on the language model's linear layers).
    The vision tower is always frozen; the projector trains with "full" and "lora" unless
    `freeze_projector`. `image_only` trains the "I" model (no output-text predictor).
    `sparsity` overrides config settings (image_keep_rate, text_keep_rate, sparse_layer,
    budget_weight, min_answer_tokens, ...). `chat_template`: a Jinja template, or "llava_v1" for
    the original LLaVA-1.5 format with "</s>" after each answer (the template shipped with llava-hf
    checkpoints writes no end token, so a model trained with it does not learn to stop); None uses
    the processor's own. `deepspeed`: a DeepSpeed JSON config for multi-GPU runs (ZeRO-2/3).
    `max_grad_norm` clips the whole gradient (0 turns clipping off); with budget_weight 100 the
    budget term's gradients are large, so clipping also slows how fast the keep ratios move.
    """

    model: str
    data: str
    images: str
    output_dir: str
    trainable: Literal["predictors", "full", "lora"] = "full"
    freeze_projector: bool = False
    image_only: bool = False
    learning_rate: float = 5e-6
    predictor_learning_rate: float = 2e-4
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    warmup_ratio: float = 0.03
    max_grad_norm: float = 1.0
    seed: int = 42
    save_steps: int = 500
    save_total_limit: int | None = 2
    logging_steps: int = 10
    gradient_checkpointing: bool = False
    bf16: bool = False
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    on_bad_record: Literal["skip", "raise"] = "skip"
    max_length: int | None = None
    chat_template: str | None = None
    deepspeed: str | None = None
    resume: bool = True
    sparsity: dict = field(default_factory=dict)

    def check(self) -> None:
        """Raise a clear error for settings or paths that cannot work, before anything is loaded."""
        if self.trainable not in ("predictors", "full", "lora"):
            raise ValueError(f"trainable={self.trainable!r}: choose 'predictors', 'full' or 'lora'.")
        for name in ("model", "images"):
            if not os.path.isdir(getattr(self, name)):
                raise FileNotFoundError(f"{name} folder not found: {getattr(self, name)}")
        if not os.path.isfile(self.data):
            raise FileNotFoundError(f"data file not found: {self.data}")
        if self.batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise ValueError("batch_size and gradient_accumulation_steps must be >= 1.")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ValueError("Give max_steps > 0 or epochs > 0.")
        if self.on_bad_record not in ("skip", "raise"):
            raise ValueError(f"on_bad_record={self.on_bad_record!r}: choose 'skip' or 'raise'.")


def load_model(recipe: TrainingRecipe) -> DynamicLlavaForConditionalGeneration:
    """The model to train, with only the chosen parts trainable (LoRA-wrapped for trainable='lora')."""
    overrides = dict(recipe.sparsity)
    if recipe.image_only:
        overrides["use_text_predictor"] = False
    dtype = torch.bfloat16 if recipe.bf16 else torch.float32
    model = DynamicLlavaForConditionalGeneration.from_pretrained(recipe.model, dtype=dtype, **overrides)
    model.requires_grad_(False)
    for name, param in model.named_parameters():
        if is_predictor_parameter(name):
            param.requires_grad_(True)
    train_projector = recipe.trainable != "predictors" and not recipe.freeze_projector
    model.model.multi_modal_projector.requires_grad_(train_projector)
    if recipe.trainable == "full":
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    elif recipe.trainable == "lora":
        from peft import LoraConfig, get_peft_model

        to_save = ["image_predictor", "text_predictor"] + (["multi_modal_projector"] if train_projector else [])
        config = LoraConfig(
            r=recipe.lora_rank, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
            target_modules=LORA_TARGETS, modules_to_save=to_save,
        )
        model = get_peft_model(model, config)
    if recipe.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def build_trainer(recipe: TrainingRecipe, callbacks=None) -> DynamicLlavaTrainer:
    """Model, data and `DynamicLlavaTrainer` for the recipe (call `.train()` on it, or use `train`)."""
    recipe.check()
    processor = AutoProcessor.from_pretrained(recipe.model)
    model = load_model(recipe)
    config = model.config
    dataset = LlavaConversationDataset(
        recipe.data, recipe.images, processor, min_answer_tokens=config.min_answer_tokens,
        on_error=recipe.on_bad_record, max_length=recipe.max_length,
        chat_template=LLAVA_V1_CHAT_TEMPLATE if recipe.chat_template == "llava_v1" else recipe.chat_template,
    )
    cuda = torch.cuda.is_available()
    args = TrainingArguments(
        output_dir=recipe.output_dir,
        per_device_train_batch_size=recipe.batch_size,
        gradient_accumulation_steps=recipe.gradient_accumulation_steps,
        learning_rate=recipe.learning_rate,
        weight_decay=0.0,
        lr_scheduler_type="cosine",
        warmup_steps=recipe.warmup_ratio,
        max_grad_norm=recipe.max_grad_norm,
        num_train_epochs=recipe.epochs,
        max_steps=recipe.max_steps,
        logging_steps=recipe.logging_steps,
        save_steps=recipe.save_steps,
        save_total_limit=recipe.save_total_limit,
        seed=recipe.seed,
        bf16=recipe.bf16,
        use_cpu=not cuda,
        ddp_backend="gloo" if not cuda and int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        remove_unused_columns=False,
        report_to=[],
        dataloader_num_workers=0,
        deepspeed=recipe.deepspeed,
    )
    trainer = DynamicLlavaTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=LlavaCollator(processor.tokenizer.pad_token_id),
        predictor_learning_rate=recipe.predictor_learning_rate,
        callbacks=callbacks,
        processing_class=processor,
    )
    return trainer


def save_final(trainer: DynamicLlavaTrainer, output_dir: str) -> str:
    """Write the trained model (LoRA merged) and its processor to `output_dir/final`, atomically."""
    final = os.path.join(output_dir, FINAL_DIR)
    if trainer.args.should_save:
        model = trainer.accelerator.unwrap_model(trainer.model)
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        staging = tempfile.mkdtemp(prefix=".final-", dir=output_dir)
        model.save_pretrained(staging)
        trainer.processing_class.save_pretrained(staging)
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(staging, final)
    trainer.accelerator.wait_for_everyone()
    return final


def train(recipe: TrainingRecipe, callbacks=None) -> str:
    """Fine-tune as the recipe says; returns the folder of the trained model (loadable by from_pretrained)."""
    trainer = build_trainer(recipe, callbacks)
    last = get_last_checkpoint(recipe.output_dir) if recipe.resume and os.path.isdir(recipe.output_dir) else None
    if last:
        logger.warning(f"Resuming from {last}")
    trainer.train(resume_from_checkpoint=last)
    return save_final(trainer, recipe.output_dir)


__all__ = ["TrainingRecipe", "build_trainer", "load_model", "save_final", "train"]
