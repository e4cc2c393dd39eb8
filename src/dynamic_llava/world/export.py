"""The world's test questions in the paper's benchmark file formats, so that convert -> eval -> score runs here.

From a world split (`write_split`), its short first questions as VQAv2 (question JSONL + the official
annotation JSON, ten human answers) and GQA (question JSONL + GQA's ``{id: {"answer"}}``). POPE and MME's
existence subtask ask two questions per image (one "yes", one "no"), so their scenes are drawn here and
rendered into ``images/``: POPE's "random" and "adversarial" (binding-trap) categories with labels in
``pope/coco_pope_<category>.json``, MME in its release layout. Questions keep the world's wording and its image place ("question\\n<image>").
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .scenes import COLORS, IMAGE_SIZE, SHAPES, question_type, render, sample_scene

SHORT_TYPES = ("color", "shape", "count", "exist", "position")


def _first_questions(split_json: Path, limit: int | None) -> list[dict]:
    records = json.loads(Path(split_json).read_text())
    out = []
    for index, record in enumerate(records):
        question, answer = record["conversations"][0]["value"], record["conversations"][1]["value"]
        text = question.replace("\n<image>", "").replace("<image>\n", "").strip()
        kind = question_type(text)
        if kind in SHORT_TYPES:
            out.append({"question_id": index, "image": record["image"], "text": question, "answer": answer,
                        "type": kind, "question": text})
    return out[:limit]


def _write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def export_world_benchmarks(split_json, output, limit: int | None = None, pope_images: int = 100,
                            mme_images: int = 100, seed: int = 0, clutter: int = 0) -> dict[str, dict[str, Path]]:
    """Write the formats under `output`; returns task -> {"questions", "annotations", "images"} paths (the images
    of VQAv2 / GQA / POPE stay in the split's own images folder); `clutter`: the world of the POPE / MME scenes
    (as `scenes.sample_scene`; the split's own world should match)."""
    split_json, output = Path(split_json), Path(output)
    output.mkdir(parents=True, exist_ok=True)
    items = _first_questions(split_json, limit)
    images = split_json.parent / "images"
    plain = [{"question_id": i["question_id"], "image": i["image"], "text": i["text"], "category": i["type"]}
             for i in items]
    paths = {}
    vqa = {"annotations": [{"question_id": i["question_id"], "answer_type": i["type"],
                            "answers": [{"answer": i["answer"], "answer_id": k + 1} for k in range(10)]}
                           for i in items]}
    (output / "vqav2_annotations.json").write_text(json.dumps(vqa))
    paths["vqav2"] = {"questions": _write_jsonl(output / "vqav2_questions.jsonl", plain),
                      "annotations": output / "vqav2_annotations.json", "images": images}
    (output / "gqa_annotations.json").write_text(json.dumps({str(i["question_id"]): {"answer": i["answer"]}
                                                              for i in items}))
    paths["gqa"] = {"questions": _write_jsonl(output / "gqa_questions.jsonl", plain),
                    "annotations": output / "gqa_annotations.json", "images": images}
    paths["pope"] = _pope(output, pope_images, seed, clutter)
    paths["mme"] = _mme(output, mme_images, seed, clutter)
    return paths


def _pope(output: Path, n_images: int, seed: int, clutter: int = 0) -> dict[str, Path]:
    """POPE: per image one "yes" and one "no" existence question; in "random" the absent object is any absent
    colour and shape, in "adversarial" a binding trap (its colour and its shape both occur, never together)."""
    rng = np.random.default_rng([seed, 78])
    folder, image_dir = output / "pope", output / "images" / "pope"
    folder.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for category in ("random", "adversarial"):
        labels = []
        for index in range(n_images):
            while True:
                scene = sample_scene(rng, min_objects=2 if category == "adversarial" else 1, clutter=clutter)
                present = {(o.color, o.shape) for o in scene.objects}
                if category == "random":
                    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
                else:
                    colors, shapes = {o.color for o in scene.objects}, {o.shape for o in scene.objects}
                    absent = sorted({(c, s) for c in colors for s in shapes} - present)
                if absent:
                    break
            name = f"{category}/{index:05d}.png"
            (image_dir / category).mkdir(exist_ok=True)
            render(scene, IMAGE_SIZE).save(image_dir / name)
            obj = scene.objects[rng.integers(len(scene.objects))]
            color, shape = absent[rng.integers(len(absent))]
            for k, (question, label) in enumerate(((f"is there a {obj.color} {obj.shape} ?", "yes"),
                                                   (f"is there a {color} {shape} ?", "no"))):
                qid = len(rows)
                rows.append({"question_id": qid, "image": f"pope/{name}", "text": f"{question}\n<image>",
                             "category": category})
                labels.append({"question_id": qid, "label": label})
        _write_jsonl(folder / f"coco_pope_{category}.json", labels)
    return {"questions": _write_jsonl(output / "pope_questions.jsonl", rows), "annotations": folder,
            "images": output / "images"}


def _mme(output: Path, n_images: int, seed: int, clutter: int = 0) -> dict[str, Path]:
    """MME existence: per image one question answered "yes" and one "no", in MME's release layout."""
    rng = np.random.default_rng([seed, 77])
    folder = output / "mme" / "existence"
    image_dir = output / "images" / "mme"
    folder.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(n_images):
        scene = sample_scene(rng, clutter=clutter)
        name = f"{index:05d}.png"
        render(scene, IMAGE_SIZE).save(image_dir / name)
        obj = scene.objects[rng.integers(len(scene.objects))]
        present = {(o.color, o.shape) for o in scene.objects}
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        color, shape = absent[rng.integers(len(absent))]
        pairs = [(f"is there a {obj.color} {obj.shape} ?", "Yes"), (f"is there a {color} {shape} ?", "No")]
        (folder / f"{index:05d}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in pairs))
        for k, (question, _) in enumerate(pairs):
            rows.append({"question_id": f"existence/{name}/{k}", "image": f"mme/{name}", "text": f"{question}\n<image>",
                         "category": "existence"})
    return {"questions": _write_jsonl(output / "mme_questions.jsonl", rows), "annotations": output / "mme",
            "images": output / "images"}


LMMS_EVAL_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 6
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""


def export_lmms_eval_task(split_json, folder, limit: int | None = None, name: str = "world_vqa") -> Path:
    """An lmms-eval task of the split's short first questions (a local JSON dataset): the folder to pass as
    ``--include_path``, holding ``<name>.yaml``, its ``utils.py`` and ``<name>.jsonl``."""
    split_json, folder = Path(split_json), Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    images = split_json.parent.resolve() / "images"
    rows = [{"question_id": i["question_id"], "image": str(images / i["image"]), "question": i["text"],
             "answer": i["answer"], "type": i["type"]} for i in _first_questions(split_json, limit)]
    data = _write_jsonl(folder / f"{name}.jsonl", rows)
    (folder / f"{name}.yaml").write_text(LMMS_EVAL_TASK.format(name=name, data=data))
    (folder / "utils.py").write_text(
        "from dynamic_llava.integrations.lmms_eval_task import doc_to_text, doc_to_visual, process_results  # noqa\n")
    return folder


__all__ = ["export_lmms_eval_task", "export_world_benchmarks"]
