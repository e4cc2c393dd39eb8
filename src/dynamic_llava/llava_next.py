"""Dynamic-LLaVA on stock transformers LLaVA-NeXT (LLaVA-1.6) and LLaVA-OneVision: anyres images through the
same sparse loop.

LLaVA-NeXT cuts each image into tiles at the resolution that fits it best (``image_grid_pinpoints``) plus a
down-scaled view, and packs their features with an ``image_newline`` after each row, so images differ in
their number of tokens: each keeps ``floor(rate * its own tokens)`` (`decoder.ImageLayout`), the newline
tokens counting as image tokens. The images are encoded first (``get_image_features``), which tells how
many tokens each one has. LLaVA-NeXT's decoder is Llama (Vicuna, Yi) or Mistral, OneVision's Qwen2.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoModel, LlavaNextConfig, LlavaOnevisionConfig
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextModel,
    LlavaNextMultiModalProjector,
    LlavaNextPreTrainedModel,
)
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionModel,
    LlavaOnevisionMultiModalProjector,
    LlavaOnevisionPreTrainedModel,
)

from .config import SparsitySettings
from .decoder import sparse_text_model
from .modeling import PromptImageMask, SparseFamilyModel, training_output
from .policies import TokenPolicy
from .stats import ForwardRecord, SparsityStats


@strict
class DynamicLlavaNextConfig(SparsitySettings, LlavaNextConfig):
    """LLaVA-NeXT configuration with the Dynamic-LLaVA sparsity settings (`SparsitySettings`)."""

    model_type = "dynamic_llava_next"
    base_model_types: ClassVar[tuple[str, ...]] = (LlavaNextConfig.model_type,)
    family: ClassVar[str] = "LLaVA-NeXT"


@strict
class DynamicLlavaOnevisionConfig(SparsitySettings, LlavaOnevisionConfig):
    """LLaVA-OneVision configuration with the Dynamic-LLaVA sparsity settings (`SparsitySettings`)."""

    model_type = "dynamic_llava_onevision"
    base_model_types: ClassVar[tuple[str, ...]] = (LlavaOnevisionConfig.model_type,)
    family: ClassVar[str] = "LLaVA-OneVision"


class _AnyresBase(PromptImageMask):
    """The stock anyres base model's parts (vision tower, projector, row-end embedding) around a sparse language
    model; image features go to the prompt's image tokens only."""

    _pretrained_class: ClassVar[type]
    _projector_class: ClassVar[type]

    def __init__(self, config):
        self._pretrained_class.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = self._projector_class(config)
        embed_std = 1 / math.sqrt(config.text_config.hidden_size)
        self.image_newline = nn.Parameter(torch.randn(config.text_config.hidden_size, dtype=self.dtype) * embed_std)
        self.vocab_size = config.text_config.vocab_size
        self.language_model = sparse_text_model(config.text_config, config)
        self._image_token_mask = None
        self.post_init()


class DynamicLlavaNextModel(_AnyresBase, LlavaNextModel):
    """`LlavaNextModel` whose language model is a sparse one (weights and names unchanged)."""

    config_class = DynamicLlavaNextConfig
    _pretrained_class = LlavaNextPreTrainedModel
    _projector_class = LlavaNextMultiModalProjector


class DynamicLlavaOnevisionModel(_AnyresBase, LlavaOnevisionModel):
    """`LlavaOnevisionModel` whose language model is a sparse one (weights and names unchanged)."""

    config_class = DynamicLlavaOnevisionConfig
    placeholder_pair = True
    _pretrained_class = LlavaOnevisionPreTrainedModel
    _projector_class = LlavaOnevisionMultiModalProjector


class _AnyresSparse(SparseFamilyModel):
    """The user-facing anyres classes: the stock ones, sparsified (see the module docstring)."""

    def forward(self, input_ids=None, pixel_values=None, image_sizes=None, attention_mask=None, position_ids=None,
                past_key_values=None, inputs_embeds=None, labels=None, vision_feature_layer=None,
                vision_feature_select_strategy=None, logits_to_keep=0, output_text_start: int | None = None,
                sparsity_policy: TokenPolicy | None = None, sparsity_stats: SparsityStats | None = None,
                sparsity_control=None,
                mm_encoder_outputs=None, use_cache=None, answer_mask=None, gumbel_tau: float = 1.0,
                keep_override=None, mask_gradient_scale: float = 1.0, num_items_in_batch=None,
                pixel_values_videos=None, **kwargs):
        """The stock forward, sparsified; returns a `DynamicLlavaOutput` (logits of the tokens that reached the
        last layer: `kept_index` maps them to input positions). With `labels`: the training path."""
        if pixel_values_videos is not None:
            raise NotImplementedError(f"Videos are not supported by Dynamic-LLaVA's {self.config.family} yet.")
        past_key_values, past = self._check_call(past_key_values, sparsity_policy, sparsity_stats)
        if sparsity_control is not None:
            kwargs["sparsity_control"] = sparsity_control
        self._take_requests(kwargs, input_ids, attention_mask, sparsity_policy)  # sparsity_requests -> control
        if labels is not None and input_ids is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels have shape {list(labels.shape)} but input_ids {list(input_ids.shape)}: one "
                             "label per input token (-100 where no loss is taken).")
        if pixel_values is not None:  # encode now: the packed features tell each image's token count
            if image_sizes is None:
                raise ValueError(f"{self.config.family} images need their image_sizes (the processor returns them).")
            mm_encoder_outputs = {"image": self.model.get_image_features(
                pixel_values, image_sizes,
                vision_feature_layer=vision_feature_layer if vision_feature_layer is not None
                else self.config.vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy or self.config.vision_feature_select_strategy,
                return_dict=True, **self._vision_kwargs(kwargs),
            )}
        image_token_mask, counts = self._image_tokens(input_ids, mm_encoder_outputs, past, output_text_start)
        record = ForwardRecord()
        common = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      mm_encoder_outputs=mm_encoder_outputs, image_token_mask=image_token_mask, tokens_per_image=counts,
                      sparsity_record=record, **kwargs)
        if labels is not None:
            outputs = self.model(**common, masked_training=True, answer_mask=answer_mask, gumbel_tau=gumbel_tau,
                                 keep_override=keep_override, mask_gradient_scale=mask_gradient_scale, use_cache=False)
            return training_output(self, outputs.last_hidden_state, record, labels, num_items_in_batch)
        outputs = self.model(**common, past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                             use_cache=use_cache, output_text_start=output_text_start, sparsity_policy=sparsity_policy)
        return self._output(outputs, record, logits_to_keep, sparsity_stats)

    def _image_tokens(self, input_ids, mm_encoder_outputs, past, output_text_start):
        """The prompt's image-token mask and each image's token count (from its packed features)."""
        encoded = (mm_encoder_outputs or {}).get("image")
        if input_ids is None or encoded is None:
            return None, None
        counts = [len(features) for features in encoded.pooler_output]
        return self._prompt_image_mask(input_ids, counts, past, output_text_start), counts

    def _vision_kwargs(self, kwargs) -> dict:
        """Family-specific arguments of `get_image_features` (taken out of the forward's kwargs)."""
        return {}


class DynamicLlavaNextForConditionalGeneration(_AnyresSparse, LlavaNextForConditionalGeneration):
    """LLaVA-NeXT with Dynamic-LLaVA sparsification; loads llava-hf LLaVA-NeXT checkpoints (fresh predictors)
    or its own, and is used like `LlavaNextForConditionalGeneration`."""

    config_class = DynamicLlavaNextConfig
    _base_model_class = DynamicLlavaNextModel
    _pretrained_class = LlavaNextPreTrainedModel


class DynamicLlavaOnevisionForConditionalGeneration(_AnyresSparse, LlavaOnevisionForConditionalGeneration):
    """LLaVA-OneVision (images; Qwen2 decoder) with Dynamic-LLaVA sparsification; loads llava-hf OneVision
    checkpoints (fresh predictors) or its own."""

    config_class = DynamicLlavaOnevisionConfig
    _base_model_class = DynamicLlavaOnevisionModel
    _pretrained_class = LlavaOnevisionPreTrainedModel

    def _vision_kwargs(self, kwargs) -> dict:
        return {"vision_aspect_ratio": kwargs.pop("vision_aspect_ratio", None) or self.config.vision_aspect_ratio,
                "batch_num_images": kwargs.pop("batch_num_images", None)}


def _register_with_transformers() -> None:
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    for config, model, base, stock_config, stock_base in (
        (DynamicLlavaNextConfig, DynamicLlavaNextForConditionalGeneration, DynamicLlavaNextModel, LlavaNextConfig,
         LlavaNextModel),
        (DynamicLlavaOnevisionConfig, DynamicLlavaOnevisionForConditionalGeneration, DynamicLlavaOnevisionModel,
         LlavaOnevisionConfig, LlavaOnevisionModel),
    ):
        AutoConfig.register(config.model_type, config, exist_ok=True)
        AutoModelForImageTextToText.register(config, model, exist_ok=True)
        # the stock checkpoints' (legacy) tensor names, renamed as for the stock model
        register_checkpoint_conversion_mapping(config.model_type,
                                               get_checkpoint_conversion_mapping(stock_config.model_type), overwrite=True)
        register_checkpoint_conversion_mapping(base.__name__, get_checkpoint_conversion_mapping(stock_base.__name__),
                                               overwrite=True)


_register_with_transformers()

__all__ = ["DynamicLlavaNextConfig", "DynamicLlavaNextForConditionalGeneration", "DynamicLlavaNextModel",
           "DynamicLlavaOnevisionConfig", "DynamicLlavaOnevisionForConditionalGeneration", "DynamicLlavaOnevisionModel"]
