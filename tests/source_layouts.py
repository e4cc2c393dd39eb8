"""Tiny checkpoints written in-process in the layouts people download: the authors' Dynamic-LLaVA release, the
original LLaVA-1.5 one, a CLIP tower folder (openai/clip-vit-large-patch14-336 style) and a sentencepiece
Llama tokenizer. Tensor and config names are those of the real files; the widths are tiny.

Also an independent reference of the authors' predictor forward (their `VisionPredictor` / `TextPredictor`,
written from `dynamic_modeling_llama.py` with plain functional ops on the source tensors).
"""

from __future__ import annotations

import json
from pathlib import Path

import sentencepiece as spm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel

HIDDEN, LAYERS, HEADS, FFN = 48, 4, 4, 96
SP_VOCAB = 60  # the sentencepiece vocabulary: <image> and <pad> make it 62, padded to 64 rows
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=32,
             patch_size=8)
D_MODEL, NHEAD, DIM_FF, BLOCKS = 16, 2, 32, 2
SPARSE_CONFIG = {
    "use_vision_predictor": True, "vision_keep_rate": 0.25, "use_text_predictor": True,
    "use_output_text_predictor": True, "output_text_keep_rate": 0.5, "output_text_len_for_training": 40,
    "use_instruct_predictor": False, "instruct_keep_rate": 0.5, "instruct_len_for_training": 50,
    "sparse_layer": 2, "d_model": D_MODEL, "nhead": NHEAD, "dim_feedforward": DIM_FF, "num_layers": BLOCKS,
    "mask_loss_weight": 80.0, "maskclip_loss_weight": 0.0,
}
CORPUS = [
    "A chat between a curious human and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the human's questions.",
    "USER: What is in the image? ASSISTANT: a red cat on a blue mat.",
    "Is there a dog in the picture? Answer yes or no.",
]


def write_sentencepiece_tokenizer(folder: Path) -> Path:
    """tokenizer.model + tokenizer_config.json as LLaVA-1.5 ships them (LlamaTokenizer, no pad token)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.txt").write_text("\n".join(CORPUS * 4))
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "tokenizer"), vocab_size=SP_VOCAB,
        model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        minloglevel=2, hard_vocab_limit=False,
    )
    (folder / "corpus.txt").unlink()
    (folder / "tokenizer.vocab").unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": None, "clean_up_tokenization_spaces": False, "legacy": False, "model_max_length": 512,
        "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
    }))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return folder


def write_clip_folder(folder: Path, seed: int = 1) -> Path:
    """A full CLIP checkpoint (text + vision towers), pytorch_model.bin with the old position-id buffers,
    and the old-style preprocessor_config.json (integer sizes)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         vocab_size=50, max_position_embeddings=16, bos_token_id=0, eos_token_id=1),
        vision_config=TOWER, projection_dim=16,
    )
    model = CLIPModel(config)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["vision_model.embeddings.position_ids"] = torch.arange((32 // 8) ** 2 + 1).unsqueeze(0)
    state["text_model.embeddings.position_ids"] = torch.arange(16).unsqueeze(0)
    torch.save(state, folder / "pytorch_model.bin")
    config.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 32, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 32,
    }))
    return folder


def llava_tensors(seed: int = 0, predictors: bool = True, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random weights under the original LLaVA-1.5 names (and the authors' predictor names)."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape, scale=0.08):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    def norm(n):
        return (1 + 0.1 * torch.randn(n, generator=g)).to(dtype)

    t = {"model.embed_tokens.weight": w(SP_VOCAB, HIDDEN, scale=0.5), "lm_head.weight": w(SP_VOCAB, HIDDEN, scale=0.3),
         "model.norm.weight": norm(HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{name}.weight"] = w(HIDDEN, HIDDEN)
        t[p + "self_attn.rotary_emb.inv_freq"] = torch.ones(HIDDEN // HEADS // 2)  # in old LLaVA checkpoints
        t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"] = w(FFN, HIDDEN), w(FFN, HIDDEN)
        t[p + "mlp.down_proj.weight"] = w(HIDDEN, FFN)
        t[p + "input_layernorm.weight"], t[p + "post_attention_layernorm.weight"] = norm(HIDDEN), norm(HIDDEN)
    t["model.mm_projector.0.weight"], t["model.mm_projector.0.bias"] = w(HIDDEN, TOWER["hidden_size"], scale=0.3), w(HIDDEN)
    t["model.mm_projector.2.weight"], t["model.mm_projector.2.bias"] = w(HIDDEN, HIDDEN, scale=0.3), w(HIDDEN)
    if predictors:
        p = "model.image_score_predictor."
        t[p + "down_mlp.0.weight"], t[p + "down_mlp.0.bias"] = norm(HIDDEN), w(HIDDEN)
        t[p + "down_mlp.1.weight"], t[p + "down_mlp.1.bias"] = w(D_MODEL, HIDDEN, scale=0.3), w(D_MODEL)
        for i in range(BLOCKS):
            b = f"{p}transformer.{i}."
            t[b + "norm1.weight"], t[b + "norm1.bias"] = norm(D_MODEL), w(D_MODEL)
            t[b + "attn.qkv.weight"] = w(3 * D_MODEL, D_MODEL, scale=0.4)  # qkv_bias=False in their blocks
            t[b + "attn.proj.weight"], t[b + "attn.proj.bias"] = w(D_MODEL, D_MODEL, scale=0.3), w(D_MODEL)
            t[b + "norm2.weight"], t[b + "norm2.bias"] = norm(D_MODEL), w(D_MODEL)
            t[b + "mlp.fc1.weight"], t[b + "mlp.fc1.bias"] = w(DIM_FF, D_MODEL, scale=0.3), w(DIM_FF)
            t[b + "mlp.fc2.weight"], t[b + "mlp.fc2.bias"] = w(D_MODEL, DIM_FF, scale=0.3), w(D_MODEL)
        for j, (d_in, d_out) in zip((0, 2, 4), ((D_MODEL, D_MODEL // 2), (D_MODEL // 2, D_MODEL // 4), (D_MODEL // 4, 2))):
            t[f"{p}output_mlp.{j}.weight"], t[f"{p}output_mlp.{j}.bias"] = w(d_out, d_in, scale=0.5), w(d_out)
        p = "model.output_text_score_predictor."
        t[p + "output_mlp.0.weight"], t[p + "output_mlp.0.bias"] = norm(HIDDEN), w(HIDDEN)
        dims = (HIDDEN, D_MODEL, D_MODEL // 2, D_MODEL // 4, 2)
        for j, (d_in, d_out) in zip((1, 3, 5, 7), zip(dims[:-1], dims[1:])):
            t[f"{p}output_mlp.{j}.weight"], t[f"{p}output_mlp.{j}.bias"] = w(d_out, d_in, scale=0.5), w(d_out)
    return t


def llava_config(sparse: bool = True, **changes) -> dict:
    """config.json of LLaVA-1.5 (llava_llama), and of the authors' release when ``sparse``."""
    config = {
        "architectures": ["DynamicLlavaLlamaForCausalLM" if sparse else "LlavaLlamaForCausalLM"],
        "model_type": "llava_llama", "hidden_size": HIDDEN, "intermediate_size": FFN, "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "hidden_act": "silu",
        "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None,
        "vocab_size": SP_VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False,
        "torch_dtype": "float16", "use_cache": True, "initializer_range": 0.02, "pretraining_tp": 1,
        "mm_hidden_size": TOWER["hidden_size"], "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "image_aspect_ratio": "pad", "mm_patch_merge_type": "flat", "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False,
        "mm_projector_lr": None, "tokenizer_model_max_length": 512, "tokenizer_padding_side": "right",
    }
    if sparse:
        config["sparse_config"] = dict(SPARSE_CONFIG)
    config.update(changes)
    return config


def write_llava_checkpoint(folder: Path, tensors: dict, config: dict, shards: int = 2, bin_format: bool = False,
                           tokenizer: bool = True) -> Path:
    """Write ``tensors`` in ``shards`` files with an index, as safetensors or PyTorch .bin, plus config/tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    parts = [names[i::shards] for i in range(shards)]
    ext, stem = ("bin", "pytorch_model") if bin_format else ("safetensors", "model")
    weight_map = {}
    for i, part in enumerate(parts):
        file = f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}"
        chunk = {n: tensors[n].contiguous() for n in part}
        if bin_format:
            torch.save(chunk, folder / file)
        else:
            save_file(chunk, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    index = folder / (f"{stem}.{ext}.index.json")
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config))
    if tokenizer:
        write_sentencepiece_tokenizer(folder)
    return folder


def authors_vision_predictor(t: dict, x: torch.Tensor, heads: int = NHEAD) -> torch.Tensor:
    """The authors' VisionPredictor.forward on [images, N, H] with image_policy = ones (their inference)."""
    p = "model.image_score_predictor."
    x = F.layer_norm(x, x.shape[-1:], t[p + "down_mlp.0.weight"], t[p + "down_mlp.0.bias"])
    x = F.gelu(F.linear(x, t[p + "down_mlp.1.weight"], t[p + "down_mlp.1.bias"]))
    policy = torch.ones(*x.shape[:2], 1, dtype=x.dtype)
    x = x * policy
    for i in range(BLOCKS):
        b = f"{p}transformer.{i}."
        h = F.layer_norm(x, x.shape[-1:], t[b + "norm1.weight"], t[b + "norm1.bias"])
        n_img, n, c = h.shape
        qkv = F.linear(h, t[b + "attn.qkv.weight"]).reshape(n_img, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n_img, n, c)
        x = x + F.linear(a, t[b + "attn.proj.weight"], t[b + "attn.proj.bias"])
        h = F.layer_norm(x, x.shape[-1:], t[b + "norm2.weight"], t[b + "norm2.bias"])
        x = x + F.linear(F.gelu(F.linear(h, t[b + "mlp.fc1.weight"], t[b + "mlp.fc1.bias"])),
                         t[b + "mlp.fc2.weight"], t[b + "mlp.fc2.bias"])
    c = x.shape[-1]
    local, pooled = x[..., : c // 2], (x[..., c // 2:] * policy).sum(1, keepdim=True) / policy.sum(1, keepdim=True)
    x = torch.cat([local, pooled.expand(-1, x.shape[1], -1)], dim=-1)
    x = F.gelu(F.linear(x, t[p + "output_mlp.0.weight"], t[p + "output_mlp.0.bias"]))
    x = F.gelu(F.linear(x, t[p + "output_mlp.2.weight"], t[p + "output_mlp.2.bias"]))
    return F.linear(x, t[p + "output_mlp.4.weight"], t[p + "output_mlp.4.bias"])


def authors_text_predictor(t: dict, x: torch.Tensor) -> torch.Tensor:
    """The authors' TextPredictor.forward: LayerNorm, then Linear-GELU x3, Linear to 2 logits."""
    p = "model.output_text_score_predictor.output_mlp."
    x = F.layer_norm(x, x.shape[-1:], t[p + "0.weight"], t[p + "0.bias"])
    for j in (1, 3, 5):
        x = F.gelu(F.linear(x, t[f"{p}{j}.weight"], t[f"{p}{j}.bias"]))
    return F.linear(x, t[p + "7.weight"], t[p + "7.bias"])


def stock_llava_from_source(tensors: dict, clip_folder: Path, image_token_id: int, pad_token_id: int, rows: int = 64):
    """A stock llava-hf `LlavaForConditionalGeneration` holding the source weights (mapped here, by hand, as
    transformers' LLaVA converter does; new vocabulary rows = the mean row)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        text_config=dict(model_type="llama", hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=512,
                         rms_norm_eps=1e-5, vocab_size=rows, pad_token_id=pad_token_id, bos_token_id=1, eos_token_id=2),
        vision_config=dict(model_type="clip_vision_model", **TOWER),
        image_token_index=image_token_id, vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_seq_length=16, projector_hidden_act="gelu", tie_word_embeddings=False,
    )
    model = LlavaForConditionalGeneration(config).eval()
    state = {}
    dtype = tensors["model.embed_tokens.weight"].dtype
    for name, value in tensors.items():
        if "predictor" in name or "inv_freq" in name:
            continue
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            value = torch.cat([value, value.double().mean(0, keepdim=True).to(dtype).expand(rows - len(value), -1)])
        value = value.float()
        name = name.replace("model.mm_projector.0.", "model.multi_modal_projector.linear_1.")
        name = name.replace("model.mm_projector.2.", "model.multi_modal_projector.linear_2.")
        if not name.startswith(("lm_head", "model.multi_modal_projector")):
            name = "model.language_model." + name.removeprefix("model.")
        state[name] = value
    clip = torch.load(clip_folder / "pytorch_model.bin", weights_only=True)
    for name, value in clip.items():
        if name.startswith("vision_model.") and not name.endswith("position_ids"):
            state["model.vision_tower." + name.removeprefix("vision_model.")] = value.to(dtype).float()
    model.load_state_dict(state, strict=True)
    return model


def photo(seed: int, size=(40, 28)) -> Image.Image:
    """A non-square RGB image (the processor pads it to a square, as LLaVA-1.5 does)."""
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy())
