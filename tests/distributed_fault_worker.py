"""Run by test_faults under torchrun: the loss turns NaN on rank 1 only; every rank must stop, none may wait."""

import sys
from pathlib import Path

import torch.distributed as dist
from transformers import TrainerCallback

from dynamic_llava.training import NonFiniteError, build_trainer
from training_setup import recipe_for


class NanOnRankOne(TrainerCallback):
    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1 and dist.get_rank() == 1:
            model.lm_head.register_forward_hook(lambda module, inputs, output: output * float("nan"))


world, out = Path(sys.argv[1]), Path(sys.argv[2])
trainer = build_trainer(recipe_for(world, str(out / "run"), trainable="predictors", max_steps=4),
                        callbacks=[NanOnRankOne()])
try:
    trainer.train()
except NonFiniteError as error:
    (out / f"rank{dist.get_rank()}.txt").write_text(str(error))
