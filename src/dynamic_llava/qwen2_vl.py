"""Dynamic-LLaVA on stock transformers Qwen2-VL / Qwen2.5-VL / Qwen3-VL: the same sparse loop over their
decoders.

Qwen2-VL encodes each image at its own resolution, so images differ in their number of tokens
(``t * h * w / merge_size^2`` from ``image_grid_thw``): each keeps ``floor(rate * its own tokens)``
(`decoder.ImageLayout`). Its multimodal RoPE gives every token three positions (time, height, width);
the rotary cos/sin the decoder computes from them are gathered by kept index like any other per-token
tensor, and decode positions come from ``rope_deltas`` exactly as in the stock model.

`DynamicQwen2VLForConditionalGeneration` and `DynamicQwen2_5_VLForConditionalGeneration` load the stock
checkpoints (fresh predictors) or their own, and are used like the stock classes (``forward``,
``generate``), and train with the same masked path and loss (``forward`` with ``labels``). Not yet:
videos, sliding-window layers, and `dynamic-llava train`'s data pipeline for their processors.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from huggingface_hub.dataclasses import strict
from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLModel,
    Qwen2_5_VLPreTrainedModel,
    Qwen2_5_VLTextModel,
)
from transformers.models.qwen3_vl.modeling_qwen3_vl import (
    Qwen3VLForConditionalGeneration,
    Qwen3VLModel,
    Qwen3VLPreTrainedModel,
    Qwen3VLTextModel,
    Qwen3VLVisionModel,
)
from transformers.models.qwen2_vl.modeling_qwen2_vl import (
    Qwen2VisionTransformerPretrainedModel,
    Qwen2VLForConditionalGeneration,
    Qwen2VLModel,
    Qwen2VLPreTrainedModel,
    Qwen2VLTextModel,
)

from .config import SparsitySettings
from .decoder import SparseDecoder
from .modeling import PromptImageMask, SparseFamilyModel, training_output
from .policies import TokenPolicy
from .stats import ForwardRecord, SparsityStats

# arguments of the sparse loop that travel through the stock model's **kwargs to its language model
SPARSE_KWARGS = ("image_token_mask", "tokens_per_image", "output_text_start", "sparsity_policy", "sparsity_record",
                 "sparsity_control",
                 "masked_training", "answer_mask", "gumbel_tau", "keep_override", "mask_gradient_scale")


@strict
class DynamicQwen2VLConfig(SparsitySettings, Qwen2VLConfig):
    """Qwen2-VL configuration with the Dynamic-LLaVA sparsity settings (`SparsitySettings`)."""

    model_type = "dynamic_qwen2_vl"
    base_model_types: ClassVar[tuple[str, ...]] = (Qwen2VLConfig.model_type,)
    family: ClassVar[str] = "Qwen2-VL"


@strict
class DynamicQwen2_5_VLConfig(SparsitySettings, Qwen2_5_VLConfig):
    """Qwen2.5-VL configuration with the Dynamic-LLaVA sparsity settings (`SparsitySettings`)."""

    model_type = "dynamic_qwen2_5_vl"
    base_model_types: ClassVar[tuple[str, ...]] = (Qwen2_5_VLConfig.model_type,)
    family: ClassVar[str] = "Qwen2.5-VL"


@strict
class DynamicQwen3VLConfig(SparsitySettings, Qwen3VLConfig):
    """Qwen3-VL configuration with the Dynamic-LLaVA sparsity settings (`SparsitySettings`)."""

    model_type = "dynamic_qwen3_vl"
    base_model_types: ClassVar[tuple[str, ...]] = (Qwen3VLConfig.model_type,)
    family: ClassVar[str] = "Qwen3-VL"


class _QwenText(SparseDecoder):
    """A Qwen-VL text model with the sparse loop. Its positions: three rows (time, height, width) for RoPE, one
    row for everything else."""

    def _positions(self, position_ids, attention_mask, past, batch, seq, device):
        sequence = None
        if position_ids is None:
            rope = torch.arange(past, past + seq, device=device).view(1, 1, -1).expand(3, batch, -1)
        elif position_ids.ndim == 2:
            rope = position_ids[None].expand(3, batch, -1)
        elif position_ids.shape[0] == 4:  # generate()'s prefill: text positions first, then the three rows
            sequence, rope = position_ids[0].expand(batch, -1), position_ids[1:]
        else:
            rope = position_ids.expand(-1, batch, -1)
        if sequence is None:
            if attention_mask is not None:
                sequence = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]
            else:
                sequence = torch.arange(past, past + seq, device=device).expand(batch, -1)
        return rope, sequence

    def _mask_positions(self, positions):
        return None  # the layers read position ids only for packed sequences (flash attention)


class DynamicQwen2VLTextModel(_QwenText, Qwen2VLTextModel):
    """A `Qwen2VLTextModel` (same weights, same names) whose layers >= K see only the tokens a policy keeps."""


class DynamicQwen2_5_VLTextModel(_QwenText, Qwen2_5_VLTextModel):
    """A `Qwen2_5_VLTextModel` (same weights, same names) whose layers >= K see only the tokens a policy keeps."""


class DynamicQwen3VLTextModel(_QwenText, Qwen3VLTextModel):
    """A `Qwen3VLTextModel` (q/k norms, interleaved multimodal RoPE; same weights, same names) whose layers >= K
    see only the tokens a policy keeps; DeepStack features reach the kept image tokens (`decoder.DeepStack`)."""


class _SparseQwenModel(PromptImageMask):
    """The stock Qwen-VL base model around a sparse language model (`_text_class`): the loop's arguments reach it,
    not the vision tower; image features go to the prompt's image tokens only."""

    placeholder_pair = True
    _pretrained_class: ClassVar[type]
    _visual_class: ClassVar[type]
    _text_class: ClassVar[type]

    def __init__(self, config):
        self._pretrained_class.__init__(self, config)
        self.visual = self._visual_class._from_config(config.vision_config)
        self.language_model = self._text_class(config.text_config, config)
        self.rope_deltas = None
        self._image_token_mask = None
        self.post_init()

    def get_image_features(self, pixel_values, image_grid_thw=None, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in SPARSE_KWARGS}
        return super().get_image_features(pixel_values, image_grid_thw, **kwargs)


class DynamicQwen2VLModel(_SparseQwenModel, Qwen2VLModel):
    config_class = DynamicQwen2VLConfig
    _pretrained_class, _visual_class = Qwen2VLPreTrainedModel, Qwen2VisionTransformerPretrainedModel
    _text_class = DynamicQwen2VLTextModel


class DynamicQwen2_5_VLModel(_SparseQwenModel, Qwen2_5_VLModel):
    config_class = DynamicQwen2_5_VLConfig
    _pretrained_class, _visual_class = Qwen2_5_VLPreTrainedModel, Qwen2_5_VisionTransformerPretrainedModel
    _text_class = DynamicQwen2_5_VLTextModel


class DynamicQwen3VLModel(_SparseQwenModel, Qwen3VLModel):
    config_class = DynamicQwen3VLConfig
    _pretrained_class, _visual_class = Qwen3VLPreTrainedModel, Qwen3VLVisionModel
    _text_class = DynamicQwen3VLTextModel


class _SparseQwenForConditionalGeneration(SparseFamilyModel):
    """The user-facing Qwen-VL classes: the stock ones, sparsified (see the module docstring)."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                labels=None, pixel_values=None, pixel_values_videos=None, image_grid_thw=None, video_grid_thw=None,
                mm_token_type_ids=None, logits_to_keep=0, output_text_start: int | None = None,
                sparsity_policy: TokenPolicy | None = None, sparsity_stats: SparsityStats | None = None,
                sparsity_control=None,
                use_cache=None, mm_encoder_outputs=None, answer_mask=None, gumbel_tau: float = 1.0,
                keep_override=None, mask_gradient_scale: float = 1.0, num_items_in_batch=None, **kwargs):
        """The stock forward, sparsified; returns a `DynamicLlavaOutput` (logits of the tokens that reached the
        last layer: `kept_index` maps them to input positions). With `labels` it is the sparsification-aware
        training path, as for LLaVA (`DynamicLlavaForConditionalGeneration.forward`)."""
        if pixel_values_videos is not None or video_grid_thw is not None:
            raise NotImplementedError(f"Videos are not supported by Dynamic-LLaVA's {self.config.family} yet.")
        past_key_values, past = self._check_call(past_key_values, sparsity_policy, sparsity_stats)
        if sparsity_control is not None:
            kwargs["sparsity_control"] = sparsity_control
        self._take_requests(kwargs, input_ids, attention_mask, sparsity_policy)  # sparsity_requests -> control
        image_token_mask, counts = self._image_tokens(input_ids, pixel_values, image_grid_thw, mm_encoder_outputs,
                                                      past, output_text_start)
        record = ForwardRecord()
        if labels is not None:
            if input_ids is not None and labels.shape != input_ids.shape:
                raise ValueError(f"labels have shape {list(labels.shape)} but input_ids {list(input_ids.shape)}: one "
                                 "label per input token (-100 where no loss is taken).")
            outputs = self.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, pixel_values=pixel_values,
                image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids, image_token_mask=image_token_mask,
                tokens_per_image=counts, masked_training=True, answer_mask=answer_mask, gumbel_tau=gumbel_tau,
                keep_override=keep_override, mask_gradient_scale=mask_gradient_scale, sparsity_record=record,
                use_cache=False, **kwargs,
            )
            return training_output(self, outputs.last_hidden_state, record, labels, num_items_in_batch)
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            pixel_values=pixel_values, image_grid_thw=image_grid_thw, mm_token_type_ids=mm_token_type_ids,
            mm_encoder_outputs=mm_encoder_outputs, image_token_mask=image_token_mask, tokens_per_image=counts,
            output_text_start=output_text_start, sparsity_policy=sparsity_policy, sparsity_record=record, **kwargs,
        )
        return self._output(outputs, record, logits_to_keep, sparsity_stats)

    def _image_tokens(self, input_ids, pixel_values, image_grid_thw, mm_encoder_outputs, past, output_text_start):
        """The prompt's image-token mask and the tokens of each image (checked against each other)."""
        encoded = (mm_encoder_outputs or {}).get("image")
        if input_ids is None or (pixel_values is None and encoded is None):
            return None, None
        if encoded is not None:  # generate() encodes the images first: one feature row per image token
            counts = [len(features) for features in encoded.pooler_output]
        elif image_grid_thw is None:
            raise ValueError("Images need their image_grid_thw (the processor returns it with pixel_values).")
        else:
            merge = self.config.vision_config.spatial_merge_size
            counts = (image_grid_thw.prod(dim=-1) // merge**2).tolist()
        return self._prompt_image_mask(input_ids, counts, past, output_text_start), counts


class DynamicQwen2VLForConditionalGeneration(_SparseQwenForConditionalGeneration, Qwen2VLForConditionalGeneration):
    config_class = DynamicQwen2VLConfig
    _base_model_class = DynamicQwen2VLModel
    _pretrained_class = Qwen2VLPreTrainedModel


class DynamicQwen2_5_VLForConditionalGeneration(_SparseQwenForConditionalGeneration,
                                                Qwen2_5_VLForConditionalGeneration):
    config_class = DynamicQwen2_5_VLConfig
    _base_model_class = DynamicQwen2_5_VLModel
    _pretrained_class = Qwen2_5_VLPreTrainedModel


class DynamicQwen3VLForConditionalGeneration(_SparseQwenForConditionalGeneration, Qwen3VLForConditionalGeneration):
    config_class = DynamicQwen3VLConfig
    _base_model_class = DynamicQwen3VLModel
    _pretrained_class = Qwen3VLPreTrainedModel


def _register_with_transformers() -> None:
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    for config, ours, stock in (
        (DynamicQwen2VLConfig, (DynamicQwen2VLForConditionalGeneration, DynamicQwen2VLModel),
         (Qwen2VLForConditionalGeneration, Qwen2VLModel)),
        (DynamicQwen2_5_VLConfig, (DynamicQwen2_5_VLForConditionalGeneration, DynamicQwen2_5_VLModel),
         (Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLModel)),
        (DynamicQwen3VLConfig, (DynamicQwen3VLForConditionalGeneration, DynamicQwen3VLModel),
         (Qwen3VLForConditionalGeneration, Qwen3VLModel)),
    ):
        AutoConfig.register(config.model_type, config, exist_ok=True)
        AutoModelForImageTextToText.register(config, ours[0], exist_ok=True)
        for mine, theirs in zip(ours, stock):  # stock checkpoints' (legacy) tensor names, renamed by class
            mapping = get_checkpoint_conversion_mapping(theirs.__name__)
            if mapping is not None:
                register_checkpoint_conversion_mapping(mine.__name__, mapping, overwrite=True)


_register_with_transformers()

__all__ = [
    "DynamicQwen2VLConfig", "DynamicQwen2VLForConditionalGeneration", "DynamicQwen2VLModel", "DynamicQwen2VLTextModel",
    "DynamicQwen2_5_VLConfig", "DynamicQwen2_5_VLForConditionalGeneration", "DynamicQwen2_5_VLModel",
    "DynamicQwen2_5_VLTextModel", "DynamicQwen3VLConfig", "DynamicQwen3VLForConditionalGeneration",
    "DynamicQwen3VLModel", "DynamicQwen3VLTextModel",
]
