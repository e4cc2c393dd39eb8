"""`DynamicLlavaTrainer`: the HF Trainer with the Dynamic-LLaVA loss, two learning rates and atomic checkpoints."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil

import torch
from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from ..losses import distillation_loss, hidden_distillation_loss, per_answer_loss

STAGING_DIR = ".staging"
RUN_FILE = "run.json"  # the run's fingerprint, written into every checkpoint and the final model


class NonFiniteError(RuntimeError):
    """Training produced a NaN / infinite loss, gradient or weight: the run stops and nothing ruined is saved."""


def non_finite_tensors(model) -> list[str]:
    """Names of the model's parameters and buffers that hold a NaN or an infinity."""
    return [
        name for name, tensor in (*model.named_parameters(), *model.named_buffers())
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def free_space(path: str) -> str:
    """Free space on the disk holding ``path`` (or its nearest existing parent), e.g. '1.2 GiB'."""
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return f"{shutil.disk_usage(path).free / 2**30:.2f} GiB"
    except OSError:
        return "unknown"


def is_write_failure(error: BaseException) -> bool:
    """An OSError, or the RuntimeError torch's zip writer raises when a write comes up short (full disk)."""
    signs = ("unexpected pos", "PytorchStreamWriter", "write")
    return isinstance(error, OSError) or (isinstance(error, RuntimeError) and any(s in str(error) for s in signs))


def save_failure(path: str, error: BaseException) -> OSError:
    """The error for a save of ``path`` that failed: names the path, the cause and the free space left."""
    return OSError(
        f"Saving {path} failed: {error} ({free_space(path)} free on that disk). The previous checkpoint is intact; "
        "free some space (or choose another output folder) and run the same command again to resume."
    )


@contextlib.contextmanager
def captured_inputs(*modules):
    """Yield a list that each module's forward fills with its first input (the final hidden states, for LM heads)."""
    seen = [None] * len(modules)
    handles = [m.register_forward_hook(lambda _, args, __, i=i: seen.__setitem__(i, args[0]))
               for i, m in enumerate(modules)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def gumbel_temperature(step: int, max_steps: int, start: float = 1.0, end_factor: float = 0.1) -> float:
    """tau = start * end_factor ** (step / max_steps): 1.0 -> 0.1 over the run, updated every optimizer step."""
    return start * end_factor ** (step / max(max_steps, 1))


def is_predictor_parameter(name: str) -> bool:
    return "image_predictor." in name or "text_predictor." in name


class DynamicLlavaTrainer(Trainer):
    """Trains a Dynamic model of any family (`DynamicLlavaForConditionalGeneration`, ...; or a PEFT wrapper of one).

    * loss = LM cross-entropy (normalised over the tokens of the whole accumulated batch, or with
      `loss_average="answer"` each answer's mean averaged over the answers: short answers then weigh as
      much as long ones) + budget_weight * (R_I + R_OT), the budget term averaged over the accumulation
      steps, so the number of accumulation steps changes neither term's weight; with a `teacher`, plus
      `distill_weight` * KL(teacher || student) on the answer tokens (`losses.distillation_loss`) and
      `hidden_distill_weight` * the relative squared error of the last hidden states on the text tokens
      (`losses.hidden_distillation_loss`);
    * the Gumbel-Softmax temperature follows `gumbel_temperature` of the optimizer step (so a
      resumed run continues it exactly);
    * predictors get `predictor_learning_rate`, everything else trainable `args.learning_rate`;
    * with `image_keep_rate_range=(low, high)`, each optimizer step trains at an image keep rate drawn
      uniformly from it (the same on every process and on a resumed run), so one model learns the rates
      inference will be asked for; the config's own rate is restored after each step, and so saved;
    * checkpoints are written to a staging folder and renamed into place: a run killed while
      saving leaves the previous checkpoint as the latest.
    """

    def __init__(self, *args, predictor_learning_rate: float = 2e-4, run_fingerprint: dict | None = None,
                 loss_average: str = "token", teacher=None, distill_weight: float = 0.0,
                 hidden_distill_weight: float = 0.0, image_keep_rate_range: tuple[float, float] | None = None,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.image_keep_rate_range = image_keep_rate_range
        self.teacher = teacher
        self.distill_weight = distill_weight
        self.hidden_distill_weight = hidden_distill_weight
        if teacher is not None:
            teacher.to(self.args.device)
        self.predictor_learning_rate = predictor_learning_rate
        self.loss_average = loss_average
        self.run_fingerprint = run_fingerprint  # written into each checkpoint as run.json
        self.loss_is_scaled_for_ga = True
        self._metric_sums: dict[str, tuple[float, int]] = {}  # name -> (sum, count) since the last log
        self._staging = False

    # ---------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        tau = gumbel_temperature(self.state.global_step, self.state.max_steps)
        taught = self.teacher is not None and model.training
        heads = ()
        if taught and self.hidden_distill_weight > 0:  # read the hidden states the LM heads get
            heads = (self.accelerator.unwrap_model(model).get_output_embeddings(), self.teacher.get_output_embeddings())
        with captured_inputs(*heads) as hidden:
            outputs = model(**inputs, gumbel_tau=tau, num_items_in_batch=num_items_in_batch,
                            mask_gradient_scale=1.0 / self.current_gradient_accumulation_steps)
            if taught:
                with torch.no_grad():
                    teacher_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "answer_mask")}
                    teacher_logits = self.teacher(**teacher_inputs, use_cache=False).logits
        lm_loss = outputs.lm_loss
        if self.loss_average == "answer":
            lm_loss = per_answer_loss(outputs.logits, inputs["labels"]) / self.current_gradient_accumulation_steps
        elif num_items_in_batch is None:
            lm_loss = lm_loss / self.current_gradient_accumulation_steps
        elif self.args.average_tokens_across_devices:
            lm_loss = lm_loss * self.accelerator.num_processes  # DDP averages; the count spans all ranks
        weight = self.accelerator.unwrap_model(model).config.budget_weight
        loss = lm_loss + weight * outputs.budget_loss / self.current_gradient_accumulation_steps
        distill = {}
        if taught and self.distill_weight > 0:
            distill["distill_loss"] = distillation_loss(outputs.logits, teacher_logits, inputs["labels"])
            loss = loss + self.distill_weight * distill["distill_loss"] / self.current_gradient_accumulation_steps
        if heads:
            image_id = self.accelerator.unwrap_model(model).config.image_token_id
            text = inputs["input_ids"] != image_id
            if inputs.get("attention_mask") is not None:
                text = text & inputs["attention_mask"].bool()
            distill["hidden_distill_loss"] = hidden_distillation_loss(hidden[0], hidden[1], text)
            loss = loss + (self.hidden_distill_weight * distill["hidden_distill_loss"]
                           / self.current_gradient_accumulation_steps)
        if model.training:
            finite = bool(torch.isfinite(loss.detach()))
            if self._on_any_rank(not finite):
                self._stop("the loss is NaN or infinite on another process" if finite else
                           f"the loss is {float(loss.detach())} (lm_loss={float(outputs.lm_loss.detach())}, "
                           f"budget_loss={float(outputs.budget_loss.detach())})")
            self._track(outputs, tau, distill)
        return (loss, outputs) if return_outputs else loss

    def step_image_keep_rate(self, step: int) -> float | None:
        """The image keep rate optimizer step `step` trains at under `image_keep_rate_range` (None without one)."""
        if self.image_keep_rate_range is None:
            return None
        low, high = self.image_keep_rate_range
        return random.Random(f"{self.args.seed}:{step}").uniform(low, high)

    def training_step(self, model, inputs, num_items_in_batch=None):
        """One micro-batch forward and backward (at this step's image keep rate); stops the run if a gradient is NaN
        or infinite."""
        config = self.accelerator.unwrap_model(model).config
        nominal, rate = config.image_keep_rate, self.step_image_keep_rate(self.state.global_step)
        try:
            if rate is not None:
                config.image_keep_rate = rate
            loss = super().training_step(model, inputs, num_items_in_batch)
        finally:
            config.image_keep_rate = nominal
        if not self.is_deepspeed_enabled:  # DeepSpeed keeps gradients in its own buffers
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            bad = bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
            if self._on_any_rank(bad):
                self._stop("a gradient is NaN or infinite")
        return loss

    def _on_any_rank(self, flag: bool) -> bool:
        """True on every process when ``flag`` is True on any (so all of them stop together, none waits)."""
        if self.accelerator.num_processes == 1:
            return flag
        total = self.accelerator.reduce(torch.tensor(float(flag), device=self.accelerator.device), reduction="sum")
        return bool(total > 0)

    def _stop(self, what: str, step: int | None = None) -> None:
        """Raise NonFiniteError for optimizer step ``step`` (default: the one being computed)."""
        last = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        step = self.state.global_step + 1 if step is None else step
        raise NonFiniteError(
            f"Training stopped at step {step}: {what}; {kept}. Lower the learning rates "
            "(--learning-rate, --predictor-learning-rate) or --budget-weight, or enable --max-grad-norm."
        )

    def _track(self, outputs, tau: float, distill: dict | None = None) -> None:
        values = {"lm_loss": outputs.lm_loss, "budget_loss": outputs.budget_loss, "tau": tau, **(distill or {})}
        if self.image_keep_rate_range is not None:
            values["image_keep_target"] = self.step_image_keep_rate(self.state.global_step)
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
        from ..modeling import SparseGeneration

        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
        if not isinstance(target, SparseGeneration) or sharded:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        saved = type(target).from_pretrained(
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
        ruined = non_finite_tensors(self.accelerator.unwrap_model(self.model))
        if ruined:
            self._stop(f"{len(ruined)} weight tensors hold NaN or infinite values (first: {ruined[0]}), so no "
                       "checkpoint is saved", step=self.state.global_step)
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
            if self.args.should_save and self.run_fingerprint is not None:
                with open(os.path.join(staged, RUN_FILE), "w") as f:
                    json.dump(self.run_fingerprint, f, indent=2)
        except (OSError, RuntimeError) as error:
            if not is_write_failure(error):
                raise
            if self.args.should_save:
                shutil.rmtree(staged, ignore_errors=True)  # give the space back; the previous checkpoint stays
            raise save_failure(staged, error) from error
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


__all__ = [
    "DynamicLlavaTrainer",
    "NonFiniteError",
    "RUN_FILE",
    "gumbel_temperature",
    "is_predictor_parameter",
    "non_finite_tensors",
    "save_failure",
]
