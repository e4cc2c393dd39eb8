"""One function from a llava-hf (or Dynamic-LLaVA) checkpoint and LLaVA-format data to a trained Dynamic-LLaVA.

The same call runs single-process or under `torchrun` / `accelerate launch` (the HF Trainer reads
the distributed environment). A run whose output folder holds checkpoints resumes from the newest.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import AutoProcessor, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..checkpoints import check_checkpoint_folder
from ..config import SPARSITY_FIELDS
from ..data import LLAVA_V1_CHAT_TEMPLATE, LlavaCollator, LlavaConversationDataset
from ..auto import model_class_for
from ..modeling import DynamicLlavaForConditionalGeneration
from ..validation import check_bool, check_integer, check_number, check_rate_range, invalid
from .trainer import (
    RUN_FILE,
    DynamicLlavaTrainer,
    NonFiniteError,
    is_predictor_parameter,
    is_write_failure,
    non_finite_tensors,
    save_failure,
)

logger = logging.getLogger(__name__)

LORA_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
FINAL_DIR = "final"
PREVIOUS_DIR = "previous"  # where a restart moves the checkpoints and final model of the run it replaces


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
    `loss_average`: "token" averages the cross-entropy over every answer token of the batch (LLaVA's choice);
    "answer" averages each answer's mean, so one-word answers weigh as much as long descriptions.
    `distill_weight` > 0 adds that weight times KL(dense teacher || sparse student) on the answer tokens, the
    teacher being the starting model with every token kept (frozen; one more copy of the model in memory and one
    more forward per step). 0, the default, is the paper's loss. `hidden_distill_weight` > 0 (with the same
    teacher) adds that weight times the relative squared error between the student's and the teacher's last
    hidden states on the text tokens (question and answer), a denser signal than the answer's logits.
    `image_keep_rate_range=(low, high)` trains each optimizer step at an image keep rate drawn uniformly from
    [low, high] instead of the config's one (which the saved model keeps), so one model serves the range of
    rates inference will be asked for; with image_mask_sampling "top_share" the drawn rate sets how many tokens
    each image keeps, with "gumbel" only the budget's target.
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
    loss_average: Literal["token", "answer"] = "token"
    distill_weight: float = 0.0
    hidden_distill_weight: float = 0.0
    image_keep_rate_range: tuple[float, float] | None = None
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
        """Raise a clear error for settings or paths that cannot work, before any weights are loaded."""
        if self.trainable not in ("predictors", "full", "lora"):
            raise ValueError(f"trainable={self.trainable!r}: choose 'predictors', 'full' or 'lora'.")
        if self.loss_average not in ("token", "answer"):
            raise ValueError(f"loss_average={self.loss_average!r}: choose 'token' or 'answer'.")
        if self.on_bad_record not in ("skip", "raise"):
            raise ValueError(f"on_bad_record={self.on_bad_record!r}: choose 'skip' or 'raise'.")
        if not os.path.exists(self.model):
            raise FileNotFoundError(f"model folder not found: {self.model}")
        check_checkpoint_folder(self.model)  # a file, or a folder without config.json
        if not os.path.isdir(self.images):
            raise FileNotFoundError(f"images folder not found: {self.images}")
        if not os.path.isfile(self.data):
            raise FileNotFoundError(f"data file not found: {self.data}")
        for name in ("learning_rate", "predictor_learning_rate", "lora_alpha"):
            check_number(name, getattr(self, name), 0.0, low_open=True)
        check_number("epochs", self.epochs, 0.0)
        check_number("distill_weight", self.distill_weight, 0.0, hint="0 trains without a teacher")
        check_number("hidden_distill_weight", self.hidden_distill_weight, 0.0, hint="0 leaves the hidden states free")
        check_integer("max_steps", self.max_steps, hint="-1 trains for --epochs")
        if self.image_keep_rate_range is not None:
            check_rate_range("image_keep_rate_range", self.image_keep_rate_range,
                             "or None (train at the config's image_keep_rate)")
        for name in ("batch_size", "gradient_accumulation_steps", "save_steps", "logging_steps", "lora_rank"):
            check_integer(name, getattr(self, name), 1)
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ValueError(f"max_steps={self.max_steps} and epochs={self.epochs}: give max_steps > 0 or epochs > 0.")
        check_number("warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        check_number("lora_dropout", self.lora_dropout, 0.0, 1.0)
        check_number("max_grad_norm", self.max_grad_norm, 0.0, hint="0 turns clipping off")
        check_integer("seed", self.seed, 0)
        for name in ("save_total_limit", "max_length"):
            if getattr(self, name) is not None:
                check_integer(name, getattr(self, name), 1)
        for name in ("freeze_projector", "image_only", "gradient_checkpointing", "bf16", "resume"):
            check_bool(name, getattr(self, name))
        template = self.chat_template
        if template is not None and (not isinstance(template, str) or not template.strip()):
            raise invalid("chat_template", template, "'llava_v1', a Jinja template, or None (the processor's)")
        if not isinstance(self.sparsity, dict):
            raise invalid("sparsity", self.sparsity, "a dict of config settings", kind=TypeError)
        unknown = sorted(set(self.sparsity) - set(SPARSITY_FIELDS))
        if unknown:
            raise ValueError(f"sparsity has unknown settings {unknown}: choose from {list(SPARSITY_FIELDS)}.")
        if self.trainable == "lora" and importlib.util.find_spec("peft") is None:
            raise ValueError("trainable='lora' needs the peft package: pip install peft.")
        self._check_deepspeed()
        self._check_output_dir()
        config = model_class_for(self.model).config_class.from_pretrained(self.model, **self.sparsity)  # the overrides
        context = config.text_config.max_position_embeddings
        if self.max_length is not None and self.max_length > context:
            raise invalid("max_length", self.max_length, f"an integer in [1, {context}]",
                          "the model's context (text_config.max_position_embeddings)")

    def _check_deepspeed(self) -> None:
        if self.deepspeed is None:
            return
        if not os.path.isfile(self.deepspeed):
            raise FileNotFoundError(
                f"DeepSpeed config not found: {self.deepspeed} (e.g. configs/deepspeed_zero2.json)."
            )
        try:
            with open(self.deepspeed, encoding="utf-8") as f:
                json.load(f)
        except ValueError as error:
            raise ValueError(f"DeepSpeed config {self.deepspeed} is not valid JSON: {error}.") from error
        if importlib.util.find_spec("deepspeed") is None:
            raise ValueError(f"--deepspeed {self.deepspeed} needs the deepspeed package: pip install deepspeed.")

    def _check_output_dir(self) -> None:
        if os.path.exists(self.output_dir) and not os.path.isdir(self.output_dir):
            raise NotADirectoryError(f"output folder {self.output_dir} is a file: pass a folder.")
        parent = self.output_dir
        while not os.path.exists(parent) and os.path.dirname(os.path.abspath(parent)) != os.path.abspath(parent):
            parent = os.path.dirname(os.path.abspath(parent))
        if not os.access(parent, os.W_OK | os.X_OK):
            raise PermissionError(f"output folder {self.output_dir} cannot be written ({parent} is not writable).")

    def fingerprint(self) -> dict:
        """What makes two runs the same run: the model, the data and the settings that shape the result."""
        settings = {name: getattr(self, name) for name in RUN_SETTINGS}
        for name in ("distill_weight", "hidden_distill_weight", "image_keep_rate_range"):
            if not settings[name]:  # unused: fingerprinted as before the option, so such runs still resume
                del settings[name]
        settings["chat_template"] = self.chat_template
        settings["processes"] = int(os.environ.get("WORLD_SIZE", "1"))
        return json.loads(json.dumps({
            "model": os.path.abspath(self.model),
            "model_config_sha256": _sha256(os.path.join(self.model, "config.json")),
            "data": os.path.abspath(self.data),
            "data_sha256": _sha256(self.data),
            "images": os.path.abspath(self.images),
            "settings": settings,
        }))


# Recipe fields that change what a run computes (not where or how often it saves or logs).
RUN_SETTINGS = (
    "trainable", "freeze_projector", "image_only", "learning_rate", "predictor_learning_rate", "epochs", "max_steps",
    "batch_size", "gradient_accumulation_steps", "warmup_ratio", "max_grad_norm", "loss_average", "distill_weight",
    "hidden_distill_weight", "image_keep_rate_range", "seed", "bf16",
    "lora_rank", "lora_alpha", "lora_dropout", "on_bad_record", "max_length", "sparsity",
)


def _sha256(path: str) -> str:
    """SHA-256 of a file's bytes (remembered while the file keeps its size and modification time)."""
    stat = os.stat(path)
    return _sha256_of(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """'name: saved -> current' for each entry that differs between two fingerprints."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key, _UNSET), current.get(key, _UNSET)
        if isinstance(a, dict) and isinstance(b, dict):
            out += fingerprint_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {_short(a)} there, {_short(b)} now")
    return out


_UNSET = object()


def _short(value) -> str:
    text = "unset" if value is _UNSET else repr(value)
    return text if len(text) <= 60 else text[:28] + "..." + text[-28:]


def projector_parts(model) -> dict[str, torch.nn.Module | torch.nn.Parameter]:
    """The modules between the vision tower and the language model, by name: LLaVA's projector (and LLaVA-NeXT's
    row-end embedding), Qwen-VL's patch merger."""
    base = model.model
    if hasattr(base, "multi_modal_projector"):
        parts = {"multi_modal_projector": base.multi_modal_projector}
        if getattr(base, "image_newline", None) is not None:
            parts["image_newline"] = base.image_newline
        return parts
    return {"merger": base.visual.merger}


def load_model(recipe: TrainingRecipe) -> DynamicLlavaForConditionalGeneration:
    """The model to train (of the family its checkpoint names), with only the chosen parts trainable (LoRA-wrapped
    for trainable='lora')."""
    overrides = dict(recipe.sparsity)
    if recipe.image_only:
        overrides["use_text_predictor"] = False
    dtype = torch.bfloat16 if recipe.bf16 else torch.float32
    model = model_class_for(recipe.model).from_pretrained(recipe.model, dtype=dtype, **overrides)
    model.requires_grad_(False)
    for name, param in model.named_parameters():
        if is_predictor_parameter(name):
            param.requires_grad_(True)
    train_projector = recipe.trainable != "predictors" and not recipe.freeze_projector
    projector = projector_parts(model)
    for part in projector.values():
        part.requires_grad_(train_projector)
    if recipe.trainable == "full":
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    elif recipe.trainable == "lora":
        from peft import LoraConfig, get_peft_model

        to_save = ["image_predictor", "text_predictor"] + ([name for name in projector if name != "image_newline"]
                                                          if train_projector else [])
        config = LoraConfig(
            r=recipe.lora_rank, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
            target_modules=LORA_TARGETS, modules_to_save=to_save,
        )
        model = get_peft_model(model, config)
    if recipe.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return model


def load_teacher(recipe: TrainingRecipe):
    """The frozen dense teacher of `distill_weight` and `hidden_distill_weight`: the starting checkpoint with every token kept, in eval mode."""
    dtype = torch.bfloat16 if recipe.bf16 else torch.float32
    teacher = model_class_for(recipe.model).from_pretrained(recipe.model, dtype=dtype,
                                                            **{**recipe.sparsity, "image_keep_rate": 1.0,
                                                               "text_keep_rate": 1.0})
    return teacher.requires_grad_(False).eval()


def build_trainer(recipe: TrainingRecipe, callbacks=None) -> DynamicLlavaTrainer:
    """Model, data and `DynamicLlavaTrainer` for the recipe (call `.train()` on it, or use `train`)."""
    recipe.check()
    processor = AutoProcessor.from_pretrained(recipe.model)
    model = load_model(recipe)
    config = model.config
    dataset = LlavaConversationDataset(
        recipe.data, recipe.images, processor, min_answer_tokens=config.min_answer_tokens,
        on_error=recipe.on_bad_record, max_length=recipe.max_length or config.text_config.max_position_embeddings,
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
        loss_average=recipe.loss_average,
        teacher=load_teacher(recipe) if recipe.distill_weight > 0 or recipe.hidden_distill_weight > 0 else None,
        distill_weight=recipe.distill_weight,
        hidden_distill_weight=recipe.hidden_distill_weight,
        image_keep_rate_range=None if recipe.image_keep_rate_range is None else tuple(recipe.image_keep_rate_range),
        run_fingerprint=recipe.fingerprint(),
        callbacks=callbacks,
        processing_class=processor,
    )
    return trainer


def save_final(trainer: DynamicLlavaTrainer, output_dir: str) -> str:
    """Write the trained model (LoRA merged), its processor and run.json to `output_dir/final`, atomically.

    Refuses (NonFiniteError) a model with NaN or infinite weights: a ruined model is never saved as a result."""
    final = os.path.join(output_dir, FINAL_DIR)
    if trainer.args.should_save:
        model = trainer.accelerator.unwrap_model(trainer.model)
        if hasattr(model, "merge_and_unload"):
            model = model.merge_and_unload()
        ruined = non_finite_tensors(model)
        if ruined:
            raise NonFiniteError(
                f"The trained model has NaN or infinite values in {len(ruined)} tensors (first: {ruined[0]}): "
                f"{final} is not written. Lower the learning rates or --budget-weight and start over (--restart)."
            )
        staging = tempfile.mkdtemp(prefix=".final-", dir=output_dir)
        try:
            os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private; the model folder is not
            model.save_pretrained(staging)
            trainer.processing_class.save_pretrained(staging)
            if trainer.run_fingerprint is not None:
                with open(os.path.join(staging, RUN_FILE), "w") as f:
                    json.dump({**trainer.run_fingerprint, "steps": trainer.state.global_step}, f, indent=2)
        except (OSError, RuntimeError) as error:
            shutil.rmtree(staging, ignore_errors=True)
            if not is_write_failure(error):
                raise
            raise save_failure(final, error) from error
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(staging, final)
    trainer.accelerator.wait_for_everyone()
    return final


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _read_json(path: str) -> dict | None:
    """A JSON file a run wrote (None if it is not there); a damaged one is refused naming it."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as error:
        raise ValueError(
            f"{path} is damaged ({error}): move that checkpoint away, or pass --restart to start over."
        ) from error


def _read_run(folder: str) -> dict | None:
    return _read_json(os.path.join(folder, RUN_FILE))


def _check_same_run(folder: str, current: dict) -> None:
    """Refuse to continue from `folder` (a checkpoint or final model) unless it was written by this very run."""
    saved = _read_run(folder)
    hint = ("Run the command that made it to resume, use another output folder, or pass --restart (Python: "
            f"resume=False) to start over (the old run is moved to {PREVIOUS_DIR}/).")
    if saved is None:
        raise ValueError(f"{folder} has no {RUN_FILE}, so it cannot be told apart from another run's. {hint}")
    saved = {k: v for k, v in saved.items() if k != "steps"}
    differences = fingerprint_differences(saved, current)
    if differences:
        raise ValueError(f"{folder} belongs to another run ({'; '.join(differences[:4])}). {hint}")


def _move_previous_run(output_dir: str) -> None:
    """Start over: move the checkpoints and final model of the run there into OUTPUT_DIR/previous (one kept)."""
    entries = [e for e in os.listdir(output_dir) if e == FINAL_DIR or re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-\d+", e)]
    if not entries:
        return
    previous = os.path.join(output_dir, PREVIOUS_DIR)
    if os.path.exists(previous):
        shutil.rmtree(previous)
    os.makedirs(previous)
    for entry in entries:
        os.replace(os.path.join(output_dir, entry), os.path.join(previous, entry))
    logger.warning(f"Starting over: moved {', '.join(sorted(entries))} of the earlier run to {previous}")


def _finished_steps(checkpoint: str | None) -> int | None:
    """The step count of `checkpoint` if it is the last step of its run (None otherwise, or without one)."""
    state = _read_json(os.path.join(checkpoint, "trainer_state.json")) if checkpoint else None
    if state is None:
        return None
    steps, planned = state.get("global_step", 0), state.get("max_steps", 0)
    return steps if planned and steps >= planned else None


def train(recipe: TrainingRecipe, callbacks=None) -> str:
    """Fine-tune as the recipe says; returns the folder of the trained model (loadable by from_pretrained).

    A run whose output folder holds its own checkpoints resumes from the newest; another run's are refused
    (``resume=False`` moves them aside and starts over); a run that already finished returns its final model."""
    recipe.check()
    final = os.path.join(recipe.output_dir, FINAL_DIR)
    current = recipe.fingerprint()
    if recipe.resume and os.path.isdir(final):
        _check_same_run(final, current)
        logger.warning(f"{final} already holds this run's trained model: nothing to do.")
        return final
    if not recipe.resume and os.path.isdir(recipe.output_dir) and (os.environ.get("RANK", "0") == "0"):
        _move_previous_run(recipe.output_dir)
    last = get_last_checkpoint(recipe.output_dir) if recipe.resume and os.path.isdir(recipe.output_dir) else None
    if last:
        _check_same_run(last, current)
    trainer = build_trainer(recipe, callbacks)
    done = _finished_steps(last)
    if done is not None:  # stopped after its last checkpoint, before final/: only the final save is left
        logger.warning(f"{last} is the end of this run ({done} steps): writing {final} from it without training.")
        trainer._load_from_checkpoint(last)
        trainer.state.global_step = done
        return save_final(trainer, recipe.output_dir)
    if last:
        logger.warning(f"Resuming from {last}")
    started = time.monotonic()
    trainer.train(resume_from_checkpoint=last)
    logger.info(f"Trained {trainer.state.global_step} steps in {time.monotonic() - started:.0f} s")
    return save_final(trainer, recipe.output_dir)


__all__ = [
    "NonFiniteError",
    "load_teacher",
    "TrainingRecipe",
    "build_trainer",
    "fingerprint_differences",
    "load_model",
    "save_final",
    "train",
]
