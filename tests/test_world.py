"""The synthetic world: deterministic, fair (no answer shortcuts), hard to prune at random, tokenised
without unknowns; its dense trainer sees exactly what the processor gives; the harness runs on it."""

import json
from collections import Counter
from math import comb

import numpy as np
import pytest
import torch
from transformers import AutoProcessor

from dynamic_llava import DynamicLlavaConfig, DynamicLlavaForConditionalGeneration
from dynamic_llava.data import LlavaConversationDataset
from dynamic_llava.evaluation import evaluate_world, exact_match
from dynamic_llava.evaluation.world import listing_correct, listing_scores
from dynamic_llava.world.assets import build_processor, write_world_settings
from dynamic_llava.world.dense import PromptEncoder, ScenePool, Stage, encode_scenes, held_out_accuracy, train_stage
from dynamic_llava.world.models import tiny_llava_config
from dynamic_llava.world.scenes import (
    CELLS,
    LIST_PROMPT,
    NUMBERS,
    ask,
    describe,
    is_trap,
    listing,
    object_patches,
    random_keep_loss_rate,
    sample_scene,
    sample_turn,
    write_split,
)
from dynamic_llava.world.vision import HEADS, patch_labels


def test_the_build_is_reached_from_the_world_package():
    import dynamic_llava.world as world
    from dynamic_llava.world import build

    assert world.WorldRecipe is build.WorldRecipe and world.build_world is build.build_world
    with pytest.raises(AttributeError, match="no attribute 'recipe'"):
        world.recipe


def test_a_bad_fine_tune_keep_range_is_refused_before_the_build_starts(tmp_path):
    from dynamic_llava.world import WorldRecipe, build_world

    recipe = WorldRecipe(work=str(tmp_path / "work"), output=str(tmp_path / "out"), dynamic_image_keep_range=(0.3, 0.1))
    with pytest.raises(ValueError, match=r"dynamic_image_keep_range=\(0.3, 0.1\): expected \(low, high\)"):
        build_world(recipe)
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


def test_splits_are_deterministic_by_seed(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_split(a, "validation", 12)
    write_split(b, "validation", 12)
    assert (a / "validation.json").read_text() == (b / "validation.json").read_text()
    for name in json.loads((a / "validation.json").read_text()):
        image = name["image"]
        assert (a / "images" / image).read_bytes() == (b / "images" / image).read_bytes()
    write_split(b, "test", 12)
    assert (a / "validation.json").read_text() != (b / "test.json").read_text().replace("test", "validation")
    write_split(b / "other", "validation", 12, seed=5)
    assert (a / "validation.json").read_text() != (b / "other" / "validation.json").read_text()


def test_existence_is_balanced_for_every_object_count_and_mostly_traps():
    rng = np.random.default_rng(0)
    yes, no_multi, traps = Counter(), 0, 0
    asked = Counter()
    for _ in range(4000):
        scene = sample_scene(rng)
        question, answer = ask(scene, "exist", rng)
        color, shape = question.split()[3:5]
        present = any(o.color == color and o.shape == shape for o in scene.objects)
        assert answer == ("yes" if present else "no")
        n = len(scene.objects)
        asked[n] += 1
        yes[n] += answer == "yes"
        if n > 1 and answer == "no":
            no_multi += 1
            traps += is_trap(scene, question)
    for n in range(1, 5):
        assert 0.45 < yes[n] / asked[n] < 0.55, (n, yes[n] / asked[n])
    assert traps / no_multi >= 0.5, traps / no_multi  # binding traps: both words occur, on different objects


def test_referents_are_unique_and_usually_confusable():
    rng = np.random.default_rng(1)
    confusable = Counter()
    for _ in range(1500):
        scene = sample_scene(rng, min_objects=2)
        colors, shapes = [o.color for o in scene.objects], [o.shape for o in scene.objects]
        assert len(set(zip(colors, shapes))) == len(colors)  # no two objects alike
        assert ask(scene, "count", rng)[1] == NUMBERS[len(scene.objects)]
        qa = ask(scene, "color", rng)
        if qa:
            shape = qa[0].split()[-2]
            assert [o.color for o in scene.objects if o.shape == shape] == [qa[1]]
            confusable["color"] += colors.count(qa[1]) > 1
        qa = ask(scene, "shape", rng)
        if qa:
            color = qa[0].split()[-3]
            assert [o.shape for o in scene.objects if o.color == color] == [qa[1]]
        question, answer = ask(scene, "position", rng)
        color, shape = question.split()[3:5]
        assert [CELLS[o.cell] for o in scene.objects if (o.color, o.shape) == (color, shape)] == [answer]
    assert confusable["color"] > 200  # the asked object's colour is often on another object too


def test_objects_live_on_few_patches_and_random_keep_loses_them():
    rng = np.random.default_rng(2)
    scenes = [sample_scene(rng) for _ in range(300)]
    sizes = [len(p) for s in scenes for p in object_patches(s)]
    assert 2 <= np.mean(sizes) <= 8 and min(sizes) >= 1
    rate = random_keep_loss_rate(scenes, 0.2)
    assert 0.3 < rate < 0.7, rate
    # the exact rate equals a simulation of uniform random keeps
    sim_rng = np.random.default_rng(3)
    lost = []
    for scene in scenes[:100]:
        for patches in object_patches(scene):
            kept = sim_rng.choice(64, size=12, replace=False)
            lost.append(not set(patches) & set(kept.tolist()))
    exact = random_keep_loss_rate(scenes[:100], 0.2)
    assert abs(np.mean(lost) - exact) < 0.06
    patches = object_patches(scenes[0])[0]
    assert random_keep_loss_rate([scenes[0]], 0.2) >= comb(64 - len(patches), 12) / comb(64, 12) - 1e-12


def test_patch_labels_mark_the_covered_patches():
    rng = np.random.default_rng(4)
    scene = sample_scene(rng, min_objects=3)
    labels = patch_labels(scene, 8, 12)
    covered = set()
    for obj, patches in zip(scene.objects, object_patches(scene)):
        covered |= set(patches)
        assert any(int(labels["color"][p]) == HEADS["color"].index(obj.color) for p in patches)
        assert all(int(labels["cell"][p]) == HEADS["cell"].index(CELLS[obj.cell]) for p in patches
                   if int(labels["shape"][p]) == HEADS["shape"].index(obj.shape)
                   and int(labels["color"][p]) == HEADS["color"].index(obj.color))
    assert set(torch.nonzero(labels["shape"]).flatten().tolist()) <= covered


def test_listings_go_backwards_and_their_check_needs_the_order():
    rng = np.random.default_rng(5)
    scene, (question, answer) = sample_turn(rng, "list")
    assert question == LIST_PROMPT and len(scene.objects) >= 3
    first, tail = answer.split("backwards :")
    names = [" ".join(item.split()[2:4]) for item in first.rstrip(" .").split(";")]
    assert [n.strip() for n in tail.rstrip(" .").split(",")] == names[::-1]
    assert listing_correct(answer, answer)
    other = listing(scene, np.random.default_rng(99))
    assert listing_correct(other, answer)  # another order is right, if its second part follows it
    swapped_tail = first + "backwards : " + " , ".join(names) + " ."
    assert not listing_correct(swapped_tail, answer)


def test_listing_scores_give_partial_credit():
    rng = np.random.default_rng(5)
    scene, (_, answer) = sample_turn(rng, "list")
    items = [" ".join(i.split()) for i in answer.split("backwards :")[0].rstrip(" .").split(";")]
    names = [" ".join(item.split()[2:4]) for item in items]
    assert listing_scores([answer], [answer]) == {"items_named": 1.0, "self_reversed": 1.0}
    # one object wrong (another shape at another cell), its own order reversed: partial credit, self-consistent
    wrong = "a small ochre blob at nowhere"
    altered = " ; ".join([wrong] + items[1:]) + " . backwards : " + " , ".join((["ochre blob"] + names[1:])[::-1]) + " ."
    scores = listing_scores([altered], [answer])
    assert scores["items_named"] == pytest.approx((len(items) - 1) / len(items)) and scores["self_reversed"] == 1.0
    # right objects, second part not reversed; and an answer without a second part
    not_reversed = answer.split("backwards :")[0] + "backwards : " + " , ".join(names) + " ."
    scores = listing_scores([not_reversed, "a small red circle at top ."], [answer, answer])
    assert scores == {"items_named": 0.5, "self_reversed": 0.0}
    with pytest.raises(ValueError, match="not a listing reference"):
        listing_scores([answer], ["blue"])


def test_tokenizer_covers_the_world_and_long_answers_are_long(tmp_path):
    processor = build_processor()
    tokenizer = processor.tokenizer
    rng = np.random.default_rng(1)
    for _ in range(100):
        scene = sample_scene(rng)
        ids = tokenizer(describe(scene), add_special_tokens=False).input_ids
        assert tokenizer.unk_token_id not in ids
        assert len(ids) + 1 >= 60  # with the end token
        for kind in ("count", "exist", "position", "color", "shape"):
            qa = ask(scene, kind, rng)
            if qa:
                assert tokenizer.unk_token_id not in tokenizer(" ".join(qa)).input_ids
        _, (question, answer) = sample_turn(rng, "list")
        ids = tokenizer(question + " " + answer, add_special_tokens=False).input_ids
        assert tokenizer.unk_token_id not in ids and len(ids) >= 40
    processor.save_pretrained(tmp_path)
    again = AutoProcessor.from_pretrained(tmp_path)
    assert again.tokenizer.get_vocab() == tokenizer.get_vocab()


def test_prompt_encoder_matches_the_processor_and_the_dataset(tmp_path):
    processor = build_processor()
    encoder = PromptEncoder(processor, 64)
    write_split(tmp_path, "train", 6, mix={"exist": 1.0, "list": 1.0}, max_turns=1)
    records = json.loads((tmp_path / "train.json").read_text())
    dataset = LlavaConversationDataset(records, tmp_path / "images", processor)
    for index, record in enumerate(records):
        question = record["conversations"][0]["value"].replace("\n<image>", "")
        ids, start = encoder.sample(question, record["conversations"][1]["value"])
        item = dataset[index]
        assert item["input_ids"].tolist() == ids
        labelled = (item["labels"] != -100).nonzero().flatten().tolist()
        assert labelled == list(range(start, len(ids)))


def test_dense_stage_learns_and_stops_at_its_target():
    processor = build_processor()
    torch.manual_seed(0)
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration(tiny_llava_config(len(processor.tokenizer), width=32, layers=2))
    model.model.vision_tower.requires_grad_(False)
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(64)]
    pool = ScenePool(scenes, encode_scenes(model, processor.image_processor, scenes, progress=False))
    encoder = PromptEncoder(processor, 64)
    before = held_out_accuracy(model, encoder, pool, ["count"])["count"]
    stage = Stage("count", {"count": 1.0}, 500, 3e-3, 16, targets={"count": 0.8}, eval_every=20)
    result = train_stage(model, encoder, pool, pool, stage, progress=False)
    after = held_out_accuracy(model, encoder, pool, ["count"])["count"]
    assert after == result["history"][-1]["count"]  # the stage's own check, repeated
    assert after > before and after >= 0.8, (before, after)
    assert result["reached_targets"] and result["steps"] < 500
    assert model.model.vision_tower.embeddings.patch_embedding.weight.grad is None  # the tower stays frozen


def test_harness_runs_through_the_engine(tmp_path):
    write_split(tmp_path, "test", 14)
    processor = build_processor()
    config = DynamicLlavaConfig(**tiny_llava_config(len(processor.tokenizer), width=32, layers=3).to_dict())
    torch.manual_seed(0)
    model = DynamicLlavaForConditionalGeneration(config).eval()
    report = evaluate_world(model, processor, tmp_path / "test.json", tmp_path / "images", batch_size=4,
                            progress=False)
    assert report["samples"] == 14
    assert set(report["accuracy"]) <= {"color", "shape", "count", "exist", "position"}
    assert report["image_tokens_kept"] == int(0.2 * 64)
    for kind in ("describe", "list"):
        if f"{kind}_ppl" in report:
            assert report[f"{kind}_ppl"] > 1
    if "list_backwards_ppl" in report:
        assert report["list_backwards_ppl"] > 1


def test_exact_match_normalisation():
    assert exact_match("Top left.", "top left")
    assert not exact_match("top", "top left")


def test_world_demo_runs_on_saved_checkpoints(tmp_path):
    from transformers import LlavaForConditionalGeneration

    from dynamic_llava.world.build import DENSE_DIR, DYNAMIC_DIR
    from dynamic_llava.world.demo import checkpoints_present, run_world_demo

    processor = build_processor()
    config = tiny_llava_config(len(processor.tokenizer), width=32, layers=3)
    assert not checkpoints_present(tmp_path)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(tmp_path / DENSE_DIR)
    DynamicLlavaForConditionalGeneration(DynamicLlavaConfig(**config.to_dict())).save_pretrained(tmp_path / DYNAMIC_DIR)
    for name in (DENSE_DIR, DYNAMIC_DIR):
        processor.save_pretrained(tmp_path / name)
    assert checkpoints_present(tmp_path)
    result = run_world_demo(tmp_path, samples=6, show=False)
    assert result["image_tokens_kept"] == {"dense": 64, "Dynamic-LLaVA": int(0.2 * 64)}
    assert result["kv_bytes"]["Dynamic-LLaVA"] < result["kv_bytes"]["dense"]


def test_a_listing_order_is_not_in_the_image_or_the_prompt():
    """The order is a uniform permutation drawn per answer: without the first part, nothing (image, prompt,
    any model) tells the second part beyond chance (1 / n!)."""
    scene = sample_scene(np.random.default_rng(6), min_objects=3, max_objects=3)
    rng = np.random.default_rng(7)
    orders = Counter(listing(scene, rng).split("backwards :")[1] for _ in range(600))
    assert len(orders) == 6 and all(60 <= n <= 140 for n in orders.values()), orders


def test_a_stopped_dense_stage_resumes_exactly(tmp_path, monkeypatch):
    import dynamic_llava.world.dense as dense
    from transformers import LlavaForConditionalGeneration

    processor = build_processor()
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(32)]
    encoder = PromptEncoder(processor, 64)

    def run(checkpoint, stop_after=None):
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(tiny_llava_config(len(processor.tokenizer), width=32, layers=2))
        model.model.vision_tower.requires_grad_(False)
        pool = ScenePool(scenes, encode_scenes(model, processor.image_processor, scenes, progress=False))
        stage = Stage("q", {"count": 1.0, "exist": 1.0}, 30, 3e-3, 8, eval_every=10, decay_steps=10)
        if stop_after is not None:
            calls = {"n": 0}
            original = dense.per_answer_loss

            def failing(*args):
                calls["n"] += 1
                if calls["n"] > stop_after:
                    raise KeyboardInterrupt
                return original(*args)

            monkeypatch.setattr(dense, "per_answer_loss", failing)
            with pytest.raises(KeyboardInterrupt):
                train_stage(model, encoder, pool, pool, stage, progress=False, checkpoint=checkpoint)
            monkeypatch.setattr(dense, "per_answer_loss", original)
            stage = Stage("q", {"count": 1.0, "exist": 1.0}, 30, 3e-3, 8, eval_every=10, decay_steps=10)
        result = train_stage(model, encoder, pool, pool, stage, progress=False, checkpoint=checkpoint)
        return model, result

    whole, whole_result = run(None)
    resumed, resumed_result = run(tmp_path / "state.pt", stop_after=25)  # stopped after the step-20 check
    assert resumed_result["steps"] == whole_result["steps"] == 30
    assert [h["step"] for h in resumed_result["history"]] == [h["step"] for h in whole_result["history"]]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)


def test_a_world_build_refuses_dense_stages_of_another_recipe(tmp_path):
    from dynamic_llava.world.build import WorldRecipe, _check_same_run, _dense_fingerprint

    recipe = WorldRecipe(work=str(tmp_path))
    same = _dense_fingerprint(recipe)
    _check_same_run(same, recipe, tmp_path / "dense-3")  # the same recipe: reused
    with pytest.raises(ValueError, match=r"question_steps: 10 there, 4000 now.*another --work folder"):
        _check_same_run({**same, "question_steps": 10}, recipe, tmp_path / "dense-1", 0)
    # the fine-tune's folder follows the dense model's settings and its own: another dense model or another
    # fine-tune recipe never resumes (nor is refused by) its checkpoints; evaluation settings do not matter
    from dynamic_llava.world.build import dynamic_folder

    assert dynamic_folder(recipe) == dynamic_folder(WorldRecipe(work=str(tmp_path), test_size=50, eval_limit=9))
    assert dynamic_folder(recipe) != dynamic_folder(WorldRecipe(work=str(tmp_path), polish_steps=5))
    for changed in ({"dynamic_steps": 9}, {"dynamic_hidden_distill_weight": 0.0}, {"train_size": 100},
                    {"dynamic_image_keep_range": (0.1, 0.3)}):
        assert dynamic_folder(recipe) != dynamic_folder(WorldRecipe(work=str(tmp_path), **changed)), changed
    # a stage is judged by the settings of the stages up to it: a later stage's settings do not matter
    first = _dense_fingerprint(recipe, 0)
    assert "question_steps" in first and "long_steps" not in first and "polish_steps" not in first
    _check_same_run(first, WorldRecipe(work=str(tmp_path), polish_steps=5), tmp_path / "dense-1", 0)
    with pytest.raises(ValueError, match=r"polish_steps: 800 there, 5 now"):
        _check_same_run(same, WorldRecipe(work=str(tmp_path), polish_steps=5), tmp_path / "dense-3", 2)


def test_a_fine_tune_can_start_from_an_earlier_builds_dense_model(tmp_path):
    from transformers import LlavaForConditionalGeneration

    from dynamic_llava.world.build import DENSE_DIR, WorldRecipe, dynamic_folder, load_dense

    processor = build_processor()
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(tiny_llava_config(len(processor.tokenizer), width=32, layers=2))
    model.to(torch.float16).save_pretrained(tmp_path / DENSE_DIR)
    processor.save_pretrained(tmp_path / DENSE_DIR)
    stages = [{"steps": 3, "seconds": 4}]
    (tmp_path / "world_report.json").write_text(json.dumps({"stages": stages, "vision_seconds": 3, "dense_seconds": 1}))
    recipe = WorldRecipe(work=str(tmp_path / "work"), dense=str(tmp_path / DENSE_DIR))
    dense, loaded_processor, record = load_dense(recipe)
    assert dense.dtype == torch.float32 and record["stages"] == stages and record["vision_seconds"] == 3
    assert "dense_seconds" not in record  # recomputed from the stages, never carried
    for (name, a), b in zip(model.state_dict().items(), dense.state_dict().values()):
        assert torch.equal(a.float(), b), name
    assert loaded_processor.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    # the fine-tune's folder is named by the dense weights: other weights never resume its checkpoints
    first = dynamic_folder(recipe)
    assert first != dynamic_folder(WorldRecipe(work=str(tmp_path / "work")))
    with torch.no_grad():
        model.model.language_model.norm.weight.add_(1.0)
    model.save_pretrained(tmp_path / DENSE_DIR)
    assert dynamic_folder(recipe) != first
    write_world_settings(tmp_path / DENSE_DIR, 16)  # a dense model of the cluttered world: never fine-tuned on another
    with pytest.raises(ValueError, match="--clutter 16, and this build has --clutter 0"):
        load_dense(recipe)


def test_a_build_from_an_earlier_dense_model_fine_tunes_saves_and_reports(tmp_path):
    from transformers import LlavaForConditionalGeneration

    from dynamic_llava.world.build import DENSE_DIR, DYNAMIC_DIR, WorldRecipe, build_world, dynamic_folder

    processor = build_processor()
    torch.manual_seed(0)
    earlier = tmp_path / "earlier"
    LlavaForConditionalGeneration(tiny_llava_config(len(processor.tokenizer), width=32, layers=3)).save_pretrained(
        earlier / DENSE_DIR)
    processor.save_pretrained(earlier / DENSE_DIR)
    stages = [{"steps": 3, "seconds": 4}, {"steps": 2, "seconds": 1}]
    (earlier / "world_report.json").write_text(json.dumps({"stages": stages, "vision_seconds": 2, "dense_seconds": 99}))
    recipe = WorldRecipe(output=str(tmp_path / "out"), work=str(tmp_path / "work"), dense=str(earlier / DENSE_DIR),
                         train_size=8, test_size=6, dynamic_steps=2, batch_size=4, eval_limit=6,
                         dynamic_image_selection="diverse")
    report = build_world(recipe)
    # the dense model's cost is what its stages took when trained (2 + 4 + 1), not a figure carried along
    assert report["stages"] == stages and report["dense_seconds"] == 7
    assert report["train_seconds"] == 7 + report["dynamic_seconds"]
    assert json.loads((tmp_path / "out" / "world_report.json").read_text())["recipe"]["dense"] == recipe.dense
    config = DynamicLlavaConfig.from_pretrained(tmp_path / "out" / DYNAMIC_DIR)
    assert config.image_selection == "diverse"
    run = json.loads((dynamic_folder(recipe) / "final" / "run.json").read_text())
    assert run["settings"]["distill_weight"] == recipe.dynamic_distill_weight > 0  # the dense model taught it
    assert run["settings"]["hidden_distill_weight"] == recipe.dynamic_hidden_distill_weight > 0
    assert report[DYNAMIC_DIR]["test"]["samples"] == 6 and report[DYNAMIC_DIR]["fresh"]["samples"] == 6


def test_the_dense_cost_is_summed_from_the_stage_records_and_the_tower_keeps_its_seconds(tmp_path):
    from transformers import LlavaForConditionalGeneration

    from dynamic_llava.world.build import WorldRecipe, _dense_seconds, _vision_tower

    assert _dense_seconds({"vision_seconds": 2, "stages": [{"seconds": 4}, {"seconds": 1.4}]}) == 7
    assert _dense_seconds({"vision_seconds": None, "stages": [{"seconds": 4}]}) is None  # unknown, not a guess
    assert _dense_seconds({"vision_seconds": 2, "stages": [{"steps": 3}]}) is None
    processor = build_processor()
    model = LlavaForConditionalGeneration(tiny_llava_config(len(processor.tokenizer), width=32, layers=2))
    recipe = WorldRecipe(work=str(tmp_path), vision_steps=1, vision_batch_size=2)
    accuracy, seconds = _vision_tower(model, processor, recipe, tmp_path)
    assert isinstance(seconds, int) and seconds >= 0 and (tmp_path / "vision_tower" / "seconds.json").is_file()
    # reused by a later build: the same tower, the seconds its training took
    again = LlavaForConditionalGeneration(tiny_llava_config(len(processor.tokenizer), width=32, layers=2))
    assert _vision_tower(again, processor, recipe, tmp_path) == (accuracy, seconds)
    for a, b in zip(model.model.vision_tower.state_dict().values(), again.model.vision_tower.state_dict().values()):
        assert torch.equal(a, b)
