"""Per-request sparsity: what one request asks for (`SparsityRequest`), and the per-sample tensor the sparse loop
reads (`control_tensor`), so one batch can mix requests with different settings and nothing on `model.config`
changes at run time.

A request sets, for its own sample:

* ``image_keep_rate``: each of its images keeps ``floor(rate * tokens)`` in layers >= K;
* ``text_keep_threshold``: a generated token enters layers >= K iff the output-text predictor's keep probability
  exceeds it (0.5 is the trained rule, keep logit > drop logit; 0.0 keeps every token);
* a KV budget, ``kv_budget_tokens`` (tokens each layer >= K may hold) or ``kv_budget_bytes`` (K/V bytes of the
  whole request, every layer). The engine meets it by storing at most that many tokens per sparse layer: at
  prefill the lowest-scored image tokens go first; while decoding, a new token that is kept replaces the stored
  image or generated token with the lowest learned keep log-probability, if its own is higher (prompt text is
  never dropped). Layers < K hold the whole context by design, so a byte budget is turned into sparse-layer
  tokens after their share, for this request's prompt and ``max_new_tokens``. Budgets need a KV cache.

The tensor is [B, 3] float: image keep rate, text logit-margin threshold, sparse-layer token budget (inf: none).
`generate()` repeats it per beam / returned sequence like any other per-sample input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch

from . import costs
from .validation import check_integer, check_number, check_rate, invalid

RATE, MARGIN, BUDGET = 0, 1, 2  # the columns of the control tensor


@dataclass(frozen=True)
class SparsityRequest:
    """The sparsity one request asks for; a field left None takes the default (the policy's, else the model
    config's). See the module docstring for each field's meaning."""

    image_keep_rate: float | None = None
    text_keep_threshold: float | None = None
    kv_budget_tokens: int | None = None
    kv_budget_bytes: int | None = None

    def __post_init__(self):
        if self.image_keep_rate is not None:
            check_rate("image_keep_rate", self.image_keep_rate, "None takes the model's rate")
        if self.text_keep_threshold is not None:
            check_number("text_keep_threshold", self.text_keep_threshold, 0.0, 1.0,
                         hint="a keep probability: 0.5 is the trained rule, 0 keeps every generated token")
        if self.kv_budget_tokens is not None:
            check_integer("kv_budget_tokens", self.kv_budget_tokens, 1, hint="tokens each layer >= K may hold")
        if self.kv_budget_bytes is not None:
            check_integer("kv_budget_bytes", self.kv_budget_bytes, 1, hint="K/V bytes of the whole request")
        if self.kv_budget_tokens is not None and self.kv_budget_bytes is not None:
            raise ValueError("Give kv_budget_tokens or kv_budget_bytes, not both.")

    @property
    def has_budget(self) -> bool:
        return self.kv_budget_tokens is not None or self.kv_budget_bytes is not None

    def merged(self, defaults: "SparsityRequest") -> "SparsityRequest":
        """This request with its unset fields taken from `defaults` (a budget counts as one field)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for f in fields(self):
            if values[f.name] is None and getattr(defaults, f.name) is not None:
                if f.name.startswith("kv_budget") and self.has_budget:
                    continue
                values[f.name] = getattr(defaults, f.name)
        return replace(self, **values)

    @classmethod
    def from_dict(cls, values: dict) -> "SparsityRequest":
        """From a plain mapping (a server request's extra fields, a CLI's options); unknown names are refused."""
        if not isinstance(values, dict):
            raise TypeError(f"sparsity settings must be a mapping, got {type(values).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown sparsity setting(s) {', '.join(unknown)}: expected {', '.join(sorted(known))}.")
        return cls(**values)


def _token_bytes(model) -> int:
    """Bytes one token's K and V take in one decoder layer of `model`, in its dtype."""
    return costs.kv_bytes_per_token(model.config.text_config, model.dtype.itemsize)


def request_kv_bytes(model, context_tokens: int, sparse_tokens: int) -> int:
    """K/V bytes of one request: layers < K hold `context_tokens`, layers >= K `sparse_tokens`."""
    k_layer, layers = model.config.sparse_layer, model.config.text_config.num_hidden_layers
    return _token_bytes(model) * (k_layer * context_tokens + (layers - k_layer) * sparse_tokens)


def budget_tokens(model, request: SparsityRequest, context_tokens: int) -> float:
    """The sparse-layer token budget of `request` for a context of `context_tokens` (prompt + new tokens); inf
    for none. A byte budget smaller than what layers < K need alone is refused."""
    if request.kv_budget_tokens is not None:
        return float(request.kv_budget_tokens)
    if request.kv_budget_bytes is None:
        return math.inf
    k_layer, layers = model.config.sparse_layer, model.config.text_config.num_hidden_layers
    per_token = _token_bytes(model)
    dense_part = per_token * k_layer * context_tokens
    tokens = (request.kv_budget_bytes - dense_part) // (per_token * (layers - k_layer))
    if tokens < 1:
        raise invalid(
            "kv_budget_bytes", request.kv_budget_bytes,
            f"more than the {dense_part} bytes layers < K need for {context_tokens} tokens (they keep the whole context)",
            "raise it, shorten the prompt or max_new_tokens",
        )
    return float(tokens)


def check_budget_covers_prompt(budget: float, text_tokens: int, who: str = "The request") -> None:
    """Refuse a sparse-layer budget that the prompt's text (never dropped) already fills."""
    if budget < text_tokens + 1:
        raise ValueError(
            f"{who}'s KV budget allows {int(budget)} tokens per layer >= K, but its prompt holds {text_tokens} text "
            f"tokens, which are never dropped: allow at least {text_tokens + 1} tokens (or the bytes for them), or "
            "shorten the prompt."
        )


def as_requests(requests, batch: int) -> list[SparsityRequest]:
    """One request per sample: a single `SparsityRequest` (or mapping) is shared by the batch."""
    if isinstance(requests, (SparsityRequest, dict)):
        requests = [requests] * batch
    if not isinstance(requests, (list, tuple)):
        raise TypeError(
            f"sparsity_requests must be a SparsityRequest or a list of them (one per sample), got {type(requests).__name__}."
        )
    if len(requests) != batch:
        raise ValueError(f"sparsity_requests has {len(requests)} entries but the batch has {batch} samples: one per sample.")
    out = []
    for i, request in enumerate(requests):
        if isinstance(request, dict):
            request = SparsityRequest.from_dict(request)
        if not isinstance(request, SparsityRequest):
            raise TypeError(f"sparsity_requests[{i}] must be a SparsityRequest, got {type(request).__name__}.")
        out.append(request)
    return out


def control_tensor(model, requests, batch: int, policy=None, context_tokens=None, device=None) -> torch.Tensor:
    """The [B, 3] control tensor for `requests` (see `as_requests`) on `model`, defaults filled in.

    `context_tokens` ([B] ints: each sample's prompt + new tokens) is needed only for byte budgets.
    """
    requests = as_requests(requests, batch)
    config = model.config
    policy_rate = getattr(policy, "image_keep_rate", None)
    default_rate = policy_rate if policy_rate is not None else config.image_keep_rate
    rows = []
    for i, request in enumerate(requests):
        rate = request.image_keep_rate if request.image_keep_rate is not None else default_rate
        threshold = request.text_keep_threshold
        if threshold is None:
            threshold = 0.5 if config.text_keep_rate < 1.0 else 0.0
        margin = -math.inf if threshold <= 0.0 else math.inf if threshold >= 1.0 else math.log(threshold / (1 - threshold))
        if request.kv_budget_bytes is not None and context_tokens is None:
            raise ValueError("kv_budget_bytes needs the request's context length: pass it through generate().")
        budget = budget_tokens(model, request, None if context_tokens is None else int(context_tokens[i]))
        rows.append((rate, margin, budget))
    return torch.tensor(rows, dtype=torch.float32, device=device)


MODES = ("prefill", "decode_cache", "decode_no_cache")


def mode_of(generating: bool, use_cache: bool) -> str:
    """The inference mode: a forward that only reads logits is prefill; generation is decoding with or without
    a KV cache."""
    return "prefill" if not generating else "decode_cache" if use_cache else "decode_no_cache"


def free_memory_bytes(device=None) -> int:
    """Free memory where the K/V will live: the accelerator's free bytes (`torch.cuda.mem_get_info`) for a CUDA
    device, else the host's available memory (``MemAvailable`` in /proc/meminfo, or free pages)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


@dataclass
class SparsityController:
    """Fills each request's unset settings by inference mode, and holds the global KV budget a server shares.

    ``defaults`` maps a mode (`MODES`) to the `SparsityRequest` whose set fields fill a request's unset ones; the
    default table leaves every field to the model config, which holds what the checkpoint was trained for (the
    paper: image 0.2 at prefill; the output-text predictor's keep > drop rule while decoding, with or without a
    cache). A KV budget means nothing without a cache: a mode default's budget is not applied there, and a
    request that asks for one there is refused.

    ``kv_budget_bytes`` (None: no limit) bounds the K/V bytes of all requests running at once; a server queues a
    request until its worst case fits (`request_kv_bytes`).
    """

    defaults: dict | None = None
    kv_budget_bytes: int | None = None

    def __post_init__(self):
        table = {mode: SparsityRequest() for mode in MODES}
        for mode, request in (self.defaults or {}).items():
            if mode not in MODES:
                raise ValueError(f"Unknown mode {mode!r} in defaults: expected one of {', '.join(MODES)}.")
            table[mode] = request if isinstance(request, SparsityRequest) else SparsityRequest.from_dict(request)
        self.defaults = table
        if self.kv_budget_bytes is not None:
            check_integer("kv_budget_bytes", self.kv_budget_bytes, 1, hint="None for no global limit")

    def resolve(self, request: SparsityRequest | None, mode: str) -> SparsityRequest:
        """`request` (None: all defaults) with its unset fields filled from the mode's defaults."""
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: expected one of {', '.join(MODES)}.")
        request = request if request is not None else SparsityRequest()
        if mode != "decode_cache" and request.has_budget:
            raise ValueError(f"A KV budget needs decoding with a KV cache (mode {mode!r} stores no K/V to bound).")
        defaults = self.defaults[mode]
        if mode != "decode_cache":
            defaults = replace(defaults, kv_budget_tokens=None, kv_budget_bytes=None)
        return request.merged(defaults)

    @classmethod
    def from_memory(cls, model=None, fraction: float = 0.5, free_bytes: int | None = None, device=None,
                    **kwargs) -> "SparsityController":
        """A controller whose global KV budget is ``fraction`` of the memory free now (after the weights are
        loaded): the accelerator's free bytes for a CUDA model, the host's available memory otherwise.
        `free_bytes` replaces the reading (tests, or a figure of your own)."""
        check_number("fraction", fraction, 0.0, 1.0, low_open=True, hint="the share of free memory K/V may use")
        if free_bytes is None:
            if device is None and model is not None:
                device = next(model.parameters()).device
            free_bytes = free_memory_bytes(device)
        check_integer("free_bytes", free_bytes, 1)
        return cls(kv_budget_bytes=max(1, int(fraction * free_bytes)), **kwargs)


def check_control(control, batch: int) -> None:
    """A control tensor handed to a forward directly: [batch, 3] float."""
    if not isinstance(control, torch.Tensor) or control.ndim != 2 or control.shape != (batch, 3):
        shape = list(control.shape) if isinstance(control, torch.Tensor) else type(control).__name__
        raise ValueError(
            f"sparsity_control must be a [{batch}, 3] tensor (control.control_tensor builds it), got {shape}: "
            "pass sparsity_requests instead."
        )


__all__ = ["MODES", "SparsityController", "SparsityRequest", "as_requests", "free_memory_bytes", "mode_of", "budget_tokens", "check_control", "check_budget_covers_prompt", "control_tensor",
           "request_kv_bytes"]
