"""`dynamic-llava train`'s recipe for the other families: LLaVA-NeXT (anyres batches of different tile counts) and
Qwen2-VL / Qwen2.5-VL / Qwen3-VL (images of different sizes, 3-D positions, DeepStack) and LLaVA-OneVision
(anyres_max_9, Qwen2 decoder). The Qwen-VL and OneVision processors are the stock ones built without their video processors (torchvision)."""

from pathlib import Path

import pytest
import torch
from test_onevision import CONFIG as ONEVISION_CONFIG
from test_onevision import pair as onevision_pair
from tiny_next import tiny_next_pair, tiny_next_processor
from tiny_qwen import tiny_pair, tiny_qwen_processor
from tiny_processor import tiny_tokenizer, without_video_processor, write_llava_dataset
from transformers import LlavaOnevisionImageProcessorPil, LlavaOnevisionProcessor

from dynamic_llava import DynamicLlavaNextForConditionalGeneration
from dynamic_llava.data import LlavaCollator
from dynamic_llava.training import TrainingRecipe, build_trainer, train


def recipe_for_family(tmp_path, model, chat_template) -> TrainingRecipe:
    """A predictors-only run of 25 steps on the tiny LLaVA-format data set, aiming at image keep 0.2."""
    model.save_pretrained(tmp_path / "model")
    data, images = write_llava_dataset(tmp_path, bad=False)
    return TrainingRecipe(model=str(tmp_path / "model"), data=str(data), images=str(images),
                          output_dir=str(tmp_path / "run"), trainable="predictors", max_steps=25, batch_size=4,
                          predictor_learning_rate=1e-2, save_steps=100, logging_steps=5, seed=0,
                          chat_template=chat_template, sparsity={"min_answer_tokens": 10, "image_keep_rate": 0.2})


def train_and_reload(trainer, batch, recipe, model_class):
    """Train; the keep ratio on `batch` moves towards 0.2, and the saved model loads with its trained predictors."""

    def image_keep(model):
        model.train()
        torch.manual_seed(0)
        with torch.no_grad():
            return float(torch.stack([model(**batch).image_keep_ratio.nanmean() for _ in range(20)]).mean())

    before = image_keep(trainer.model)
    trainer.train()
    after = image_keep(trainer.model)
    assert abs(after - 0.2) < abs(before - 0.2) - 0.1, (before, after)
    final = train(recipe)  # the finished run: written from its last checkpoint, nothing retrained
    assert (Path(final) / "processor_config.json").is_file() or (Path(final) / "preprocessor_config.json").is_file()
    loaded = model_class.from_pretrained(final)
    assert loaded.config.image_keep_rate == 0.2
    state = dict(trainer.model.named_parameters())
    assert all(torch.equal(p, state[n]) for n, p in loaded.named_parameters() if "predictor" in n)


def test_llava_next_trains_its_predictors_through_the_recipe(tmp_path):
    ours, _ = tiny_next_pair(image_keep_rate=0.25)
    tiny_next_processor().save_pretrained(tmp_path / "model")
    recipe = recipe_for_family(tmp_path, ours, "llava_v1")
    trainer = build_trainer(recipe)
    batch = LlavaCollator(0)([trainer.train_dataset[i] for i in range(4)])
    assert batch["pixel_values"].ndim == 5 and "image_sizes" in batch
    train_and_reload(trainer, batch, recipe, DynamicLlavaNextForConditionalGeneration)


ONEVISION_PINPOINTS = ONEVISION_CONFIG["image_grid_pinpoints"]


def onevision_processor():
    images = LlavaOnevisionImageProcessorPil(size={"height": 16, "width": 16}, image_grid_pinpoints=ONEVISION_PINPOINTS)
    return without_video_processor(LlavaOnevisionProcessor)(
        image_processor=images, tokenizer=tiny_tokenizer(), num_image_tokens=16, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9")


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision"])
def test_video_families_train_their_predictors_through_the_recipe(tmp_path, monkeypatch, family):
    """Records with images of different sizes: labels on the answers only (and their end token), keep ratios moving
    to their target, and a saved model that loads."""
    import dynamic_llava.training.recipe as recipe_module

    if family == "llava_onevision":
        ours, _ = onevision_pair(image_keep_rate=0.25)
        processor, template, end, image = onevision_processor(), "llava_v1", "</s>", "<image>"
    else:
        ours, _ = tiny_pair(family, image_keep_rate=0.25)
        processor, template, end, image = tiny_qwen_processor(family), None, "<|im_end|>", "<|image_pad|>"
    # AutoProcessor would build the video processor too
    monkeypatch.setattr(recipe_module.AutoProcessor, "from_pretrained", staticmethod(lambda *a, **k: processor))
    recipe = recipe_for_family(tmp_path, ours, template)
    trainer = build_trainer(recipe)
    items = [trainer.train_dataset[i] for i in range(4)]
    tokens = [int((item["input_ids"] == ours.config.image_token_id).sum()) for item in items if "pixel_values" in item]
    assert len(set(tokens)) > 1, tokens  # images of different sizes give different token counts
    for item in items:  # every label is an answer token or the end of turn, never the prompt or an image
        labelled = processor.tokenizer.decode(item["labels"][item["labels"] >= 0])
        assert "user" not in labelled.lower() and image not in labelled and labelled.endswith(end), labelled
    train_and_reload(trainer, LlavaCollator(0)(items), recipe, type(ours))
