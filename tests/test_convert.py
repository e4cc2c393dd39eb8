"""`dynamic-llava convert`: the authors' release, the original LLaVA-1.5 layout and llava-hf, written in-process."""

import json
import shutil

import pytest
import sentencepiece as spm
import torch
from safetensors import safe_open
from source_layouts import (
    D_MODEL,
    SP_VOCAB,
    authors_text_predictor,
    authors_vision_predictor,
    llava_config,
    llava_tensors,
    photo,
    stock_llava_from_source,
    write_clip_folder,
    write_llava_checkpoint,
)
from tiny import stock_copy, tiny_dynamic
from tiny_processor import tiny_processor
from transformers import AutoProcessor, LlavaForConditionalGeneration
from typer.testing import CliRunner

from dynamic_llava import DynamicLlavaForConditionalGeneration
from dynamic_llava.cli import app
from dynamic_llava.conversion import VICUNA_SYSTEM, ConversionError, convert

IMAGE_ID, PAD_ID = SP_VOCAB, SP_VOCAB + 1  # <image> then <pad> after the sentencepiece vocabulary, as llava-hf
QUESTION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """The authors' layout (2 safetensors shards, fp32), its CLIP tower, and its conversion."""
    root = tmp_path_factory.mktemp("released")
    clip = write_clip_folder(root / "clip-vit")
    tensors = llava_tensors(seed=0)
    source = write_llava_checkpoint(root / "Dynamic-LLaVA", tensors, llava_config())
    report = convert(source, root / "converted", vision_tower=clip)
    return dict(root=root, clip=clip, tensors=tensors, source=source, out=root / "converted", report=report)


def _load(folder, **settings):
    model, info = DynamicLlavaForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True, **settings)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _inputs(processor):
    """Three left-padded prompts, the third with two images; non-square images (padded to squares)."""
    one = processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    two = "USER: <image>\nIs there a dog? ASSISTANT:"
    three = "USER: <image>\n<image>\nWhat differs between them? Answer yes or no. ASSISTANT:"
    images = [photo(0), photo(1), photo(2, size=(24, 36)), photo(3)]
    return processor(images=images, text=[one, two, three], return_tensors="pt", padding=True)


def test_authors_layout_puts_every_tensor_in_place(released):
    model = _load(released["out"])
    state, t = model.state_dict(), released["tensors"]
    config = model.config
    assert (config.image_keep_rate, config.text_keep_rate, config.sparse_layer) == (0.25, 0.5, 2)
    assert (config.min_answer_tokens, config.budget_weight, config.mask_gradient) == (40, 80.0, "raw")
    assert (config.predictor_dim, config.predictor_heads, config.predictor_mlp_dim) == (D_MODEL, 2, 32)
    assert config.image_token_id == IMAGE_ID and config.vision_feature_layer == -2
    lm = "model.language_model."
    pairs = {
        "model.layers.3.mlp.down_proj.weight": lm + "layers.3.mlp.down_proj.weight",
        "model.norm.weight": lm + "norm.weight",
        "model.mm_projector.0.weight": "model.multi_modal_projector.linear_1.weight",
        "model.mm_projector.2.bias": "model.multi_modal_projector.linear_2.bias",
        "model.image_score_predictor.down_mlp.1.weight": lm + "image_predictor.proj.0.weight",
        "model.image_score_predictor.transformer.1.attn.qkv.weight": lm + "image_predictor.blocks.1.self_attn.in_proj_weight",
        "model.image_score_predictor.transformer.0.mlp.fc2.bias": lm + "image_predictor.blocks.0.linear2.bias",
        "model.image_score_predictor.output_mlp.4.weight": lm + "image_predictor.head.4.weight",
        "model.output_text_score_predictor.output_mlp.0.bias": lm + "text_predictor.norm.bias",
        "model.output_text_score_predictor.output_mlp.7.weight": lm + "text_predictor.mlp.6.weight",
    }
    for source_name, ours in pairs.items():
        assert torch.equal(state[ours], t[source_name]), source_name
    assert not state[lm + "image_predictor.blocks.0.self_attn.in_proj_bias"].any()  # their qkv has no bias
    embed = state[lm + "embed_tokens.weight"]
    assert embed.shape[0] == 64 and torch.equal(embed[:SP_VOCAB], t["model.embed_tokens.weight"])
    assert torch.allclose(embed[SP_VOCAB:], t["model.embed_tokens.weight"].mean(0).expand(4, -1), atol=1e-6)
    clip = torch.load(released["clip"] / "pytorch_model.bin", weights_only=True)
    assert torch.equal(state["model.vision_tower.encoder.layers.2.mlp.fc1.weight"],
                       clip["vision_model.encoder.layers.2.mlp.fc1.weight"])
    report = released["report"]
    assert report.fresh_predictors == [] and report.ignored_settings == ["maskclip_loss_weight"]
    assert report.added_tokens == ["<image>", "<pad>"] and report.vocab_rows == (SP_VOCAB, 64)
    skipped = {name for names in report.skipped.values() for name in names}
    assert "logit_scale" in skipped and "model.layers.0.self_attn.rotary_emb.inv_freq" in skipped
    source_weights = [n for n in t if "inv_freq" not in n]
    clip_weights = [n for n in clip if n.startswith("vision_model.") and not n.endswith("position_ids")]
    assert report.tensors == len(source_weights) + len(clip_weights) + 2 == len(state)  # + 2 zero biases


def test_converted_predictors_compute_the_authors_forward(released):
    model, t = _load(released["out"]), released["tensors"]
    x = torch.randn(3, 16, 48, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours_image = model.model.language_model.image_predictor(x)
        ours_text = model.model.language_model.text_predictor(x)
    torch.testing.assert_close(ours_image, authors_vision_predictor(t, x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_text, authors_text_predictor(t, x), atol=1e-5, rtol=1e-5)


def test_converted_model_keeps_the_tokens_the_authors_predictor_chooses(released):
    processor = AutoProcessor.from_pretrained(released["out"])
    model = _load(released["out"])  # image keep rate 0.25 from the release: 4 of 16 tokens per image
    stock = stock_llava_from_source(released["tensors"], released["clip"], IMAGE_ID, PAD_ID)
    inputs = _inputs(processor)
    with torch.no_grad():
        out = model(**inputs)
        hidden = stock(**inputs, output_hidden_states=True).hidden_states[2]  # entering layer K = 2
    image = inputs["input_ids"] == IMAGE_ID
    per_image = hidden[image].view(-1, 16, hidden.shape[-1])
    with torch.no_grad():
        scores = torch.log_softmax(authors_vision_predictor(released["tensors"], per_image), dim=-1)[..., 0]
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(4, dim=1).indices, True)
    expected = torch.zeros_like(image)
    expected[image] = chosen.view(-1)
    kept = torch.zeros_like(image)
    kept.scatter_(1, out.kept_index, out.kept_valid)
    assert torch.equal(kept & image, expected)


def test_keep_all_equals_stock_llava_hf_from_the_same_source(released):
    processor = AutoProcessor.from_pretrained(released["out"])
    model = _load(released["out"], image_keep_rate=1.0, text_keep_rate=1.0)
    stock = stock_llava_from_source(released["tensors"], released["clip"], IMAGE_ID, PAD_ID)
    inputs = _inputs(processor)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, stock(**inputs).logits, atol=1e-5, rtol=1e-5)
        ours = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        theirs = stock.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert torch.equal(ours, theirs)


def test_processor_speaks_llava_v1_with_the_shipped_tokenizer(released):
    processor = AutoProcessor.from_pretrained(released["out"])
    prompt = processor.apply_chat_template(QUESTION, add_generation_prompt=True)
    assert prompt == f"{VICUNA_SYSTEM} USER: <image>\nWhat is in the image? ASSISTANT:"
    sp = spm.SentencePieceProcessor(model_file=str(released["source"] / "tokenizer.model"))
    text = "USER: Is there a dog in the picture? ASSISTANT:"
    assert processor.tokenizer(text).input_ids == [1, *sp.encode(text)]
    assert (processor.tokenizer.image_token_id, processor.tokenizer.pad_token_id) == (IMAGE_ID, PAD_ID)
    assert processor.image_processor.do_pad  # image_aspect_ratio "pad": squares padded with the mean colour
    from PIL import Image

    wide = Image.new("RGB", (48, 24), (250, 10, 10))  # as LLaVA's expand2square: centred on the mean colour
    pixels = processor.image_processor(images=[wide], return_tensors="pt")["pixel_values"][0]
    assert pixels.shape[-2:] == (32, 32)
    assert pixels[:, :4].abs().max() < 0.03 and pixels[:, -4:].abs().max() < 0.03  # padding: mean, normalised to 0
    assert pixels[0, 16, 16] > 1.5 and pixels[1, 16, 16] < -1.5  # the red image in the middle
    ids = processor(images=[photo(5)], text=["USER: <image>\nhi ASSISTANT:"], return_tensors="pt").input_ids
    assert int((ids == IMAGE_ID).sum()) == 16


def test_original_llava_layout_bin_shards_stream_into_shards_in_its_dtype(tmp_path, released):
    tensors = llava_tensors(seed=1, predictors=False, dtype=torch.bfloat16)
    source = write_llava_checkpoint(tmp_path / "llava-v1.5", tensors, llava_config(sparse=False), shards=3,
                                    bin_format=True)
    report = convert(source, tmp_path / "out", vision_tower=released["clip"], max_shard_size=20_000)
    assert report.fresh_predictors == ["image", "output-text"] and report.shards > 3
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == report.shards
    first = sorted(set(index["weight_map"].values()))[0]
    with safe_open(str(tmp_path / "out" / first), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    processor = AutoProcessor.from_pretrained(tmp_path / "out")
    model = _load(tmp_path / "out", image_keep_rate=1.0, text_keep_rate=1.0)
    stock = stock_llava_from_source(tensors, released["clip"], IMAGE_ID, PAD_ID)
    inputs = _inputs(processor)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, stock(**inputs).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("names", ["as 5.x saves them", "4.x"])
def test_llava_hf_layout_converts_with_fresh_predictors(tmp_path, names):
    stock = stock_copy(tiny_dynamic())
    stock.save_pretrained(tmp_path / "llava-hf")
    if names == "4.x":  # llava-hf/llava-1.5-7b-hf's names: the tower under vision_tower.vision_model
        from safetensors.torch import load_file, save_file

        file = tmp_path / "llava-hf" / "model.safetensors"
        state = load_file(str(file))
        save_file({("vision_tower.vision_model." + k.removeprefix("vision_tower.") if k.startswith("vision_tower.")
                    else k): v for k, v in state.items()}, str(file), metadata={"format": "pt"})
    processor = tiny_processor()
    processor.save_pretrained(tmp_path / "llava-hf")
    report = convert(tmp_path / "llava-hf", tmp_path / "out")
    assert report.layout == "llava-hf" and report.fresh_predictors == ["image", "output-text"]
    model = _load(tmp_path / "out", image_keep_rate=1.0, text_keep_rate=1.0)
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava-hf", dtype=torch.float32).eval()
    inputs = processor(images=[photo(0), photo(1)], text=["USER: <image>\nwhat is in the picture? ASSISTANT:",
                                                          "USER: <image>\nis there a dog? ASSISTANT:"],
                       return_tensors="pt", padding=True)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reloaded(**inputs).logits, atol=1e-5, rtol=1e-5)


def _edited_source(tmp_path, released, config_edit=None, tensor_edit=None):
    config = llava_config()
    tensors = dict(released["tensors"])
    if config_edit:
        config_edit(config)
    if tensor_edit:
        tensor_edit(tensors)
    return write_llava_checkpoint(tmp_path / "source", tensors, config, shards=1)


REFUSALS = [
    ("instruct predictor in settings", lambda c: c["sparse_config"].update(use_instruct_predictor=True), None,
     "instruct"),
    ("instruct predictor tensors", None,
     lambda t: t.update({"model.instruct_score_predictor.output_mlp.0.weight": torch.ones(48)}), "instruct"),
    ("unknown tensor", None, lambda t: t.update({"model.extra_head.weight": torch.ones(2)}), "model.extra_head.weight"),
    ("unknown setting", lambda c: c["sparse_config"].update(token_merging=True), None, "token_merging"),
    ("linear projector", lambda c: c.update(mm_projector_type="linear"), None, "mlp2x_gelu"),
    ("anyres", lambda c: c.update(image_aspect_ratio="anyres", mm_patch_merge_type="spatial_unpad"), None,
     "LLaVA-NeXT"),
    ("missing layer tensor", None, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "up_proj"),
    ("partial predictor", None, lambda t: t.pop("model.image_score_predictor.output_mlp.2.bias"), "incomplete"),
    ("predictor missing", None,
     lambda t: [t.pop(k) for k in list(t) if k.startswith("model.output_text_score_predictor.")], "hold none"),
    ("predictor widths differ", lambda c: c["sparse_config"].update(d_model=32), None, "shape"),
    ("another model", lambda c: c.update(model_type="qwen2_vl", architectures=["Qwen2VLForConditionalGeneration"]),
     None, "qwen2_vl"),
]


@pytest.mark.parametrize("case, config_edit, tensor_edit, needle", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refuses_what_it_cannot_map_before_writing(tmp_path, released, case, config_edit, tensor_edit, needle):
    source = _edited_source(tmp_path, released, config_edit, tensor_edit)
    with pytest.raises(ConversionError, match=needle):
        convert(source, tmp_path / "out", vision_tower=released["clip"])
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["source"]  # no half-written folder left behind


def test_refuses_without_a_vision_tower_and_into_a_full_folder(tmp_path, released):
    with pytest.raises(ConversionError, match="--vision-tower"):
        convert(released["source"], tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(ConversionError, match="not empty"):
        convert(released["source"], tmp_path / "full", vision_tower=released["clip"])
    assert (tmp_path / "full" / "notes.txt").read_text() == "mine"


def test_a_failed_overwrite_leaves_the_previous_conversion_intact(tmp_path, released):
    out = tmp_path / "out"
    shutil.copytree(released["out"], out)
    before = sorted(p.name for p in out.iterdir())
    broken = _edited_source(tmp_path, released, tensor_edit=lambda t: t.pop("model.norm.weight"))
    with pytest.raises(ConversionError, match="lacks"):
        convert(broken, out, vision_tower=released["clip"], overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before
    convert(released["source"], out, vision_tower=released["clip"], overwrite=True, dtype="float16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "source"]


def test_cli_converts_and_refuses_in_one_line(tmp_path, released):
    argv = ["convert", str(released["source"]), str(tmp_path / "out"), "--vision-tower", str(released["clip"])]
    outcome = CliRunner().invoke(app, argv)
    assert outcome.exit_code == 0, outcome.output
    assert "Read a Dynamic-LLaVA (authors' layout) checkpoint" in outcome.output
    assert (tmp_path / "out" / "config.json").is_file()
    for bad, needle in ((argv[:3], "--vision-tower"), (argv + ["--max-shard-size", "lots"], "--max-shard-size"),
                        (argv + ["--dtype", "int3"], "dtype")):
        outcome = CliRunner().invoke(app, [bad[0], bad[1], str(tmp_path / "again"), *bad[3:]])
        lines = [line for line in outcome.output.splitlines() if line.strip()]
        assert outcome.exit_code == 2 and len(lines) == 1 and needle in lines[0], outcome.output
