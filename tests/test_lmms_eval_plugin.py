"""The lmms-eval plug-in's request handling, on the shipped world model. lmms-eval itself is an optional extra
(heavy, not installed for the tests): its two names the plug-in uses are stood in for when it is absent."""

import importlib
import json
import importlib.util
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

SHIPPED = Path(__file__).parent.parent / "checkpoints"


@pytest.fixture
def plugin(monkeypatch):
    if importlib.util.find_spec("lmms_eval") is None:
        @dataclass(frozen=True)
        class ModelManifest:
            model_id: str
            simple_class_path: str | None = None
            chat_class_path: str | None = None
            aliases: tuple = ()

        class lmms:  # noqa: N801 - lmms-eval's name
            def __init__(self):
                self.task_dict = {}

        modules = {"lmms_eval": types.ModuleType("lmms_eval"), "lmms_eval.api": types.ModuleType("lmms_eval.api"),
                   "lmms_eval.api.model": types.ModuleType("lmms_eval.api.model"),
                   "lmms_eval.models": types.ModuleType("lmms_eval.models"),
                   "lmms_eval.models.registry_v2": types.ModuleType("lmms_eval.models.registry_v2")}
        modules["lmms_eval.api.model"].lmms = lmms
        modules["lmms_eval.models.registry_v2"].ModelManifest = ModelManifest
        for name, module in modules.items():
            monkeypatch.setitem(sys.modules, name, module)
        monkeypatch.delitem(sys.modules, "dynamic_llava.integrations.lmms_eval", raising=False)
    return importlib.import_module("dynamic_llava.integrations.lmms_eval")


class Request:
    def __init__(self, *args):
        self.args = args


def test_manifest_names_the_model_class(plugin):
    manifest = plugin.manifest()
    assert manifest.model_id == "dynamic_llava" and manifest.simple_class_path == plugin.CLASS_PATH
    module, name = plugin.CLASS_PATH.rsplit(".", 1)
    assert getattr(importlib.import_module(module), name) is plugin.DynamicLlavaLMMS


def test_plugin_answers_as_the_world_harness_in_request_order(plugin, tmp_path):
    import torch
    from transformers import AutoProcessor

    from dynamic_llava import DynamicLlavaForConditionalGeneration
    from dynamic_llava.evaluation.world import answer_questions
    from dynamic_llava.integrations.lmms_eval_task import doc_to_text, doc_to_visual
    from dynamic_llava.world.export import export_lmms_eval_task
    from dynamic_llava.world.scenes import write_split

    write_split(tmp_path, "test", 24, seed=9)
    task = export_lmms_eval_task(tmp_path / "test.json", tmp_path / "task", limit=10)  # the world's lmms-eval task
    docs = [json.loads(line) for line in (task / "world_vqa.jsonl").read_text().splitlines()]
    assert "!function utils.doc_to_visual" in (task / "world_vqa.yaml").read_text()
    model = plugin.DynamicLlavaLMMS(pretrained=str(SHIPPED / "tiny-dynamic-llava"), dtype="float32", batch_size=4)
    model.task_dict = {"world": {"test": docs}}
    short, long = {"max_new_tokens": 6, "until": ["?"]}, {"max_new_tokens": 6}  # two groups, interleaved
    requests = [Request(doc_to_text(d), short if i % 2 else long, doc_to_visual, i, "world", "test")
                for i, d in enumerate(docs)]
    replies = model.generate_until(requests)
    items = [{"image": d["image"], "question": d["question"].split("\n")[0], "answer": d["answer"]} for d in docs]
    processor = AutoProcessor.from_pretrained(SHIPPED / "tiny-dynamic-llava")
    reference = DynamicLlavaForConditionalGeneration.from_pretrained(SHIPPED / "tiny-dynamic-llava",
                                                                     dtype=torch.float32).eval()
    direct = answer_questions(reference, processor, items, Path("/"), batch_size=10, max_new_tokens=6,
                              progress=False)
    assert replies == [d["prediction"].split("?")[0].strip() if i % 2 else d["prediction"]
                       for i, d in enumerate(direct)]
    totals = model.sparsity_totals
    assert totals["samples"] == 10 and totals["image_tokens"] == 640 and totals["image_tokens_kept"] == 120
    # the right answer is likelier than a wrong one of the same type
    right = Request(doc_to_text(docs[0]), docs[0]["answer"], doc_to_visual, 0, "world", "test")
    wrong_answer = "no" if docs[0]["answer"] == "yes" else "yes" if docs[0]["answer"] == "no" else "zebra"
    wrong = Request(doc_to_text(docs[0]), wrong_answer, doc_to_visual, 0, "world", "test")
    (right_logp, right_greedy), (wrong_logp, _) = model.loglikelihood([right, wrong])
    assert right_logp > wrong_logp and right_logp <= 0
    assert right_greedy == (direct[0]["prediction"] == docs[0]["answer"])


def test_plugin_refuses_unknown_model_args(plugin):
    with pytest.raises(ValueError, match="image_keep_rat"):
        plugin.DynamicLlavaLMMS(pretrained=str(SHIPPED / "tiny-dynamic-llava"), image_keep_rat=0.2)
    with pytest.raises(ValueError, match="exclude"):
        plugin.DynamicLlavaLMMS(pretrained=str(SHIPPED / "tiny-dynamic-llava"), dense=True, image_keep_rate=0.2)
