"""Run by test_training under torchrun: train a few steps, then save this rank's parameters."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dynamic_llava.training import build_trainer
from training_setup import flat_parameters, recipe_for

world, out = Path(sys.argv[1]), Path(sys.argv[2])
trainer = build_trainer(recipe_for(world, str(out / "run"), trainable="full", max_steps=3, learning_rate=1e-3))
trainer.train()
torch.save(flat_parameters(trainer.accelerator.unwrap_model(trainer.model)), out / f"rank{dist.get_rank()}.pt")
