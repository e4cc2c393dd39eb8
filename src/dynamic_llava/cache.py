"""A KV cache whose layers >= K store only the K/V of kept tokens, per sample, without copying per step.

Layers < K are plain `DynamicLayer`s (as in the stock model). The sparse layers share one `SlotTable`:
per sample, slots ``[0, lengths[b])`` hold its kept tokens in order; beside that, each slot's column in
the full sequence if it is a generated token (``text_columns``, -1 for prompt tokens) and the attention
it has received in layer K (``attention``, accumulated only for policies that ask). Samples that keep
different numbers of tokens stay exact in one batch (slots past a sample's length are masked). Keys are
stored after RoPE, so their positions travel with them.

Each sparse layer holds preallocated K/V buffers ``[batch, kv_heads, capacity, head_dim]``; the model loop
plans each step once (`DynamicLlavaCache.plan_step`: where each new token goes, the key mask), and every
sparse layer then writes its new K/V by scatter and attends over a view of its buffer:

* one new token per sample (decoding): it is written at slot ``lengths[b]``, kept there if stored and
  overwritten by the next token if not. Nothing is copied; the step reads the longest sample's length
  once (one host sync) after a step that may have dropped a token, and not at all otherwise.
* several new tokens (prefill, a chunk): the layer attends over the stored slots followed by the new
  tokens (one copy, as `DynamicLayer` does every step) and writes the stored ones into their slots.

Buffers grow geometrically, or to the size `reserve` was told (`generate()` reserves ``max_new_tokens``).
`DynamicLlavaCache.evict` removes slots per sample by compacting them (eviction policies only).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .validation import check_integer


class SlotTable:
    """The slot layout every sparse layer shares, and the current step's write plan."""

    def __init__(self, layers: int = 0):
        self.layers = layers  # sparse layers that run each step: the plan is cleared after the last one
        self.reserved = 0  # slots to add at the first growth (generate: max_new_tokens)
        self.clear()

    def clear(self) -> None:
        """Forget every token (a reset cache); the reservation stays, the per-request state goes."""
        self.budget: torch.Tensor | None = None  # [B] float: the most slots each sample may hold (inf: none)
        self.text_open = False  # per-request settings keep every generated token (the learned gate is skipped)
        self.lengths: torch.Tensor | None = None  # [B] long: valid slots per sample
        self.text_columns: torch.Tensor | None = None  # [B, capacity] long: column of a generated token, else -1
        self.attention: torch.Tensor | None = None  # [B, capacity] float: attention received in layer K so far
        self.scores: torch.Tensor | None = None  # [B, capacity] float: learned keep log-prob (+inf: never evicted)
        self.width = 0  # slots in use: >= every sample's length (equal after a host sync)
        self.exact = True  # whether `width` is known to be the longest sample's length (else: an upper bound)
        self.complete = True  # every sample stored every token it was given, no padding: slot j is token j
        self.end_step()

    def end_step(self) -> None:
        # the step being planned or run: one token per sample goes to `dest` [B, 1] and the layers attend over
        # `attend_width` slots; several go to `append_dest` [B, q] and the layers attend over the stored slots
        # (`past_width`) followed by the new tokens
        self.dest: torch.Tensor | None = None
        self.append_dest: torch.Tensor | None = None
        self.attend_width = 0
        self.past_width = 0
        self.pending = 0  # sparse layers still to run this step

    @property
    def planned(self) -> bool:
        return self.pending > 0

    @property
    def is_initialized(self) -> bool:
        return self.lengths is not None

    @property
    def capacity(self) -> int:
        return 0 if self.text_columns is None else self.text_columns.shape[1]

    def initialize(self, batch: int, device) -> None:
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.text_columns = torch.full((batch, 0), -1, dtype=torch.long, device=device)
        self.attention = torch.zeros(batch, 0, dtype=torch.float32, device=device)
        self.scores = torch.zeros(batch, 0, dtype=torch.float32, device=device)
        self.width, self.exact, self.complete = 0, True, True

    def ensure_capacity(self, needed: int) -> None:
        """Grow the side state to hold ``needed`` slots (layers grow their buffers to match on their next write)."""
        if needed <= self.capacity:
            return
        size = max(needed + self.reserved, 2 * self.capacity)
        self.reserved = 0
        grow = size - self.capacity
        self.text_columns = torch.nn.functional.pad(self.text_columns, (0, grow), value=-1)
        self.attention = torch.nn.functional.pad(self.attention, (0, grow))
        self.scores = torch.nn.functional.pad(self.scores, (0, grow), value=float("inf"))

    def settle(self) -> int:
        """The width, made exact first if a step may have left it an upper bound (one host sync then)."""
        if not self.exact and not self.planned:
            self.width, self.exact = int(self.lengths.max()), True
        return self.width

    def valid_mask(self, width: int | None = None) -> torch.Tensor:
        """[B, width] bool: which slots hold a token of their sample."""
        width = self.width if width is None else width
        return torch.arange(width, device=self.lengths.device).unsqueeze(0) < self.lengths.unsqueeze(1)

    def select_batch(self, index_fn) -> None:
        """Apply a batch-dimension operation (repeat, select, reorder) to the per-sample state."""
        if self.budget is not None:
            self.budget = index_fn(self.budget)
        if self.is_initialized:
            self.lengths, self.text_columns, self.attention, self.scores = (
                index_fn(t) for t in (self.lengths, self.text_columns, self.attention, self.scores)
            )
            self.exact = False  # the longest sample may be gone: the width is an upper bound now


class SparseLayer(DynamicLayer):
    """Cache layer >= K: preallocated K/V buffers, written at the slots its `SlotTable` plans."""

    is_croppable = False

    def __init__(self, table: SlotTable | None = None):
        super().__init__()
        self.table = table if table is not None else SlotTable()
        self.key_buffer: torch.Tensor | None = None  # [B, H, capacity, D]
        self.value_buffer: torch.Tensor | None = None

    # the live region of the buffers and of the shared side state, as views
    @property
    def keys(self) -> torch.Tensor | None:
        return None if self.key_buffer is None else self.key_buffer[:, :, : self.table.settle()]

    @keys.setter
    def keys(self, value) -> None:  # DynamicLayer.__init__ / reset assign None
        if value is not None:
            raise AttributeError("SparseLayer keys are written through update(), not assigned.")
        self.key_buffer = None

    @property
    def values(self) -> torch.Tensor | None:
        return None if self.value_buffer is None else self.value_buffer[:, :, : self.table.settle()]

    @values.setter
    def values(self, value) -> None:
        if value is not None:
            raise AttributeError("SparseLayer values are written through update(), not assigned.")
        self.value_buffer = None

    @property
    def lengths(self) -> torch.Tensor | None:
        return self.table.lengths

    @property
    def text_columns(self) -> torch.Tensor | None:
        return None if self.table.text_columns is None else self.table.text_columns[:, : self.table.settle()]

    @property
    def attention(self) -> torch.Tensor | None:
        return None if self.table.attention is None else self.table.attention[:, : self.table.settle()]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        batch, heads, _, dim = key_states.shape
        self.key_buffer = key_states.new_zeros(batch, heads, 0, dim)
        self.value_buffer = value_states.new_zeros(batch, value_states.shape[1], 0, value_states.shape[-1])
        self.is_initialized = True

    def get_seq_length(self) -> int:
        """Slots in use; during a step, the slots its queries see before their own tokens (the mask's query offset)."""
        if not self.table.is_initialized:
            return 0
        return self.table.past_width if self.table.planned else self.table.width

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        table = self.table
        return (table.attend_width if table.planned else self.get_seq_length() + query_length), 0

    def valid_mask(self) -> torch.Tensor:
        """[B, T] bool: which stored slots hold a token of their sample."""
        return self.table.valid_mask(self.table.settle())

    def _fit_buffers(self) -> None:
        grow = self.table.capacity - self.key_buffer.shape[2]
        if grow > 0:
            self.key_buffer = torch.nn.functional.pad(self.key_buffer, (0, 0, 0, grow))
            self.value_buffer = torch.nn.functional.pad(self.value_buffer, (0, 0, 0, grow))

    def update(self, key_states, value_states, *args, **kwargs):
        """Write the new K/V where the step's plan says; return the K/V this step attends over."""
        table = self.table
        if not table.planned:
            raise RuntimeError("SparseLayer.update called without a step plan; run it through the model loop.")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._fit_buffers()
        heads, dim = key_states.shape[1], key_states.shape[-1]
        table.pending -= 1
        if table.dest is not None:  # one new token per sample: write it, attend over a view
            index = table.dest[:, None, :, None].expand(-1, heads, -1, dim)
            self.key_buffer.scatter_(2, index, key_states)
            self.value_buffer.scatter_(2, index, value_states)
            width = table.attend_width
            out = self.key_buffer[:, :, :width], self.value_buffer[:, :, :width]
        else:
            past = table.past_width
            out = (torch.cat([self.key_buffer[:, :, :past], key_states], dim=-2),
                   torch.cat([self.value_buffer[:, :, :past], value_states], dim=-2))
            index = table.append_dest[:, None, :, None].expand(-1, heads, -1, dim)
            self.key_buffer.scatter_(2, index, key_states)  # stored tokens to their slots, the others to a spare one
            self.value_buffer.scatter_(2, index, value_states)
        if not table.planned:
            table.end_step()
        return out

    def keep_slots(self, order: torch.Tensor) -> None:
        """Compact: slot j of sample b becomes its old slot ``order[b, j]`` ([B, T'] long)."""
        index = order[:, None, :, None].expand(-1, self.key_buffer.shape[1], -1, self.key_buffer.shape[-1])
        width = order.shape[1]
        self.key_buffer[:, :, :width] = self.key_buffer.gather(2, index)
        self.value_buffer[:, :, :width] = self.value_buffer.gather(2, index)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "A Dynamic-LLaVA cache cannot be cropped (its sparse layers hold only kept tokens); "
            "assisted/speculative decoding is not supported."
        )

    def _select_batch(self, index_fn) -> None:
        if self.is_initialized:
            self.key_buffer, self.value_buffer = index_fn(self.key_buffer), index_fn(self.value_buffer)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batch(lambda t: t[indices])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search, every step: reorder the live slots in place (the spare room is not copied)."""
        if self.is_initialized:
            width, index = self.table.width, beam_idx.to(self.key_buffer.device)
            self.key_buffer[:, :, :width] = self.key_buffer[:, :, :width].index_select(0, index)
            self.value_buffer[:, :, :width] = self.value_buffer[:, :, :width].index_select(0, index)

    def offload(self) -> None:
        if self.is_initialized:
            self.key_buffer = self.key_buffer.to("cpu", non_blocking=True)
            self.value_buffer = self.value_buffer.to("cpu", non_blocking=True)

    def prefetch(self) -> None:
        if self.is_initialized and self.key_buffer.device != self.device:
            self.key_buffer = self.key_buffer.to(self.device, non_blocking=True)
            self.value_buffer = self.value_buffer.to(self.device, non_blocking=True)

    def reset(self) -> None:
        self.key_buffer = self.value_buffer = None
        self.is_initialized = False

    def nbytes(self) -> int:
        """Bytes of the live region (every sample as long as the longest), as a cache without spare room holds."""
        return 0 if not self.is_initialized else (self.keys.nbytes + self.values.nbytes)

    def allocated_nbytes(self) -> int:
        """Bytes of the buffers, spare room included."""
        return 0 if not self.is_initialized else (self.key_buffer.nbytes + self.value_buffer.nbytes)


class DynamicLlavaCache(Cache):
    """Per-layer cache for Dynamic-LLaVA: full layers below `sparse_layer`, `SparseLayer`s from it on.

    `generate()` builds one automatically; pass your own as `past_key_values` to keep it afterwards.
    """

    def __init__(self, num_layers: int, sparse_layer: int):
        check_integer("num_layers", num_layers, 2)
        check_integer("sparse_layer", sparse_layer, 1, num_layers - 1, f"layer K of a {num_layers}-layer model")
        self.table = SlotTable(num_layers - sparse_layer)
        layers = [DynamicLayer() for _ in range(sparse_layer)]
        layers += [SparseLayer(self.table) for _ in range(num_layers - sparse_layer)]
        super().__init__(layers=layers)
        self.sparse_layer = sparse_layer

    @classmethod
    def from_config(cls, config) -> "DynamicLlavaCache":
        return cls(config.text_config.num_hidden_layers, config.sparse_layer)

    def reserve(self, tokens: int) -> None:
        """Room for ``tokens`` more slots at the next growth (so a generation of known length grows once)."""
        self.table.reserved = max(int(tokens), 0)

    def plan_step(
        self,
        store: torch.Tensor,
        valid: torch.Tensor,
        text_columns: torch.Tensor | None = None,
        attention: torch.Tensor | None = None,
        may_drop: bool = True,
        scores: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Plan the step the sparse layers are about to run: which of the new tokens to keep ([B, q] bool
        `store`), which are real (`valid`: padding is False), each one's column if generated ([B, q] long, -1 for
        prompt tokens; default: none generated), the attention it received in layer K ([B, q] float; default 0).
        `may_drop=False` promises that every valid new token is stored (no host sync needed for the width).
        `scores` ([B, q] float; default +inf) are the learned keep log-probabilities a KV budget ranks by: under
        one (``table.budget``), a sample at its budget stores a new token only in place of its lowest-scored slot,
        and only if the new token scores higher.

        Updates the slot table and returns the key mask [B, keys] (True: visible) for the sparse layers.
        """
        table = self.table
        batch, q = store.shape
        if not table.is_initialized:
            table.initialize(batch, store.device)
        if text_columns is None:
            text_columns = torch.full_like(store, -1, dtype=torch.long)
        if attention is None:
            attention = torch.zeros_like(store, dtype=torch.float32)
        if scores is None:
            scores = torch.full_like(store, float("inf"), dtype=torch.float32)
        table.end_step()  # a step that failed part-way leaves nothing planned
        past = table.past_width = table.settle()  # after a step that may have dropped a token: the one host sync
        lengths = table.lengths
        if q == 1:
            table.ensure_capacity(past + 1)
            dest, grows = lengths.unsqueeze(1), store[:, 0]
            if table.budget is not None:
                dest, grows = self._budget_slot(past, store[:, 0], scores[:, 0])
            table.text_columns.scatter_(1, dest, text_columns)
            table.attention.scatter_(1, dest, attention.float())
            table.scores.scatter_(1, dest, scores.float())
            slots = torch.arange(past + 1, device=store.device).unsqueeze(0)
            mask = (slots < lengths.unsqueeze(1)) | ((slots == dest) & valid)
            table.lengths = lengths + grows.long()
            table.dest, table.attend_width, table.pending = dest, past + 1, table.layers
            table.width, table.exact = past + 1, not may_drop
            table.complete = table.complete and not may_drop and table.budget is None
            return mask
        table.ensure_capacity(past + q + 1)
        past_valid = table.valid_mask(past)  # before the new tokens count
        rank = store.long().cumsum(dim=1) - 1
        spare = table.capacity - 1  # not-stored tokens are written here: past every sample's length
        append = torch.where(store, lengths.unsqueeze(1) + rank, torch.full_like(rank, spare))
        table.text_columns.scatter_(1, append, text_columns)
        table.attention.scatter_(1, append, attention.float())
        table.scores.scatter_(1, append, scores.float())
        table.lengths = lengths + store.sum(dim=1)
        table.append_dest, table.attend_width, table.pending = append, past + q, table.layers
        width, stored_all = torch.stack([table.lengths.max(), store.all().long()]).tolist()  # one host sync
        table.width, table.exact = int(width), True  # (`store` is False on padding: all stored means none)
        table.complete = table.complete and bool(stored_all)
        table.text_columns[:, spare] = -1
        table.attention[:, spare] = 0.0
        table.scores[:, spare] = float("inf")
        return torch.cat([past_valid, valid], dim=1)

    def _budget_slot(self, past: int, stored: torch.Tensor, score: torch.Tensor):
        """Under a budget, where one new token per sample goes: (dest [B, 1], grows [B]: a slot is added). A sample
        at its budget puts it in place of its lowest-scored slot if it scores higher, else does not store it."""
        table = self.table
        lengths = table.lengths
        if past > 0:
            held = table.valid_mask(past)
            low, low_at = table.scores[:, :past].masked_fill(~held, float("inf")).min(dim=1)
        else:
            low, low_at = torch.full_like(score, float("inf")), torch.zeros_like(lengths)
        full = lengths.to(table.budget.dtype) >= table.budget
        replace = full & stored & (score > low)
        grows = stored & ~full
        dest = torch.where(replace, low_at, lengths).unsqueeze(1)
        return dest, grows

    def sparse_valid_mask(self) -> torch.Tensor | None:
        """[B, T] bool validity of the sparse layers' slots before the step (the keys a new query may see)."""
        return self.table.valid_mask(self.table.settle()) if self.table.is_initialized else None

    def stored_text_columns(self) -> torch.Tensor | None:
        """[B, T] long: the column of each stored generated token in the sparse layers, -1 elsewhere."""
        if not self.table.is_initialized:
            return None
        width = self.table.settle()
        return self.table.text_columns[:, :width].masked_fill(~self.table.valid_mask(width), -1)

    def stored_attention(self) -> torch.Tensor | None:
        """[B, T] float: attention each stored token has received in layer K (accumulated by `add_attention`)."""
        return self.table.attention[:, : self.table.settle()] if self.table.is_initialized else None

    def add_attention(self, received: torch.Tensor) -> None:
        """Add [B, T] attention received by the stored slots (every sparse layer shares the slot layout)."""
        self.table.attention[:, : received.shape[1]] += received

    def evict(self, drop: torch.Tensor) -> torch.Tensor:
        """Remove the stored tokens marked in `drop` ([B, T] bool) from every sparse layer.

        Each sample's remaining slots move to the front in their order. Returns the [B] count of evicted
        tokens. One host sync (the new width).
        """
        table = self.table
        keep = table.valid_mask(table.settle()) & ~drop
        lengths = keep.sum(dim=1)
        evicted = table.lengths - lengths
        width, total = torch.stack([lengths.max(), evicted.sum()]).tolist()  # the one host sync
        if total == 0:
            return evicted
        # stable sort: kept slots first, each sample's in their original order
        order = torch.sort(keep.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :width]
        for layer in self.layers[self.sparse_layer :]:
            layer.keep_slots(order)
        table.text_columns[:, :width] = table.text_columns.gather(1, order)
        table.attention[:, :width] = table.attention.gather(1, order)
        table.scores[:, :width] = table.scores.gather(1, order)
        table.lengths, table.width, table.exact = lengths, width, True
        table.complete = False
        return evicted

    # batch-dimension operations of `generate()`: the shared table once, then each layer
    def batch_repeat_interleave(self, repeats: int) -> None:
        self.table.select_batch(lambda t: t.repeat_interleave(repeats, dim=0))
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.table.select_batch(lambda t: t[indices])
        super().batch_select_indices(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.table.select_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))
        super().reorder_cache(beam_idx)

    def reset(self) -> None:
        super().reset()
        self.table.clear()

    # continuous batching: requests join (`concatenate`) and leave (`batch_select_indices`, then `trim_left`)
    @classmethod
    def concatenate(cls, caches: list["DynamicLlavaCache"], left_pads: list[int]) -> "DynamicLlavaCache":
        """One cache holding the rows of `caches` in order, each first left-padded by its `left_pads` columns so
        that all layers < K have one length (the caller pads the attention masks alike). Generated tokens'
        columns move with the padding; the sparse layers' slots are unchanged (their buffers grow to one size)."""
        if not caches or len(caches) != len(left_pads):
            raise ValueError("concatenate takes one left padding per cache.")
        first = caches[0]
        out = cls(len(first.layers), first.sparse_layer)
        tables = [c.table for c in caches]
        widths = [t.settle() for t in tables]
        capacity = max(t.capacity for t in tables)

        def right(t: torch.Tensor, value) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, capacity - t.shape[1]), value=value)

        table = out.table
        table.lengths = torch.cat([t.lengths for t in tables])
        columns = [right(t.text_columns, -1) for t in tables]
        table.text_columns = torch.cat([torch.where(c >= 0, c + pad, c) for c, pad in zip(columns, left_pads)])
        table.attention = torch.cat([right(t.attention, 0.0) for t in tables])
        table.scores = torch.cat([right(t.scores, float("inf")) for t in tables])
        if any(t.budget is not None for t in tables):
            table.budget = torch.cat([t.budget if t.budget is not None
                                      else torch.full_like(t.lengths, float("inf"), dtype=torch.float32) for t in tables])
        table.width, table.exact, table.complete = max(widths), False, False
        table.text_open = all(t.text_open for t in tables)
        for i, layer in enumerate(out.layers):
            parts = [c.layers[i] for c in caches]
            sparse = isinstance(layer, SparseLayer)
            names = ("key_buffer", "value_buffer") if sparse else ("keys", "values")
            layer.lazy_initialization(*(getattr(parts[0], n) for n in names))
            for n in names:  # sparse buffers grow on the right to one capacity, dense K/V are padded on the left
                setattr(layer, n, torch.cat([
                    torch.nn.functional.pad(getattr(p, n), (0, 0, 0, capacity - getattr(p, n).shape[2]) if sparse
                                            else (0, 0, pad, 0)) for p, pad in zip(parts, left_pads)]))
        return out

    def trim_left(self, columns: int) -> None:
        """Drop the first `columns` columns of layers < K (the caller knows they are padding in every row)."""
        if columns <= 0:
            return
        for layer in self.layers[: self.sparse_layer]:
            layer.keys, layer.values = layer.keys[:, :, columns:], layer.values[:, :, columns:]
        text = self.table.text_columns
        if text is not None:
            self.table.text_columns = torch.where(text >= 0, text - columns, text)

    def layer_lengths(self) -> list[torch.Tensor]:
        """Tokens held per sample in each layer ([B] long tensors); dense layers count their padding too."""
        out = []
        for layer in self.layers:
            if not layer.is_initialized:
                out.append(torch.zeros(0, dtype=torch.long))
            elif isinstance(layer, SparseLayer):
                out.append(self.table.lengths.clone())
            else:
                out.append(torch.full((layer.keys.shape[0],), layer.keys.shape[-2], dtype=torch.long))
        return out

    def layer_nbytes(self) -> list[int]:
        """Bytes held by each layer's K and V: a sparse layer's up to its longest sample (spare room not counted)."""
        return [
            (layer.nbytes() if isinstance(layer, SparseLayer) else layer.keys.nbytes + layer.values.nbytes)
            if layer.is_initialized else 0
            for layer in self.layers
        ]

    def allocated_nbytes(self) -> int:
        """Bytes allocated for K and V, the sparse layers' spare room included."""
        return sum(
            (layer.allocated_nbytes() if isinstance(layer, SparseLayer) else layer.keys.nbytes + layer.values.nbytes)
            if layer.is_initialized else 0
            for layer in self.layers
        )

    def dense_nbytes(self) -> int:
        """Bytes a dense cache would hold for the same tokens: every layer as long as layer 0."""
        return self.layer_nbytes()[0] * len(self.layers)

    def nbytes(self) -> int:
        """Bytes held by all K/V tensors of the cache (spare room not counted)."""
        return sum(self.layer_nbytes())


__all__ = ["DynamicLlavaCache", "SlotTable", "SparseLayer"]
