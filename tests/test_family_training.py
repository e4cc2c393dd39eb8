"""`dynamic-llava train`'s recipe for the other families: LLaVA-NeXT (anyres batches of different tile counts)."""

import torch
from tiny_next import tiny_next_pair, tiny_next_processor
from tiny_processor import write_llava_dataset

from dynamic_llava import DynamicLlavaNextForConditionalGeneration
from dynamic_llava.data import LlavaCollator
from dynamic_llava.training import TrainingRecipe, build_trainer, train


def test_llava_next_trains_its_predictors_through_the_recipe(tmp_path):
    ours, _ = tiny_next_pair(image_keep_rate=0.25)
    ours.save_pretrained(tmp_path / "model")
    processor = tiny_next_processor()
    processor.save_pretrained(tmp_path / "model")
    data, images = write_llava_dataset(tmp_path, bad=False)
    recipe = TrainingRecipe(model=str(tmp_path / "model"), data=str(data), images=str(images),
                            output_dir=str(tmp_path / "run"), trainable="predictors", max_steps=25, batch_size=4,
                            predictor_learning_rate=1e-2, save_steps=100, logging_steps=5, seed=0,
                            chat_template="llava_v1", sparsity={"min_answer_tokens": 10, "image_keep_rate": 0.2})
    trainer = build_trainer(recipe)
    batch = LlavaCollator(0)([trainer.train_dataset[i] for i in range(4)])
    assert batch["pixel_values"].ndim == 5 and "image_sizes" in batch

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
    loaded = DynamicLlavaNextForConditionalGeneration.from_pretrained(final)
    assert loaded.config.image_keep_rate == 0.2
