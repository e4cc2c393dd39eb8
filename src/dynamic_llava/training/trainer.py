"""`DynamicLlavaTrainer`: the HF Trainer with the Dynamic-LLaVA loss, two learning rates and atomic checkpoints."""

from __future__ import annotations

import os
import shutil

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

STAGING_DIR = ".staging"


def gumbel_temperature(step: int, max_steps: int, start: float = 1.0, end_factor: float = 0.1) -> float:
    """tau = start * end_factor ** (step / max_steps): 1.0 -> 0.1 over the run, updated every optimizer step."""
    return start * end_factor ** (step / max(max_steps, 1))


def is_predictor_parameter(name: str) -> bool:
    return "image_predictor." in name or "text_predictor." in name


class DynamicLlavaTrainer(Trainer):
    """Trains a `DynamicLlavaForConditionalGeneration` (or a PEFT wrapper of one).

    * loss = LM cross-entropy (normalised over the tokens of the whole accumulated batch) +
      budget_weight * (R_I + R_OT), the budget term averaged over the accumulation steps, so the
      number of accumulation steps changes neither term's weight;
    * the Gumbel-Softmax temperature follows `gumbel_temperature` of the optimizer step (so a
      resumed run continues it exactly);
    * predictors get `predictor_learning_rate`, everything else trainable `args.learning_rate`;
    * checkpoints are written to a staging folder and renamed into place: a run killed while
      saving leaves the previous checkpoint as the latest.
    """

    def __init__(self, *args, predictor_learning_rate: float = 2e-4, **kwargs):
        super().__init__(*args, **kwargs)
        self.predictor_learning_rate = predictor_learning_rate
        self.loss_is_scaled_for_ga = True
        self._metric_sums: dict[str, tuple[float, int]] = {}  # name -> (sum, count) since the last log
        self._staging = False

    # ---------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        tau = gumbel_temperature(self.state.global_step, self.state.max_steps)
        outputs = model(**inputs, gumbel_tau=tau, num_items_in_batch=num_items_in_batch)
        lm_loss = outputs.lm_loss
        if num_items_in_batch is None:
            lm_loss = lm_loss / self.current_gradient_accumulation_steps
        elif self.args.average_tokens_across_devices:
            lm_loss = lm_loss * self.accelerator.num_processes  # DDP averages; the count spans all ranks
        weight = self.accelerator.unwrap_model(model).config.budget_weight
        loss = lm_loss + weight * outputs.budget_loss / self.current_gradient_accumulation_steps
        if model.training:
            self._track(outputs, tau)
        return (loss, outputs) if return_outputs else loss

    def _track(self, outputs, tau: float) -> None:
        values = {"lm_loss": outputs.lm_loss, "budget_loss": outputs.budget_loss, "tau": tau}
        for name, ratio in (("image_keep", outputs.image_keep_ratio), ("text_keep", outputs.text_keep_ratio)):
            if ratio is not None and not bool(ratio.isnan().all()):
                values[name] = ratio.nanmean()  # over the samples that have such tokens
        for name, value in values.items():
            total, count = self._metric_sums.get(name, (0.0, 0))
            value = float(value.detach()) if torch.is_tensor(value) else float(value)
            self._metric_sums[name] = (total + value, count + 1)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Add the mean LM loss, budget loss, keep ratios and temperature since the last log."""
        if self._metric_sums and "loss" in logs:
            logs.update({k: round(total / count, 4) for k, (total, count) in self._metric_sums.items()})
            self._metric_sums = {}
        super().log(logs, *args, **kwargs)

    # ---------------------------------------------------------------- optimizer
    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            groups = [
                {"params": [p for n, p in named if is_predictor_parameter(n)], "lr": self.predictor_learning_rate,
                 "weight_decay": 0.0},
                {"params": [p for n, p in named if not is_predictor_parameter(n)], "lr": self.args.learning_rate,
                 "weight_decay": self.args.weight_decay},
            ]
            groups = [g for g in groups if g["params"]]
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            optimizer_kwargs.pop("lr", None)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    # ---------------------------------------------------------------- checkpoints
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        """Load model weights through `from_pretrained`, which knows the llava-hf weight names
        (the Trainer's raw `load_state_dict` does not); PEFT adapters and sharded set-ups go the usual way."""
        from ..modeling import DynamicLlavaForConditionalGeneration

        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
        if not isinstance(target, DynamicLlavaForConditionalGeneration) or sharded:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        saved = DynamicLlavaForConditionalGeneration.from_pretrained(
            resume_from_checkpoint, config=target.config, dtype=target.dtype
        )
        target.load_state_dict(saved.state_dict())

    def _get_output_dir(self, trial):
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING_DIR) if self._staging else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged, final = os.path.join(run_dir, STAGING_DIR, name), os.path.join(run_dir, name)
        if self.args.should_save and os.path.exists(staged):
            shutil.rmtree(staged)  # left over from a run killed while saving
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(staged, final)
            if self.state.best_model_checkpoint == staged:
                self.state.best_model_checkpoint = final
            rotate_checkpoints(
                output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True,
            )
        self.accelerator.wait_for_everyone()


__all__ = ["DynamicLlavaTrainer", "gumbel_temperature", "is_predictor_parameter"]
