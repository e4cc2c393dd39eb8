"""The cluttered world (`clutter` > 0): specks added to the plain world's scenes without changing them, labelled
for the tower, recorded in the checkpoints, and never mixed with a plain world's models or tower."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import LlavaForConditionalGeneration

from dynamic_llava.benchmarking import AccuracySettings, run_accuracy
from dynamic_llava.world.assets import build_processor, world_clutter, write_world_settings
from dynamic_llava.world.build import WorldRecipe, _dense_fingerprint, _vision_tower
from dynamic_llava.world.scenes import (
    CLUTTER_COLORS,
    CLUTTER_KINDS,
    COLORS,
    PATCH_SIZE,
    coverage,
    render,
    sample_scene,
    write_split,
)
from dynamic_llava.world.models import tiny_llava_config
from dynamic_llava.world.vision import HEADS, patch_labels, pretrain_vision_tower

SIDE = 8  # patches per side of the world's 96 px images


def test_clutter_adds_specks_to_the_same_scene_in_free_patches():
    for seed in range(40):
        plain = sample_scene(np.random.default_rng(seed))
        cluttered = sample_scene(np.random.default_rng(seed), clutter=16)
        assert plain.clutter == ()
        assert cluttered.objects == plain.objects and cluttered.background == plain.background
        patches = [s.patch for s in cluttered.clutter]
        assert 8 <= len(patches) <= 16 and len(set(patches)) == len(patches)
        assert not coverage(plain).sum(axis=0)[patches].any()  # no speck touches an object's patch
        assert all(s.color in CLUTTER_COLORS and s.color not in COLORS and s.kind in CLUTTER_KINDS
                   for s in cluttered.clutter)
        # the picture is the plain one outside the specks' patches, and differs inside each of them
        a = np.asarray(render(plain), dtype=np.int16).reshape(SIDE, PATCH_SIZE, SIDE, PATCH_SIZE, 3)
        b = np.asarray(render(cluttered), dtype=np.int16).reshape(SIDE, PATCH_SIZE, SIDE, PATCH_SIZE, 3)
        changed = (a != b).any(axis=(1, 3, 4)).reshape(-1)
        assert sorted(np.flatnonzero(changed).tolist()) == sorted(patches)


def test_plain_splits_do_not_change_with_the_clutter_option(tmp_path):
    write_split(tmp_path / "a", "test", 8, seed=3)
    write_split(tmp_path / "b", "test", 8, seed=3, clutter=0)
    write_split(tmp_path / "c", "test", 8, seed=3, clutter=12)
    plain = (tmp_path / "a" / "test.json").read_text()
    assert plain == (tmp_path / "b" / "test.json").read_text()
    # a cluttered split draws other scenes after the first (the specks use the generator), with specks drawn in
    first = json.loads(plain)[0]["image"]
    assert (tmp_path / "a" / "images" / first).read_bytes() != (tmp_path / "c" / "images" / first).read_bytes()


def test_tower_labels_specks_and_learns_them_only_in_a_cluttered_world():
    scene = sample_scene(np.random.default_rng(4), clutter=16)
    labels = patch_labels(scene, SIDE, PATCH_SIZE)
    for speck in scene.clutter:
        assert HEADS["clutter"][int(labels["clutter"][speck.patch])] == f"{speck.color} {speck.kind}"
        assert int(labels["shape"][speck.patch]) == 0
    assert int((labels["clutter"] > 0).sum()) == len(scene.clutter)
    processor = build_processor()
    reports = {}
    for clutter in (0, 16):
        torch.manual_seed(0)
        tower = LlavaForConditionalGeneration(tiny_llava_config(len(processor.tokenizer))).model.vision_tower
        reports[clutter] = pretrain_vision_tower(tower, processor.image_processor, steps=2, batch_size=4,
                                                 progress=False, clutter=clutter)
    assert "clutter" not in reports[0] and 0.0 <= reports[16]["clutter"] <= 1.0


def test_checkpoints_record_their_world_and_evaluations_refuse_to_mix_worlds(tmp_path):
    plain, cluttered = tmp_path / "plain", tmp_path / "cluttered"
    plain.mkdir()
    cluttered.mkdir()
    write_world_settings(cluttered, 16)
    assert world_clutter(plain) == 0 and world_clutter(cluttered) == 16
    with pytest.raises(ValueError, match="different worlds"):
        run_accuracy(AccuracySettings(checkpoint=str(cluttered), baseline_checkpoint=str(plain)))


def test_a_build_refuses_a_tower_of_the_other_world(tmp_path):
    tower = tmp_path / "vision_tower"
    tower.mkdir()
    save_file({"x": torch.zeros(1)}, tower / "model.safetensors")
    (tower / "patch_accuracy.json").write_text(json.dumps({"shape": 1.0, "empty": 1.0}))
    with pytest.raises(ValueError, match="plain world"):
        _vision_tower(None, None, WorldRecipe(work=str(tmp_path), clutter=16), tmp_path)
    assert "clutter" not in _dense_fingerprint(WorldRecipe())  # plain builds keep the stamps they had
    assert _dense_fingerprint(WorldRecipe(clutter=16))["clutter"] == 16
