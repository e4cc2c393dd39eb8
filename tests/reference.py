"""A masking-only reference for the sparse path, built from stock modules (no code shared with the engine).

Every token is computed in every layer; in layers >= K a dropped token is simply invisible as a key
to every other token (it still sees itself). Same decisions, no gathering, no cache.
"""

import torch


def masked_reference_logits(stock, input_ids, attention_mask, pixel_values, key_kept, sparse_layer, features=None):
    """stock: LlavaForConditionalGeneration (or LLaVA-NeXT, with its image `features` given); key_kept: [B, N]
    bool tokens visible in layers >= K."""
    lm = stock.model.language_model
    embeds = lm.embed_tokens(input_ids)
    if features is None:
        features = stock.model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output
    features = torch.cat(list(features), dim=0)
    image_slots = (input_ids == stock.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(image_slots, features.to(embeds.dtype))
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    cos_sin = lm.rotary_emb(embeds, position_ids=positions)

    n = input_ids.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    pad_ok = attention_mask.bool()[:, None, :]
    eye = torch.eye(n, dtype=torch.bool)
    dense_allowed = (causal & pad_ok) | eye  # every row sees at least itself
    sparse_allowed = (causal & pad_ok & key_kept[:, None, :]) | eye
    neg = torch.finfo(embeds.dtype).min

    def additive(allowed):
        zero = torch.zeros((), dtype=embeds.dtype)
        return torch.where(allowed, zero, neg).unsqueeze(1)

    hidden = embeds
    for i, layer in enumerate(lm.layers):
        mask = additive(dense_allowed if i < sparse_layer else sparse_allowed)
        hidden = layer(hidden, attention_mask=mask, position_embeddings=cos_sin, position_ids=positions)
    return stock.lm_head(lm.norm(hidden))


def qwen_masked_reference_logits(stock, batch: dict, key_kept, sparse_layer):
    """The same masking-only reference for a stock Qwen2-VL / Qwen2.5-VL model: its own image features, its own
    3-D positions (`get_rope_index`), and in layers >= K the dropped tokens hidden as keys."""
    model, lm = stock.model, stock.model.language_model
    ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    embeds = lm.embed_tokens(ids)
    encoded = model.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
    features = torch.cat(list(encoded.pooler_output))
    image = ids == stock.config.image_token_id
    embeds = embeds.masked_scatter(image.unsqueeze(-1), features.to(embeds.dtype))
    deepstack = [torch.cat(list(f)) for f in (getattr(encoded, "deepstack_features", None) or [])]  # Qwen3-VL
    positions, _ = model.get_rope_index(ids, mm_token_type_ids=batch["mm_token_type_ids"],
                                        image_grid_thw=batch["image_grid_thw"], attention_mask=attention_mask)
    cos_sin = lm.rotary_emb(embeds, positions)
    n = ids.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    pad_ok = attention_mask.bool()[:, None, :]
    eye = torch.eye(n, dtype=torch.bool)
    neg = torch.finfo(embeds.dtype).min
    masks = [torch.where((causal & pad_ok & keys[:, None, :]) | eye, 0.0, neg).unsqueeze(1).to(embeds.dtype)
             for keys in (torch.ones_like(key_kept), key_kept)]
    hidden = embeds
    for i, layer in enumerate(lm.layers):
        hidden = layer(hidden, attention_mask=masks[i >= sparse_layer], position_embeddings=cos_sin)
        if i < len(deepstack):  # every image token gets its DeepStack feature, kept or not
            hidden = hidden.clone()
            hidden[image] = hidden[image] + deepstack[i].to(hidden.dtype)
    return stock.lm_head(lm.norm(hidden))
