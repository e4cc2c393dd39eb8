"""Dynamic-LLaVA on stock transformers LLaVA: the model users load (`DynamicLlavaForConditionalGeneration`).

Its language model is a `DynamicLlamaModel` (`decoder.py`: the sparse loop shared by every family); this
module adds what LLaVA needs around it: the checks of inputs, the training loss, `generate()` with a
`DynamicLlavaCache`, loading llava-hf and Dynamic-LLaVA checkpoints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin
from transformers.cache_utils import Cache, DynamicCache
from transformers.models.llava.modeling_llava import (
    LlavaCausalLMOutputWithPast,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaMultiModalProjector,
    LlavaPreTrainedModel,
)
from transformers.utils import logging

from .cache import DynamicLlavaCache
from .decoder import DynamicLlamaModel, sparse_text_model
from .checkpoints import (
    check_checkpoint_folder,
    checkpoint_tensor_shapes,
    predictor_mismatches,
    stored_predictor_shapes,
)
from .control import BUDGET, as_requests, check_budget_covers_prompt, control_tensor
from .config import SPARSITY_FIELDS, DynamicLlavaConfig, refuse_misspelt_settings
from .policies import (
    TokenPolicy,
    check_policy,
)
from .losses import budget_loss
from .predictors import ImagePredictor, TextPredictor
from .stats import ForwardRecord, SparsityStats
from .validation import check_number

logger = logging.get_logger(__name__)



@dataclass
class DynamicLlavaOutput(LlavaCausalLMOutputWithPast):
    """`LlavaCausalLMOutputWithPast` plus which input positions the logits belong to (inference)
    or the parts of the training loss (with labels).

    kept_index : [B, N'] input positions that reached the last layer (None: all of them).
    kept_valid : [B, N'] False for filler slots of samples that kept fewer tokens than the longest.
    lm_loss, budget_loss : the cross-entropy and R_I + R_OT (loss = lm_loss + budget_weight * budget_loss).
    image_keep_ratio, text_keep_ratio : [B] realised keep share of image / eligible answer tokens
        (NaN for samples that have none; detached: for reading, the loss has its own).
    """

    kept_index: torch.Tensor | None = None
    kept_valid: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    budget_loss: torch.Tensor | None = None
    image_keep_ratio: torch.Tensor | None = None
    text_keep_ratio: torch.Tensor | None = None


def _only_where(values: torch.Tensor | None, counts: torch.Tensor | None) -> torch.Tensor | None:
    """A detached copy of per-sample `values` with NaN where the sample had no such tokens."""
    if values is None:
        return None
    return torch.where(counts > 0, values.detach(), torch.full_like(values, float("nan")))


def training_output(model, hidden, record, labels, num_items_in_batch) -> "DynamicLlavaOutput":
    """The training path's output for any family: LM cross-entropy + budget_weight * (R_I + R_OT), and the
    realised keep ratios."""
    logits = model.lm_head(hidden)
    lm_loss = model.loss_function(logits=logits, labels=labels, vocab_size=model.config.text_config.vocab_size,
                                  num_items_in_batch=num_items_in_batch)
    budget = budget_loss(record, model.config.image_keep_rate, model.config.text_keep_rate)
    return DynamicLlavaOutput(
        loss=lm_loss + model.config.budget_weight * budget,
        logits=logits,
        lm_loss=lm_loss,
        budget_loss=budget,
        image_keep_ratio=_only_where(record.image_keep_mean, record.image_tokens),
        text_keep_ratio=_only_where(record.text_keep_mean, record.text_tokens),
    )


class PromptImageMask:
    """Image features go to the prompt's image tokens only (`image_token_mask`): a generated token that carries
    the image id stays text, as in the stock model. Mixed into a family's base model; `placeholder_pair` marks
    the families whose placeholder mask is an (image, video) pair."""

    placeholder_pair: ClassVar[bool] = False

    def forward(self, *args, **kwargs):
        self._image_token_mask = kwargs.get("image_token_mask")
        try:
            return super().forward(*args, **kwargs)
        finally:
            self._image_token_mask = None

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features=None, video_features=None):
        mask = getattr(self, "_image_token_mask", None)
        if mask is None or mask.shape != inputs_embeds.shape[:2]:
            if self.placeholder_pair:
                return super().get_placeholder_mask(input_ids, inputs_embeds, image_features, video_features)
            return super().get_placeholder_mask(input_ids, inputs_embeds, image_features)
        image_mask = mask.unsqueeze(-1).expand_as(inputs_embeds).to(inputs_embeds.device)
        if not self.placeholder_pair:
            return image_mask
        _, video_mask = super().get_placeholder_mask(input_ids, inputs_embeds, None, video_features)
        return image_mask, video_mask


class DynamicLlavaModel(PromptImageMask, LlavaModel):
    """`LlavaModel` whose language model is a sparse one (`decoder.py`; weights and names unchanged)."""

    config_class = DynamicLlavaConfig

    def __init__(self, config: DynamicLlavaConfig):
        LlavaPreTrainedModel.__init__(self, config)
        config.check_sparsity()
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = sparse_text_model(config.text_config, config)
        self._image_token_mask = None
        self.post_init()


class SparseGeneration:
    """`generate()` for every family: a `DynamicLlavaCache` (buffers reserved for `max_new_tokens`), where
    generated text begins (for decoding without a cache), and limits checked before decoding starts; and the
    two predictors."""

    @property
    def image_predictor(self) -> ImagePredictor | None:
        return self.model.language_model.image_predictor

    @property
    def text_predictor(self) -> TextPredictor | None:
        return self.model.language_model.text_predictor

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """Give `generate()` a `DynamicLlavaCache` instead of a plain `DynamicCache`."""
        user_cache = model_kwargs.get("past_key_values")
        if user_cache is not None and not isinstance(user_cache, DynamicLlavaCache):
            raise TypeError(
                f"past_key_values must be a DynamicLlavaCache, got {type(user_cache).__name__}; "
                "pass none and generate() makes one."
            )
        if generation_config.cache_implementation not in (None, "dynamic"):
            raise ValueError(
                f"cache_implementation={generation_config.cache_implementation!r} is not supported by Dynamic-LLaVA: "
                "its cache stores a different number of tokens per layer. Leave it unset."
            )
        made_here = user_cache is None and generation_config.use_cache is not False
        if made_here:
            model_kwargs["past_key_values"] = DynamicLlavaCache.from_config(self.config)
        if model_kwargs.get("past_key_values") is not None and generation_config.max_new_tokens:
            model_kwargs["past_key_values"].reserve(generation_config.max_new_tokens)  # the buffers grow once
        result = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if made_here:
            model_kwargs["past_key_values"]._is_user_defined = False  # ours, not the caller's
        return result

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """`GenerationMixin.generate`, marking where generated text begins (for decoding without cache).

        Pass `sparsity_stats=SparsityStats()` to read what was kept; assisted decoding is refused.
        """
        self.config.check_sparsity()
        policy = kwargs.get("sparsity_policy")
        check_policy(policy)
        if policy is not None and policy.needs_attention and kwargs.get("use_cache") is False:
            raise ValueError(
                f"{type(policy).__name__} ranks tokens by the attention accumulated in the KV cache: generate with "
                "use_cache=True."
            )
        stats = kwargs.get("sparsity_stats")
        if stats is not None and not isinstance(stats, SparsityStats):
            raise TypeError(f"sparsity_stats must be a SparsityStats, got {type(stats).__name__}.")
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        mask = kwargs.get("attention_mask")
        if prompt is not None and mask is not None and mask.shape != prompt.shape:
            raise ValueError(
                f"attention_mask has shape {list(mask.shape)} but input_ids {list(prompt.shape)}: pass the mask the "
                "processor made for these input_ids."
            )
        if prompt is not None and kwargs.get("output_text_start") is None:
            kwargs["output_text_start"] = prompt.shape[1]
        if kwargs.get("sparsity_requests") is not None:
            config = generation_config if generation_config is not None else self.generation_config
            new_tokens = kwargs.get("max_new_tokens", config.max_new_tokens)
            if new_tokens is None and prompt is not None:
                new_tokens = max(kwargs.get("max_length", config.max_length) - prompt.shape[1], 0)
            use_cache = kwargs.get("use_cache", config.use_cache)
            self._take_requests(kwargs, prompt, mask, policy, new_tokens or 0, use_cache is not False)
        if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens") is not None:
            raise NotImplementedError("Assisted/speculative decoding is not supported by Dynamic-LLaVA (its cache cannot be cropped).")
        return GenerationMixin.generate(self, inputs, generation_config, **kwargs)

    def _take_requests(self, kwargs, input_ids, attention_mask, policy=None, new_tokens: int = 0,
                       use_cache: bool = True) -> None:
        """Turn ``kwargs["sparsity_requests"]`` (one `SparsityRequest` per sample, or one for all) into the per-sample
        ``sparsity_control`` tensor the sparse loop reads, checking the requests against the prompt first."""
        requests = kwargs.pop("sparsity_requests", None)
        if requests is None:
            return
        if kwargs.get("sparsity_control") is not None:
            raise ValueError("Pass sparsity_requests or sparsity_control, not both.")
        if input_ids is None:
            raise ValueError("sparsity_requests need input_ids (a budget is checked against the prompt's tokens).")
        batch = input_ids.shape[0]
        requests = as_requests(requests, batch)
        budgeted = [i for i, r in enumerate(requests) if r.has_budget]
        real = attention_mask.sum(dim=1) if attention_mask is not None else torch.full((batch,), input_ids.shape[1])
        context = (real + new_tokens).tolist()
        control = control_tensor(self, requests, batch, policy, context, input_ids.device)
        if budgeted:
            if not use_cache:
                raise ValueError("A KV budget needs a KV cache: generate with use_cache=True (without a cache nothing "
                                 "is stored; lower text_keep_threshold or image_keep_rate instead).")
            text = (real - (input_ids == self.config.image_token_id).sum(dim=1)).tolist()
            for i in budgeted:
                check_budget_covers_prompt(float(control[i, BUDGET]), text[i], f"Sample {i}")
        kwargs["sparsity_control"] = control

    def _validate_generated_length(self, generation_config, input_ids_length, has_default_max_length):
        """Refuse, before decoding starts, a generation that would run past the model's context."""
        super()._validate_generated_length(generation_config, input_ids_length, has_default_max_length)
        limit = self.config.text_config.max_position_embeddings
        # the last token is sampled, never fed back: the model sees at most max_length - 1 tokens
        if generation_config.max_length - 1 > limit:
            raise ValueError(
                f"max_new_tokens={generation_config.max_length - input_ids_length} after a prompt of "
                f"{input_ids_length} tokens needs {generation_config.max_length - 1} positions, but the model's "
                f"context is {limit} (text_config.max_position_embeddings): ask for at most "
                f"{limit + 1 - input_ids_length} new tokens or shorten the prompt."
            )

    def _output(self, outputs, record, logits_to_keep, sparsity_stats) -> "DynamicLlavaOutput":
        """Logits of the kept tokens (`logits_to_keep` of them), the stats filled, the record's kept index."""
        hidden = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, slice_indices, :])
        if sparsity_stats is not None:
            sparsity_stats.update(record, outputs.past_key_values, accumulate_text=outputs.past_key_values is not None)
        return DynamicLlavaOutput(logits=logits, past_key_values=outputs.past_key_values,
                                  hidden_states=outputs.hidden_states, attentions=outputs.attentions,
                                  image_hidden_states=getattr(outputs, "image_hidden_states", None),
                                  kept_index=record.kept_index, kept_valid=record.kept_valid)


class SparseFamilyModel(SparseGeneration):
    """The user-facing classes of the other families: the stock class with a sparse base model
    (`_base_model_class`), the predictors, loading of stock checkpoints (fresh predictors), and the output."""

    _keys_to_ignore_on_load_missing = [r"image_predictor\.", r"text_predictor\."]
    _base_model_class: ClassVar[type]
    _pretrained_class: ClassVar[type]

    def __init__(self, config):
        if not isinstance(config, self.config_class):
            raise TypeError(f"config must be a {self.config_class.__name__}, got {type(config).__name__}.")
        config.check_sparsity()
        self._pretrained_class.__init__(self, config)
        self.model = self._base_model_class(config)
        self.config.__dict__["_structure_fixed"] = True
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load a stock checkpoint of the family (fresh predictors) or a Dynamic one; sparsity settings may be
        overridden as keyword arguments."""
        refuse_misspelt_settings(kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def _check_call(self, past_key_values, sparsity_policy, sparsity_stats):
        """Checks before any compute; returns the cache to use (an empty default one is replaced by ours) and its
        length."""
        check_policy(sparsity_policy)
        if sparsity_stats is not None and not isinstance(sparsity_stats, SparsityStats):
            raise TypeError(f"sparsity_stats must be a SparsityStats, got {type(sparsity_stats).__name__}.")
        if isinstance(past_key_values, DynamicCache) and past_key_values.get_seq_length() == 0:
            past_key_values = None
        past = past_key_values.get_seq_length(0) if past_key_values is not None else 0
        if past == 0:
            self.config.check_sparsity()
        return past_key_values, past

    def _prompt_image_mask(self, input_ids, counts, past, output_text_start):
        """The prompt's image tokens (generated ones are text, whatever their id), checked against the images."""
        mask = input_ids == self.config.image_token_id
        if output_text_start is not None:
            mask[:, max(output_text_start - past, 0) :] = False
        if int(mask.sum()) != sum(counts):
            raise ValueError(
                f"The prompt has {int(mask.sum())} image tokens but its {len(counts)} image(s) need {sum(counts)}: "
                "build the inputs with the model's processor (it expands each image placeholder for its size)."
            )
        return mask

class DynamicLlavaForConditionalGeneration(SparseGeneration, LlavaForConditionalGeneration):
    """LLaVA with Dynamic-LLaVA vision-language context sparsification.

    Loads any llava-hf (LLaVA-1.5 layout) checkpoint with `from_pretrained`; a checkpoint without
    predictors gets fresh ones. Use it like `LlavaForConditionalGeneration`: `forward`, `generate`
    (with or without cache, batched). Extra arguments: `sparsity_stats` (a `SparsityStats` to fill),
    `sparsity_policy` (a `TokenPolicy` from `dynamic_llava.policies`: `LearnedPolicy`, the default,
    `RandomPolicy`, `FastVPolicy`, `StreamingLLMPolicy`, `H2OPolicy`, `ComposedPolicy`, ...) and
    `sparsity_requests` (one `SparsityRequest` per sample, or one for all: keep rates, text threshold and KV
    budget per sample, the config untouched).
    """

    config_class = DynamicLlavaConfig
    _keys_to_ignore_on_load_missing = [r"image_predictor\.", r"text_predictor\."]

    def __init__(self, config: DynamicLlavaConfig):
        if not isinstance(config, DynamicLlavaConfig):
            raise TypeError(
                f"config must be a DynamicLlavaConfig, got {type(config).__name__}: build one with "
                "DynamicLlavaConfig(...) or DynamicLlavaConfig.from_pretrained(path)."
            )
        config.check_sparsity()
        LlavaPreTrainedModel.__init__(self, config)
        self.model = DynamicLlavaModel(config)
        self.config.__dict__["_structure_fixed"] = True  # the predictors exist: their widths cannot change now
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """Load a Dynamic-LLaVA or a plain llava-hf checkpoint (the latter gets fresh predictors, said in one line).

        Sparsity settings may be overridden as keyword arguments (e.g. ``image_keep_rate=0.3``).
        """
        refuse_misspelt_settings(kwargs)
        check_checkpoint_folder(pretrained_model_name_or_path)
        shapes = checkpoint_tensor_shapes(pretrained_model_name_or_path)
        try:
            model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except OSError as error:
            if os.path.isdir(pretrained_model_name_or_path):
                raise
            raise OSError(
                f"{pretrained_model_name_or_path} is not a checkpoint folder, nor a hub model in the local cache: "
                f"pass the folder holding config.json and model.safetensors ({error})"
            ) from error
        except RuntimeError as error:
            config = kwargs.get("config")
            if shapes is None or "mismatch" not in str(error):
                raise
            if not isinstance(config, DynamicLlavaConfig):
                overrides = {k: v for k, v in kwargs.items() if k in SPARSITY_FIELDS}
                config = DynamicLlavaConfig.from_pretrained(pretrained_model_name_or_path, **overrides)
            problems = predictor_mismatches(config, shapes)
            if not problems:
                raise
            raise ValueError(
                f"The predictor weights in {pretrained_model_name_or_path} do not match the predictor widths of the "
                "config (predictor_dim, predictor_heads, predictor_mlp_dim, predictor_blocks, predictor_head_dims, "
                "text_predictor_dims): " + "; ".join(problems[:3]) + ". Load without overriding these widths, or "
                "fix config.json."
            ) from error
        loaded = model[0] if isinstance(model, tuple) else model
        if shapes is not None:
            stored = stored_predictor_shapes(shapes)
            fresh = [
                label
                for label, prefix, enabled in (
                    ("image", "image_predictor.", loaded.config.use_image_predictor),
                    ("output-text", "text_predictor.", loaded.config.use_text_predictor),
                )
                if enabled and not any(key.startswith(prefix) for key in stored)
            ]
            if fresh:
                logger.warning(
                    f"{pretrained_model_name_or_path} has no trained {' and '.join(fresh)} "
                    f"predictor{'s' if len(fresh) > 1 else ''}: initialised fresh ones (their keep decisions are arbitrary until fine-tuned)."
                )
        return model

    def tokens_per_image(self) -> int:
        """Image tokens one image expands to (576 for LLaVA-1.5 at 336 px)."""
        vision = self.config.vision_config
        if hasattr(vision, "image_size") and hasattr(vision, "patch_size"):
            patches = (vision.image_size // vision.patch_size) ** 2
            return patches + (0 if self.config.vision_feature_select_strategy == "default" else 1)
        return self.config.image_seq_length

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_text_start: int | None = None,
        sparsity_policy: TokenPolicy | None = None,
        sparsity_stats: SparsityStats | None = None,
        sparsity_control: torch.Tensor | None = None,
        answer_mask: torch.Tensor | None = None,
        gumbel_tau: float = 1.0,
        keep_override: torch.Tensor | None = None,
        mask_gradient_scale: float = 1.0,
        num_items_in_batch: int | torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        **kwargs,
    ) -> LlavaCausalLMOutputWithPast:
        """Same as `LlavaForConditionalGeneration.forward`, sparsified.

        `output_text_start`: index in the full sequence where generated text begins (set by
        `generate`); without a cache, earlier generated tokens are judged by the output-text policy.
        The returned logits cover the tokens that reached the last layer: `kept_index` (None when
        all did) maps them to input positions.

        With `labels` it is the sparsification-aware training path instead: every token runs through
        every layer, layers >= K mask dropped tokens as keys (`attention.py`), and the loss is the LM
        cross-entropy plus `budget_weight * (R_I + R_OT)`. `answer_mask` marks the answer tokens the
        output-text predictor may drop; `gumbel_tau` is the Gumbel-Softmax temperature;
        `keep_override` ([B, N], 1 = keep) replaces the predictors' decisions; `mask_gradient_scale` weighs
        this micro-batch's balanced mask gradient (the trainer passes 1 / accumulation steps).

        `mm_encoder_outputs` (image features encoded beforehand) is named here so that `generate()` encodes
        the images before it repeats the inputs per beam or per returned sequence, as it does for the stock
        class: repeating `pixel_values` instead would hand each beam the wrong images when prompts hold
        several.
        """
        if mm_encoder_outputs is not None:
            kwargs["mm_encoder_outputs"] = mm_encoder_outputs
        if sparsity_control is not None:
            kwargs["sparsity_control"] = sparsity_control
        self._take_requests(kwargs, input_ids, attention_mask, sparsity_policy)  # sparsity_requests -> control
        if past_key_values is None or past_key_values.get_seq_length() == 0:
            # settings are checked on assignment and in generate(); here once per prompt, not per decode step
            self.config.check_sparsity()
        check_policy(sparsity_policy)
        if sparsity_stats is not None and not isinstance(sparsity_stats, SparsityStats):
            raise TypeError(f"sparsity_stats must be a SparsityStats, got {type(sparsity_stats).__name__}.")
        if attention_mask is not None and attention_mask.ndim != 2:
            raise ValueError(
                f"attention_mask must be the 2-D padding mask [batch, tokens] (got {attention_mask.ndim}-D): "
                "the sparse layers build their own masks from it."
            )
        if labels is not None:
            if input_ids is not None and labels.shape != input_ids.shape:
                raise ValueError(
                    f"labels have shape {list(labels.shape)} but input_ids {list(input_ids.shape)}: one label per "
                    "input token (-100 where no loss is taken), as LlavaConversationDataset makes them."
                )
            check_number("gumbel_tau", gumbel_tau, 0.0, low_open=True, hint="the Gumbel-Softmax temperature")
            return self._masked_training_forward(
                input_ids, pixel_values, attention_mask, position_ids, labels, answer_mask, gumbel_tau,
                keep_override, num_items_in_batch, kwargs, mask_gradient_scale,
            )
        if isinstance(past_key_values, DynamicCache) and past_key_values.get_seq_length() == 0:
            past_key_values = None  # an empty default cache: replace it with ours
        image_token_mask, per_image = self._check_inputs(
            input_ids, pixel_values, kwargs, past_key_values, output_text_start, attention_mask
        )
        record = ForwardRecord()
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            image_token_mask=image_token_mask,
            tokens_per_image=per_image,
            output_text_start=output_text_start,
            sparsity_policy=sparsity_policy,
            sparsity_record=record,
            **kwargs,
        )
        return self._output(outputs, record, logits_to_keep, sparsity_stats)

    def _masked_training_forward(
        self, input_ids, pixel_values, attention_mask, position_ids, labels, answer_mask, gumbel_tau,
        keep_override, num_items_in_batch, kwargs, mask_gradient_scale=1.0,
    ) -> "DynamicLlavaOutput":
        image_token_mask, per_image = self._check_inputs(input_ids, pixel_values, kwargs, None, None, attention_mask)
        record = ForwardRecord()
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            image_token_mask=image_token_mask,
            tokens_per_image=per_image,
            masked_training=True,
            answer_mask=answer_mask,
            gumbel_tau=gumbel_tau,
            keep_override=keep_override,
            mask_gradient_scale=mask_gradient_scale,
            sparsity_record=record,
            use_cache=False,
            **kwargs,
        )
        return training_output(self, outputs.last_hidden_state, record, labels, num_items_in_batch)

    def _check_inputs(self, input_ids, pixel_values, kwargs, cache, output_text_start, attention_mask=None):
        """Validate before any compute; return the prompt's image-token mask and tokens per image.

        Generated tokens are text even if they carry the image token's id (as in the stock model).
        """
        ids = input_ids
        if ids is None:
            if pixel_values is not None:
                raise ValueError("Dynamic-LLaVA needs input_ids with images (it finds image tokens by id).")
            return None, None
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise TypeError(f"input_ids must hold integer token ids, got a {ids.dtype} tensor.")
        mask = attention_mask
        if mask is not None and mask.shape[0] != ids.shape[0]:
            raise ValueError(f"attention_mask has {mask.shape[0]} rows but input_ids has {ids.shape[0]}.")
        past = cache.get_seq_length(0) if cache is not None else 0
        vocab = self.get_input_embeddings().num_embeddings
        # checked on the prompt only: min / max wait for the device, and decode steps feed back sampled ids
        if past == 0 and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(
                f"input_ids hold token ids from {int(ids.min())} to {int(ids.max())}, but the vocabulary has {vocab} "
                "(ids 0 .. vocab_size - 1): encode the prompt with this model's processor."
            )
        if mask is not None and mask.shape[1] != past + ids.shape[1]:
            raise ValueError(
                f"attention_mask covers {mask.shape[1]} tokens but there are {past + ids.shape[1]} ({past} cached + "
                f"{ids.shape[1]} new): pass the mask the processor made for these input_ids."
            )
        limit = self.config.text_config.max_position_embeddings
        if past + ids.shape[1] > limit:
            raise ValueError(
                f"The sequence has {past + ids.shape[1]} tokens ({past} cached + {ids.shape[1]} new) but the model's "
                f"context is {limit} (text_config.max_position_embeddings): shorten the prompt or max_new_tokens."
            )
        if past > 0 and pixel_values is None and kwargs.get("mm_encoder_outputs") is None:
            return None, None  # continuing from a cache: the images were consumed at prefill
        image_token_mask = ids == self.config.image_token_id
        if output_text_start is not None:
            image_token_mask[:, max(output_text_start - past, 0) :] = False
        n_tokens = int(image_token_mask.sum())
        if n_tokens == 0:
            if pixel_values is not None and past == 0:
                raise ValueError(
                    f"{pixel_values.shape[0]} image(s) given but the prompt has no image token "
                    f"(id {self.config.image_token_id}): put '<image>' in the prompt and use the processor."
                )
            return None, None
        per_image = self.tokens_per_image()
        if kwargs.get("mm_encoder_outputs") is not None:
            n_images = len(kwargs["mm_encoder_outputs"]["image"].pooler_output)
        elif pixel_values is not None:
            n_images = pixel_values.shape[0]
        else:
            n_images = 0
        if n_tokens != n_images * per_image:
            raise ValueError(
                f"The prompt has {n_tokens} image placeholder tokens but {n_images} image(s) were given, which "
                f"need {n_images * per_image} ({per_image} per image). Build inputs with the model's processor, "
                "which expands each '<image>' to the right number of tokens."
            )
        return image_token_mask, per_image


__all__ = [
    "DynamicLlamaModel",
    "PromptImageMask",
    "SparseFamilyModel",
    "SparseGeneration",
    "training_output",
    "DynamicLlavaModel",
    "DynamicLlavaForConditionalGeneration",
    "DynamicLlavaOutput",
]


def _register_with_transformers() -> None:
    """Make `dynamic_llava` checkpoints loadable like llava ones (Auto classes, legacy weight names)."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    AutoConfig.register(DynamicLlavaConfig.model_type, DynamicLlavaConfig, exist_ok=True)
    AutoModelForImageTextToText.register(DynamicLlavaConfig, DynamicLlavaForConditionalGeneration, exist_ok=True)
    register_checkpoint_conversion_mapping(
        DynamicLlavaConfig.model_type, get_checkpoint_conversion_mapping("llava"), overwrite=True
    )
    register_checkpoint_conversion_mapping(  # saved layout == llava-hf layout (+ predictors)
        DynamicLlavaModel.__name__, get_checkpoint_conversion_mapping("LlavaModel"), overwrite=True
    )


_register_with_transformers()
