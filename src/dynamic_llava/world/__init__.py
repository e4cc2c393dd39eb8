"""The synthetic visual world: scenes and conversations (`scenes`), its tokenizer and processor (`assets`),
the tiny LLaVA config (`models`), vision-tower pre-training (`vision`), the build (`build`) and demo (`demo`)."""

from .scenes import QUESTION_TYPES, Scene, SceneObject, describe, render, sample_scene, write_split

__all__ = ["QUESTION_TYPES", "Scene", "SceneObject", "describe", "render", "sample_scene", "write_split"]
