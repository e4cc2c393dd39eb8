"""The paper's benchmarks in LLaVA-1.5's evaluation file formats: questions in, answers JSONL out, scored
with each benchmark's official rule (`scorers.py`).

Question files are those of LLaVA-1.5's `scripts/v1_5/eval`: a JSONL of ``{"question_id", "image", "text"}``
(VQAv2, GQA, VizWiz, TextVQA, POPE, MME, SEED), ScienceQA's ``llava_test_CQM-A.json`` (conversations)
and MMBench's TSV (base64 images). Answers are written as LLaVA writes them (``question_id``, ``prompt``,
``text``, ``answer_id``, ``model_id``) plus, under ``metadata``, what the sample cost: prompt and image
tokens, image tokens kept, generated tokens kept, KV tokens held, prefill FLOPs and the batch's latency
per sample. A run appends each batch as it finishes; a rerun skips the questions already answered.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import math
import os
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..costs import prefill_flops
from ..stats import SparsityStats
from . import scorers

TASKS = ("vqav2", "gqa", "vizwiz", "textvqa", "pope", "scienceqa", "mme", "mmbench", "seed")
VQA_TASKS = ("vqav2", "vizwiz", "textvqa")
MMBENCH_SUFFIX = "Answer with the option's letter from the given choices directly."


class BenchmarkError(ValueError):
    """A question, answer or annotation file that cannot be used as it is; the message says why."""


@dataclass
class Question:
    """One question as the model gets it (``round`` > 0 for MMBench's rotated options)."""

    id: object
    text: str
    image: str | None = None  # a file under the images folder
    image_bytes: bytes | None = None  # MMBench ships its images inline
    round: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def key(self):
        return (self.id, self.round)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise BenchmarkError(f"Unknown task {task!r}: choose one of {', '.join(TASKS)}.")


def _read_json_or_jsonl(path: Path, what: str):
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise BenchmarkError(f"{what} not found: {path}.") from None
    except IsADirectoryError:
        raise BenchmarkError(f"{what} {path} is a folder: pass the file.") from None
    try:
        return json.loads(text)
    except ValueError:
        pass
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as error:
                raise BenchmarkError(f"{path} line {number} is not JSON ({error}): {what} must be JSON or JSONL.") from None
    return rows


def read_questions(task: str, path, all_rounds: bool = False) -> list[Question]:
    """The questions of `task` from its LLaVA-format question file (MMBench: every rotation of the options
    when `all_rounds`, for its circular evaluation)."""
    _check_task(task)
    path = Path(path)
    if task == "mmbench":
        return _mmbench_questions(path, all_rounds)
    rows = _read_json_or_jsonl(path, "The question file")
    if isinstance(rows, dict):
        rows = [rows]
    questions = []
    for number, row in enumerate(rows, 1):
        if task == "scienceqa":
            if not isinstance(row, dict) or "id" not in row or not row.get("conversations"):
                raise BenchmarkError(f"{path} entry {number}: ScienceQA questions have an id and conversations "
                                     "(llava_test_CQM-A.json).")
            text = row["conversations"][0]["value"].replace("<image>", "").strip()
            questions.append(Question(row["id"], text, row.get("image")))
            continue
        if not isinstance(row, dict) or "question_id" not in row or "text" not in row:
            raise BenchmarkError(f"{path} entry {number}: expected {{\"question_id\", \"image\", \"text\"}} "
                                 f"(LLaVA's question JSONL), got {str(row)[:80]}.")
        meta = {k: row[k] for k in ("category",) if k in row}
        questions.append(Question(row["question_id"], row["text"], row.get("image"), meta=meta))
    if not questions:
        raise BenchmarkError(f"{path} holds no questions.")
    return questions


def _mmbench_questions(path: Path, all_rounds: bool) -> list[Question]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except FileNotFoundError:
        raise BenchmarkError(f"The question file not found: {path}.") from None
    if not rows or not {"index", "question", "image"} <= set(rows[0]):
        raise BenchmarkError(f"{path}: MMBench questions are a TSV with index, question, hint, A-D and image columns.")
    questions = []
    for row in rows:
        options = [c for c in "ABCD" if (row.get(c) or "").strip() and row[c].strip().lower() != "nan"]
        values = [row[c] for c in options]
        rounds = len(options) if all_rounds else 1
        for r in range(rounds):
            shifted = values[r:] + values[:r]
            text = row["question"]
            hint = (row.get("hint") or "").strip()
            if hint and hint.lower() != "nan":
                text = hint + "\n" + text
            for letter, value in zip(options, shifted):
                text += f"\n{letter}. {value}"
            answer = (row.get("answer") or "").strip()
            if answer in options:  # where the right option moved to in this rotation
                answer = options[(options.index(answer) - r) % len(options)]
            questions.append(Question(
                int(row["index"]), text + "\n" + MMBENCH_SUFFIX, image_bytes=base64.b64decode(row["image"]), round=r,
                meta={"answer": answer, "category": row.get("category", "")},
            ))
    return questions


# ---------------------------------------------------------------------------------------------- answering


def read_answers(path) -> list[dict]:
    """The answers JSONL (a partial last line, from a run killed mid-write, is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    answers = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            answers.append(json.loads(line))
        except ValueError:
            if number == len(lines):
                break
            raise BenchmarkError(f"{path} line {number} is not JSON: it is not an answers file of this command.")
    return answers


def _truncate_partial_line(path: Path) -> None:
    """Drop a last line cut short by a killed run, so that appending continues on a clean line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    with open(path, "r+b") as f:
        f.truncate(data.rfind(b"\n") + 1)


def _image(question: Question, images: Path | None) -> Image.Image | None:
    if question.image_bytes is not None:
        return Image.open(io.BytesIO(question.image_bytes)).convert("RGB")
    if question.image is None:
        return None
    if images is None:
        raise BenchmarkError(f"Question {question.id} has an image ({question.image}): pass the images folder.")
    file = images / question.image
    if not file.is_file():
        raise BenchmarkError(f"Image of question {question.id} not found: {file}.")
    return Image.open(file).convert("RGB")


def _prompt(processor, question: Question, has_image: bool) -> str:
    """The chat prompt: the image first (LLaVA-1.5's evaluation), or where the text has its ``<image>``."""
    if has_image and "<image>" in question.text:
        before, after = (part.strip("\n") for part in question.text.split("<image>", 1))
        content = ([{"type": "text", "text": before}] if before else []) + [{"type": "image"}]
        content += [{"type": "text", "text": after}] if after else []
    else:
        text = question.text.replace("<image>", "").strip() if not has_image else question.text
        content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


@torch.no_grad()
def answer_benchmark(model, processor, questions: list[Question], answers_path, images=None, batch_size: int = 8,
                     max_new_tokens: int = 128, model_id: str = "dynamic-llava", progress: bool = True) -> dict:
    """Answer every question not yet in `answers_path` (greedy), appending one JSON line per answer.

    Returns {"answered": new answers, "skipped": already there}. Images are checked before any compute."""
    answers_path = Path(answers_path)
    images = Path(images) if images is not None else None
    if images is not None and not images.is_dir():
        raise BenchmarkError(f"Images folder not found: {images}.")
    for q in questions:  # every image exists: fail now, not after hours of answering
        if q.image is not None and q.image_bytes is None and (images is None or not (images / q.image).is_file()):
            _image(q, images)  # raises, naming the question and the file
    done = {(a["question_id"], a.get("round_id", 0)) for a in read_answers(answers_path)}
    todo = [q for q in questions if q.key not in done]
    answers_path.parent.mkdir(parents=True, exist_ok=True)
    _truncate_partial_line(answers_path)
    config = model.config
    text_config, k_layer = config.text_config, config.sparse_layer
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    with open(answers_path, "a") as out:
        for start in tqdm(range(0, len(todo), batch_size), disable=not progress, desc="answering"):
            chunk = todo[start : start + batch_size]
            pictures = [_image(q, images) for q in chunk]
            texts = [_prompt(processor, q, p is not None) for q, p in zip(chunk, pictures)]
            given = [p for p in pictures if p is not None]
            inputs = processor(text=texts, images=given or None, padding=True, return_tensors="pt").to(model.device)
            stats = SparsityStats()
            started = time.perf_counter()
            generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, sparsity_stats=stats,
                                       pad_token_id=tokenizer.pad_token_id)
            latency = (time.perf_counter() - started) / len(chunk)
            new = generated[:, inputs["input_ids"].shape[1] :]
            replies = processor.batch_decode(new, skip_special_tokens=True)
            prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
            kv = torch.stack(stats.kv_lengths).sum(dim=0).tolist() if stats.kv_lengths else [None] * len(chunk)
            for i, (q, reply) in enumerate(zip(chunk, replies)):
                image_tokens = int(stats.image_tokens[i]) if stats.image_tokens is not None else 0
                image_kept = int(stats.image_tokens_kept[i]) if stats.image_tokens_kept is not None else image_tokens
                kept = prompt_tokens[i] - image_tokens + image_kept
                record = {
                    "question_id": q.id, "prompt": q.text, "text": reply.strip(), "answer_id": uuid.uuid4().hex,
                    "model_id": model_id,
                    "metadata": {
                        "prompt_tokens": prompt_tokens[i], "image_tokens": image_tokens, "image_tokens_kept": image_kept,
                        "generated_tokens": int(stats.generated_tokens[i]) if stats.generated_tokens is not None else 0,
                        "generated_tokens_kept": int(stats.generated_tokens_kept[i])
                        if stats.generated_tokens_kept is not None else 0,
                        "kv_tokens": kv[i], "prefill_tflops": prefill_flops(text_config, prompt_tokens[i], k_layer,
                                                                            kept) / 1e12,
                        "latency_s": latency,
                    },
                }
                if q.round or "answer" in q.meta:
                    record.update(round_id=q.round, answer=q.meta.get("answer"), category=q.meta.get("category"))
                out.write(json.dumps(record) + "\n")
            out.flush()
            os.fsync(out.fileno())
    return {"answered": len(todo), "skipped": len(questions) - len(todo)}


# ---------------------------------------------------------------------------------------------- scoring


def score_answers(task: str, answers_path, annotations=None, questions_path=None) -> dict:
    """Score an answers file with `task`'s official rule; `annotations` is the ground truth as the benchmark
    ships it (see `read_ground_truth`); MMBench needs none (its TSV answers are copied into the answers).
    Also the mean cost per sample from the answers' metadata."""
    _check_task(task)
    answers = read_answers(answers_path)
    if not answers:
        raise BenchmarkError(f"No answers in {answers_path}: run `dynamic-llava eval` first.")
    questions = read_questions(task, questions_path) if questions_path is not None else None
    if task == "mmbench":
        keyed = {(str(a["question_id"]), a.get("round_id", 0)): a for a in answers}
        truth = {key: a["answer"] for key, a in keyed.items() if a.get("answer")}
        predictions = {key: a["text"] for key, a in keyed.items()}
        groups = {key: key[0] for key in keyed}
        categories = {key: a.get("category") or "other" for key, a in keyed.items()}
        result = scorers.score_multiple_choice(predictions, truth, groups=groups, categories=categories)
    else:
        if annotations is None:
            raise BenchmarkError(f"Scoring {task} needs its ground truth: pass the annotations (--annotations).")
        predictions = {str(a["question_id"]): a["text"] for a in answers}  # ids compared as text: files differ
        truth = {str(k): v for k, v in read_ground_truth(task, annotations, questions).items()}
        if task == "textvqa" and not set(predictions) & set(truth):
            predictions, truth = _textvqa_by_image(answers, annotations)
        result = _score(task, predictions, truth, questions)
    result["cost"] = mean_cost(answers)
    return result


def _textvqa_question(prompt: str) -> str:
    """The question inside LLaVA-1.5's TextVQA prompt (with or without its reference OCR tokens)."""
    lines = prompt.split("\n")
    if prompt.startswith("Reference OCR token:") and len(lines) == 3:
        return lines[1].lower()
    return lines[0].lower()


def _textvqa_by_image(answers: list[dict], annotations) -> tuple[dict, dict]:
    """LLaVA-1.5's TextVQA question file names each question by its image; the official annotations are matched
    by (image id, question text), as its evaluation script does."""
    data = _read_json_or_jsonl(Path(annotations), "The annotation file")
    rows = data.get("data", []) if isinstance(data, dict) else []
    truth = {f"{r['image_id']}\t{r['question'].lower()}": r["answers"] for r in rows if "image_id" in r}
    predictions = {f"{a['question_id']}\t{_textvqa_question(a.get('prompt', ''))}": a["text"] for a in answers}
    return predictions, truth


def _score(task, predictions, truth, questions):
    if task in VQA_TASKS:
        return scorers.score_vqa(predictions, truth)
    if task == "gqa":
        return scorers.score_gqa(predictions, truth)
    if task == "pope":
        labels = {i: t["label"] for i, t in truth.items()}
        categories = {i: t["category"] for i, t in truth.items() if t.get("category")}
        if questions is not None:
            categories.update({str(q.id): q.meta["category"] for q in questions if q.meta.get("category")})
        return scorers.score_pope(predictions, labels, categories)
    if task == "scienceqa":
        if questions is not None:  # the split: the problems asked
            asked = {str(q.id) for q in questions}
            truth = {i: p for i, p in truth.items() if i in asked}
        else:
            truth = {i: p for i, p in truth.items() if i in predictions}
        return scorers.score_scienceqa(predictions, truth)
    if task == "mme":
        return scorers.score_mme(predictions, truth)
    answers = {i: t["answer"] for i, t in truth.items()}
    categories = {i: t["category"] for i, t in truth.items() if t.get("category") is not None}
    return scorers.score_multiple_choice(predictions, answers, categories=categories or None)


def read_ground_truth(task: str, annotations, questions: list[Question] | None = None) -> dict:
    """question id -> ground truth, from the files each benchmark ships:

    * VQAv2 ``{"annotations": [{"question_id", "answers": [{"answer"}]}]}``, TextVQA ``{"data": [...]}``, VizWiz
      ``[{"image", "answers"}]`` (keyed by image), or a list of ``{"question_id", "answers"}``;
    * GQA's questions JSON ``{id: {"answer"}}`` or a list of ``{"question_id", "answer"}``;
    * POPE's ``coco_pope_<category>.json`` (a file, or the folder of them) of ``{"question_id", "label"}``;
    * ScienceQA's ``problems.json``; SEED-Bench's JSON ``{"questions": [...]}``;
    * MME's release folder (``<subtask>/[questions_answers_YN/]<image>.txt``, needs the question file) or a
      list of ``{"question_id", "answer", "category", "image"}``.
    """
    path = Path(annotations)
    if task == "pope" and path.is_dir():
        truth = {}
        for file in sorted(path.glob("coco_pope_*.json")):
            category = file.stem.removeprefix("coco_pope_")
            for row in _rows(_read_json_or_jsonl(file, "POPE annotations"), file):
                truth[row["question_id"]] = {"label": row["label"], "category": category}
        if not truth:
            raise BenchmarkError(f"No coco_pope_<category>.json in {path}.")
        return truth
    if task == "mme" and path.is_dir():
        return _mme_folder(path, questions)
    data = _read_json_or_jsonl(path, "The annotation file")
    if task in VQA_TASKS:
        rows = data.get("annotations", data.get("data")) if isinstance(data, dict) else data
        truth = {}
        for row in _rows(rows, path):
            key = row.get("question_id", row.get("image"))
            answers = [a["answer"] if isinstance(a, dict) else a for a in row.get("answers", [])]
            if key is None or not answers:
                raise BenchmarkError(f"{path}: each annotation needs a question_id (or image) and its answers.")
            truth[key] = answers
        return truth
    if task == "gqa" and isinstance(data, dict) and "annotations" not in data:
        return {k: v["answer"] for k, v in data.items()}
    if task == "scienceqa":
        if not isinstance(data, dict):
            raise BenchmarkError(f"{path}: ScienceQA's ground truth is problems.json (id -> problem).")
        return data
    if task == "seed" and isinstance(data, dict):
        data = data.get("questions", [])
    truth = {}
    for row in _rows(data, path):
        if "question_id" not in row:
            raise BenchmarkError(f"{path}: each annotation needs a question_id.")
        if task == "gqa":
            truth[row["question_id"]] = row["answer"]
        elif task == "pope":
            truth[row["question_id"]] = {"label": row["label"], "category": row.get("category")}
        else:
            truth[row["question_id"]] = {"answer": row["answer"], "category": row.get("category",
                                                                                      row.get("question_type_id")),
                                         "image": row.get("image")}
    return truth


def _rows(rows, path) -> list[dict]:
    if isinstance(rows, dict) and "question_id" in rows:  # a JSONL file of one line
        rows = [rows]
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise BenchmarkError(f"{path}: expected a list of annotation objects.")
    return rows


def _mme_folder(root: Path, questions: list[Question] | None) -> dict:
    """MME's release: per subtask, text files of ``question<TAB>answer`` lines named after their image."""
    if questions is None:
        raise BenchmarkError("Scoring MME from its release folder needs the question file (--questions).")
    lines = {}
    for task_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        folder = task_dir / "questions_answers_YN" if (task_dir / "questions_answers_YN").is_dir() else task_dir
        for file in folder.glob("*.txt"):
            for line in file.read_text().splitlines():
                if "\t" in line:
                    question, answer = line.rsplit("\t", 1)
                    lines[(task_dir.name, file.stem, question.strip())] = answer.strip()
    truth = {}
    for q in questions:
        category = q.meta.get("category")
        stem = Path(q.image or "").stem
        answer = lines.get((category, stem, q.text.replace("<image>", "").strip()))
        if answer is not None:
            truth[q.id] = {"answer": answer, "category": category, "image": stem}
    return truth


def write_submission(task: str, answers_path, output) -> Path:
    """The answers as the VQAv2 / VizWiz evaluation servers take them (their test splits have no public
    ground truth): ``[{"question_id" | "image", "answer"}]`` with the answers normalised as LLaVA-1.5 does."""
    if task not in ("vqav2", "vizwiz"):
        raise BenchmarkError(f"Submission files are for vqav2 and vizwiz (scored on their servers), not {task}.")
    answers = read_answers(answers_path)
    if not answers:
        raise BenchmarkError(f"No answers in {answers_path}: run `dynamic-llava eval` first.")
    key = "question_id" if task == "vqav2" else "image"
    rows = [{key: a["question_id"], "answer": scorers.normalize_vqa_answer(a["text"])} for a in answers]
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(rows))
    return output


def mean_cost(answers: list[dict]) -> dict:
    """Means over the answers of the cost fields in their metadata (prompt and kept tokens, FLOPs, latency)."""
    sums, counts = defaultdict(float), defaultdict(int)
    for a in answers:
        for key, value in (a.get("metadata") or {}).items():
            if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
                sums[key] += value
                counts[key] += 1
    return {"answers": len(answers), **{k: sums[k] / counts[k] for k in sums}}


__all__ = ["BenchmarkError", "MMBENCH_SUFFIX", "Question", "TASKS", "answer_benchmark", "mean_cost",
           "read_answers", "read_ground_truth", "read_questions", "score_answers", "write_submission"]
