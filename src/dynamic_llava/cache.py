"""A KV cache whose layers >= K store only the K/V of kept tokens, per sample.

Layers < K are plain `DynamicLayer`s. Each sparse layer keeps one rectangular tensor
``[batch, kv_heads, T, head_dim]`` plus a per-sample fill count ``lengths[b]``: slots
``[0, lengths[b])`` hold sample b's kept tokens in order, later slots are empty. Samples that keep
different numbers of tokens thus stay exact in one batch (the empty slots are masked), and ``T`` is
the largest per-sample count, never the dense length. Keys are stored after RoPE, so their
positions travel with them.

Beside K/V each slot records what eviction policies need: the column of a generated token in the
full sequence (``text_columns``, -1 for prompt tokens) and the attention it has received in layer K
(``attention``, accumulated only for policies that ask). `DynamicLlavaCache.evict` removes slots
later, per sample, by compacting each sample's slots (no loop over tokens).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .validation import check_integer


class SparseLayer(DynamicLayer):
    """Cache layer that appends only the tokens the model loop marked as kept."""

    is_croppable = False

    def __init__(self):
        super().__init__()
        self.lengths: torch.Tensor | None = None  # [B] long: valid slots per sample
        self.text_columns: torch.Tensor | None = None  # [B, T] long: column of a generated token, else -1
        self.attention: torch.Tensor | None = None  # [B, T] float: attention received in layer K so far
        self.pending_store: torch.Tensor | None = None  # [B, q] bool, set by the model before the layer runs
        self.pending_columns: torch.Tensor | None = None  # [B, q] long: text_columns of the new tokens
        self.pending_attention: torch.Tensor | None = None  # [B, q] float: attention the new tokens received
        self.pending_append_all = False  # True when every new token is stored and no sample has a gap

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        shape = (key_states.shape[0], key_states.shape[1], 0, key_states.shape[-1])
        self.keys = key_states.new_zeros(shape)
        self.values = value_states.new_zeros(shape)
        self.lengths = torch.zeros(key_states.shape[0], dtype=torch.long, device=key_states.device)
        self.text_columns = torch.zeros(key_states.shape[0], 0, dtype=torch.long, device=key_states.device)
        self.attention = torch.zeros(key_states.shape[0], 0, dtype=torch.float32, device=key_states.device)

    def valid_mask(self) -> torch.Tensor:
        """[B, T] bool: which stored slots hold a token of their sample."""
        slots = torch.arange(self.get_seq_length(), device=self.lengths.device)
        return slots.unsqueeze(0) < self.lengths.unsqueeze(1)

    def update(self, key_states, value_states, *args, **kwargs):
        """Return (cached + new) K/V for attention, then store the new K/V whose `pending_store` is set."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        store, append_all = self.pending_store, self.pending_append_all
        if store is None:
            raise RuntimeError("SparseLayer.update called without a keep decision; run it through the model loop.")
        self.pending_store = None
        columns, attention = self.pending_columns, self.pending_attention
        self.pending_columns = self.pending_attention = None
        keys = torch.cat([self.keys, key_states], dim=-2)
        values = torch.cat([self.values, value_states], dim=-2)
        if append_all:
            self.keys, self.values = keys, values  # rectangular fast path, as DynamicLayer
            self.text_columns = torch.cat([self.text_columns, columns], dim=1)
            self.attention = torch.cat([self.attention, attention], dim=1)
            self.lengths = self.lengths + key_states.shape[-2]
        else:
            self._scatter(key_states, value_states, columns, attention, store)
        return keys, values

    def _scatter(self, key_states, value_states, columns, attention, store: torch.Tensor) -> None:
        counts = store.sum(dim=1)
        new_lengths = self.lengths + counts
        grow = int(new_lengths.max()) - self.keys.shape[-2]
        if grow > 0:
            self.keys = torch.nn.functional.pad(self.keys, (0, 0, 0, grow))
            self.values = torch.nn.functional.pad(self.values, (0, 0, 0, grow))
            self.text_columns = torch.nn.functional.pad(self.text_columns, (0, grow), value=-1)
            self.attention = torch.nn.functional.pad(self.attention, (0, grow))
        b_idx, q_idx = store.nonzero(as_tuple=True)
        dest = self.lengths[b_idx] + store.long().cumsum(dim=1)[b_idx, q_idx] - 1
        self.keys[b_idx, :, dest] = key_states[b_idx, :, q_idx]
        self.values[b_idx, :, dest] = value_states[b_idx, :, q_idx]
        self.text_columns[b_idx, dest] = columns[b_idx, q_idx]
        self.attention[b_idx, dest] = attention[b_idx, q_idx]
        self.lengths = new_lengths

    def keep_slots(self, order: torch.Tensor, lengths: torch.Tensor) -> None:
        """Compact: slot j of sample b becomes its old slot ``order[b, j]`` ([B, T'] long); `lengths` [B] stay valid."""
        index = order[:, None, :, None].expand(-1, self.keys.shape[1], -1, self.keys.shape[-1])
        self.keys = self.keys.gather(2, index)
        self.values = self.values.gather(2, index)
        self.text_columns = self.text_columns.gather(1, order)
        self.attention = self.attention.gather(1, order)
        self.lengths = lengths

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "A Dynamic-LLaVA cache cannot be cropped (its sparse layers hold only kept tokens); "
            "assisted/speculative decoding is not supported."
        )

    _SLOT_STATE = ("lengths", "text_columns", "attention")  # per-sample side state that follows the batch

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        for name in self._SLOT_STATE:
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        for name in self._SLOT_STATE:
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name)[indices])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        for name in self._SLOT_STATE:
            if getattr(self, name) is not None:
                state = getattr(self, name)
                setattr(self, name, state.index_select(0, beam_idx.to(state.device)))

    def reset(self) -> None:
        super().reset()
        self.lengths = self.text_columns = self.attention = None
        self.pending_store = self.pending_columns = self.pending_attention = None


class DynamicLlavaCache(Cache):
    """Per-layer cache for Dynamic-LLaVA: full layers below `sparse_layer`, `SparseLayer`s from it on.

    `generate()` builds one automatically; pass your own as `past_key_values` to keep it afterwards.
    """

    def __init__(self, num_layers: int, sparse_layer: int):
        check_integer("num_layers", num_layers, 2)
        check_integer("sparse_layer", sparse_layer, 1, num_layers - 1, f"layer K of a {num_layers}-layer model")
        layers = [DynamicLayer() for _ in range(sparse_layer)]
        layers += [SparseLayer() for _ in range(num_layers - sparse_layer)]
        super().__init__(layers=layers)
        self.sparse_layer = sparse_layer

    @classmethod
    def from_config(cls, config) -> "DynamicLlavaCache":
        return cls(config.text_config.num_hidden_layers, config.sparse_layer)

    def set_store_mask(
        self, store: torch.Tensor, text_columns: torch.Tensor | None = None, attention: torch.Tensor | None = None
    ) -> None:
        """Tell every sparse layer which of the tokens about to run through it to keep ([B, q] bool), the
        column of each generated one ([B, q] long, -1 for prompt tokens; default: none generated) and the
        attention they received in layer K ([B, q] float; default 0)."""
        first = self.layers[self.sparse_layer]
        gapless = not first.is_initialized or bool((first.lengths == first.keys.shape[-2]).all())
        append_all = gapless and bool(store.all())
        if text_columns is None:
            text_columns = torch.full_like(store, -1, dtype=torch.long)
        if attention is None:
            attention = torch.zeros_like(store, dtype=torch.float32)
        for layer in self.layers[self.sparse_layer :]:
            layer.pending_store = store
            layer.pending_columns = text_columns
            layer.pending_attention = attention
            layer.pending_append_all = append_all

    def sparse_valid_mask(self) -> torch.Tensor | None:
        """[B, T] bool validity of the sparse layers' slots (identical in every sparse layer)."""
        layer = self.layers[self.sparse_layer]
        return layer.valid_mask() if layer.is_initialized else None

    def stored_text_columns(self) -> torch.Tensor | None:
        """[B, T] long: the column of each stored generated token in the sparse layers, -1 elsewhere."""
        layer = self.layers[self.sparse_layer]
        if not layer.is_initialized:
            return None
        return layer.text_columns.masked_fill(~layer.valid_mask(), -1)

    def stored_attention(self) -> torch.Tensor | None:
        """[B, T] float: attention each stored token has received in layer K (accumulated by `add_attention`)."""
        layer = self.layers[self.sparse_layer]
        return layer.attention if layer.is_initialized else None

    def add_attention(self, received: torch.Tensor) -> None:
        """Add [B, T] attention received by the stored slots (every sparse layer shares the slot layout)."""
        for layer in self.layers[self.sparse_layer :]:
            layer.attention = layer.attention + received

    def evict(self, drop: torch.Tensor) -> torch.Tensor:
        """Remove the stored tokens marked in `drop` ([B, T] bool) from every sparse layer.

        Each sample's remaining slots move to the front in their order; the tensors shrink to the
        longest sample. Returns the [B] count of evicted tokens. One host sync (the new width).
        """
        first = self.layers[self.sparse_layer]
        keep = first.valid_mask() & ~drop
        lengths = keep.sum(dim=1)
        evicted = first.lengths - lengths
        width, total = torch.stack([lengths.max(), evicted.sum()]).tolist()  # the one host sync
        if total == 0:
            return evicted
        # stable sort: kept slots first, each sample's in their original order
        order = torch.sort(keep.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :width]
        for layer in self.layers[self.sparse_layer :]:
            layer.keep_slots(order, lengths)
        return evicted

    def layer_lengths(self) -> list[torch.Tensor]:
        """Tokens held per sample in each layer ([B] long tensors); dense layers count their padding too."""
        out = []
        for layer in self.layers:
            if not layer.is_initialized:
                out.append(torch.zeros(0, dtype=torch.long))
            elif isinstance(layer, SparseLayer):
                out.append(layer.lengths.clone())
            else:
                out.append(torch.full((layer.keys.shape[0],), layer.keys.shape[-2], dtype=torch.long))
        return out

    def layer_nbytes(self) -> list[int]:
        """Bytes held by each layer's K and V tensors."""
        return [
            (layer.keys.nbytes + layer.values.nbytes) if layer.is_initialized else 0 for layer in self.layers
        ]

    def dense_nbytes(self) -> int:
        """Bytes a dense cache would hold for the same tokens: every layer as long as layer 0."""
        return self.layer_nbytes()[0] * len(self.layers)

    def nbytes(self) -> int:
        """Bytes held by all K/V tensors of the cache."""
        return sum(self.layer_nbytes())


__all__ = ["DynamicLlavaCache", "SparseLayer"]
