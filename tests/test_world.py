"""The synthetic world: deterministic, consistent, tokenised without unknowns; the harness runs on it."""

import json
from collections import Counter

import numpy as np
import torch
from transformers import AutoProcessor

from dynamic_llava import DynamicLlavaConfig, DynamicLlavaForConditionalGeneration
from dynamic_llava.evaluation import evaluate_world, exact_match
from dynamic_llava.world.assets import build_processor
from dynamic_llava.world.models import tiny_llava_config
from dynamic_llava.world.scenes import NUMBERS, ask, describe, sample_scene, write_split


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


def test_answers_agree_with_the_scene():
    rng = np.random.default_rng(0)
    answers = Counter()
    for _ in range(300):
        scene = sample_scene(rng)
        assert ask(scene, "count", rng)[1] == NUMBERS[len(scene.objects)]
        question, answer = ask(scene, "exist", rng)
        color, shape = question.split()[3:5]
        present = any(o.color == color and o.shape == shape for o in scene.objects)
        assert answer == ("yes" if present else "no")
        answers[answer] += 1
        qa = ask(scene, "color", rng)
        if qa:
            shape = qa[0].split()[-2]
            assert [o.color for o in scene.objects if o.shape == shape] == [qa[1]]
    assert 0.4 < answers["yes"] / sum(answers.values()) < 0.6  # POPE-style balance


def test_tokenizer_covers_the_world_and_descriptions_are_long(tmp_path):
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
    processor.save_pretrained(tmp_path)
    again = AutoProcessor.from_pretrained(tmp_path)
    assert again.tokenizer.get_vocab() == tokenizer.get_vocab()


def test_harness_runs_through_the_engine(tmp_path):
    write_split(tmp_path, "test", 10, describe_share=0.3)
    processor = build_processor()
    config = DynamicLlavaConfig(**tiny_llava_config(len(processor.tokenizer), width=32, layers=3).to_dict())
    torch.manual_seed(0)
    model = DynamicLlavaForConditionalGeneration(config).eval()
    report = evaluate_world(model, processor, tmp_path / "test.json", tmp_path / "images", batch_size=4,
                            progress=False)
    assert report["samples"] == 10
    assert set(report["accuracy"]) <= {"color", "shape", "count", "exist", "position"}
    assert report["image_tokens_kept"] == int(0.2 * 144)
    if "describe_ppl" in report:
        assert report["describe_ppl"] > 1


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
    assert result["image_tokens_kept"] == {"dense": 144, "Dynamic-LLaVA": int(0.2 * 144)}
    assert result["kv_bytes"]["Dynamic-LLaVA"] < result["kv_bytes"]["dense"]
