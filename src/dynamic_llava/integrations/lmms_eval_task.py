"""The functions of the world's lmms-eval task (`world.export.export_lmms_eval_task` writes its YAML)."""

from __future__ import annotations

from PIL import Image

from ..evaluation.metrics import exact_match


def doc_to_visual(doc: dict) -> list:
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs=None) -> str:
    return doc["question"]  # the world's wording, the image where it was trained to be ("question\n<image>")


def process_results(doc: dict, results: list[str]) -> dict:
    return {"exact_match": float(exact_match(results[0], doc["answer"]))}


__all__ = ["doc_to_text", "doc_to_visual", "process_results"]
