"""Tensor names of the source layouts, and where each lands in a Dynamic-LLaVA checkpoint.

Source layouts:
* ``"authors"``: the authors' Dynamic-LLaVA (`DynamicLlavaLlamaForCausalLM`): original LLaVA names plus
  ``model.image_score_predictor.*`` and ``model.output_text_score_predictor.*``;
* ``"llava"``: the original LLaVA-1.5 (`LlavaLlamaForCausalLM`), ``model.layers.*``, ``model.mm_projector.*``;
* ``"llava-hf"``: llava-hf checkpoints, in the 4.x names (``language_model.model.*``) or the 5.x ones.

A CLIP vision tower folder (``openai/clip-vit-large-patch14-336``) is read with `clip_target`.
Every function returns the target name, `SKIP` with a reason for tensors that are not weights of a LLaVA
model, or raises `UnmappableTensor`, so that no tensor is ever dropped without being named.
"""

from __future__ import annotations

import re

LM = "model.language_model."
TOWER = "model.vision_tower."
PROJECTOR = "model.multi_modal_projector."
IMAGE_PREDICTOR = LM + "image_predictor."
TEXT_PREDICTOR = LM + "text_predictor."
SKIP = None


class UnmappableTensor(ValueError):
    """A source tensor with no place in a Dynamic-LLaVA model (it would otherwise be lost)."""


# the authors' VisionPredictor / TextPredictor (dynamic_modeling_llama.py) -> ours (predictors.py)
_IMAGE_PREDICTOR_NAMES = [
    (r"down_mlp\.0\.(weight|bias)", r"norm.\1"),
    (r"down_mlp\.1\.(weight|bias)", r"proj.0.\1"),
    (r"transformer\.(\d+)\.norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"transformer\.(\d+)\.attn\.qkv\.weight", r"blocks.\1.self_attn.in_proj_weight"),
    (r"transformer\.(\d+)\.attn\.qkv\.bias", r"blocks.\1.self_attn.in_proj_bias"),
    (r"transformer\.(\d+)\.attn\.proj\.(weight|bias)", r"blocks.\1.self_attn.out_proj.\2"),
    (r"transformer\.(\d+)\.mlp\.fc1\.(weight|bias)", r"blocks.\1.linear1.\2"),
    (r"transformer\.(\d+)\.mlp\.fc2\.(weight|bias)", r"blocks.\1.linear2.\2"),
    (r"output_mlp\.(\d+)\.(weight|bias)", r"head.\1.\2"),
]
# output_mlp: LayerNorm (0), then Linear layers at 1, 3, 5, 7 with GELU between; ours: norm + mlp.{0,2,4,6}
_TEXT_PREDICTOR_NAMES = [
    (r"output_mlp\.0\.(weight|bias)", r"norm.\1"),
    (r"output_mlp\.(\d+)\.(weight|bias)", lambda m: f"mlp.{int(m[1]) - 1}.{m[2]}" if int(m[1]) % 2 else None),
]
_OLD_BUFFERS = re.compile(r".*(rotary_emb\.inv_freq|embeddings\.position_ids)$")


def _apply(table, name: str) -> str | None:
    for pattern, replacement in table:
        match = re.fullmatch(pattern, name)
        if match:
            return replacement(match) if callable(replacement) else match.expand(replacement)
    return None


def original_target(name: str) -> tuple[str | None, str]:
    """(target or SKIP, reason) for a tensor of the original LLaVA / authors' Dynamic-LLaVA layout."""
    if _OLD_BUFFERS.match(name):
        return SKIP, "rotary / position-id buffers (recomputed, not weights)"
    if name == "lm_head.weight":
        return "lm_head.weight", ""
    if name.startswith("model.vision_tower.vision_tower.vision_model."):
        return TOWER + name.removeprefix("model.vision_tower.vision_tower.vision_model."), ""
    if name.startswith("model.mm_projector."):
        rest = name.removeprefix("model.mm_projector.")
        match = re.fullmatch(r"([02])\.(weight|bias)", rest)
        if match:
            return f"{PROJECTOR}linear_{1 if match[1] == '0' else 2}.{match[2]}", ""
        raise UnmappableTensor(
            f"{name}: llava-hf's projector is two linear layers with GELU between (mlp2x_gelu: "
            "mm_projector.0 and .2); this one has more."
        )
    if name.startswith("model.image_score_predictor."):
        target = _apply(_IMAGE_PREDICTOR_NAMES, name.removeprefix("model.image_score_predictor."))
        if target is None:
            raise UnmappableTensor(f"{name}: not a tensor of the authors' VisionPredictor as published.")
        return IMAGE_PREDICTOR + target, ""
    if name.startswith("model.output_text_score_predictor."):
        target = _apply(_TEXT_PREDICTOR_NAMES, name.removeprefix("model.output_text_score_predictor."))
        if target is None:
            raise UnmappableTensor(f"{name}: not a tensor of the authors' TextPredictor as published.")
        return TEXT_PREDICTOR + target, ""
    if name.startswith("model.instruct_score_predictor."):
        raise UnmappableTensor(
            f"{name}: the instruct (prompt-text) predictor is not supported; convert a checkpoint trained "
            "without it (use_instruct_predictor false)."
        )
    match = re.fullmatch(r"model\.(embed_tokens\.weight|norm\.weight|layers\.\d+\..+)", name)
    if match:
        return LM + match[1], ""
    raise UnmappableTensor(f"{name}: not a tensor of a LLaVA-1.5 / Dynamic-LLaVA Llama model.")


def llava_hf_target(name: str) -> tuple[str | None, str]:
    """(target or SKIP, reason) for a tensor of a llava-hf checkpoint (4.x or 5.x names)."""
    if _OLD_BUFFERS.match(name):
        return SKIP, "rotary / position-id buffers (recomputed, not weights)"
    for old, new in (
        ("language_model.model.", LM),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.vision_model.", TOWER),
        ("vision_tower.", TOWER),
        ("multi_modal_projector.", PROJECTOR),
        ("model.vision_tower.vision_model.", TOWER),
    ):
        if name.startswith(old):
            return new + name.removeprefix(old), ""
    if name.startswith(("model.language_model.", TOWER, PROJECTOR)) or name == "lm_head.weight":
        return name, ""
    raise UnmappableTensor(f"{name}: not a tensor of a llava-hf LLaVA model.")


def clip_target(name: str) -> tuple[str | None, str]:
    """(target or SKIP, reason) for a tensor of a CLIP folder (a full `CLIPModel` or a `CLIPVisionModel`)."""
    if _OLD_BUFFERS.match(name):
        return SKIP, "rotary / position-id buffers (recomputed, not weights)"
    if name.startswith("vision_model."):
        return TOWER + name.removeprefix("vision_model."), ""
    if name.startswith(("text_model.", "text_projection.", "visual_projection.")) or name == "logit_scale":
        return SKIP, "CLIP's text tower and projection heads (LLaVA uses the vision encoder only)"
    raise UnmappableTensor(f"{name}: not a tensor of a CLIP model.")


__all__ = ["SKIP", "UnmappableTensor", "clip_target", "llava_hf_target", "original_target"]
