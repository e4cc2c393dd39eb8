"""Compute and memory costs of (Dynamic-)LLaVA, in the paper's convention and exactly.

Two ways of counting, reported side by side (the paper's convention and ours):

* **Paper convention** (`paper_layer_flops`, `paper_prefill_flops`): one decoder layer over N tokens
  of width C costs ``32*N*C^2 + 4*N^2*C`` FLOPs (8NC^2 projections, 4N^2C attention, 24NC^2 for an
  FFN counted as three C x 4C matmuls), and "prefill FLOPs" count the image tokens only.
* **Exact** (`llama_layer_flops`, `prefill_flops`, `decode_step_flops`, ...): the matmul FLOPs of
  the real config (2 FLOPs per multiply-add): grouped KV heads, the real FFN width, every token,
  the exact causal count of query-key pairs, the lm_head for the tokens whose logits are computed,
  and optionally the vision tower, projector and image predictor. Element-wise work (norms, RoPE,
  softmax, activations, residual adds) is O(N*C) and left out; it is well under 1% at LLaVA sizes.

Configs are duck-typed: the Llama functions read ``hidden_size``, ``intermediate_size``,
``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim`` (optional)
and ``vocab_size`` from a text config (``config.text_config`` of a `DynamicLlavaConfig`).

>>> dense = paper_prefill_flops(32, 4096, 2, kept_image_tokens=576)  # LLaVA-1.5-7B
>>> sparse = paper_prefill_flops(32, 4096, 2, kept_image_tokens=115)
>>> round(dense / 1e12, 1), round(sparse / 1e12, 1)  # paper: 10.1 T and 2.5 T
(10.1, 2.5)
"""

from __future__ import annotations

import math

from .validation import check_integer, check_rate

# ----------------------------------------------------------------------------- paper convention


def paper_layer_flops(n_tokens: int, width: int) -> int:
    """Paper FLOPs of one decoder layer over ``n_tokens`` tokens of width ``width``: 32NC^2 + 4N^2C."""
    n, c = n_tokens, width
    return 32 * n * c * c + 4 * n * n * c


def paper_prefill_flops(
    num_layers: int, width: int, sparse_layer: int, image_tokens: int = 576, kept_image_tokens: int = 115
) -> int:
    """Paper "prefill FLOPs" (image tokens only): K * f(image_tokens) + (L - K) * f(kept_image_tokens).

    Dense when ``kept_image_tokens == image_tokens`` (L * f(576)). Defaults are LLaVA-1.5 at a keep
    rate of 0.2 (576 -> 115 image tokens).
    """
    return sparse_layer * paper_layer_flops(image_tokens, width) + (num_layers - sparse_layer) * paper_layer_flops(
        kept_image_tokens, width
    )


# ----------------------------------------------------------------------------- exact counts


def head_dim(config) -> int:
    """Per-head width of a Llama text config (``head_dim`` if set, else hidden / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def causal_pairs(n_query: int, n_kv: int) -> int:
    """Query-key pairs a causal attention computes when the queries are the last ``n_query`` of ``n_kv`` tokens.

    Query i (0-based among the queries) sees ``n_kv - n_query + i + 1`` keys. Prefill (``n_query ==
    n_kv == N``) gives N(N+1)/2; one decode step (``n_query == 1``) gives ``n_kv``.
    """
    if not 0 <= n_query <= n_kv:
        raise ValueError(f"need 0 <= n_query <= n_kv, got n_query={n_query}, n_kv={n_kv}")
    return n_query * (n_kv - n_query) + n_query * (n_query + 1) // 2


def llama_layer_flops(n_query: int, n_kv: int, config, causal: bool = True) -> int:
    """Exact matmul FLOPs (2 per multiply-add) of one Llama decoder layer.

    ``n_query`` tokens go through the layer (projections and MLP run on them); each attends over
    ``n_kv`` keys (cached + its own block). With ``causal`` the queries are the last ``n_query`` of
    the ``n_kv`` positions (see `causal_pairs`); otherwise every query sees all ``n_kv`` keys.

    q/o projections: C x (H*d) each; k/v projections: C x (H_kv*d) each (grouped KV heads);
    attention: H*d for the scores and H*d for the weighted sum per query-key pair;
    MLP: gate, up (C x I) and down (I x C).
    """
    c, i, d = config.hidden_size, config.intermediate_size, head_dim(config)
    h = config.num_attention_heads
    h_kv = getattr(config, "num_key_value_heads", None) or h
    proj = 2 * c * h * d + 2 * c * h_kv * d
    mlp = 3 * c * i
    pairs = causal_pairs(n_query, n_kv) if causal else n_query * n_kv
    macs = n_query * (proj + mlp) + pairs * 2 * h * d
    return 2 * macs


def lm_head_flops(config, n_tokens: int = 1) -> int:
    """Vocabulary projection for ``n_tokens`` tokens (generation computes only the last one's logits)."""
    return 2 * n_tokens * config.hidden_size * config.vocab_size


def prefill_flops(config_text, n_tokens: int, sparse_layer: int, n_kept: int | None = None, logits_tokens: int = 1) -> int:
    """Exact prefill FLOPs of the language model, batch 1.

    Layers < K run on all ``n_tokens``; layers >= K on the ``n_kept`` tokens that survive the
    pruning at K (``None`` or ``n_tokens``: dense), causal among themselves; plus the lm_head for
    ``logits_tokens`` tokens (1: the last token, as in `generate`). Vision tower, projector and
    predictors are counted separately (`vision_flops`, `image_predictor_flops`).
    """
    n_kept = n_tokens if n_kept is None else n_kept
    layers = config_text.num_hidden_layers
    total = sparse_layer * llama_layer_flops(n_tokens, n_tokens, config_text)
    total += (layers - sparse_layer) * llama_layer_flops(n_kept, n_kept, config_text)
    return total + lm_head_flops(config_text, logits_tokens)


def decode_step_flops(config_text, context: int, sparse_layer: int, sparse_context: int | None = None) -> int:
    """Exact FLOPs of one decode step with a KV cache (one new token, its logits included).

    ``context``: keys the new token attends over in layers < K (cached + itself);
    ``sparse_context``: the same in layers >= K (``None``: dense, equal to ``context``).
    """
    sparse_context = context if sparse_context is None else sparse_context
    layers = config_text.num_hidden_layers
    total = sparse_layer * llama_layer_flops(1, context, config_text)
    total += (layers - sparse_layer) * llama_layer_flops(1, sparse_context, config_text)
    return total + lm_head_flops(config_text, 1)


def vision_flops(config, n_images: int = 1) -> int:
    """Exact matmul FLOPs of a CLIP vision tower (all layers) plus the LLaVA projector.

    ``config`` is the full LLaVA config (``vision_config``, ``text_config``). Patch embedding,
    ``num_hidden_layers`` pre-LN ViT layers over patches + CLS (bidirectional attention), and the
    two-layer projector on the image tokens handed to the language model (its input is several
    layers' features side by side when ``vision_feature_layer`` is a list).
    """
    v = config.vision_config
    patches = (v.image_size // v.patch_size) ** 2
    tokens = patches + 1  # CLS
    cv, iv = v.hidden_size, v.intermediate_size
    macs = patches * v.num_channels * v.patch_size**2 * cv  # patch embedding (conv as matmul)
    per_layer = tokens * (4 * cv * cv + 2 * cv * iv) + tokens * tokens * 2 * cv
    macs += v.num_hidden_layers * per_layer
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    image_tokens = patches if strategy == "default" else tokens
    c = config.text_config.hidden_size
    layers = getattr(config, "vision_feature_layer", -1)
    width_in = cv * (1 if isinstance(layers, int) else len(layers))  # several layers are concatenated
    macs += image_tokens * (width_in * c + c * c)  # projector: Linear(width_in, C) -> act -> Linear(C, C)
    return 2 * macs * n_images


def image_predictor_flops(config, tokens_per_image: int, n_images: int = 1) -> int:
    """Exact matmul FLOPs of the image predictor (`predictors.ImagePredictor`) over the image tokens.

    Linear(C, dim), ``predictor_blocks`` transformer blocks (qkv + out projections, bidirectional
    attention over one image's tokens, MLP dim -> mlp_dim -> dim), then the head MLP
    dim -> head_dims... -> 2. Zero when the model has no image predictor.
    """
    if not getattr(config, "use_image_predictor", True):
        return 0
    n, c = tokens_per_image, config.text_config.hidden_size
    dim, mlp = config.predictor_dim, config.predictor_mlp_dim
    macs = n * c * dim
    macs += config.predictor_blocks * (n * (4 * dim * dim + 2 * dim * mlp) + n * n * 2 * dim)
    dims = [dim, *config.predictor_head_dims, 2]
    macs += n * sum(a * b for a, b in zip(dims[:-1], dims[1:]))
    return 2 * macs * n_images


def text_predictor_flops(config, n_tokens: int = 1) -> int:
    """Exact matmul FLOPs of the output-text predictor MLP for ``n_tokens`` generated tokens."""
    if not getattr(config, "use_text_predictor", True):
        return 0
    dims = [config.text_config.hidden_size, *config.text_predictor_dims, 2]
    return 2 * n_tokens * sum(a * b for a, b in zip(dims[:-1], dims[1:]))


# ----------------------------------------------------------------------------- memory


def kv_bytes_per_token(config_text, dtype_bytes: int = 2) -> int:
    """Bytes one token's K and V take in ONE layer's cache: 2 * num_key_value_heads * head_dim * dtype_bytes."""
    h_kv = getattr(config_text, "num_key_value_heads", None) or config_text.num_attention_heads
    return 2 * h_kv * head_dim(config_text) * dtype_bytes


# ----------------------------------------------------------------------------- one call for a config


def estimate(config, text_tokens: int = 40, new_tokens: int = 0, image_keep_rate: float | None = None,
             text_keep_rate: float | None = None, images: int = 1, dtype_bytes: int = 2) -> dict:
    """Costs of one sample (prompt: `images` images plus `text_tokens` text tokens; then `new_tokens` generated)
    for a (Dynamic-)LLaVA config, dense next to sparse at the given keep rates (None: the config's).

    Returns FLOPs (paper convention and exact) for prefill, for decoding with a KV cache (all steps) and
    without one (every step recomputes the sequence: layers < K over everything, layers >= K over the
    kept tokens), and KV-cache bytes per layer at the end. Generated tokens are assumed kept at
    `text_keep_rate` (the training target; the trained predictor decides at run time).
    """
    if not (hasattr(config, "text_config") and hasattr(config, "vision_config")):
        raise TypeError(
            f"config must be a LLaVA config (with text_config and vision_config), got {type(config).__name__}: "
            "load one with DynamicLlavaConfig.from_pretrained(path)."
        )
    for name, value in (("text_tokens", text_tokens), ("new_tokens", new_tokens), ("images", images)):
        check_integer(name, value, 0)
    check_integer("dtype_bytes", dtype_bytes, 1, hint="2 for fp16/bf16, 4 for fp32")
    for name, value in (("image_keep_rate", image_keep_rate), ("text_keep_rate", text_keep_rate)):
        if value is not None:
            check_rate(name, value)
    text = config.text_config
    k = getattr(config, "sparse_layer", 2)
    image_keep_rate = getattr(config, "image_keep_rate", 1.0) if image_keep_rate is None else image_keep_rate
    text_keep_rate = getattr(config, "text_keep_rate", 1.0) if text_keep_rate is None else text_keep_rate
    v = config.vision_config
    per_image = getattr(config, "image_seq_length", None) or (v.image_size // v.patch_size) ** 2
    image_tokens = images * per_image
    # as the engine keeps them: floor(rate * tokens) per image, at least one
    kept_per_image = per_image if image_keep_rate >= 1.0 else max(1, math.floor(image_keep_rate * per_image + 1e-6))
    kept_image = images * kept_per_image
    prompt = text_tokens + image_tokens
    kept_prompt = text_tokens + kept_image
    layers = text.num_hidden_layers
    vision = vision_flops(config, images)
    predictor = image_predictor_flops(config, per_image, images) if image_keep_rate < 1.0 else 0
    sparse_text = text_keep_rate < 1.0

    def decoding(kept_prompt_tokens: int, share: float, cache: bool, extra: int) -> int:
        """All steps after the first new token (which prefill's logits give); `extra`: per-step vision +
        image-predictor FLOPs without a cache (images are re-encoded every step)."""
        judge = share < 1.0
        total = 0
        for step in range(1, new_tokens):
            held = int(share * (step - 1)) + 1  # earlier generated tokens kept, plus the newest
            if cache:
                total += decode_step_flops(text, prompt + step, k, kept_prompt_tokens + held)
                total += text_predictor_flops(config) if judge else 0
            else:
                total += prefill_flops(text, prompt + step, k, kept_prompt_tokens + held) + extra
                total += text_predictor_flops(config, step) if judge else 0
        return total

    share = text_keep_rate if sparse_text else 1.0
    per_token_layer = kv_bytes_per_token(text, dtype_bytes)
    generated_in_cache = max(new_tokens - 1, 0)
    dense_len = prompt + generated_in_cache
    sparse_len = kept_prompt + int(share * generated_in_cache)
    return {
        "image_tokens": image_tokens, "image_tokens_kept": kept_image, "prompt_tokens": prompt,
        "paper_prefill": {"dense": paper_prefill_flops(layers, text.hidden_size, k, image_tokens, image_tokens),
                          "sparse": paper_prefill_flops(layers, text.hidden_size, k, image_tokens, kept_image)},
        "prefill": {"dense": prefill_flops(text, prompt, k) + vision,
                    "sparse": prefill_flops(text, prompt, k, kept_prompt) + vision + predictor},
        "decode_with_cache": {"dense": decoding(prompt, 1.0, True, 0),
                              "sparse": decoding(kept_prompt, share, True, 0)},
        "decode_without_cache": {"dense": decoding(prompt, 1.0, False, vision),
                                 "sparse": decoding(kept_prompt, share, False, vision + predictor)},
        "kv_bytes_per_layer": {"dense": [dense_len * per_token_layer] * layers,
                               "sparse": [dense_len * per_token_layer] * k + [sparse_len * per_token_layer] * (layers - k)},
    }


__all__ = [
    "estimate",
    "paper_layer_flops",
    "paper_prefill_flops",
    "head_dim",
    "causal_pairs",
    "llama_layer_flops",
    "lm_head_flops",
    "prefill_flops",
    "decode_step_flops",
    "vision_flops",
    "image_predictor_flops",
    "text_predictor_flops",
    "kv_bytes_per_token",
]
