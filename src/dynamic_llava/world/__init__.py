"""The synthetic visual world: scenes and conversations (`scenes`), its tokenizer and processor (`assets`),
the tiny LLaVA config (`models`), vision-tower pre-training (`vision`), the build (`build`) and demo (`demo`)."""

from .scenes import QUESTION_TYPES, Scene, SceneObject, describe, render, sample_scene, write_split

__all__ = ["QUESTION_TYPES", "Scene", "SceneObject", "WorldRecipe", "build_world", "describe", "render", "sample_scene",
           "write_split"]


def __getattr__(name: str):
    """`WorldRecipe` and `build_world` on first use: the build pulls in training, which the scenes do not need."""
    if name in ("WorldRecipe", "build_world"):
        from . import build

        return getattr(build, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
