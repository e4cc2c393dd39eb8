"""A tiny trainable world on disk: a Dynamic-LLaVA checkpoint with its processor, and LLaVA-format data."""

import os
import subprocess
import sys
from pathlib import Path

import torch

from dynamic_llava.training import TrainingRecipe
from tiny import tiny_dynamic
from tiny_processor import tiny_processor, write_llava_dataset


def write_world(root: Path, seed: int = 0) -> tuple[Path, Path, Path]:
    """Returns (model folder, data.json, image folder)."""
    model_dir = root / "model"
    tiny_dynamic(seed=seed).save_pretrained(model_dir)
    tiny_processor().save_pretrained(model_dir)
    data, images = write_llava_dataset(root, bad=False)
    return model_dir, data, images


def recipe_for(root: Path, output: str = "run", **overrides) -> TrainingRecipe:
    model_dir, data, images = root / "model", root / "data.json", root / "images"
    settings = dict(
        model=str(model_dir), data=str(data), images=str(images), output_dir=str(root / output),
        batch_size=2, max_steps=4, save_steps=100, logging_steps=1, seed=0,
        sparsity={"min_answer_tokens": 10},
    )
    settings.update(overrides)
    return TrainingRecipe(**settings)


def flat_parameters(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_two_processes(worker: str, *args, port: int, timeout: int) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=2 tests/<worker> args...` on CPU (gloo), with this test folder importable."""
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here), *sys.path])}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
         str(here / worker), *map(str, args)],
        env=env, capture_output=True, text=True, timeout=timeout,
    )

