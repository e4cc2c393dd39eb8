"""Dynamic-LLaVA on stock transformers LLaVA: the sparse decoder loop and the model users load.

`DynamicLlamaModel` owns the Llama decoder loop. Layers < K run on the full sequence. At layer K a
policy (`policies/`; by default the learned predictors) decides which tokens the deeper layers keep:

* image tokens: each image keeps its top ``floor(image_keep_rate * tokens)`` by the policy's score;
* generated tokens: kept or dropped one by one as they enter (output-text predictor), and, for
  eviction policies (StreamingLLM-style windows), earlier generated tokens leave the context later.

Kept tokens are gathered (hidden states, original position ids, rotary cos/sin, padding mask) into
a shorter sequence; samples that keep fewer tokens get masked filler slots on the left, exactly like
left padding, so a batch is computed as its samples would be one by one. With a cache, layers >= K
store only kept K/V (`DynamicLlavaCache`); without one, each step recomputes the sequence and drops
what the policy drops. The newest token is always computed, so its logits are always returned.
Evicted generated tokens leave the cache; without a cache they stay in the recomputed sequence but
are hidden from every query after their eviction (their own, earlier, outputs shaped the tokens that
came after them, exactly as the cached K/V did), so both modes give the same tokens.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import LlamaModel
from transformers.models.llava.modeling_llava import (
    LlavaCausalLMOutputWithPast,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaMultiModalProjector,
    LlavaPreTrainedModel,
)
from transformers.utils import logging
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .attention import allowed_keys, masked_layer_forward
from .cache import DynamicLlavaCache
from .checkpoints import (
    check_checkpoint_folder,
    checkpoint_tensor_shapes,
    predictor_mismatches,
    stored_predictor_shapes,
)
from .config import SPARSITY_FIELDS, DynamicLlavaConfig, refuse_misspelt_settings
from .policies import (
    LearnedPolicy,
    PolicyContext,
    TextSlots,
    TokenPolicy,
    check_policy,
    layer_keys,
    query_attention,
)
from .losses import balance_mask_gradient, budget_loss
from .predictors import KEEP, ImagePredictor, TextPredictor, keep_log_prob, sample_keep
from .stats import ForwardRecord, SparsityStats
from .validation import check_number

logger = logging.get_logger(__name__)

SUPPORTED_TEXT_MODELS = ("llama",)
_DEFAULT_POLICY = LearnedPolicy()


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


class DynamicLlamaModel(LlamaModel):
    """A `LlamaModel` (same weights, same names) whose layers >= K see only the tokens a policy keeps."""

    def __init__(self, config, sparsity: DynamicLlavaConfig):
        super().__init__(config)
        self.sparsity = sparsity  # the full model config: read at every call, so edits take effect
        hidden = config.hidden_size
        self.image_predictor = (
            ImagePredictor(
                hidden,
                sparsity.predictor_dim,
                sparsity.predictor_heads,
                sparsity.predictor_mlp_dim,
                sparsity.predictor_blocks,
                sparsity.predictor_head_dims,
            )
            if sparsity.use_image_predictor
            else None
        )
        self.text_predictor = (
            TextPredictor(hidden, sparsity.text_predictor_dims) if sparsity.use_text_predictor else None
        )

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        image_token_mask: torch.Tensor | None = None,
        tokens_per_image: int | None = None,
        output_text_start: int | None = None,
        sparsity_policy: TokenPolicy | None = None,
        sparsity_record: ForwardRecord | None = None,
        masked_training: bool = False,
        answer_mask: torch.Tensor | None = None,
        gumbel_tau: float = 1.0,
        keep_override: torch.Tensor | None = None,
        mask_gradient_scale: float = 1.0,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        record = sparsity_record if sparsity_record is not None else ForwardRecord()
        if masked_training:
            hidden = self._masked_forward(
                inputs_embeds, attention_mask, position_ids, image_token_mask, tokens_per_image, answer_mask,
                gumbel_tau, keep_override, record, mask_gradient_scale, **kwargs,
            )
            return BaseModelOutputWithPast(last_hidden_state=hidden)
        policy = sparsity_policy or _DEFAULT_POLICY
        k_layer = self.sparsity.sparse_layer
        batch, seq = inputs_embeds.shape[:2]

        cache = past_key_values
        if use_cache and cache is None:
            cache = DynamicLlavaCache(self.config.num_hidden_layers, k_layer)
        if cache is not None and not isinstance(cache, DynamicLlavaCache):
            raise TypeError(
                f"Dynamic-LLaVA needs a DynamicLlavaCache (its layers >= K hold only kept tokens), got "
                f"{type(cache).__name__}. Pass none and one is made, or pass DynamicLlavaCache.from_config(config)."
            )
        past = cache.get_seq_length(0) if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=inputs_embeds.device).unsqueeze(0)
        position_ids = position_ids.expand(batch, -1)

        full_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=cache,
            position_ids=position_ids,
            layer_idx=0,
        )
        hidden = inputs_embeds
        cos, sin = self.rotary_emb(hidden, position_ids=position_ids)
        layer_kwargs = dict(past_key_values=cache, use_cache=use_cache, **kwargs)
        for i, layer in enumerate(self.layers[:k_layer]):
            if i == k_layer - 1:
                hidden_before = hidden  # entering layer K-1: attention-based policies (FastV) read it
            hidden = layer(
                hidden, attention_mask=full_mask, position_embeddings=(cos, sin), position_ids=position_ids, **layer_kwargs
            )

        # ---- layer K: decide who stays ----
        valid = (
            attention_mask[:, -seq:].bool()
            if attention_mask is not None
            else torch.ones(batch, seq, dtype=torch.bool, device=hidden.device)
        )
        text_start = self._text_start(seq, past, output_text_start, cache)  # generated text: input[text_start:]
        store = valid.clone()  # tokens the deeper layers keep (and cache)
        if image_token_mask is not None:
            prompt_end = max((seq if text_start is None else text_start) - 1, 0)
            context = PolicyContext(hidden_before, (cos, sin), valid, image_token_mask, prompt_end, past,
                                    inputs_embeds=inputs_embeds, hidden=hidden)
            store &= self._select_image_tokens(
                hidden, image_token_mask, tokens_per_image, position_ids, policy, context, record
            )
        if text_start is not None:
            store &= self._select_text_tokens(hidden, text_start, cache is None, position_ids, policy, record)
        keep = store.clone()
        keep[:, -1] = True  # the newest token is always computed: its logits are the output
        keep |= ~valid  # padding stays in place (masked), so shapes match the dense model

        # each token's column in the full sequence, and the same for generated tokens only (-1 for the
        # prompt): eviction policies measure a generated token's age with it
        columns = torch.arange(past, past + seq, device=hidden.device).expand(batch, -1)
        text_columns = columns.masked_fill(columns < past + (seq if text_start is None else text_start), -1)
        if seq == 1 or bool(keep.all()):  # one new token is always computed: no host sync to know it
            index, slot_valid = None, None
            hidden_s, pos_s, cos_s, sin_s, valid_s, store_s = hidden, position_ids, cos, sin, valid, store
            columns_s, text_columns_s = columns, text_columns
        else:
            n_keep = int(keep.sum(dim=1).max())
            # stable sort puts dropped tokens first, kept ones last, each in position order
            index = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices[:, seq - n_keep :]
            slot_valid = keep.gather(1, index)
            hidden_s = _gather_tokens(hidden, index)
            cos_s, sin_s = _gather_tokens(cos, index), _gather_tokens(sin, index)
            pos_s = position_ids.gather(1, index)
            valid_s = valid.gather(1, index) & slot_valid
            store_s = store.gather(1, index) & slot_valid
            columns_s, text_columns_s = columns.gather(1, index), text_columns.gather(1, index)
        record.kept_index, record.kept_valid = index, slot_valid

        visible = None  # [B, Q, keys] key visibility beyond causality and padding (eviction policies)
        if policy.evicts_text and text_start is not None:
            visible = self._evict_text(policy, cache, columns_s, text_columns_s, record)
        mask_2d, seq_s = valid_s, valid_s.shape[1]
        if cache is not None:
            received = None
            if policy.needs_attention and text_start is not None:
                received = self._attention_received(cache, hidden_s, (cos_s, sin_s), valid_s, visible)
            # with one new token, only a text decision can leave it out of the cache (a padded step at most
            # overstates the width, which the key mask covers)
            may_drop = seq_s > 1 or record.text_decided
            mask_2d = cache.plan_step(store_s, valid_s, text_columns_s, received, may_drop=may_drop)
        sparse_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden_s,
            attention_mask=mask_2d,
            past_key_values=cache,
            position_ids=pos_s,
            layer_idx=k_layer,
            and_mask_function=None if visible is None else _visibility_function(visible, mask_2d.shape[1] - seq_s),
            allow_is_causal_skip=seq_s > 1,  # decoding: the slot mask always matters, and checking it would sync
        )
        for layer in self.layers[k_layer:]:
            hidden_s = layer(
                hidden_s, attention_mask=sparse_mask, position_embeddings=(cos_s, sin_s), position_ids=pos_s, **layer_kwargs
            )
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_s), past_key_values=cache)

    def _masked_forward(
        self, inputs_embeds, attention_mask, position_ids, image_token_mask, tokens_per_image, answer_mask,
        gumbel_tau, keep_override, record, mask_gradient_scale=1.0, **kwargs,
    ) -> torch.Tensor:
        """Training path: the full sequence in every layer; in layers >= K dropped tokens are masked as keys.

        Keep masks come from the predictors: hard Gumbel-Softmax samples (straight-through) in train
        mode, the inference decisions (top share per image, keep > drop) in eval mode, or
        `keep_override` ([B, N], 1 = keep) when given. Under `mask_gradient="balanced"` the LM loss's gradient
        on the masks is balanced against the budget term (`losses.balance_mask_gradient`, weighed by
        `mask_gradient_scale`). Returns the final normed hidden states.
        """
        batch, seq = inputs_embeds.shape[:2]
        if position_ids is None:
            position_ids = (
                (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
                if attention_mask is not None
                else torch.arange(seq, device=inputs_embeds.device).unsqueeze(0)
            )
        position_ids = position_ids.expand(batch, -1)
        full_mask = create_causal_mask(
            config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
            past_key_values=None, position_ids=position_ids,
        )
        hidden = inputs_embeds
        position_embeddings = self.rotary_emb(hidden, position_ids=position_ids)
        k_layer = self.sparsity.sparse_layer
        for layer in self.layers[:k_layer]:
            hidden = layer(hidden, attention_mask=full_mask, position_embeddings=position_embeddings,
                           position_ids=position_ids, **kwargs)

        key_keep = self._training_keep_mask(hidden, image_token_mask, tokens_per_image, answer_mask, gumbel_tau, record)
        if keep_override is not None:
            key_keep = keep_override.to(key_keep.dtype)
        elif self.training and self.sparsity.mask_gradient == "balanced":
            groups = [image_token_mask, answer_mask if self.text_predictor is not None else None]
            scale = mask_gradient_scale * self.sparsity.budget_weight  # the budget's size at a gap of 1/2
            key_keep = balance_mask_gradient(key_keep, groups, scale)
        allowed = allowed_keys(attention_mask, batch, seq, hidden.device)
        for layer in self.layers[k_layer:]:
            if layer.gradient_checkpointing and self.training:  # recompute as the model was configured to
                hidden = layer._gradient_checkpointing_func(
                    partial(masked_layer_forward, layer), hidden, position_embeddings, allowed, key_keep
                )
            else:
                hidden = masked_layer_forward(layer, hidden, position_embeddings, allowed, key_keep)
        return self.norm(hidden)

    def _training_keep_mask(self, hidden, image_token_mask, tokens_per_image, answer_mask, tau, record):
        """[B, N] float keep mask (1 for tokens never dropped); fills the record's keep means for the budget loss."""
        batch, seq, width = hidden.shape
        key_keep = torch.ones(batch, seq, dtype=torch.float32, device=hidden.device)
        if image_token_mask is not None and self.image_predictor is not None and bool(image_token_mask.any()):
            flat = image_token_mask.reshape(-1)
            images = int(flat.sum()) // tokens_per_image
            logits = self.image_predictor(hidden.reshape(-1, width)[flat].view(images, tokens_per_image, width))
            if self.training:
                keep = sample_keep(logits, tau)
            else:
                n_keep = max(1, math.floor(self.sparsity.image_keep_rate * tokens_per_image + 1e-6))
                top = keep_log_prob(logits).topk(n_keep, dim=1).indices
                keep = torch.zeros(images, tokens_per_image, device=hidden.device).scatter_(1, top, 1.0)
            key_keep = key_keep.masked_scatter(image_token_mask, keep.reshape(-1))
            counts = image_token_mask.sum(dim=1)
            record.image_tokens = counts
            record.image_keep_mean = (key_keep * image_token_mask).sum(dim=1) / counts.clamp(min=1)
        if answer_mask is not None and self.text_predictor is not None and bool(answer_mask.any()):
            logits = self.text_predictor(hidden[answer_mask])
            keep = sample_keep(logits, tau) if self.training else (logits[..., KEEP] > logits[..., 1 - KEEP]).float()
            key_keep = key_keep.masked_scatter(answer_mask, keep)
            counts = answer_mask.sum(dim=1)
            record.text_tokens = counts
            record.text_keep_mean = (key_keep * answer_mask).sum(dim=1) / counts.clamp(min=1)
        return key_keep

    def _select_image_tokens(self, hidden, image_token_mask, tokens_per_image, position_ids, policy, context, record):
        """[B, N] bool: False for image tokens dropped by the policy (each image keeps its top share)."""
        batch, seq, width = hidden.shape
        keep = torch.ones(batch, seq, dtype=torch.bool, device=hidden.device)
        record.image_tokens = image_token_mask.sum(dim=1)
        record.image_kept = record.image_tokens.clone()
        rate = policy.image_keep_rate if policy.image_keep_rate is not None else self.sparsity.image_keep_rate
        if rate >= 1.0 or not bool(image_token_mask.any()):
            return keep
        flat = image_token_mask.reshape(-1)
        images = int(flat.sum()) // tokens_per_image
        img_hidden = hidden.reshape(-1, width)[flat].view(images, tokens_per_image, width)
        img_pos = position_ids.reshape(-1)[flat].view(images, tokens_per_image)
        scores = policy.image_scores(self, img_hidden, img_pos, context)
        if scores is None:
            return keep
        n_keep = max(1, math.floor(rate * tokens_per_image + 1e-6))
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(n_keep, dim=1).indices, True)
        keep.view(-1)[flat] = chosen.view(-1)
        record.image_kept = (keep & image_token_mask).sum(dim=1)
        return keep

    def _text_start(self, seq, past, output_text_start, cache) -> int | None:
        """Index in this input where generated text begins (generated tokens are a suffix); None: none."""
        if output_text_start is not None:
            start = max(output_text_start - past, 0)
            return start if start < seq else None
        if cache is not None and past > 0 and seq == 1:
            return 0  # a manual decode step with cache
        return None

    def _select_text_tokens(self, hidden, text_start, recomputing, position_ids, policy, record):
        """[B, N] bool: False for generated tokens the policy drops as they enter.

        Recomputing without cache, the newest token is never judged (always kept)."""
        batch, seq, width = hidden.shape
        keep = torch.ones(batch, seq, dtype=torch.bool, device=hidden.device)
        judged = slice(text_start, seq - 1 if recomputing else seq)
        n_judged = judged.stop - judged.start
        if n_judged <= 0:
            return keep
        record.text_tokens = torch.full((batch,), n_judged, device=hidden.device)
        decision = policy.text_keep(self, hidden[:, judged].reshape(-1, width), position_ids[:, judged].reshape(-1))
        record.text_decided = decision is not None
        if decision is not None:
            keep[:, judged] = decision.view(batch, n_judged)
        record.text_kept = keep[:, judged].sum(dim=1)
        return keep

    def _evict_text(self, policy, cache, columns, text_columns, record):
        """Let the policy evict earlier generated tokens; return the [B, Q, T + Q] key visibility for
        layers >= K, or None when every key left is visible to every query (one new token with a cache).

        With a cache, stored tokens the first new query may no longer see are removed from it (the
        policy is monotone: later queries cannot see them either). Without one, no token is removed:
        each query is denied the generated keys evicted before it, which is what it saw with a cache.
        """
        keys = text_columns
        stored = cache.stored_text_columns() if cache is not None else None
        if stored is not None:
            drop = self._evicted(policy, columns[:, :1] - stored, stored, cache.stored_attention())
            record.text_evicted = cache.evict(drop)
            if columns.shape[1] == 1:
                return None
            keys = torch.cat([cache.stored_text_columns(), text_columns], dim=1)
        if "flash" in self.config._attn_implementation:
            raise ValueError(
                f"{type(policy).__name__} without a cache needs a per-query key mask, which "
                f"{self.config._attn_implementation} cannot take: use sdpa or eager attention, or use_cache=True."
            )
        ages = columns.unsqueeze(2) - keys.unsqueeze(1)
        hidden_keys = self._evicted(policy, ages, keys.unsqueeze(1).expand_as(ages), None)
        if cache is None:
            record.text_evicted = hidden_keys[:, -1].sum(dim=1)  # as seen by the newest token
        return ~hidden_keys

    def _attention_received(self, cache, hidden, position_embeddings, valid, visible):
        """Attention the new tokens pay in layer K (mean over heads), for policies that rank by it (H2O).

        Only the new tokens' rows are computed, over the stored layer-K keys and their own; the part
        the stored tokens receive is added to the cache, the new tokens' own part is returned ([B, Q]).
        """
        k_layer = self.sparsity.sparse_layer
        layer, stored = self.layers[k_layer], cache.layers[k_layer]
        new_keys = layer_keys(layer, hidden, position_embeddings)
        past_valid = cache.sparse_valid_mask()
        keys = torch.cat([stored.keys, new_keys], dim=2) if stored.is_initialized else new_keys
        mask_2d = valid if past_valid is None or not stored.is_initialized else torch.cat([past_valid, valid], dim=1)
        queries, n_stored = hidden.shape[1], keys.shape[2] - hidden.shape[1]
        causal = torch.ones(queries, n_stored + queries, dtype=torch.bool, device=hidden.device).tril(n_stored)
        allowed = (causal & mask_2d.unsqueeze(1)) | ~valid.unsqueeze(2)  # filler rows: anything, then zeroed
        if visible is not None:
            allowed &= visible
        received = (query_attention(layer, hidden, position_embeddings, keys, allowed) * valid.unsqueeze(2)).sum(dim=1)
        if n_stored:
            cache.add_attention(received[:, :n_stored])
        return received[:, n_stored:]

    def _evicted(self, policy, ages, key_text_columns, attention):
        """bool like `ages`: generated keys the policy evicts (never a token for itself or a later one)."""
        generated = key_text_columns >= 0
        drop = policy.text_evict(self, TextSlots(ages=ages, generated=generated, attention=attention))
        if drop is None:
            return torch.zeros_like(generated)
        return drop & generated & (ages > 0)


def _only_where(values: torch.Tensor | None, counts: torch.Tensor | None) -> torch.Tensor | None:
    """A detached copy of per-sample `values` with NaN where the sample had no such tokens."""
    if values is None:
        return None
    return torch.where(counts > 0, values.detach(), torch.full_like(values, float("nan")))


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], index [B, N'] -> [B, N', D]."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _visibility_function(visible: torch.Tensor, q_offset: int):
    """A transformers mask function reading `visible` [B, Q, keys] (queries start at key column `q_offset`)."""

    def mask(batch_idx, head_idx, q_idx, kv_idx):
        return visible[batch_idx, q_idx - q_offset, kv_idx]

    return mask


class DynamicLlavaModel(LlavaModel):
    """`LlavaModel` whose language model is a `DynamicLlamaModel` (weights and names unchanged)."""

    config_class = DynamicLlavaConfig

    def __init__(self, config: DynamicLlavaConfig):
        LlavaPreTrainedModel.__init__(self, config)
        text_type = config.text_config.model_type
        if text_type not in SUPPORTED_TEXT_MODELS:
            raise ValueError(
                f"Dynamic-LLaVA supports LLaVA checkpoints with a {SUPPORTED_TEXT_MODELS} language model; "
                f"this one has '{text_type}'."
            )
        config.check_sparsity()
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = DynamicLlamaModel(config.text_config, config)
        self._image_token_mask = None
        self.post_init()

    def forward(self, *args, image_token_mask: torch.Tensor | None = None, **kwargs):
        """`LlavaModel.forward`; image features go to `image_token_mask` (the prompt's image tokens) only."""
        self._image_token_mask = image_token_mask
        try:
            return super().forward(*args, image_token_mask=image_token_mask, **kwargs)
        finally:
            self._image_token_mask = None

    def get_placeholder_mask(self, input_ids, inputs_embeds, image_features):
        """Where image features go: the prompt's image tokens; generated tokens with the image id stay text."""
        mask = self._image_token_mask
        if mask is None or mask.shape != inputs_embeds.shape[:2]:
            return super().get_placeholder_mask(input_ids, inputs_embeds, image_features)
        return mask.unsqueeze(-1).expand_as(inputs_embeds).to(inputs_embeds.device)


class DynamicLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """LLaVA with Dynamic-LLaVA vision-language context sparsification.

    Loads any llava-hf (LLaVA-1.5 layout) checkpoint with `from_pretrained`; a checkpoint without
    predictors gets fresh ones. Use it like `LlavaForConditionalGeneration`: `forward`, `generate`
    (with or without cache, batched). Extra arguments: `sparsity_stats` (a `SparsityStats` to fill)
    and `sparsity_policy` (a `TokenPolicy` from `dynamic_llava.policies`: `LearnedPolicy`, the default,
    `RandomPolicy`, `FastVPolicy`, `StreamingLLMPolicy`, `H2OPolicy`).
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

    @property
    def image_predictor(self) -> ImagePredictor | None:
        return self.model.language_model.image_predictor

    @property
    def text_predictor(self) -> TextPredictor | None:
        return self.model.language_model.text_predictor

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
        hidden = outputs.last_hidden_state
        slice_indices = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, slice_indices, :])
        if sparsity_stats is not None:
            sparsity_stats.update(record, outputs.past_key_values, accumulate_text=outputs.past_key_values is not None)
        out = DynamicLlavaOutput(
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            kept_index=record.kept_index,
            kept_valid=record.kept_valid,
        )
        return out

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
        logits = self.lm_head(outputs.last_hidden_state)
        lm_loss = self.loss_function(
            logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size,
            num_items_in_batch=num_items_in_batch,
        )
        budget = budget_loss(record, self.config.image_keep_rate, self.config.text_keep_rate)
        return DynamicLlavaOutput(
            loss=lm_loss + self.config.budget_weight * budget,
            logits=logits,
            lm_loss=lm_loss,
            budget_loss=budget,
            image_keep_ratio=_only_where(record.image_keep_mean, record.image_tokens),
            text_keep_ratio=_only_where(record.text_keep_mean, record.text_tokens),
        )

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
        if kwargs.get("assistant_model") is not None or kwargs.get("prompt_lookup_num_tokens") is not None:
            raise NotImplementedError("Assisted/speculative decoding is not supported by Dynamic-LLaVA (its cache cannot be cropped).")
        return GenerationMixin.generate(self, inputs, generation_config, **kwargs)

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


__all__ = [
    "DynamicLlamaModel",
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
