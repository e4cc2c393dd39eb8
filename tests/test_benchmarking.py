"""The benchmark harness measures what it says: kept tokens, FLOPs, KV bytes per length, accuracy sweeps, plots."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import tiny_dynamic
from transformers import LlavaForConditionalGeneration
from typer.testing import CliRunner

from dynamic_llava import DynamicLlavaConfig, DynamicLlavaForConditionalGeneration, costs
from dynamic_llava.benchmarking import (
    AccuracySettings,
    measure_methods,
    methods_at_budget,
    random_workload,
    run_accuracy,
)
from dynamic_llava.benchmarking.plots import accuracy_vs_flops, kept_overlay, kv_vs_length, latency_vs_context
from dynamic_llava.cli import app
from dynamic_llava.world.assets import build_processor
from dynamic_llava.world.models import tiny_llava_config


@pytest.fixture(scope="module")
def speed_results():
    model = tiny_dynamic()
    workload = random_workload(model, batch=2, text_before=3, text_after=2)
    methods = methods_at_budget(image_keep_rate=0.25, text_keep_rate=0.5, trained=False)
    results = measure_methods(model, workload, methods, repeats=1, decode_tokens=12, no_cache_tokens=3,
                              checkpoints=(1, 4, 8, 12), log=lambda _: None)
    return model, workload, results


def test_speed_results_count_what_each_method_keeps(speed_results):
    model, workload, results = speed_results
    assert list(results) == ["dense", "dynamic-llava", "fastv", "random"]
    per_image = workload.image_tokens
    text = model.config.text_config
    per_token = costs.kv_bytes_per_token(text, 4)
    dense = results["dense"]
    assert dense["image_tokens_kept"] == per_image
    # dense cache after 12 new tokens holds the prompt and 11 generated tokens in every layer, for both samples
    assert dense["kv_bytes_final"] == per_token * text.num_hidden_layers * 2 * (workload.prompt_tokens + 11)
    assert dense["kv_bytes_by_length"][1] == per_token * text.num_hidden_layers * 2 * workload.prompt_tokens
    assert dense["generated_kv_kept_share"] == 1.0
    for name in ("dynamic-llava", "fastv", "random"):
        r = results[name]
        assert r["image_tokens_kept"] == int(0.25 * per_image)
        assert r["flops_speedup"] > 1.0 and r["kv_ratio"] < 1.0
        assert r["prefill_flops"] < dense["prefill_flops"]
        lengths = sorted(r["kv_bytes_by_length"])
        assert lengths == [1, 4, 8, 12]
        assert all(r["kv_bytes_by_length"][a] <= r["kv_bytes_by_length"][b] for a, b in zip(lengths, lengths[1:]))
        assert r["no_cache_tokens"] == 3 and r["no_cache_s"] > 0
    assert results["fastv"]["generated_kv_kept_share"] == 1.0  # FastV prunes image tokens only
    assert results["dynamic-llava"]["generated_kv_kept_share"] < 1.0
    assert results["random"]["generated_kv_kept_share"] < 1.0
    # only Dynamic-LLaVA pays for a predictor
    assert results["dynamic-llava"]["prefill_flops"] > results["fastv"]["prefill_flops"]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_speed_harness_measures_a_qwen_model(family):
    """The same harness on Qwen-VL (multimodal RoPE): what each method keeps, and its exact FLOPs."""
    from dynamic_llava.benchmarking import qwen_random_workload
    from tiny_qwen import tiny_pair

    model, _ = tiny_pair(family)
    workload = qwen_random_workload(model, batch=2, text_before=3, text_after=2, image_side=4)
    methods = methods_at_budget(image_keep_rate=0.25, text_keep_rate=0.5, trained=False)
    results = measure_methods(model, workload, methods, repeats=1, decode_tokens=8, no_cache_tokens=2,
                              checkpoints=(1, 4, 8), log=lambda _: None)
    assert results["dense"]["image_tokens_kept"] == 16
    assert results["dynamic-llava"]["image_tokens_kept"] == results["fastv"]["image_tokens_kept"] == 4
    assert results["dynamic-llava"]["prefill_flops"] < results["dense"]["prefill_flops"]
    assert results["dynamic-llava"]["kv_bytes_final"] < results["dense"]["kv_bytes_final"]
    assert all(r["no_cache_tokens"] == 2 for r in results.values())


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_speed_harness_measures_an_anyres_model(family):
    """The same harness on LLaVA-NeXT and LLaVA-OneVision (anyres tiles, row-end tokens): what each method keeps,
    and its exact FLOPs with the tower run once per tile."""
    from test_onevision import pair as onevision_pair
    from tiny_next import tiny_next_pair

    from dynamic_llava import costs
    from dynamic_llava.benchmarking import next_random_workload
    from dynamic_llava.benchmarking.speed import exact_prefill_flops

    model, _ = tiny_next_pair() if family == "llava_next" else onevision_pair()
    workload = next_random_workload(model, batch=2, text_before=3, text_after=2, image_size=(16, 32))
    assert workload.vision_passes == 3  # two tiles and the overview
    assert workload.image_tokens == 16 + 4 * 8 + 4  # overview + two tiles of 4 x 4 + an end token per row
    assert int((workload.inputs["input_ids"] == model.config.image_token_id).sum()) == 2 * workload.image_tokens
    methods = methods_at_budget(image_keep_rate=0.25, text_keep_rate=0.5, trained=False)
    results = measure_methods(model, workload, methods, repeats=1, decode_tokens=8, no_cache_tokens=2,
                              checkpoints=(1, 4, 8), log=lambda _: None)
    assert results["dense"]["image_tokens_kept"] == workload.image_tokens
    assert results["dynamic-llava"]["image_tokens_kept"] == results["fastv"]["image_tokens_kept"] == 13
    assert results["dynamic-llava"]["kv_bytes_final"] < results["dense"]["kv_bytes_final"]
    dense = exact_prefill_flops(model, methods[0], workload, workload.image_tokens)
    vision = costs.vision_flops(model.config, 3) * 2
    assert dense - vision == costs.prefill_flops(model.config.text_config, workload.prompt_tokens, 2,
                                                 workload.prompt_tokens) * 2


def test_speed_plots_are_written(speed_results, tmp_path):
    model, workload, results = speed_results
    report = {"runs": [{"model": "tiny", "batch": 2, "prompt_tokens": workload.prompt_tokens, "methods": results}]}
    report = json.loads(json.dumps(report))  # as read back from speed.json: integer keys become strings
    for plot in (kv_vs_length, latency_vs_context):
        path = plot(report, tmp_path / f"{plot.__name__}.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kept_overlay_greys_dropped_patches(tmp_path):
    from PIL import Image

    image = Image.new("RGB", (32, 32), (200, 10, 10))
    mask = torch.tensor([True, False, False, True])
    path = kept_overlay(image, {"a": mask}, 2, tmp_path / "kept.png")
    assert path.stat().st_size > 0


@pytest.fixture(scope="module")
def world_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world") / "tiny-dynamic-llava"
    processor = build_processor()
    config = DynamicLlavaConfig(**tiny_llava_config(len(processor.tokenizer), width=32, layers=3).to_dict())
    torch.manual_seed(0)
    DynamicLlavaForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    dense = folder.parent / "tiny-llava"  # the plain llava-hf model it would be fine-tuned from
    LlavaForConditionalGeneration(tiny_llava_config(len(processor.tokenizer), width=32, layers=3)).save_pretrained(dense)
    processor.save_pretrained(dense)
    return folder


def test_accuracy_sweep_holds_the_budgets(world_checkpoint, tmp_path):
    settings = AccuracySettings(checkpoint=str(world_checkpoint), baseline_checkpoint=str(world_checkpoint.parent /
                                "tiny-llava"), image_rates=(0.2,), text_rates=(0.5,), questions=30, calibration=6,
                                batch_size=8, seed=3)
    report = run_accuracy(settings, log=lambda _: None)
    methods = [(p["method"], p["image_keep_rate"]) for p in report["image_sweep"]]
    baselines = ("fastv", "cdpruner", "dart", "random")
    assert methods == [("dense", 1.0), ("dynamic-llava", 1.0), ("dynamic-llava", 0.2), *((m, 0.2) for m in baselines),
                       *((f"{m} on the fine-tuned LM", 0.2) for m in baselines)]
    assert sum(report["questions_per_type"].values()) == report["short_questions"]
    dense, _, *pruned = report["image_sweep"]
    on_dense, on_fine_tuned = pruned[1:5], pruned[5:]
    # the two models differ (random weights of each), so the same policy scores differently on them
    assert [p["describe_ppl"] for p in on_dense] != [p["describe_ppl"] for p in on_fine_tuned]
    pruned = pruned[:5]
    assert dense["image_tokens_kept"] == 64
    for point in pruned:
        assert point["image_tokens_kept"] == int(0.2 * 64)
        assert 0.0 <= point["accuracy_all"] <= 1.0 and point["describe_ppl"] > 1.0
    learned, fastv, cdpruner, dart, random = pruned
    assert fastv["prefill_flops"] == random["prefill_flops"] == cdpruner["prefill_flops"] == dart["prefill_flops"]
    assert random["prefill_flops"] < dense["prefill_flops"]
    config = DynamicLlavaConfig.from_pretrained(world_checkpoint)
    assert learned["prefill_flops"] == fastv["prefill_flops"] + costs.image_predictor_flops(config, 64)
    text = {p["method"]: p for p in report["text_sweep"]}
    assert set(text) == {"dense", "dynamic-llava", "random", "streamingllm", "h2o", "none kept"}
    # the output-text threshold was set on other listings, so the share only approximates the rate
    assert 0.2 < text["dynamic-llava"]["held_share_at_end"] < 0.8
    for name in ("streamingllm", "h2o"):
        assert text[name]["held_share_at_end"] < 1.0
    assert text["dense"]["held_share_at_end"] == 1.0 and text["none kept"]["held_share_at_end"] == 0.0
    for point in text.values():
        assert point["list_ppl"] > 1.0 and point["list_backwards_ppl"] > 1.0
    path = accuracy_vs_flops(report, tmp_path / "acc.png")
    assert path.stat().st_size > 0


def test_accuracy_sweep_of_a_diverse_checkpoint_also_scores_its_top_k_selection(world_checkpoint, tmp_path):
    import shutil

    folder = tmp_path / "tiny-dynamic-llava"
    shutil.copytree(world_checkpoint, folder)
    model = DynamicLlavaForConditionalGeneration.from_pretrained(folder, image_selection="diverse")
    model.save_pretrained(folder)
    settings = AccuracySettings(checkpoint=str(folder), baseline_checkpoint=None, image_rates=(0.2,),
                                text_rates=(0.5,), questions=20, calibration=4, batch_size=8, seed=3)
    report = run_accuracy(settings, log=lambda _: None)
    points = {p["method"]: p for p in report["image_sweep"] if p["image_keep_rate"] == 0.2}
    assert {"dynamic-llava", "dynamic-llava, top-k selection"} <= set(points)
    assert points["dynamic-llava"]["image_tokens_kept"] == points["dynamic-llava, top-k selection"]["image_tokens_kept"]


def test_bench_commands_refuse_a_missing_checkpoint(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "--models", "tiny", "--checkpoint", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "make world" in result.output
    result = runner.invoke(app, ["bench-accuracy", "--checkpoint", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "make world" in result.output
    result = runner.invoke(app, ["bench", "--batches", "0", "--models", "wide"])
    assert result.exit_code == 2 and "--batches" in result.output
