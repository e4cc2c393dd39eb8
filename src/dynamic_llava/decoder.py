"""The sparse decoder loop, shared by every decoder family: layers < K see the whole sequence, layers >= K
only the tokens a policy keeps.

At layer K a policy (`policies/`; by default the learned predictors) decides which tokens the deeper layers
keep:

* image tokens: each image keeps its top ``floor(image_keep_rate * tokens)`` by the policy's score
  (`ImageLayout`: images may differ in size);
* generated tokens: kept or dropped one by one as they enter (output-text predictor), and, for
  eviction policies (StreamingLLM-style windows), earlier generated tokens leave the context later.

Kept tokens are gathered (hidden states, positions, rotary cos/sin, padding mask) into a shorter sequence;
samples that keep fewer tokens get masked filler slots on the left, exactly like left padding, so a batch
is computed as its samples would be one by one. With a cache, layers >= K store only kept K/V
(`DynamicLlavaCache`); without one, each step recomputes the sequence and drops what the policy drops. The
newest token is always computed, so its logits are always returned. Evicted generated tokens leave the
cache; without a cache they stay in the recomputed sequence but are hidden from every query after their
eviction (their own, earlier, outputs shaped the tokens that came after them, exactly as the cached K/V
did), so both modes give the same tokens.

A family plugs in through two position hooks (`SparseDecoder._positions`, `_mask_positions`): Llama's
positions are one row per sample, Qwen2-VL's multimodal RoPE three; the rotary cos/sin each family computes
from them are gathered by kept index like any other per-token tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import LlamaModel
from transformers.models.mistral.modeling_mistral import MistralModel
from transformers.models.qwen2.modeling_qwen2 import Qwen2Model
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .attention import allowed_keys, masked_layer_forward
from .cache import DynamicLlavaCache
from .control import BUDGET, MARGIN, RATE, check_control
from .losses import balance_mask_gradient
from .policies import LearnedPolicy, PolicyContext, TextSlots, TokenPolicy, attention_probe, learned_image_scores
from .predictors import KEEP, ImagePredictor, TextPredictor, keep_log_prob, sample_keep, sample_top_share
from .stats import ForwardRecord

_DEFAULT_POLICY = LearnedPolicy()


@dataclass
class ImageLayout:
    """Where each image's tokens sit in a batch, for per-image selection when images differ in size.

    counts : tokens of each image, in the order of the image tokens ([images]).
    index : [images, T] flat positions into the [B * N] tokens (T: the largest image; padding repeats a position).
    valid : [images, T] bool, False for padding (None when every image has T tokens).
    """

    counts: list[int]
    index: torch.Tensor
    valid: torch.Tensor | None
    seq: int = 0  # N, the tokens per sample of the mask it was built from

    @classmethod
    def from_mask(cls, image_token_mask: torch.Tensor, tokens_per_image) -> "ImageLayout":
        """From the [B, N] image-token mask and the tokens per image (one int for all, or one per image)."""
        flat = image_token_mask.reshape(-1).nonzero().squeeze(1)
        if isinstance(tokens_per_image, int):
            counts = [tokens_per_image] * (flat.numel() // tokens_per_image)
        else:
            counts = [int(c) for c in tokens_per_image]
        if sum(counts) != flat.numel():
            raise ValueError(f"The prompt has {flat.numel()} image tokens but its images need {sum(counts)}.")
        width, seq = max(counts), image_token_mask.shape[1]
        if all(c == width for c in counts):
            return cls(counts, flat.view(len(counts), width), None, seq)
        columns = torch.arange(width, device=flat.device)
        valid = columns < torch.tensor(counts, device=flat.device).unsqueeze(1)
        starts = torch.tensor([0, *counts[:-1]], device=flat.device).cumsum(0).unsqueeze(1)
        return cls(counts, flat[torch.where(valid, starts + columns, starts)], valid, seq)  # padding: the first token

    def samples(self) -> list[int]:
        """The sample each image belongs to (one host sync)."""
        return (self.index[:, 0] // self.seq).tolist()

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, ...] -> [images, T, ...] (padding entries repeat a token of the same image)."""
        return x.reshape(-1, *x.shape[2:])[self.index]

    def scatter(self, target: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """A copy of `target` [B, N] with each image token set from `values` [images, T]."""
        out = target.clone()
        flat = out.view(-1)
        if self.valid is None:
            flat[self.index.reshape(-1)] = values.reshape(-1).to(out.dtype)
        else:
            flat[self.index[self.valid]] = values[self.valid].to(out.dtype)
        return out

    def keep_counts(self, rate) -> list[int]:
        """How many tokens each image keeps: ``max(1, floor(rate * its tokens))`` (`rate`: one float or one per image)."""
        rates = rate if isinstance(rate, (list, tuple)) else [rate] * len(self.counts)
        return [max(1, math.floor(r * c + 1e-6)) for r, c in zip(rates, self.counts)]

    def top_share(self, scores: torch.Tensor, rate) -> torch.Tensor:
        """[images, T] bool: each image's top ``max(1, floor(rate * its tokens))`` by `scores` (higher first);
        `rate` is one float for every image or a list with one per image."""
        if self.valid is None and not isinstance(rate, (list, tuple)):
            n_keep = self.keep_counts(rate)[0]
            return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(n_keep, dim=1).indices, True)
        k = torch.tensor(self.keep_counts(rate), device=scores.device)
        ranked = scores.float() if self.valid is None else scores.float().masked_fill(~self.valid, float("-inf"))
        order = ranked.argsort(dim=1, descending=True, stable=True)
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                                 .expand_as(order).contiguous())
        chosen = ranks < k.unsqueeze(1)
        return chosen if self.valid is None else chosen & self.valid


@dataclass
class DeepStack:
    """Qwen3-VL's DeepStack: visual features added to the image tokens' hidden states after each of the first
    layers. In layers >= K only the kept image tokens get theirs (their rows, gathered by kept index)."""

    positions: torch.Tensor  # [B, N] bool, the tokens that receive features (this input's image tokens)
    rows: torch.Tensor  # [B, N] long, each such token's row in the feature tensors
    features: list[torch.Tensor]  # per layer, [visual tokens, H]

    def __post_init__(self):
        # where the features go, found once (not in every layer): flat token index and feature row of each
        self._targets = self.positions.reshape(-1).nonzero().squeeze(1)
        self._sources = self.rows.reshape(-1)[self._targets]

    @classmethod
    def take(cls, kwargs: dict) -> "DeepStack | None":
        """Pop Qwen3-VL's ``visual_pos_masks`` / ``deepstack_visual_embeds`` from a forward's kwargs (None if absent)."""
        positions, features = kwargs.pop("visual_pos_masks", None), kwargs.pop("deepstack_visual_embeds", None)
        if positions is None or not features:
            return None
        rows = (positions.reshape(-1).long().cumsum(0) - 1).clamp(min=0).view_as(positions)
        return cls(positions.bool(), rows, list(features))

    def add(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        if layer >= len(self.features):
            return hidden
        features = self.features[layer][self._sources].to(hidden.dtype)
        return hidden.reshape(-1, hidden.shape[-1]).index_add(0, self._targets, features).view_as(hidden)

    def gathered(self, index: torch.Tensor | None, slot_valid: torch.Tensor | None) -> "DeepStack":
        """The same for the kept tokens' slots (filler slots get nothing)."""
        if index is None:
            return self
        return DeepStack(self.positions.gather(1, index) & slot_valid, self.rows.gather(1, index), self.features)


def refuse_sliding_window(config) -> None:
    """Sliding-window layers need a mask the sparse loop does not build: refuse them clearly."""
    sliding = "sliding_attention" in (getattr(config, "layer_types", None) or [])
    if sliding or (config.model_type == "mistral" and getattr(config, "sliding_window", None) is not None):
        raise ValueError("Sliding-window attention is not supported by Dynamic-LLaVA: use a checkpoint without it "
                         "(sliding_window unset, use_sliding_window false).")


class SparseDecoder:
    """The sparse loop, mixed into a family's text model (`LlamaModel`, `Qwen2VLTextModel`): same weights, same
    names, plus the two predictors. The family supplies `_positions` and `_mask_positions`."""

    def __init__(self, config, sparsity):
        refuse_sliding_window(config)
        super().__init__(config)  # the family's stock text model
        self.sparsity = sparsity  # the full model config: read at every call, so edits take effect
        hidden = config.hidden_size
        self.image_predictor = (
            ImagePredictor(hidden, sparsity.predictor_dim, sparsity.predictor_heads, sparsity.predictor_mlp_dim,
                           sparsity.predictor_blocks, sparsity.predictor_head_dims)
            if sparsity.use_image_predictor
            else None
        )
        self.text_predictor = (
            TextPredictor(hidden, sparsity.text_predictor_dims) if sparsity.use_text_predictor else None
        )

    def _positions(self, position_ids, attention_mask, past, batch, seq, device):
        """(positions for the rotary embedding, [B, N] sequence positions for masks, policies and gathering)."""
        raise NotImplementedError

    def _mask_positions(self, positions):
        """The position ids handed to masks and layers (a family whose layers do not read them returns None)."""
        return positions

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
        sparsity_control: torch.Tensor | None = None,
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
        deepstack = DeepStack.take(kwargs)  # Qwen3-VL's visual features added after the first layers
        if masked_training:
            hidden = self._masked_forward(
                inputs_embeds, attention_mask, position_ids, image_token_mask, tokens_per_image, answer_mask,
                gumbel_tau, keep_override, record, mask_gradient_scale, deepstack=deepstack, **kwargs,
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
        if sparsity_control is not None:
            check_control(sparsity_control, batch)
        budgets = self._budgets(sparsity_control, cache, past)  # [B] sparse-layer token budgets, or None
        thresholds = self._text_thresholds(sparsity_control, cache, past)  # per-sample text gate, or None
        rope_positions, position_ids = self._positions(position_ids, attention_mask, past, batch, seq,
                                                       inputs_embeds.device)
        mask_positions = self._mask_positions(position_ids)
        full_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=cache,
            position_ids=mask_positions,
            layer_idx=0,
        )
        hidden = inputs_embeds
        cos, sin = self.rotary_emb(hidden, rope_positions)
        layer_kwargs = dict(past_key_values=cache, use_cache=use_cache, **kwargs)
        for i, layer in enumerate(self.layers[:k_layer]):
            if i == k_layer - 1:
                hidden_before = hidden  # entering layer K-1: attention-based policies (FastV) read it
            hidden = layer(
                hidden, attention_mask=full_mask, position_embeddings=(cos, sin), position_ids=mask_positions,
                **layer_kwargs
            )
            if deepstack is not None:
                hidden = deepstack.add(i, hidden)

        # ---- layer K: decide who stays ----
        valid = (
            attention_mask[:, -seq:].bool()
            if attention_mask is not None
            else torch.ones(batch, seq, dtype=torch.bool, device=hidden.device)
        )
        text_start = self._text_start(seq, past, output_text_start, cache)  # generated text: input[text_start:]
        store = valid.clone()  # tokens the deeper layers keep (and cache)
        # under a KV budget: each token's learned keep log-probability (+inf: prompt text, never dropped)
        scores = None if budgets is None else torch.full((batch, seq), float("inf"), device=hidden.device)
        if image_token_mask is not None:
            prompt_end = max((seq if text_start is None else text_start) - 1, 0)
            context = PolicyContext(hidden_before, (cos, sin), valid, image_token_mask, prompt_end, past,
                                    inputs_embeds=inputs_embeds, hidden=hidden)
            store &= self._select_image_tokens(
                hidden, image_token_mask, tokens_per_image, position_ids, policy, context, record, sparsity_control,
                scores,
            )
        if text_start is not None:
            store &= self._select_text_tokens(hidden, text_start, cache is None, position_ids, policy, record,
                                              thresholds, scores)
        if budgets is not None and seq > 1:
            if past > 0:
                raise ValueError("A KV budget is met while decoding one token per step; several new tokens after a "
                                 "cached prefix are not supported with one (start a new cache, or drop the budget).")
            store = _fit_budget(store, scores, budgets)
            if image_token_mask is not None:
                record.image_kept = (store & image_token_mask).sum(dim=1)
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
            pos_s = position_ids.gather(1, index)  # sequence positions; RoPE's are already in cos_s / sin_s
            valid_s = valid.gather(1, index) & slot_valid
            store_s = store.gather(1, index) & slot_valid
            columns_s, text_columns_s = columns.gather(1, index), text_columns.gather(1, index)
        record.kept_index, record.kept_valid = index, slot_valid
        if deepstack is not None:
            deepstack = deepstack.gathered(index, slot_valid)

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
            may_drop = seq_s > 1 or record.text_decided or budgets is not None
            scores_s = scores if scores is None or index is None else scores.gather(1, index)
            mask_2d = cache.plan_step(store_s, valid_s, text_columns_s, received, may_drop=may_drop, scores=scores_s)
        mask_positions = self._mask_positions(pos_s)
        if seq_s == 1 and full_mask is None and visible is None and cache is not None and cache.table.complete:
            # one new token, no padding anywhere (the full mask was skipped) and every token ever seen stored:
            # the sparse layers see every slot, as the full layers do, so they need no mask either
            sparse_mask = None
        else:
            sparse_mask = create_causal_mask(
                config=self.config,
                inputs_embeds=hidden_s,
                attention_mask=mask_2d,
                past_key_values=cache,
                position_ids=mask_positions,
                layer_idx=k_layer,
                and_mask_function=None if visible is None else _visibility_function(visible, mask_2d.shape[1] - seq_s),
                allow_is_causal_skip=seq_s > 1,  # decoding: the slot mask always matters, and checking it would sync
            )
        for i, layer in enumerate(self.layers[k_layer:], start=k_layer):
            hidden_s = layer(
                hidden_s, attention_mask=sparse_mask, position_embeddings=(cos_s, sin_s), position_ids=mask_positions,
                **layer_kwargs
            )
            if deepstack is not None:
                hidden_s = deepstack.add(i, hidden_s)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_s), past_key_values=cache)

    def _masked_forward(
        self, inputs_embeds, attention_mask, position_ids, image_token_mask, tokens_per_image, answer_mask,
        gumbel_tau, keep_override, record, mask_gradient_scale=1.0, deepstack=None, **kwargs,
    ) -> torch.Tensor:
        """Training path: the full sequence in every layer; in layers >= K dropped tokens are masked as keys.

        Keep masks come from the predictors: hard Gumbel-Softmax samples (straight-through) in train
        mode, the inference decisions (top share per image, keep > drop) in eval mode, or
        `keep_override` ([B, N], 1 = keep) when given. Under `mask_gradient="balanced"` the LM loss's gradient
        on the masks is balanced against the budget term (`losses.balance_mask_gradient`, weighed by
        `mask_gradient_scale`). Returns the final normed hidden states.
        """
        batch, seq = inputs_embeds.shape[:2]
        if position_ids is None and attention_mask is not None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        rope_positions, position_ids = self._positions(position_ids, attention_mask, 0, batch, seq,
                                                       inputs_embeds.device)
        mask_positions = self._mask_positions(position_ids)
        full_mask = create_causal_mask(
            config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
            past_key_values=None, position_ids=mask_positions,
        )
        hidden = inputs_embeds
        position_embeddings = self.rotary_emb(hidden, rope_positions)
        k_layer = self.sparsity.sparse_layer
        for i, layer in enumerate(self.layers[:k_layer]):
            hidden = layer(hidden, attention_mask=full_mask, position_embeddings=position_embeddings,
                           position_ids=mask_positions, **kwargs)
            if deepstack is not None:
                hidden = deepstack.add(i, hidden)

        key_keep = self._training_keep_mask(hidden, image_token_mask, tokens_per_image, answer_mask, gumbel_tau, record)
        if keep_override is not None:
            key_keep = keep_override.to(key_keep.dtype)
        elif self.training and self.sparsity.mask_gradient == "balanced":
            groups = [image_token_mask, answer_mask if self.text_predictor is not None else None]
            scale = mask_gradient_scale * self.sparsity.budget_weight  # the budget's size at a gap of 1/2
            key_keep = balance_mask_gradient(key_keep, groups, scale)
        allowed = allowed_keys(attention_mask, batch, seq, hidden.device)
        for i, layer in enumerate(self.layers[k_layer:], start=k_layer):
            if layer.gradient_checkpointing and self.training:  # recompute as the model was configured to
                hidden = layer._gradient_checkpointing_func(
                    partial(masked_layer_forward, layer), hidden, position_embeddings, allowed, key_keep
                )
            else:
                hidden = masked_layer_forward(layer, hidden, position_embeddings, allowed, key_keep)
            if deepstack is not None:
                hidden = deepstack.add(i, hidden)
        return self.norm(hidden)

    def _training_keep_mask(self, hidden, image_token_mask, tokens_per_image, answer_mask, tau, record):
        """[B, N] float keep mask (1 for tokens never dropped); fills the record's keep means for the budget loss."""
        batch, seq, width = hidden.shape
        key_keep = torch.ones(batch, seq, dtype=torch.float32, device=hidden.device)
        if image_token_mask is not None and self.image_predictor is not None and bool(image_token_mask.any()):
            layout = ImageLayout.from_mask(image_token_mask, tokens_per_image)
            features = layout.gather(hidden)
            logits = self.image_predictor(features, layout.valid)
            rate = self.sparsity.image_keep_rate
            k = max(layout.keep_counts(rate))

            def choose(log_prob):  # what inference keeps, from these keep log-probabilities
                return layout.top_share(learned_image_scores(self.sparsity, log_prob, features.detach(), layout.valid, k),
                                        rate)

            if self.training and self.sparsity.image_mask_sampling == "top_share":
                keep = sample_top_share(logits, tau, choose)
            elif self.training:
                keep = sample_keep(logits, tau)
            else:
                keep = choose(keep_log_prob(logits)).float()
            key_keep = layout.scatter(key_keep, keep)
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

    def _select_image_tokens(self, hidden, image_token_mask, tokens_per_image, position_ids, policy, context, record,
                             control=None, scores=None):
        """[B, N] bool: False for image tokens dropped by the policy (each image keeps its top share, at its
        sample's rate under per-request `control`). Under a KV budget, `scores` ([B, N]) gets the image tokens'
        learned keep log-probabilities."""
        batch, seq, width = hidden.shape
        keep = torch.ones(batch, seq, dtype=torch.bool, device=hidden.device)
        record.image_tokens = image_token_mask.sum(dim=1)
        record.image_kept = record.image_tokens.clone()
        if control is not None:
            rates = control[:, RATE].tolist()  # at prefill only
            dense = all(r >= 1.0 for r in rates)
        else:
            rate = policy.image_keep_rate if policy.image_keep_rate is not None else self.sparsity.image_keep_rate
            dense = rate >= 1.0
        if (dense and scores is None) or not bool(image_token_mask.any()):
            return keep
        layout = ImageLayout.from_mask(image_token_mask, tokens_per_image)
        context.image_layout = layout
        share = ([rates[s] for s in layout.samples()] if control is not None else rate) if not dense else None
        context.image_keep_counts = None if dense else layout.keep_counts(share)
        policy_scores = None if dense else policy.image_scores(self, layout.gather(hidden), layout.gather(position_ids),
                                                                context)
        if scores is not None:
            if isinstance(policy, LearnedPolicy) and policy_scores is not None and self.sparsity.image_selection == "top":
                learned = policy_scores
            elif self.image_predictor is not None:
                learned = keep_log_prob(self.image_predictor(layout.gather(hidden), layout.valid))
            else:
                learned = torch.zeros(layout.index.shape, device=hidden.device)
            scores.copy_(layout.scatter(scores, learned))
        if policy_scores is None:
            return keep
        keep = layout.scatter(keep, layout.top_share(policy_scores, share))
        record.image_kept = (keep & image_token_mask).sum(dim=1)
        return keep

    def _text_thresholds(self, control, cache, past):
        """The per-sample text thresholds of `control` ([B] margins), or -inf (a float) when every sample keeps
        every generated token: the learned gate then does not run at all, and a decode step needs no host sync
        for it. Decided at prefill (one look at the control) and kept in the cache for the decode steps."""
        if control is None:
            return None
        if cache is not None and past > 0:
            open_gate = cache.table.text_open
        else:
            open_gate = bool(torch.isneginf(control[:, MARGIN]).all())
            if cache is not None:
                cache.table.text_open = open_gate
        return float("-inf") if open_gate else control[:, MARGIN]

    def _budgets(self, control, cache, past) -> torch.Tensor | None:
        """[B] sparse-layer token budgets for this step, or None: read from the control at prefill (kept in the
        cache's slot table for the decode steps, which then need no look at the control)."""
        if cache is not None and past > 0:
            if cache.table.budget is not None and control is not None and control.shape[0] != cache.table.budget.shape[0]:
                raise ValueError("sparsity_control does not match the cache's batch.")
            return cache.table.budget
        budgeted = control is not None and bool(torch.isfinite(control[:, BUDGET]).any())  # at prefill only
        if cache is not None:
            cache.table.budget = None
        if not budgeted:
            return None
        if cache is None:
            raise ValueError("A KV budget needs a KV cache: generate with use_cache=True (without a cache nothing is "
                             "stored; lower text_keep_threshold or image_keep_rate instead).")
        cache.table.budget = control[:, BUDGET].clone()
        return cache.table.budget

    def _text_start(self, seq, past, output_text_start, cache) -> int | None:
        """Index in this input where generated text begins (generated tokens are a suffix); None: none."""
        if output_text_start is not None:
            start = max(output_text_start - past, 0)
            return start if start < seq else None
        if cache is not None and past > 0 and seq == 1:
            return 0  # a manual decode step with cache
        return None

    def _select_text_tokens(self, hidden, text_start, recomputing, position_ids, policy, record, thresholds=None,
                            scores=None):
        """[B, N] bool: False for generated tokens the policy drops as they enter (at each sample's threshold
        under per-request settings: `thresholds` [B], or -inf for all). Under a KV budget, `scores` gets their
        learned keep log-probabilities.

        Recomputing without cache, the newest token is never judged (always kept)."""
        batch, seq, width = hidden.shape
        keep = torch.ones(batch, seq, dtype=torch.bool, device=hidden.device)
        judged = slice(text_start, seq - 1 if recomputing else seq)
        n_judged = judged.stop - judged.start
        if n_judged <= 0:
            return keep
        record.text_tokens = torch.full((batch,), n_judged, device=hidden.device)
        rows, row_positions = hidden[:, judged].reshape(-1, width), position_ids[:, judged].reshape(-1)
        if thresholds is None:
            decision = policy.text_keep(self, rows, row_positions)
        else:
            threshold = thresholds if isinstance(thresholds, float) else thresholds.repeat_interleave(n_judged)
            decision = policy.text_keep(self, rows, row_positions, threshold=threshold)
        if scores is not None and self.text_predictor is not None:
            learned = keep_log_prob(self.text_predictor(rows)).view(batch, n_judged)
            scores[:, judged] = learned.to(scores.dtype)
        elif scores is not None:
            scores[:, judged] = 0.0
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
        past_keys = stored.keys if stored.is_initialized else None
        past_valid = cache.sparse_valid_mask()
        n_stored = 0 if past_keys is None else past_keys.shape[2]
        mask_2d = valid if past_valid is None or past_keys is None else torch.cat([past_valid, valid], dim=1)
        queries = hidden.shape[1]
        causal = torch.ones(queries, n_stored + queries, dtype=torch.bool, device=hidden.device).tril(n_stored)
        allowed = (causal & mask_2d.unsqueeze(1)) | ~valid.unsqueeze(2)  # filler rows: anything, then zeroed
        if visible is not None:
            allowed &= visible
        _, probs = attention_probe(layer, hidden, position_embeddings, allowed=allowed, past_keys=past_keys)
        received = (probs * valid.unsqueeze(2)).sum(dim=1)
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



def _fit_budget(store: torch.Tensor, scores: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
    """`store` [B, N] with each sample's lowest-scored stored tokens dropped until it holds at most its budget
    (tokens scored +inf, prompt text, always stay)."""
    over = store.sum(dim=1).to(budgets.dtype) - budgets
    ranked = scores.masked_fill(~store, float("inf"))
    order = ranked.argsort(dim=1, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                             .expand_as(order).contiguous())
    return store & ~((ranks < over.unsqueeze(1)) & torch.isfinite(scores))


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], index [B, N'] -> [B, N', D]."""
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def _visibility_function(visible: torch.Tensor, q_offset: int):
    """A transformers mask function reading `visible` [B, Q, keys] (queries start at key column `q_offset`)."""

    def mask(batch_idx, head_idx, q_idx, kv_idx):
        return visible[batch_idx, q_idx - q_offset, kv_idx]

    return mask



class SequencePositions:
    """One position per token (Llama, Mistral): RoPE and everything else read the same [B, N] positions."""

    def _positions(self, position_ids, attention_mask, past, batch, seq, device):
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=device).unsqueeze(0)
        position_ids = position_ids.expand(batch, -1)
        return position_ids, position_ids


class DynamicLlamaModel(SequencePositions, SparseDecoder, LlamaModel):
    """A `LlamaModel` (same weights, same names) whose layers >= K see only the tokens a policy keeps."""


class DynamicMistralModel(SequencePositions, SparseDecoder, MistralModel):
    """A `MistralModel` (same weights, same names) whose layers >= K see only the tokens a policy keeps."""


class DynamicQwen2Model(SequencePositions, SparseDecoder, Qwen2Model):
    """A `Qwen2Model` (LLaVA-OneVision's decoder; same weights, same names) whose layers >= K see only the tokens
    a policy keeps."""


TEXT_MODELS = {"llama": DynamicLlamaModel, "mistral": DynamicMistralModel, "qwen2": DynamicQwen2Model}


def sparse_text_model(text_config, sparsity):
    """The sparse text model for a config's decoder family, or a clear error naming the supported ones."""
    model_type = text_config.model_type
    if model_type not in TEXT_MODELS:
        raise ValueError(
            f"Dynamic-LLaVA supports {', '.join(TEXT_MODELS)} language models here; this checkpoint has {model_type!r}."
        )
    return TEXT_MODELS[model_type](text_config, sparsity)


__all__ = ["DeepStack", "DynamicLlamaModel", "DynamicMistralModel", "DynamicQwen2Model", "ImageLayout",
           "SequencePositions", "SparseDecoder", "TEXT_MODELS", "refuse_sliding_window", "sparse_text_model"]
