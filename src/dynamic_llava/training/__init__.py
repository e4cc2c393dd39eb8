"""Sparsification-aware fine-tuning of Dynamic-LLaVA (Huang et al., ICLR 2025, section 3)."""

from .recipe import TrainingRecipe, build_trainer, load_model, save_final, train
from .trainer import DynamicLlavaTrainer, NonFiniteError, gumbel_temperature

__all__ = [
    "DynamicLlavaTrainer",
    "NonFiniteError",
    "TrainingRecipe",
    "build_trainer",
    "gumbel_temperature",
    "load_model",
    "save_final",
    "train",
]
