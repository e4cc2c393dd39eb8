"""Faults during training: a diverging run, another run's checkpoints, a rerun, bad images, long records, a full disk.

In every case the run stops (or skips) with a message naming the problem, and nothing that was saved is lost or
replaced by a ruined model.
"""

import copy
import json
import os

import pytest
import torch
from transformers import TrainerCallback

from dynamic_llava import DynamicLlavaForConditionalGeneration
from dynamic_llava.training import NonFiniteError, build_trainer, train
from tiny_processor import GOOD_RECORDS
from training_setup import recipe_for, write_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    write_world(root)
    return root


def checkpoints(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("checkpoint-"))


class PoisonAt(TrainerCallback):
    """Turns one predictor weight into NaN after optimizer step `step`, before its checkpoint is written or (with
    `after_save`) after: a run that diverged."""

    def __init__(self, step, after_save=True):
        self.step, self.after_save = step, after_save

    def poison(self, state, model):
        if state.global_step == self.step:
            with torch.no_grad():
                model.image_predictor.proj[0].weight.fill_(float("nan"))

    def on_save(self, args, state, control, model=None, **kwargs):
        if self.after_save:
            self.poison(state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not (self.after_save and control.should_save):
            self.poison(state, model)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(world):
    recipe = recipe_for(world, "diverged", trainable="predictors", max_steps=4, save_steps=2)
    with pytest.raises(NonFiniteError, match=r"step 3: the loss is nan.*last good checkpoint is .*checkpoint-2"):
        train(recipe, callbacks=[PoisonAt(2)])
    run = world / "diverged"
    assert checkpoints(run) == ["checkpoint-2"]
    assert not (run / "final").exists()
    good = DynamicLlavaForConditionalGeneration.from_pretrained(run / "checkpoint-2")
    assert all(bool(torch.isfinite(p).all()) for p in good.parameters())


def test_non_finite_gradient_stops_before_the_optimizer_step(world):
    class NanGradient(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            model.image_predictor.proj[0].weight.register_hook(lambda grad: grad * float("nan"))

    recipe = recipe_for(world, "nan-grad", trainable="predictors", max_steps=2)
    with pytest.raises(NonFiniteError, match="step 1: a gradient is NaN or infinite; no checkpoint was written yet"):
        train(recipe, callbacks=[NanGradient()])
    assert not (world / "nan-grad" / "final").exists()


@pytest.mark.parametrize(
    "after_save, kept, message",
    [
        (False, [], "no checkpoint is saved; no checkpoint was written yet"),  # the end-of-run checkpoint is refused
        (True, ["checkpoint-2"], "The trained model has NaN or infinite values in 1 tensors"),  # then final/ is
    ],
)
def test_ruined_weights_are_never_saved(world, after_save, kept, message):
    output = f"ruined-{after_save}"
    recipe = recipe_for(world, output, trainable="predictors", max_steps=2, save_steps=100)
    with pytest.raises(NonFiniteError, match=message):
        train(recipe, callbacks=[PoisonAt(2, after_save=after_save)])
    run = world / output
    assert checkpoints(run) == kept and not (run / "final").exists()


def test_foreign_checkpoint_is_refused_and_restart_moves_it_aside(world):
    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 1

    first = recipe_for(world, "shared", trainable="predictors", max_steps=3, save_steps=1)
    build_trainer(first, callbacks=[StopAt()]).train()
    assert checkpoints(world / "shared") == ["checkpoint-1"]
    other = recipe_for(
        world,
        "shared",
        trainable="predictors",
        max_steps=3,
        save_steps=1,
        sparsity={"min_answer_tokens": 10, "image_keep_rate": 0.5},
    )
    with pytest.raises(
        ValueError,
        match=r"checkpoint-1 belongs to another run \(settings\.sparsity\.image_keep_rate: "
        r"unset there, 0\.5 now.*--restart",
    ):
        train(other)
    assert checkpoints(world / "shared") == ["checkpoint-1"]  # untouched
    run_file = world / "shared" / "checkpoint-1" / "run.json"
    kept = run_file.read_text()
    run_file.write_text(kept[: len(kept) // 2])
    with pytest.raises(ValueError, match=r"checkpoint-1/run.json is damaged .*--restart"):
        train(first)
    run_file.write_text(kept)
    other.resume = False
    final = train(other)
    saved = json.loads((world / "shared" / "final" / "run.json").read_text())
    assert saved["settings"]["sparsity"]["image_keep_rate"] == 0.5
    assert checkpoints(world / "shared" / "previous") == ["checkpoint-1"]  # the replaced run is kept aside
    assert DynamicLlavaForConditionalGeneration.from_pretrained(final).config.image_keep_rate == 0.5


def test_rerun_of_a_finished_run_neither_steps_on_nor_rewrites_final(world):
    recipe = recipe_for(world, "finished", trainable="predictors", max_steps=2, save_steps=100)
    final = train(recipe)
    weights = os.path.join(final, "model.safetensors")
    written = os.stat(weights).st_mtime_ns
    assert train(recipe) == final
    assert os.stat(weights).st_mtime_ns == written
    assert checkpoints(world / "finished") == ["checkpoint-2"]
    # killed after its last checkpoint but before final/: the rerun only writes final/, at the same step
    os.replace(final, world / "finished-final-before")
    train(recipe)
    assert json.loads((world / "finished" / "final" / "run.json").read_text())["steps"] == 2
    assert checkpoints(world / "finished") == ["checkpoint-2"]
    before = DynamicLlavaForConditionalGeneration.from_pretrained(world / "finished-final-before").state_dict()
    after = DynamicLlavaForConditionalGeneration.from_pretrained(final).state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def write_data(world, name, records):
    path = world / f"{name}.json"
    path.write_text(json.dumps(records))
    return str(path)


def test_unreadable_image_is_skipped_by_id_also_on_restart(world, caplog):
    (world / "images" / "broken.png").write_bytes(b"not a png")
    broken = copy.deepcopy(GOOD_RECORDS[0]) | {"id": "broken-image", "image": "broken.png"}
    data = write_data(world, "unreadable", [broken, *GOOD_RECORDS])
    recipe = recipe_for(world, "unreadable", data=data, trainable="predictors", max_steps=3, save_steps=1)

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 1

    build_trainer(recipe, callbacks=[StopAt()]).train()
    assert "Skipping record 'broken-image': cannot read image" in caplog.text
    caplog.clear()
    final = train(recipe)  # the restart meets the same record again and goes on
    assert os.path.isdir(final)
    assert json.loads((world / "unreadable" / "final" / "run.json").read_text())["steps"] == 3


def test_over_long_record_is_found_before_training(world):
    long = copy.deepcopy(GOOD_RECORDS[0]) | {"id": "too-long"}
    long["conversations"][1]["value"] = "the cat sat on the mat. " * 200  # far past the 512-token context
    data = write_data(world, "long", [long, *GOOD_RECORDS])
    trainer = build_trainer(recipe_for(world, "long", data=data, trainable="predictors", max_steps=1))
    assert [rid for rid, _ in trainer.train_dataset.skipped] == ["too-long"]
    assert "max_length=512" in trainer.train_dataset.skipped[0][1]
    with pytest.raises(ValueError, match=r"record 'too-long': \d+ tokens > max_length=512"):
        build_trainer(recipe_for(world, "long-raise", data=data, on_bad_record="raise", max_steps=1))
    assert not (world / "long-raise").exists()  # refused before any work


def test_full_disk_during_a_save_names_the_path_and_keeps_the_previous_checkpoint(world, monkeypatch):
    recipe = recipe_for(world, "full-disk", trainable="predictors", max_steps=4, save_steps=2)
    original = torch.save
    calls = {"n": 0}

    def short_write(obj, f, *args, **kwargs):  # the optimizer state of the second checkpoint hits a full disk
        if str(f).endswith("optimizer.pt") and "checkpoint-4" in str(f):
            raise OSError(28, "No space left on device")
        calls["n"] += 1
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", short_write)
    with pytest.raises(
        OSError,
        match=r"Saving .*checkpoint-4 failed: .*No space left on device \(.* GiB free on "
        r"that disk\)\. The previous checkpoint is intact",
    ):
        train(recipe)
    run = world / "full-disk"
    assert checkpoints(run) == ["checkpoint-2"] and not (run / "final").exists()
    assert not (run / ".staging" / "checkpoint-4").exists()  # the partial save is cleaned up
    monkeypatch.setattr(torch, "save", original)
    assert os.path.isdir(train(recipe))  # the same command then resumes from checkpoint-2 and finishes


def test_final_model_folder_is_readable_by_others(world):
    final = train(recipe_for(world, "mode", trainable="predictors", max_steps=1))
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(final).st_mode & 0o777 == 0o777 & ~mask


def test_train_command_refuses_another_run_in_one_line_and_restarts_on_request(world):
    from typer.testing import CliRunner

    from dynamic_llava.cli import app

    args = [
        "train",
        str(world / "model"),
        str(world / "data.json"),
        str(world / "images"),
        str(world / "cli-run"),
        "--trainable",
        "predictors",
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--min-answer-tokens",
        "10",
    ]
    assert CliRunner().invoke(app, args).exit_code == 0
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "Trained model saved" in again.output  # finished: nothing to do
    other = CliRunner().invoke(app, [*args, "--image-keep-rate", "0.5"])
    lines = [line for line in other.output.splitlines() if line.strip()]
    assert other.exit_code == 2 and len(lines) == 1, other.output
    assert "belongs to another run (settings.sparsity.image_keep_rate: unset there, 0.5 now)" in lines[0]
    restarted = CliRunner().invoke(app, [*args, "--image-keep-rate", "0.5", "--restart"])
    assert restarted.exit_code == 0, restarted.output
    assert (world / "cli-run" / "previous" / "final" / "run.json").is_file()


def test_train_command_reports_a_diverging_run_in_one_error_line(world):
    from typer.testing import CliRunner

    from dynamic_llava.cli import app

    output = world / "cli-diverged"
    args = [
        "train",
        str(world / "model"),
        str(world / "data.json"),
        str(world / "images"),
        str(output),
        "--trainable",
        "predictors",
        "--max-steps",
        "4",
        "--batch-size",
        "2",
        "--save-steps",
        "1",
        "--predictor-learning-rate",
        "1e30",
        "--max-grad-norm",
        "0",
    ]
    outcome = CliRunner().invoke(app, args)
    errors = [line for line in outcome.output.splitlines() if line.startswith("Error: ")]
    assert outcome.exit_code == 1 and "Traceback" not in outcome.output, outcome.output
    assert len(errors) == 1 and "the loss is nan" in errors[0] and "the last good checkpoint is" in errors[0]
    assert not (output / "final").exists()
    last = sorted(p for p in output.iterdir() if p.name.startswith("checkpoint-"))[-1]
    kept = DynamicLlavaForConditionalGeneration.from_pretrained(last)
    assert all(bool(torch.isfinite(p).all()) for p in kept.parameters())


def test_deepspeed_without_the_package_is_refused_before_loading(world, monkeypatch):
    import importlib.util

    config = world / "zero2.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    with pytest.raises(ValueError, match=r"--deepspeed .*zero2.json needs the deepspeed package: pip install"):
        train(recipe_for(world, "deepspeed", deepspeed=str(config)))
    assert not (world / "deepspeed").exists()


def test_non_finite_loss_on_one_process_stops_every_process(world, tmp_path):
    from training_setup import run_two_processes

    result = run_two_processes("distributed_fault_worker.py", world, tmp_path, port=29531, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    messages = [(tmp_path / f"rank{rank}.txt").read_text() for rank in (0, 1)]
    assert "Training stopped at step 2: the loss is NaN or infinite on another process" in messages[0]
    assert "Training stopped at step 2: the loss is nan" in messages[1]
