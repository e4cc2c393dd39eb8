"""Bad input over the Python API and every CLI command: a clear error naming the problem, before any work.

Each API case asserts the exception type and that the message names the setting or file and what is allowed;
each CLI case asserts exit status 2, a single line of output, no traceback, and the same.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny import make_prompts, tiny_config_kwargs, tiny_dynamic
from tiny_processor import GOOD_RECORDS, tiny_processor
from training_setup import recipe_for, write_world
from transformers import LlamaConfig
from typer.testing import CliRunner

from dynamic_llava import (
    CDPrunerPolicy,
    DARTPolicy,
    DynamicLlavaCache,
    DynamicLlavaConfig,
    DynamicLlavaForConditionalGeneration,
    FastVPolicy,
    H2OPolicy,
    LearnedPolicy,
    RandomPolicy,
    StreamingLLMPolicy,
)
from dynamic_llava.benchmarking import SpeedSettings
from dynamic_llava.cli import app
from dynamic_llava.costs import estimate
from dynamic_llava.data import LlavaConversationDataset

NAN = float("nan")
CLUTTERED = Path(__file__).resolve().parents[1] / "checkpoints" / "cluttered" / "tiny-dynamic-llava"
RATE = r"expected a number in \(0, 1\]"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny model and processor on disk, LLaVA data, and broken variants of a checkpoint folder."""
    root = tmp_path_factory.mktemp("bad-inputs")
    model_dir, data, images = write_world(root)
    for name, edit in {
        "zero": lambda f: f.write_bytes(b""),
        "truncated": lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]),
    }.items():
        folder = root / name
        folder.mkdir()
        for file in model_dir.iterdir():
            (folder / file.name).write_bytes(file.read_bytes())
        edit(folder / "model.safetensors")
    bert = root / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    (root / "no-config").mkdir()
    (root / "a-file.txt").write_text("not a folder")
    (root / "deepspeed-bad.json").write_text("{not json")
    model = tiny_dynamic()
    ids, mask, pixels = make_prompts([2], [3])
    return SimpleNamespace(
        root=root,
        model_dir=model_dir,
        data=data,
        images=images,
        model=model,
        inputs=dict(input_ids=ids, attention_mask=mask, pixel_values=pixels),
        processor=tiny_processor(),
    )


def config_with(**settings):
    return lambda env: DynamicLlavaConfig(**tiny_config_kwargs(), **settings)


def load_with(folder=None, **settings):
    return lambda env: DynamicLlavaForConditionalGeneration.from_pretrained(
        env.root / folder if folder else env.model_dir, **settings
    )


def assign(name, value):
    return lambda env: setattr(tiny_dynamic().config, name, value)


def generate_with(**kwargs):
    return lambda env: env.model.generate(**env.inputs, **{"max_new_tokens": 2, **kwargs})


def recipe_with(**overrides):
    def check(env):
        recipe_for(env.root, "never-written", **overrides).check()

    return check


def dataset_with(records=None, **kwargs):
    return lambda env: LlavaConversationDataset(records or GOOD_RECORDS, env.images, env.processor, **kwargs)


def costs_with(**kwargs):
    return lambda env: estimate(DynamicLlavaConfig(**tiny_config_kwargs()), **kwargs)


def speed_with(**kwargs):
    return lambda env: SpeedSettings(**{"models": ("wide",), **kwargs}).check()


def _changed(policy, name, value):
    setattr(policy, name, value)
    return policy


EMPTY_ANSWER = copy.deepcopy(GOOD_RECORDS[0]) | {"id": "empty-answer"}
EMPTY_ANSWER["conversations"][1]["value"] = "  "

API_CASES = [
    # ---- sparsity settings at construction
    (
        "sparse_layer float",
        config_with(sparse_layer=2.0),
        TypeError,
        r"sparse_layer=2.0: expected an integer in \[1, 3\]",
    ),
    ("sparse_layer huge", config_with(sparse_layer=10**12), ValueError, r"sparse_layer=1000000000000: .*\[1, 3\]"),
    ("sparse_layer 0", config_with(sparse_layer=0), ValueError, r"sparse_layer=0: expected an integer in \[1, 3\]"),
    ("sparse_layer bool", config_with(sparse_layer=True), TypeError, r"sparse_layer=True: expected an integer"),
    ("sparse_layer string", config_with(sparse_layer="2"), TypeError, r"sparse_layer='2': expected an integer"),
    ("image rate 0", config_with(image_keep_rate=0.0), ValueError, rf"image_keep_rate=0.0: {RATE}"),
    ("image rate 1.5", config_with(image_keep_rate=1.5), ValueError, rf"image_keep_rate=1.5: {RATE}"),
    ("image rate nan", config_with(image_keep_rate=NAN), ValueError, rf"image_keep_rate=nan: {RATE}"),
    ("image rate string", config_with(image_keep_rate="0.2"), TypeError, rf"image_keep_rate='0.2': {RATE}"),
    ("text rate negative", config_with(text_keep_rate=-0.1), ValueError, rf"text_keep_rate=-0.1: {RATE}"),
    ("text rate inf", config_with(text_keep_rate=math.inf), ValueError, rf"text_keep_rate=inf: {RATE}"),
    (
        "use predictor string",
        config_with(use_image_predictor="yes"),
        TypeError,
        r"use_image_predictor='yes': expected True or False",
    ),
    (
        "use predictor int",
        config_with(use_text_predictor=1),
        TypeError,
        r"use_text_predictor=1: expected True or False",
    ),
    ("heads 0", config_with(predictor_heads=0), ValueError, r"predictor_heads=0: expected an integer >= 1"),
    (
        "heads not dividing",
        config_with(predictor_dim=16, predictor_heads=3),
        ValueError,
        r"predictor_dim=16: expected an even multiple of predictor_heads=3",
    ),
    ("dim odd", config_with(predictor_dim=15, predictor_heads=5), ValueError, r"predictor_dim=15: expected an even"),
    ("mlp dim float", config_with(predictor_mlp_dim=32.0), TypeError, r"predictor_mlp_dim=32.0: expected an integer"),
    ("blocks 0", config_with(predictor_blocks=0), ValueError, r"predictor_blocks=0: expected an integer >= 1"),
    (
        "head dims zero",
        config_with(predictor_head_dims=[8, 0]),
        ValueError,
        r"predictor_head_dims=\[8, 0\]: expected a list of integers >= 1",
    ),
    (
        "text dims string",
        config_with(text_predictor_dims="16,8"),
        TypeError,
        r"text_predictor_dims='16,8': expected a list",
    ),
    ("budget nan", config_with(budget_weight=NAN), ValueError, r"budget_weight=nan: expected a finite number >= 0"),
    (
        "budget negative",
        config_with(budget_weight=-1.0),
        ValueError,
        r"budget_weight=-1.0: expected a finite number >= 0",
    ),
    ("min answer 0", config_with(min_answer_tokens=0), ValueError, r"min_answer_tokens=0: expected an integer >= 1"),
    # ---- at load, overrides included, and loading errors
    ("load sparse_layer huge", load_with(sparse_layer=10**12), ValueError, r"sparse_layer=1000000000000: .*\[1, 3\]"),
    ("load rate string", load_with(image_keep_rate="high"), TypeError, rf"image_keep_rate='high': {RATE}"),
    ("load heads not dividing", load_with(predictor_heads=3), ValueError, r"predictor_dim=16: .*predictor_heads=3"),
    ("load missing folder", load_with("nope"), FileNotFoundError, r"Checkpoint folder not found: .*nope"),
    (
        "load config.json path",
        lambda env: DynamicLlavaForConditionalGeneration.from_pretrained(env.model_dir / "config.json"),
        NotADirectoryError,
        r"config.json is a file: pass the checkpoint folder",
    ),
    ("load folder without config", load_with("no-config"), FileNotFoundError, r"No config.json in .*no-config"),
    ("load bert config", load_with("bert"), ValueError, r"config.json in .*bert is for a 'bert' model, not LLaVA"),
    ("config of bert", lambda env: DynamicLlavaConfig.from_pretrained(env.root / "bert"), ValueError, r"'bert' model"),
    ("load zero-byte weights", load_with("zero"), OSError, r"zero/model.safetensors \(0 bytes\) is not a readable"),
    (
        "load truncated weights",
        load_with("truncated"),
        OSError,
        r"truncated/model.safetensors \(\d+ bytes\) is not a read",
    ),
    (
        "model from a plain config",
        lambda env: DynamicLlavaForConditionalGeneration(SimpleNamespace()),
        TypeError,
        r"config must be a DynamicLlavaConfig",
    ),
    # ---- on assignment to model.config
    ("assign rate 0", assign("image_keep_rate", 0.0), ValueError, rf"image_keep_rate=0.0: {RATE}"),
    ("assign rate nan", assign("text_keep_rate", NAN), ValueError, rf"text_keep_rate=nan: {RATE}"),
    ("assign rate string", assign("image_keep_rate", "0.3"), TypeError, rf"image_keep_rate='0.3': {RATE}"),
    ("assign sparse_layer huge", assign("sparse_layer", 10**12), ValueError, r"sparse_layer=1000000000000"),
    ("assign sparse_layer float", assign("sparse_layer", 1.0), TypeError, r"sparse_layer=1.0: expected an integer"),
    ("assign budget inf", assign("budget_weight", math.inf), ValueError, r"budget_weight=inf"),
    ("mask gradient unknown", config_with(mask_gradient="centred"), ValueError,
     r"mask_gradient='centred': expected 'balanced' or 'raw'"),
    ("mask gradient not a string", config_with(mask_gradient=1), TypeError, r"mask_gradient=1: expected"),
    ("image mask sampling unknown", config_with(image_mask_sampling="topk"), ValueError,
     r"image_mask_sampling='topk': expected 'gumbel' or 'top_share'"),
    ("balanced without a budget", config_with(budget_weight=0.0), ValueError,
     r"budget_weight=0.0: expected > 0 with mask_gradient='balanced'"),
    (
        "assign width under a model",
        assign("predictor_heads", 4),
        ValueError,
        r"predictor_heads=4: fixed at 2 once a model is built from this config",
    ),
    (
        "assign predictor switch under a model",
        assign("use_text_predictor", False),
        ValueError,
        r"use_text_predictor=False: fixed at True once a model is built",
    ),
    ("assign use_text string", assign("use_text_predictor", "no"), TypeError, r"use_text_predictor='no'"),
    # ---- generate / forward arguments
    (
        "policy as string",
        generate_with(sparsity_policy="random"),
        TypeError,
        r"sparsity_policy='random': expected a TokenPolicy instance",
    ),
    (
        "policy as class",
        generate_with(sparsity_policy=RandomPolicy),
        TypeError,
        r"expected an instance; pass RandomPolicy\(\)",
    ),
    ("stats wrong type", generate_with(sparsity_stats={}), TypeError, r"sparsity_stats must be a SparsityStats"),
    (
        "max_new_tokens past context",
        generate_with(max_new_tokens=600),
        ValueError,
        r"max_new_tokens=600 after a prompt of 23 tokens .* context is 512.*at most 490 new tokens",
    ),
    (
        "forward policy string",
        lambda env: env.model(**env.inputs, sparsity_policy="fastv"),
        TypeError,
        r"sparsity_policy='fastv'",
    ),
    (
        "out-of-vocabulary id",
        lambda env: env.model.generate(
            input_ids=torch.cat([env.inputs["input_ids"][:, :-1], torch.tensor([[999]])], 1),
            attention_mask=env.inputs["attention_mask"],
            pixel_values=env.inputs["pixel_values"],
            max_new_tokens=2,
        ),
        ValueError,
        r"input_ids hold token ids from 3 to 999, but the vocabulary has 64",
    ),
    (
        "mask shorter than ids",
        lambda env: env.model.generate(
            input_ids=env.inputs["input_ids"],
            attention_mask=env.inputs["attention_mask"][:, 1:],
            pixel_values=env.inputs["pixel_values"],
            max_new_tokens=2,
        ),
        ValueError,
        r"attention_mask has shape \[1, 22\] but input_ids \[1, 23\]",
    ),
    (
        "forward mask shorter",
        lambda env: env.model(
            input_ids=env.inputs["input_ids"],
            attention_mask=env.inputs["attention_mask"][:, 1:],
            pixel_values=env.inputs["pixel_values"],
        ),
        ValueError,
        r"attention_mask covers 22 tokens but there are 23",
    ),
    (
        "misspelt setting",
        config_with(image_keep_rat=0.1),
        ValueError,
        r"image_keep_rat: not a Dynamic-LLaVA setting; did you mean image_keep_rate\?",
    ),
    ("misspelt override", load_with(sparse_layers=3), ValueError, r"sparse_layers: .*did you mean sparse_layer\?"),
    (
        "cache sparse layer",
        lambda env: DynamicLlavaCache(4, 4),
        ValueError,
        r"sparse_layer=4: expected an integer in \[1, 3\]",
    ),
    ("cache layers float", lambda env: DynamicLlavaCache(4.0, 2), TypeError, r"num_layers=4.0: expected an integer"),
    (
        "float input ids",
        lambda env: env.model(input_ids=env.inputs["input_ids"].float()),
        TypeError,
        r"input_ids must hold integer token ids, got a torch.float32 tensor",
    ),
    (
        "labels shorter than ids",
        lambda env: env.model(**env.inputs, labels=env.inputs["input_ids"][:, 1:]),
        ValueError,
        r"labels have shape \[1, 22\] but input_ids \[1, 23\]",
    ),
    (
        "gumbel tau 0",
        lambda env: env.model(**env.inputs, labels=env.inputs["input_ids"], gumbel_tau=0.0),
        ValueError,
        r"gumbel_tau=0.0: expected a finite number > 0",
    ),
    (
        "h2o without cache",
        generate_with(sparsity_policy=H2OPolicy(), use_cache=False),
        ValueError,
        r"H2OPolicy ranks tokens by the attention accumulated in the KV cache: generate with use_cache=True",
    ),
    # ---- policies
    (
        "policy changed after it was made",
        lambda env: env.model.generate(
            **env.inputs, max_new_tokens=2, sparsity_policy=_changed(RandomPolicy(), "image_keep_rate", 5.0)
        ),
        ValueError,
        rf"image_keep_rate=5.0: {RATE}",
    ),
    (
        "random image rate 1.5",
        lambda env: RandomPolicy(image_keep_rate=1.5),
        ValueError,
        rf"image_keep_rate=1.5: {RATE}",
    ),
    (
        "random image rate nan",
        lambda env: RandomPolicy(image_keep_rate=NAN),
        ValueError,
        rf"image_keep_rate=nan: {RATE}",
    ),
    ("random text rate 0", lambda env: RandomPolicy(text_keep_rate=0), ValueError, rf"text_keep_rate=0: {RATE}"),
    ("random text rate string", lambda env: RandomPolicy(text_keep_rate="0.5"), TypeError, r"text_keep_rate='0.5'"),
    ("random seed float", lambda env: RandomPolicy(seed=1.5), TypeError, r"seed=1.5: expected an integer"),
    ("fastv rate 2", lambda env: FastVPolicy(image_keep_rate=2.0), ValueError, rf"image_keep_rate=2.0: {RATE}"),
    ("cdpruner theta 2", lambda env: CDPrunerPolicy(theta=2.0), ValueError, r"theta=2.0: expected a number in \[0, 1\]"),
    ("cdpruner rate 0", lambda env: CDPrunerPolicy(image_keep_rate=0.0), ValueError, rf"image_keep_rate=0.0: {RATE}"),
    ("dart no image pivot", lambda env: DARTPolicy(image_pivots=0), ValueError, r"image_pivots=0: expected an integer"),
    ("dart text pivots float", lambda env: DARTPolicy(text_pivots=1.5), TypeError, r"text_pivots=1.5"),
    ("learned rate negative", lambda env: LearnedPolicy(image_keep_rate=-0.5), ValueError, r"image_keep_rate=-0.5"),
    ("streaming window 0", lambda env: StreamingLLMPolicy(window=0), ValueError, r"window=0: expected an integer >= 1"),
    (
        "streaming window float",
        lambda env: StreamingLLMPolicy(window=2.5),
        TypeError,
        r"window=2.5: expected an integer",
    ),
    ("h2o heavy negative", lambda env: H2OPolicy(heavy=-1), ValueError, r"heavy=-1: expected an integer >= 0"),
    ("h2o recent 0", lambda env: H2OPolicy(recent=0), ValueError, r"recent=0: expected an integer >= 1"),
    # ---- training recipe, checked before anything is loaded
    ("lr nan", recipe_with(learning_rate=NAN), ValueError, r"learning_rate=nan: expected a finite number > 0"),
    ("lr negative", recipe_with(learning_rate=-1.0), ValueError, r"learning_rate=-1.0: expected a finite number > 0"),
    ("predictor lr 0", recipe_with(predictor_learning_rate=0.0), ValueError, r"predictor_learning_rate=0.0"),
    ("lr string", recipe_with(learning_rate="1e-5"), TypeError, r"learning_rate='1e-5'"),
    ("budget weight nan", recipe_with(sparsity={"budget_weight": NAN}), ValueError, r"budget_weight=nan"),
    (
        "keep rate 0 in recipe",
        recipe_with(sparsity={"image_keep_rate": 0.0}),
        ValueError,
        rf"image_keep_rate=0.0: {RATE}",
    ),
    (
        "unknown sparsity key",
        recipe_with(sparsity={"image_rate": 0.2}),
        ValueError,
        r"unknown settings \['image_rate'\]",
    ),
    ("batch size 0", recipe_with(batch_size=0), ValueError, r"batch_size=0: expected an integer >= 1"),
    ("batch size float", recipe_with(batch_size=2.5), TypeError, r"batch_size=2.5: expected an integer"),
    ("accumulation 0", recipe_with(gradient_accumulation_steps=0), ValueError, r"gradient_accumulation_steps=0"),
    ("warmup 1.5", recipe_with(warmup_ratio=1.5), ValueError, r"warmup_ratio=1.5: expected a number in \[0, 1\]"),
    ("grad norm negative", recipe_with(max_grad_norm=-1.0), ValueError, r"max_grad_norm=-1.0: .*0 turns clipping off"),
    ("seed negative", recipe_with(seed=-1), ValueError, r"seed=-1: expected an integer >= 0"),
    ("save steps 0", recipe_with(save_steps=0), ValueError, r"save_steps=0: expected an integer >= 1"),
    ("epochs nan", recipe_with(epochs=NAN, max_steps=-1), ValueError, r"epochs=nan"),
    ("no steps", recipe_with(epochs=0.0, max_steps=-1), ValueError, r"give max_steps > 0 or epochs > 0"),
    ("bf16 string", recipe_with(bf16="yes"), TypeError, r"bf16='yes': expected True or False"),
    (
        "max_length past context",
        recipe_with(max_length=4096),
        ValueError,
        r"max_length=4096: expected an integer in \[1, 512\]",
    ),
    ("max_length 0", recipe_with(max_length=0), ValueError, r"max_length=0: expected an integer >= 1"),
    ("empty chat template", recipe_with(chat_template=" "), ValueError, r"chat_template=' ': expected 'llava_v1'"),
    ("trainable unknown", recipe_with(trainable="all"), ValueError, r"trainable='all': choose"),
    ("on_bad_record unknown", recipe_with(on_bad_record="ignore"), ValueError, r"on_bad_record='ignore': choose"),
    (
        "deepspeed missing",
        recipe_with(deepspeed="nope.json"),
        FileNotFoundError,
        r"DeepSpeed config not found: nope.json",
    ),
    (
        "deepspeed not json",
        lambda env: recipe_for(env.root, "x", deepspeed=str(env.root / "deepspeed-bad.json")).check(),
        ValueError,
        r"deepspeed-bad.json is not valid JSON",
    ),
    (
        "output is a file",
        lambda env: recipe_for(env.root, "a-file.txt").check(),
        NotADirectoryError,
        r"output folder .*a-file.txt is a file",
    ),
    (
        "model folder without config",
        lambda env: recipe_for(env.root, model=str(env.root / "no-config")).check(),
        FileNotFoundError,
        r"No config.json in .*no-config",
    ),
    (
        "model of another type",
        lambda env: recipe_for(env.root, model=str(env.root / "bert")).check(),
        ValueError,
        r"holds a 'bert' model; Dynamic-LLaVA loads",
    ),
    # ---- training data
    (
        "template renders no turns",
        dataset_with(chat_template="{{ bos_token }}"),
        ValueError,
        r"chat template renders no conversation turns",
    ),
    (
        "template fails",
        dataset_with(chat_template="{% for %}"),
        ValueError,
        r"chat template cannot render a conversation",
    ),
    (
        "empty answer refused",
        dataset_with([EMPTY_ANSWER], on_error="raise"),
        ValueError,
        r"record 'empty-answer': turn 1 \(gpt\) is an empty answer",
    ),
    (
        "data not json",
        lambda env: LlavaConversationDataset(env.root / "deepspeed-bad.json", env.images, env.processor),
        ValueError,
        r"deepspeed-bad.json is not a JSON file of LLaVA records",
    ),
    (
        "data not a list",
        lambda env: LlavaConversationDataset(env.model_dir / "config.json", env.images, env.processor),
        ValueError,
        r"config.json: expected a list of records, got dict",
    ),
    ("only empty answers", dataset_with([EMPTY_ANSWER]), ValueError, r"no usable record: .*empty-answer.*empty answer"),
    # ---- cost model and benchmark settings
    (
        "costs of a text-only config",
        lambda env: estimate(LlamaConfig()),
        TypeError,
        r"config must be a LLaVA config \(with text_config and vision_config\), got LlamaConfig",
    ),
    ("costs dtype bytes 0", costs_with(dtype_bytes=0), ValueError, r"dtype_bytes=0: expected an integer >= 1"),
    ("costs dtype bytes -2", costs_with(dtype_bytes=-2), ValueError, r"dtype_bytes=-2"),
    ("costs negative tokens", costs_with(new_tokens=-5), ValueError, r"new_tokens=-5: expected an integer >= 0"),
    ("costs rate 0", costs_with(image_keep_rate=0.0), ValueError, rf"image_keep_rate=0.0: {RATE}"),
    (
        "speed unknown model",
        speed_with(models=("tiny", "foo")),
        ValueError,
        r"unknown model 'foo'; choose from tiny, wide",
    ),
    ("speed threads -1", speed_with(threads=-1), ValueError, r"threads=-1: expected an integer >= 1"),
    ("speed wide layers 2", speed_with(wide_layers=2), ValueError, r"wide_layers=2: expected an integer >= 3"),
    ("speed repeats 0", speed_with(repeats=0), ValueError, r"repeats=0: expected an integer >= 1"),
]


@pytest.mark.parametrize("case, call, error, message", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_refuses_bad_input(env, case, call, error, message):
    with pytest.raises(error, match=message):
        call(env)


def test_policy_refusal_comes_before_any_work(env, monkeypatch):
    calls = []
    monkeypatch.setattr(type(env.model.model), "forward", lambda *a, **k: calls.append(1))
    with pytest.raises(TypeError):
        env.model.generate(**env.inputs, max_new_tokens=2, sparsity_policy="random")
    with pytest.raises(ValueError, match="max_new_tokens=600"):
        env.model.generate(**env.inputs, max_new_tokens=600)
    assert calls == []


def train_args(env, *extra):
    return ["train", str(env.model_dir), str(env.data), str(env.images), str(env.root / "cli-run"), *extra]


CLI_CASES = [
    # (id, argv builder, text the one line must contain)
    ("demo max-new-tokens 1", lambda env: ["demo", "-n", "1"], "--max-new-tokens must be at least 2"),
    ("demo rate 0", lambda env: ["demo", "--image-keep-rate", "0"], "--image-keep-rate must be in (0, 1]"),
    ("demo rate nan", lambda env: ["demo", "--image-keep-rate", "nan"], "--image-keep-rate must be in (0, 1]"),
    ("demo seed -1", lambda env: ["demo", "--seed", "-1"], "--seed must be >= 0"),
    ("demo seed text", lambda env: ["demo", "--seed", "one"], "Invalid value for '--seed'"),
    (
        "demo wrong checkpoints",
        lambda env: ["demo", "--checkpoints", str(env.root / "nope")],
        "does not hold the world models",
    ),
    (
        "demo checkpoints and random",
        lambda env: ["demo", "--checkpoints", "x", "--random-weights"],
        "exclude each other",
    ),
    ("demo unknown option", lambda env: ["demo", "--fast"], "No such option: --fast"),
    ("train missing arguments", lambda env: ["train", str(env.model_dir)], "Missing argument"),
    (
        "train lr nan",
        lambda env: train_args(env, "--learning-rate", "nan"),
        "learning_rate=nan: expected a finite number > 0",
    ),
    ("train lr -1", lambda env: train_args(env, "--learning-rate", "-1"), "learning_rate=-1.0"),
    ("train budget nan", lambda env: train_args(env, "--budget-weight", "nan"), "budget_weight=nan"),
    ("train mask gradient unknown", lambda env: train_args(env, "--mask-gradient", "centred"),
     "mask_gradient='centred': expected 'balanced' or 'raw'"),
    ("train keep rate 0", lambda env: train_args(env, "--image-keep-rate", "0"), "image_keep_rate=0.0"),
    (
        "train sparse layer 9",
        lambda env: train_args(env, "--sparse-layer", "9"),
        "sparse_layer=9: expected an integer in [1, 3]",
    ),
    ("train batch 0", lambda env: train_args(env, "--batch-size", "0"), "batch_size=0"),
    ("train trainable", lambda env: train_args(env, "--trainable", "all"), "trainable='all'"),
    ("train bad record mode", lambda env: train_args(env, "--on-bad-record", "ignore"), "on_bad_record='ignore'"),
    ("train deepspeed missing", lambda env: train_args(env, "--deepspeed", "nope.json"), "DeepSpeed config not found"),
    ("train max length text", lambda env: train_args(env, "--max-length", "long"), "Invalid value for '--max-length'"),
    ("train max length past context", lambda env: train_args(env, "--max-length", "9999"), "max_length=9999"),
    (
        "train model is config.json",
        lambda env: ["train", str(env.model_dir / "config.json"), *train_args(env)[2:]],
        "config.json is a file",
    ),
    (
        "train missing data",
        lambda env: ["train", str(env.model_dir), "nope.json", str(env.images), "out"],
        "data file not found: nope.json",
    ),
    ("bench unknown model", lambda env: ["bench", "--models", "tiny,foo"], "unknown model 'foo'"),
    ("bench threads -1", lambda env: ["bench", "--models", "wide", "--threads", "-1"], "--threads must be >= 0"),
    ("bench threads text", lambda env: ["bench", "--threads", "many"], "Invalid value for '--threads'"),
    ("bench batches 0", lambda env: ["bench", "--models", "wide", "--batches", "0"], "--batches must be positive"),
    ("bench batches text", lambda env: ["bench", "--batches", "one"], "--batches takes a comma-separated list"),
    (
        "bench rate 2",
        lambda env: ["bench", "--models", "wide", "--image-keep-rate", "2"],
        "--image-keep-rate must be in",
    ),
    (
        "bench output is a file",
        lambda env: ["bench", "--models", "wide", "--output", str(env.root / "a-file.txt")],
        "is a file: pass a folder",
    ),
    (
        "bench output uncreatable",
        lambda env: ["bench", "--models", "wide", "--output", str(env.root / "a-file.txt" / "x")],
        "cannot be created",
    ),
    ("bench wide layers 2", lambda env: ["bench", "--models", "wide", "--wide-layers", "2"], "wide_layers=2"),
    (
        "bench missing tiny checkpoint",
        lambda env: ["bench", "--models", "tiny", "--checkpoint", str(env.root / "nope")],
        "No trained world model",
    ),
    (
        "costs dtype bytes 0",
        lambda env: ["costs", str(env.model_dir), "--dtype-bytes", "0"],
        "--dtype-bytes must be >= 1",
    ),
    (
        "costs dtype bytes -2",
        lambda env: ["costs", str(env.model_dir), "--dtype-bytes", "-2"],
        "--dtype-bytes must be >= 1",
    ),
    ("costs bert config", lambda env: ["costs", str(env.root / "bert")], "'bert' model, not LLaVA"),
    ("costs config.json path", lambda env: ["costs", str(env.model_dir / "config.json")], "config.json is a file"),
    ("costs missing folder", lambda env: ["costs", str(env.root / "nope")], "Checkpoint folder not found"),
    ("costs no config", lambda env: ["costs", str(env.root / "no-config")], "No config.json in"),
    (
        "costs rate 0",
        lambda env: ["costs", str(env.model_dir), "--image-keep-rate", "0"],
        "--image-keep-rate must be in",
    ),
    ("costs negative tokens", lambda env: ["costs", str(env.model_dir), "--new-tokens", "-1"], "must be >= 0"),
    ("costs missing argument", lambda env: ["costs"], "Missing argument 'model'"),
    ("version extra argument", lambda env: ["version", "now"], "unexpected extra argument"),
    ("world seed -1", lambda env: ["world", "--seed", "-1"], "Invalid value for '--seed'"),
    (
        "world missing tower",
        lambda env: ["world", "--output", str(env.root / "w-out"), "--work", str(env.root / "w-work"),
                     "--vision-tower", str(env.root / "nope")],
        "no model.safetensors there",
    ),
    (
        "world missing dense model",
        lambda env: ["world", "--output", str(env.root / "w-out"), "--work", str(env.root / "w-work"),
                     "--dense", str(env.root / "nope")],
        "nope: no model.safetensors there (a folder an earlier build wrote as OUTPUT/tiny-llava)",
    ),
    (
        "world unknown mask sampling",
        lambda env: ["world", "--output", str(env.root / "w-out"), "--work", str(env.root / "w-work"),
                     "--image-mask-sampling", "topk"],
        "--image-mask-sampling topk: choose gumbel or top_share",
    ),
    (
        "world keep range reversed",
        lambda env: ["world", "--output", str(env.root / "w-out"), "--work", str(env.root / "w-work"),
                     "--image-keep-range", "0.3,0.1"],
        "--image-keep-range 0.3,0.1: give LOW,HIGH with 0 < LOW <= HIGH <= 1",
    ),
    ("train keep range of one rate", lambda env: train_args(env, "--image-keep-range", "0.2"),
     "--image-keep-range 0.2: give LOW,HIGH"),
    ("train keep range not numbers", lambda env: train_args(env, "--image-keep-range", "low,high"),
     "--image-keep-range"),
    (
        "world output is a file",
        lambda env: ["world", "--output", str(env.root / "a-file.txt")],
        "is a file",
    ),
    ("bench-accuracy seed -1", lambda env: ["bench-accuracy", "--seed", "-1"], "Invalid value for '--seed'"),
    (
        "bench-accuracy output is a file",
        lambda env: ["bench-accuracy", "--checkpoint", str(env.model_dir), "--output", str(env.root / "a-file.txt")],
        "is a file",
    ),
    (
        "bench-accuracy baseline of another world",
        lambda env: ["bench-accuracy", "--checkpoint", str(CLUTTERED), "--baseline-checkpoint", str(env.model_dir),
                     "--output", str(env.root / "acc")],
        "were trained in different worlds (clutter 16 and 0): pass the dense model of the same world build as "
        "--baseline-checkpoint",
    ),
    ("unknown command", lambda env: ["deploy"], "No such command 'deploy'"),
    ("serve without a model", lambda env: ["serve"], "Missing argument 'model'"),
    ("serve a missing folder", lambda env: ["serve", str(env.root / "nowhere")], "is not a checkpoint folder"),
    ("serve on a bad port", lambda env: ["serve", str(env.model_dir), "--port", "70000"], "--port"),
    ("generate without a prompt", lambda env: ["generate", str(env.model_dir)], "Missing option '--prompt'"),
    ("generate a bad budget", lambda env: ["generate", str(env.model_dir), "-p", "hi", "--kv-budget-tokens", "0"],
     "kv_budget_tokens=0"),
]


@pytest.mark.parametrize("case, argv, needle", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_refuses_bad_input_in_one_line(env, case, argv, needle):
    outcome = CliRunner().invoke(app, argv(env))
    lines = [line for line in outcome.output.splitlines() if line.strip()]
    assert outcome.exit_code == 2, outcome.output
    assert len(lines) == 1 and "Traceback" not in outcome.output, outcome.output
    assert lines[0].startswith("Error: ") and needle in lines[0], lines[0]


def test_bench_refuses_before_running_anything(env, monkeypatch):
    import dynamic_llava.benchmarking as benchmarking

    monkeypatch.setattr(benchmarking, "run_speed", lambda *a, **k: pytest.fail("the benchmark ran"))
    outcome = CliRunner().invoke(app, ["bench", "--models", "tiny,foo", "--output", str(env.root / "results")])
    assert outcome.exit_code == 2 and "unknown model 'foo'" in outcome.output
    assert not (env.root / "results").exists()


def test_an_unforeseen_failure_is_one_line_with_the_traceback_on_request(env, monkeypatch):
    import dynamic_llava.benchmarking as benchmarking

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory\nwhile decoding")

    monkeypatch.setattr(benchmarking, "run_speed", broken)
    argv = ["bench", "--models", "wide", "--output", str(env.root / "unforeseen")]
    outcome = CliRunner().invoke(app, argv)
    lines = [line for line in outcome.output.splitlines() if line.strip()]
    assert outcome.exit_code == 1 and "Traceback" not in outcome.output
    assert lines == ["Error: RuntimeError: out of memory while decoding (set DYNAMIC_LLAVA_DEBUG=1 for the traceback)"]
    monkeypatch.setenv("DYNAMIC_LLAVA_DEBUG", "1")
    assert isinstance(CliRunner().invoke(app, argv).exception, RuntimeError)


def test_case_count():
    assert len(API_CASES) + len(CLI_CASES) >= 80
    assert len({c[0] for c in API_CASES}) == len(API_CASES) and len({c[0] for c in CLI_CASES}) == len(CLI_CASES)


def test_no_records_are_left_out_silently(env, caplog):
    dataset = LlavaConversationDataset([EMPTY_ANSWER, *GOOD_RECORDS], env.images, env.processor)
    assert dataset.skipped == [("empty-answer", "turn 1 (gpt) is an empty answer")]
    assert "empty-answer" in caplog.text


def test_a_bad_setting_in_config_json_names_the_folder_and_an_override_can_fix_it(env):
    folder = env.root / "zero-rate"
    folder.mkdir()
    for file in env.model_dir.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "image_keep_rate": 0}))
    with pytest.raises(ValueError, match=rf"config.json in {folder}: image_keep_rate=0: {RATE}"):
        DynamicLlavaForConditionalGeneration.from_pretrained(folder)
    assert DynamicLlavaForConditionalGeneration.from_pretrained(folder, image_keep_rate=0.5).config.image_keep_rate == 0.5


def test_refused_assignment_keeps_the_old_value():
    model = tiny_dynamic()
    with pytest.raises(ValueError):
        model.config.sparse_layer = 10**12
    assert model.config.sparse_layer == 2
    assert "_sparsity_ready" not in model.config.to_dict() and "_structure_fixed" not in model.config.to_dict()
    config = DynamicLlavaConfig(**tiny_config_kwargs())
    config.use_text_predictor = False  # before any model is built from it, structure may still change
    assert DynamicLlavaForConditionalGeneration(config).text_predictor is None


def test_generated_image_token_ids_are_text_with_and_without_cache(env):
    from transformers import LogitsProcessor, LogitsProcessorList

    class AlternateImageId(LogitsProcessor):
        def __call__(self, input_ids, scores):
            forced = torch.full_like(scores, -1e9)
            forced[:, 3 if input_ids.shape[1] % 2 else 5] = 0  # 3: the image token's id
            return forced

    outs = [
        env.model.generate(
            **env.inputs,
            max_new_tokens=6,
            do_sample=False,
            use_cache=use_cache,
            logits_processor=LogitsProcessorList([AlternateImageId()]),
        )
        for use_cache in (True, False)
    ]
    assert (outs[0][0, -6:] == 3).sum() == 3
    assert torch.equal(outs[0], outs[1])


def test_loading_messages_name_the_file(env):
    with pytest.raises(OSError) as caught:
        DynamicLlavaForConditionalGeneration.from_pretrained(Path(env.root / "zero"))
    assert str(env.root / "zero" / "model.safetensors") in str(caught.value)


@pytest.mark.parametrize("rate", [0.01, 0.3, 0.7, 1.0])
def test_cost_estimate_keeps_as_many_image_tokens_as_the_engine(env, rate):
    from dynamic_llava import SparsityStats

    model = tiny_dynamic(image_keep_rate=rate)
    stats = SparsityStats()
    model(**env.inputs, sparsity_stats=stats)
    assert stats.summary()["image_tokens_kept"] == [estimate(model.config)["image_tokens_kept"]]
