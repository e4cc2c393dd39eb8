"""Fine-tuning with DynamicLlavaTrainer: budgets are learned, runs resume exactly, checkpoints are atomic."""

import os

import pytest
import torch
from transformers import TrainerCallback

from dynamic_llava import DynamicLlavaForConditionalGeneration
from dynamic_llava.data import LlavaCollator
from dynamic_llava.training import build_trainer, gumbel_temperature, train
from training_setup import flat_parameters, recipe_for, run_two_processes, write_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    write_world(root)
    return root


def realised_keep(model, batch, draws=30):
    """Mean hard Gumbel keep decision of image and answer tokens (an estimate of the keep probability)."""
    model.train()
    image, text = [], []
    with torch.no_grad():
        for _ in range(draws):
            out = model(**batch)
            image.append(out.image_keep_ratio.nanmean())
            text.append(out.text_keep_ratio.nanmean())  # NaN for samples without an eligible answer
    return float(torch.stack(image).mean()), float(torch.stack(text).mean())


def test_temperature_schedule():
    assert gumbel_temperature(0, 100) == 1.0
    assert gumbel_temperature(100, 100) == pytest.approx(0.1)
    assert gumbel_temperature(50, 100) == pytest.approx(0.1**0.5)


def test_short_run_moves_keep_ratios_toward_targets(world):
    recipe = recipe_for(world, "budget", trainable="predictors", max_steps=30, batch_size=5,
                        predictor_learning_rate=1e-2, sparsity={"min_answer_tokens": 10, "text_keep_rate": 0.2})
    trainer = build_trainer(recipe)
    batch = LlavaCollator(0)([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    torch.manual_seed(0)
    image_before, text_before = realised_keep(trainer.model, batch)
    trainer.train()
    torch.manual_seed(0)
    image_after, text_after = realised_keep(trainer.model, batch)
    assert abs(image_after - 0.2) < abs(image_before - 0.2) - 0.1, (image_before, image_after)
    assert abs(text_after - 0.2) < abs(text_before - 0.2) - 0.1, (text_before, text_after)


def test_answer_loss_average_is_the_training_loss(world):
    from dynamic_llava.losses import per_answer_loss

    trainer = build_trainer(recipe_for(world, "answers", loss_average="answer", batch_size=4))
    batch = LlavaCollator(0)([trainer.train_dataset[i] for i in range(4)])
    model = trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    torch.manual_seed(0)
    loss = trainer.compute_loss(model, batch)
    torch.manual_seed(0)
    outputs = model(**batch, gumbel_tau=1.0)
    expected = per_answer_loss(outputs.logits, batch["labels"]) + model.config.budget_weight * outputs.budget_loss
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="loss_average"):
        recipe_for(world, loss_average="sample").check()


def test_distillation_loss_measures_the_answer_tokens_only():
    from dynamic_llava.losses import distillation_loss

    torch.manual_seed(0)
    teacher = torch.randn(2, 6, 11)
    labels = torch.full((2, 6), -100)
    labels[0, 3:5] = 1
    labels[1, 5] = 2
    assert float(distillation_loss(teacher.clone(), teacher, labels)) == pytest.approx(0.0, abs=1e-6)
    student = teacher.clone()
    student[0, 4] += torch.randn(11)  # logits at 4 predict label 5, which is unlabelled: no change
    student[1, 0] += torch.randn(11)
    assert float(distillation_loss(student, teacher, labels)) == pytest.approx(0.0, abs=1e-6)
    student[0, 2] += 3 * torch.randn(11)  # predicts label 3
    assert float(distillation_loss(student, teacher, labels)) > 0.01


def test_distillation_adds_the_teachers_kl_to_the_loss(world):
    from dynamic_llava.losses import distillation_loss

    recipe = recipe_for(world, "distill", distill_weight=0.5, batch_size=4)
    trainer = build_trainer(recipe)
    assert trainer.teacher is not None and not trainer.teacher.training
    assert not any(p.requires_grad for p in trainer.teacher.parameters())
    batch = LlavaCollator(0)([trainer.train_dataset[i] for i in range(4)])
    model = trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    torch.manual_seed(0)
    loss = trainer.compute_loss(model, batch)
    torch.manual_seed(0)
    outputs = model(**batch, gumbel_tau=1.0)
    with torch.no_grad():
        dense = trainer.teacher(**{k: v for k, v in batch.items() if k not in ("labels", "answer_mask")}).logits
    kl = distillation_loss(outputs.logits, dense, batch["labels"])
    assert float(kl) > 0  # the sparse student differs from its dense teacher
    expected = outputs.lm_loss + model.config.budget_weight * outputs.budget_loss + 0.5 * kl
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="distill_weight"):
        recipe_for(world, distill_weight=-1.0).check()
    # a teacher changes the run; no teacher fingerprints as runs written before the option did
    assert recipe.fingerprint()["settings"]["distill_weight"] == 0.5
    assert "distill_weight" not in recipe_for(world, "distill").fingerprint()["settings"]


def test_hidden_distillation_loss_measures_the_chosen_positions_relative_to_the_teacher():
    from dynamic_llava.losses import hidden_distillation_loss

    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 8)
    where = torch.tensor([[False, True, True, False, False], [True, False, False, False, False]])
    assert float(hidden_distillation_loss(teacher.clone(), teacher, where)) == pytest.approx(0.0, abs=1e-7)
    student = teacher.clone()
    student[0, 0] += 5.0  # an image or padding position: not measured
    assert float(hidden_distillation_loss(student, teacher, where)) == pytest.approx(0.0, abs=1e-7)
    student[1, 0] = 0.0  # all of one position's vector lost: relative error 1 there, 0 at the other two
    assert float(hidden_distillation_loss(student, teacher, where)) == pytest.approx(1 / 3, rel=1e-5)
    assert float(hidden_distillation_loss(2 * teacher, teacher, where)) == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="line up"):
        hidden_distillation_loss(teacher[:, :4], teacher, where)


def test_hidden_distillation_adds_the_text_tokens_hidden_state_error_to_the_loss(world):
    from dynamic_llava.losses import hidden_distillation_loss

    recipe = recipe_for(world, "hidden", hidden_distill_weight=2.0, batch_size=4)
    trainer = build_trainer(recipe)
    assert trainer.teacher is not None  # the hidden-state term alone loads the teacher
    batch = LlavaCollator(0)([trainer.train_dataset[i] for i in range(4)])
    model = trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    torch.manual_seed(0)
    loss = trainer.compute_loss(model, batch)
    assert not model.lm_head._forward_hooks and not trainer.teacher.lm_head._forward_hooks  # hooks removed
    seen = {}  # what each LM head reads: the final (normed) hidden states
    hooks = [m.lm_head.register_forward_pre_hook(lambda _, args, name=name: seen.__setitem__(name, args[0]))
             for name, m in (("student", model), ("teacher", trainer.teacher))]
    torch.manual_seed(0)
    outputs = model(**batch, gumbel_tau=1.0)
    with torch.no_grad():
        trainer.teacher(**{k: v for k, v in batch.items() if k not in ("labels", "answer_mask")})
    for hook in hooks:
        hook.remove()
    text = (batch["input_ids"] != model.config.image_token_id) & batch["attention_mask"].bool()
    assert bool((batch["input_ids"] == model.config.image_token_id).any()) and bool(text.any())
    student_hidden, teacher_hidden = seen["student"], seen["teacher"]
    assert student_hidden.shape == teacher_hidden.shape == (*batch["input_ids"].shape, model.config.text_config.hidden_size)
    error = hidden_distillation_loss(student_hidden, teacher_hidden, text)
    assert float(error) > 0  # the sparse student's hidden states differ from the dense teacher's
    expected = outputs.lm_loss + model.config.budget_weight * outputs.budget_loss + 2.0 * error
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="hidden_distill_weight"):
        recipe_for(world, hidden_distill_weight=-1.0).check()
    assert recipe.fingerprint()["settings"]["hidden_distill_weight"] == 2.0
    assert "hidden_distill_weight" not in recipe_for(world, "hidden").fingerprint()["settings"]


def test_keep_rate_range_trains_each_step_at_its_drawn_rate_and_saves_the_nominal_one(world):
    recipe = recipe_for(world, "keep-range", max_steps=6, image_keep_rate_range=(0.1, 0.6),
                        sparsity={"min_answer_tokens": 10, "image_keep_rate": 0.2, "image_mask_sampling": "top_share"})
    trainer = build_trainer(recipe)
    seen = []  # (step, rate in the config, share of image tokens the step's masks kept)
    original = trainer.compute_loss

    def spy(model, inputs, *args, **kwargs):
        loss, outputs = original(model, inputs, *args, return_outputs=True, **kwargs)
        rate = trainer.accelerator.unwrap_model(model).config.image_keep_rate
        seen.append((trainer.state.global_step, rate, float(outputs.image_keep_ratio.nanmean())))
        return loss

    trainer.compute_loss = spy
    trainer.train()
    assert [s for s, _, _ in seen] == list(range(6))
    rates = [r for _, r, _ in seen]
    assert rates == [trainer.step_image_keep_rate(s) for s in range(6)]
    assert all(0.1 <= r <= 0.6 for r in rates) and len(set(rates)) == 6
    tokens = trainer.model.config.image_seq_length
    for _, rate, kept in seen:  # top_share keeps floor(rate * tokens) of each image
        assert kept == pytest.approx(max(1, int(rate * tokens + 1e-6)) / tokens), (rate, kept)
    assert trainer.model.config.image_keep_rate == 0.2  # restored after every step, and so saved
    again = build_trainer(recipe_for(world, "keep-range-2", max_steps=6, image_keep_rate_range=(0.1, 0.6)))
    assert [again.step_image_keep_rate(s) for s in range(6)] == rates  # the same draws on a resumed run
    assert list(recipe.fingerprint()["settings"]["image_keep_rate_range"]) == [0.1, 0.6]
    assert "image_keep_rate_range" not in recipe_for(world, "plain").fingerprint()["settings"]
    assert build_trainer(recipe_for(world, "plain")).step_image_keep_rate(0) is None
    for bad, kind in (((0.3, 0.1), ValueError), ((0.0, 0.5), ValueError), ((0.1, 1.5), ValueError),
                      ((0.1,), TypeError), ("0.1,0.3", TypeError), ((0.1, "x"), TypeError)):
        with pytest.raises(kind, match="image_keep_rate_range"):
            recipe_for(world, image_keep_rate_range=bad).check()


def test_frozen_parts_do_not_change(world):
    trainer = build_trainer(recipe_for(world, "frozen", trainable="predictors", max_steps=2))
    before = flat_parameters(trainer.model)
    trainer.train()
    after = flat_parameters(trainer.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("predictor" in k for k in changed), changed


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_stopped_and_resumed_run_ends_like_an_uninterrupted_one(world):
    common = dict(trainable="full", max_steps=6, save_steps=3, learning_rate=1e-3)
    straight = build_trainer(recipe_for(world, "straight", **common))
    straight.train()
    expected = flat_parameters(straight.model)

    first = build_trainer(recipe_for(world, "resumed", **common), callbacks=[StopAt(3)])
    first.train()
    assert os.path.isdir(world / "resumed" / "checkpoint-3")
    final = train(recipe_for(world, "resumed", **common))  # finds checkpoint-3 and goes on
    resumed = DynamicLlavaForConditionalGeneration.from_pretrained(final)
    state = resumed.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, atol=1e-6, rtol=0, msg=key)


def test_failed_save_leaves_previous_checkpoint_intact(world, monkeypatch):
    trainer = build_trainer(recipe_for(world, "atomic", trainable="predictors", max_steps=4, save_steps=2))
    saves = {"n": 0}
    original = DynamicLlavaForConditionalGeneration.save_pretrained

    def failing_second_save(self, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:
            raise OSError("disk full")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DynamicLlavaForConditionalGeneration, "save_pretrained", failing_second_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    run = world / "atomic"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2"]
    monkeypatch.setattr(DynamicLlavaForConditionalGeneration, "save_pretrained", original)
    loaded = DynamicLlavaForConditionalGeneration.from_pretrained(run / "checkpoint-2")
    assert loaded.config.model_type == "dynamic_llava"


def test_lora_run_saves_a_merged_dynamic_llava(world):
    base = flat_parameters(DynamicLlavaForConditionalGeneration.from_pretrained(world / "model"))
    final = train(recipe_for(world, "lora", trainable="lora", max_steps=2, learning_rate=1e-2,
                             gradient_checkpointing=True))
    model = DynamicLlavaForConditionalGeneration.from_pretrained(final)
    state = model.state_dict()
    assert state.keys() == base.keys()
    assert any(not torch.equal(state[k], base[k]) for k in base if "image_predictor" in k)
    assert any(not torch.equal(state[k], base[k]) for k in base if ".layers." in k and "q_proj" in k)
    assert all(torch.equal(state[k], base[k]) for k in base if "vision_tower" in k)


def test_gradient_checkpointing_gives_the_same_gradients(world):
    from tiny import make_prompts, tiny_dynamic

    ids, mask, pixels = make_prompts([3, 5], [6, 4], seed=3)
    keep = torch.ones_like(mask, dtype=torch.float32)
    keep[:, 5:9] = 0
    grads = []
    for checkpointing in (False, True):
        model = tiny_dynamic().train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels, labels=ids, keep_override=keep).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5, msg=name)


def test_two_process_run_ends_with_identical_parameters(world, tmp_path):
    result = run_two_processes("distributed_worker.py", world, tmp_path, port=29517, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    initial = flat_parameters(DynamicLlavaForConditionalGeneration.from_pretrained(world / "model"))
    assert rank0.keys() == rank1.keys()
    assert any(not torch.equal(rank0[k], initial[k]) for k in rank0)  # it trained
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key


def test_train_command(world):
    from typer.testing import CliRunner

    from dynamic_llava.cli import app

    output = world / "cli"
    args = ["train", str(world / "model"), str(world / "data.json"), str(world / "images"), str(output),
            "--trainable", "predictors", "--max-steps", "2", "--batch-size", "2", "--image-keep-rate", "0.3"]
    outcome = CliRunner().invoke(app, args)
    assert outcome.exit_code == 0, outcome.output
    trained = DynamicLlavaForConditionalGeneration.from_pretrained(output / "final")
    assert trained.config.image_keep_rate == 0.3
    bad = CliRunner().invoke(app, [*args[:5], "--trainable", "everything"])
    assert bad.exit_code == 2 and "trainable='everything'" in bad.output
    missing = CliRunner().invoke(app, ["train", str(world / "nope"), *args[2:5]])
    assert missing.exit_code == 2 and "model folder not found" in missing.output
