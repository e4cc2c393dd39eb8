"""Benchmark scorers on hand-made fixtures with known scores, the LLaVA file formats, and resumable answering."""

import base64
import csv
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny import tiny_dynamic
from tiny_processor import tiny_processor
from transformers import AutoProcessor
from typer.testing import CliRunner

from dynamic_llava import DynamicLlavaForConditionalGeneration
from dynamic_llava.cli import app
from dynamic_llava.evaluation import benchmarks, scorers
from dynamic_llava.evaluation.benchmarks import BenchmarkError, Question
from dynamic_llava.evaluation.metrics import exact_match
from dynamic_llava.evaluation.world import answer_questions
from dynamic_llava.world.export import export_world_benchmarks

SHIPPED = Path(__file__).parent.parent / "checkpoints"


# ------------------------------------------------------------------------------------------------ scorers


@pytest.mark.parametrize("raw, normal", [
    ("Two dogs.", "2 dogs"), ("The cat's hat!", "cat 's hat"), ("1,000", "1000"), ("Yes, it is", "yes it is"),
    ("an apple", "apple"), ("dont", "don't"), ("left-hand", "left hand"), ("3.5", "3.5"),
])
def test_vqa_normalisation(raw, normal):
    assert scorers.normalize_vqa_answer(raw) == normal


def test_vqa_accuracy_averages_the_ten_leave_one_out_subsets():
    # 3 humans said "two": leaving one of them out gives 2/3, leaving out another gives 1 -> (3*2/3 + 7)/10
    assert scorers.vqa_accuracy("2", ["two"] * 3 + ["three"] * 7) == pytest.approx(0.9)
    assert scorers.vqa_accuracy("Two.", ["2"] * 2 + ["x"] * 8) == pytest.approx(0.6)
    assert scorers.vqa_accuracy("cat", ["dog"] * 10) == 0.0
    assert scorers.vqa_accuracy("dog", ["dog"] * 10) == 1.0
    result = scorers.score_vqa({1: "2", 2: "dog", 3: "cat"}, {1: ["two"] * 3 + ["three"] * 7, 2: ["dog"] * 10,
                                                               3: ["dog"] * 10})
    assert result == {"accuracy": pytest.approx(100 * 1.9 / 3), "questions": 3}


def test_gqa_exact_match_after_llava_conversion():
    assert scorers.score_gqa({"a": "Yes.", "b": "left", "c": "The table"}, {"a": "yes", "b": "right",
                                                                           "c": "table"})["accuracy"] == pytest.approx(100 / 3)


def test_pope_reads_answers_as_llava_and_counts_by_category():
    assert scorers.pope_answer("No, there is not.") == "no"
    assert scorers.pope_answer("There is not a dog. But a cat.") == "no"
    assert scorers.pope_answer("Yes, there is a dog.") == "yes"
    assert scorers.pope_answer("A dog is there, no doubt.") == "no"  # LLaVA's rule reads the word "no"
    predictions = {1: "Yes", 2: "Yes", 3: "No", 4: "yes", 5: "No", 6: "no", 7: "Yes", 8: "No"}
    labels = {1: "yes", 2: "yes", 3: "yes", 4: "no", 5: "no", 6: "no", 7: "yes", 8: "yes"}
    categories = dict.fromkeys(range(1, 9), "random")
    result = scorers.score_pope(predictions, labels, categories)["random"]
    # TP = 3 (1, 2, 7), FP = 1 (4), TN = 2 (5, 6), FN = 2 (3, 8)
    assert result["accuracy"] == pytest.approx(100 * 5 / 8)
    assert result["precision"] == pytest.approx(75.0) and result["recall"] == pytest.approx(60.0)
    assert result["f1"] == pytest.approx(100 * 2 * 0.75 * 0.6 / 1.35) and result["yes_ratio"] == pytest.approx(0.5)


def test_scienceqa_letters_and_image_accuracy():
    assert [scorers.option_letter(t) for t in ("B", "B. a cat", "So. The answer is C.", "cat", "D)")] == \
        ["B", "B", "C", None, "D"]
    problems = {"1": {"answer": 1, "choices": ["x", "y"], "image": "1.png"},
                "2": {"answer": 0, "choices": ["x", "y", "z"], "image": None},
                "3": {"answer": 2, "choices": ["x", "y", "z"], "image": "3.png"},
                "4": {"answer": 0, "choices": ["x", "y"], "image": "4.png"}}
    result = scorers.score_scienceqa({"1": "B", "2": "A", "3": "The answer is A."}, problems)  # "4" unanswered
    assert result["accuracy"] == 50.0 and result["img_accuracy"] == pytest.approx(100 / 3)
    assert scorers.option_letter("C", "AB") is None  # not one of this question's options


def test_mme_accuracy_plus_and_perception_sum():
    truth = {"a1": {"answer": "Yes", "category": "existence", "image": "a"},
             "a2": {"answer": "No", "category": "existence", "image": "a"},
             "b1": {"answer": "Yes", "category": "existence", "image": "b"},
             "b2": {"answer": "No", "category": "existence", "image": "b"},
             "c1": {"answer": "No", "category": "code_reasoning", "image": "c"},
             "c2": {"answer": "Yes", "category": "code_reasoning", "image": "c"}}
    predictions = {"a1": "Yes, it is.", "a2": "No", "b1": "yes", "b2": "Yes", "c1": "No.", "c2": "Maybe"}
    result = scorers.score_mme(predictions, truth)
    existence = result["subtasks"]["existence"]
    assert (existence["accuracy"], existence["accuracy_plus"], existence["score"]) == (75.0, 50.0, 125.0)
    assert result["perception"] == 125.0 and result["cognition"] == 50.0  # 50 + 0


def test_multiple_choice_circular_evaluation():
    predictions = {(1, 0): "A", (1, 1): "C", (2, 0): "B", (2, 1): "B"}
    answers = {(1, 0): "A", (1, 1): "C", (2, 0): "B", (2, 1): "A"}
    groups = {k: k[0] for k in predictions}
    assert scorers.score_multiple_choice(predictions, answers)["accuracy"] == 75.0
    assert scorers.score_multiple_choice(predictions, answers, groups=groups)["accuracy"] == 50.0


def test_no_overlap_between_answers_and_truth_is_a_clear_error():
    with pytest.raises(ValueError, match="different question files"):
        scorers.score_gqa({"1": "yes"}, {"2": "yes"})


# ------------------------------------------------------------------------------------------------ file formats


def test_ground_truth_from_each_official_layout(tmp_path):
    (tmp_path / "vqa.json").write_text(json.dumps({"annotations": [
        {"question_id": 7, "answers": [{"answer": "two", "answer_id": k} for k in range(10)]}]}))
    assert benchmarks.read_ground_truth("vqav2", tmp_path / "vqa.json") == {7: ["two"] * 10}
    (tmp_path / "textvqa.json").write_text(json.dumps({"data": [{"question_id": 3, "answers": ["stop"] * 10}]}))
    assert benchmarks.read_ground_truth("textvqa", tmp_path / "textvqa.json") == {3: ["stop"] * 10}
    (tmp_path / "vizwiz.json").write_text(json.dumps([{"image": "VizWiz_val_0.jpg", "answers": [{"answer": "tea"}]}]))
    assert benchmarks.read_ground_truth("vizwiz", tmp_path / "vizwiz.json") == {"VizWiz_val_0.jpg": ["tea"]}
    (tmp_path / "gqa.json").write_text(json.dumps({"201": {"answer": "left", "question": "?"}}))
    assert benchmarks.read_ground_truth("gqa", tmp_path / "gqa.json") == {"201": "left"}
    pope = tmp_path / "pope"
    pope.mkdir()
    (pope / "coco_pope_random.json").write_text('{"question_id": 1, "label": "yes"}\n{"question_id": 2, "label": "no"}\n')
    (pope / "coco_pope_adversarial.json").write_text('{"question_id": 3, "label": "no"}\n')
    assert benchmarks.read_ground_truth("pope", pope) == {1: {"label": "yes", "category": "random"},
                                                          2: {"label": "no", "category": "random"},
                                                          3: {"label": "no", "category": "adversarial"}}
    (tmp_path / "seed.json").write_text(json.dumps({"questions": [
        {"question_id": "9", "answer": "B", "question_type_id": 2, "data_type": "image"}]}))
    assert benchmarks.read_ground_truth("seed", tmp_path / "seed.json")["9"]["category"] == 2
    mme = tmp_path / "MME" / "existence"
    mme.mkdir(parents=True)
    (mme / "000.txt").write_text("Is there a dog? Please answer yes or no.\tYes\nIs there a cat? Please answer yes or no.\tNo\n")
    questions = [Question("q1", "Is there a dog? Please answer yes or no.", "existence/000.png",
                          meta={"category": "existence"}),
                 Question("q2", "Is there a cat? Please answer yes or no.", "existence/000.png",
                          meta={"category": "existence"})]
    truth = benchmarks.read_ground_truth("mme", tmp_path / "MME", questions)
    assert truth == {"q1": {"answer": "Yes", "category": "existence", "image": "000"},
                     "q2": {"answer": "No", "category": "existence", "image": "000"}}


def _png_b64(color) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_question_files_in_llava_formats(tmp_path):
    (tmp_path / "q.jsonl").write_text('{"question_id": 5, "image": "a.jpg", "text": "What? Answer briefly.", '
                                      '"category": "random"}\n')
    (question,) = benchmarks.read_questions("pope", tmp_path / "q.jsonl")
    assert (question.id, question.image, question.meta["category"]) == (5, "a.jpg", "random")
    (tmp_path / "sqa.json").write_text(json.dumps([
        {"id": "11", "image": "11/image.png", "conversations": [{"from": "human", "value": "<image>\nWhich? A. x B. y"}]},
        {"id": "12", "conversations": [{"from": "human", "value": "Which? A. x B. y"}]}]))
    with_image, text_only = benchmarks.read_questions("scienceqa", tmp_path / "sqa.json")
    assert (with_image.text, with_image.image, text_only.image) == ("Which? A. x B. y", "11/image.png", None)
    with open(tmp_path / "mmbench.tsv", "w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"])
        writer.writerow([3, "What colour?", "nan", "red", "blue", "green", "nan", "B", "color", _png_b64("blue")])
    rounds = benchmarks.read_questions("mmbench", tmp_path / "mmbench.tsv", all_rounds=True)
    assert len(rounds) == 3 and rounds[0].text.startswith("What colour?\nA. red\nB. blue\nC. green\n")
    assert rounds[0].text.endswith(benchmarks.MMBENCH_SUFFIX)
    assert [r.meta["answer"] for r in rounds] == ["B", "A", "C"]  # "blue" moves as the options rotate
    assert "A. blue" in rounds[1].text
    with pytest.raises(BenchmarkError, match="question_id"):
        (tmp_path / "bad.jsonl").write_text('{"id": 1, "text": "x"}\n')
        benchmarks.read_questions("gqa", tmp_path / "bad.jsonl")
    with pytest.raises(BenchmarkError, match="Unknown task"):
        benchmarks.read_questions("vqav3", tmp_path / "q.jsonl")


# ------------------------------------------------------------------------------------------------ answering


@pytest.fixture
def tiny_bench(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(5):
        Image.new("RGB", (32 + 4 * i, 32), (40 * i, 90, 200)).save(images / f"{i}.png")
    rows = [{"question_id": i, "image": f"{i}.png", "text": "what is in the picture?"} for i in range(5)]
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_answering_is_resumable_and_records_the_cost(tiny_bench):
    model, processor = tiny_dynamic(), tiny_processor()
    questions = benchmarks.read_questions("gqa", tiny_bench / "questions.jsonl")
    answers = tiny_bench / "answers.jsonl"
    first = benchmarks.answer_benchmark(model, processor, questions[:3], answers, tiny_bench / "images",
                                        batch_size=2, max_new_tokens=3, progress=False)
    assert first == {"answered": 3, "skipped": 0}
    with open(answers, "a") as f:
        f.write('{"question_id": 3, "prompt": "wha')  # a run killed mid-write
    second = benchmarks.answer_benchmark(model, processor, questions, answers, tiny_bench / "images",
                                         batch_size=2, max_new_tokens=3, progress=False)
    assert second == {"answered": 2, "skipped": 3}
    rows = benchmarks.read_answers(answers)
    assert [r["question_id"] for r in rows] == [0, 1, 2, 3, 4]
    meta = rows[0]["metadata"]
    assert meta["image_tokens"] == 16 and meta["image_tokens_kept"] == 4  # keep rate 0.25
    assert meta["prompt_tokens"] > meta["image_tokens"] and meta["prefill_tflops"] > 0 and meta["latency_s"] > 0
    # the same answers one by one
    alone = benchmarks.answer_benchmark(model, processor, questions[4:], tiny_bench / "alone.jsonl",
                                        tiny_bench / "images", batch_size=1, max_new_tokens=3, progress=False)
    assert alone["answered"] == 1
    assert benchmarks.read_answers(tiny_bench / "alone.jsonl")[0]["text"] == rows[4]["text"]


def test_a_missing_image_is_refused_before_any_answer(tiny_bench):
    (tiny_bench / "images" / "3.png").unlink()
    questions = benchmarks.read_questions("gqa", tiny_bench / "questions.jsonl")
    with pytest.raises(BenchmarkError, match="3.png"):
        benchmarks.answer_benchmark(tiny_dynamic(), tiny_processor(), questions, tiny_bench / "answers.jsonl",
                                    tiny_bench / "images", progress=False)
    assert not (tiny_bench / "answers.jsonl").exists()


def test_world_chain_export_eval_score_matches_the_world_harness(tmp_path):
    """The shipped world model through the benchmark formats: same answers as the world's own harness."""
    from dynamic_llava.world.scenes import write_split

    data = tmp_path / "world"
    write_split(data, "test", 60, seed=5)
    paths = export_world_benchmarks(data / "test.json", tmp_path / "bench", pope_images=10, mme_images=10)
    model_dir = SHIPPED / "tiny-dynamic-llava"
    processor = AutoProcessor.from_pretrained(model_dir)
    model = DynamicLlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    questions = benchmarks.read_questions("vqav2", paths["vqav2"]["questions"])
    benchmarks.answer_benchmark(model, processor, questions, tmp_path / "vqa.jsonl", paths["vqav2"]["images"],
                                batch_size=16, max_new_tokens=6, progress=False)
    result = benchmarks.score_answers("vqav2", tmp_path / "vqa.jsonl", paths["vqav2"]["annotations"])
    answers = {a["question_id"]: a["text"] for a in benchmarks.read_answers(tmp_path / "vqa.jsonl")}
    records = json.loads((data / "test.json").read_text())
    items = [{"id": q.id, "image": records[q.id]["image"], "question": q.text.split("\n")[0],
              "answer": records[q.id]["conversations"][1]["value"]} for q in questions]
    direct = answer_questions(model, processor, items, data / "images", batch_size=16, max_new_tokens=6,
                              progress=False)
    assert [answers[d["id"]] for d in direct] == [d["prediction"] for d in direct]
    expected = 100 * sum(exact_match(d["prediction"], d["answer"]) for d in direct) / len(direct)
    assert result["accuracy"] == pytest.approx(expected) and result["questions"] == len(questions)
    assert result["accuracy"] > 70  # the shipped model reads these images (a guard far below its ~93%)
    # POPE and MME in their layouts, through the command line
    for task, count in (("pope", 40), ("mme", 20)):
        p = paths[task]
        argv = ["eval", task, "--model", str(model_dir), "--questions", str(p["questions"]), "--images",
                str(p["images"]), "--answers", str(tmp_path / f"{task}.jsonl"), "--annotations", str(p["annotations"]),
                "--max-new-tokens", "4"]
        outcome = CliRunner().invoke(app, argv)
        assert outcome.exit_code == 0, outcome.output
        assert f"Answered {count} question(s)" in outcome.output
    pope = benchmarks.score_answers("pope", tmp_path / "pope.jsonl", paths["pope"]["annotations"])
    assert set(pope) >= {"random", "adversarial", "mean_f1"} and pope["random"]["questions"] == 20
    mme = benchmarks.score_answers("mme", tmp_path / "mme.jsonl", paths["mme"]["annotations"], paths["mme"]["questions"])
    assert mme["subtasks"]["existence"]["questions"] == 20 and mme["perception"] > 100


def test_llava_hf_chain_convert_eval_score_equals_the_stock_dense_model(tmp_path):
    """The world's dense llava-hf model: convert, answer with `eval --dense`, same answers as the stock class."""
    from transformers import LlavaForConditionalGeneration

    from dynamic_llava.conversion import convert
    from dynamic_llava.world.scenes import write_split

    data = tmp_path / "world"
    write_split(data, "test", 40, seed=6)
    paths = export_world_benchmarks(data / "test.json", tmp_path / "bench", pope_images=2, mme_images=2)
    report = convert(SHIPPED / "tiny-llava", tmp_path / "converted")
    assert report.layout == "llava-hf"
    argv = ["eval", "gqa", "--model", str(tmp_path / "converted"), "--dense", "--questions",
            str(paths["gqa"]["questions"]), "--images", str(paths["gqa"]["images"]), "--answers",
            str(tmp_path / "gqa.jsonl"), "--annotations", str(paths["gqa"]["annotations"]), "--max-new-tokens", "5"]
    outcome = CliRunner().invoke(app, argv)
    assert outcome.exit_code == 0, outcome.output
    answers = benchmarks.read_answers(tmp_path / "gqa.jsonl")
    stock = LlavaForConditionalGeneration.from_pretrained(SHIPPED / "tiny-llava", dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(SHIPPED / "tiny-llava")
    questions = {q.id: q for q in benchmarks.read_questions("gqa", paths["gqa"]["questions"])}
    records = json.loads((data / "test.json").read_text())
    for answer in answers[:12]:
        question = questions[answer["question_id"]]
        prompt = processor.apply_chat_template([{"role": "user", "content": [
            {"type": "text", "text": question.text.split("\n")[0]}, {"type": "image"}]}], add_generation_prompt=True)
        image = Image.open(paths["gqa"]["images"] / records[question.id]["image"]).convert("RGB")
        inputs = processor(text=[prompt], images=[image], return_tensors="pt")
        with torch.no_grad():
            out = stock.generate(**inputs, max_new_tokens=5, do_sample=False)
        assert processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip() == answer["text"]
    assert answers[0]["metadata"]["image_tokens_kept"] == answers[0]["metadata"]["image_tokens"] == 64


def test_textvqa_matches_llava_question_files_by_image_and_question(tmp_path):
    """LLaVA-1.5's TextVQA questions are named by their image; the annotations by (image id, question)."""
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": [
        {"question_id": 1, "image_id": "abc", "question": "What brand is it?", "answers": ["nike"] * 10},
        {"question_id": 2, "image_id": "abc", "question": "What number is it?", "answers": ["7"] * 10}]}))
    rows = [{"question_id": "abc", "prompt": "What brand is it?\nReference OCR token: Nike, 7\nAnswer the question "
                                             "using a single word or phrase.", "text": "Nike"},
            {"question_id": "abc", "prompt": "What number is it?\nAnswer the question using a single word or phrase.",
             "text": "seven"}]
    (tmp_path / "answers.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = benchmarks.score_answers("textvqa", tmp_path / "answers.jsonl", tmp_path / "TextVQA_0.5.1_val.json")
    assert result["accuracy"] == 100.0 and result["questions"] == 2


EVAL_REFUSALS = [
    (lambda d: ["eval", "vqav3", "--model", "m", "--questions", "q", "--answers", "a"], "Unknown task 'vqav3'"),
    (lambda d: ["eval", "gqa", "--model", str(d), "--questions", str(d / "nope.jsonl"), "--answers", str(d / "a.jsonl")],
     "not found"),
    (lambda d: ["eval", "gqa", "--model", str(d), "--questions", str(d / "questions.jsonl"), "--answers", str(d)],
     "is a folder"),
    (lambda d: ["eval", "gqa", "--model", str(d), "--questions", str(d / "questions.jsonl"), "--answers",
                str(d / "a.jsonl"), "--batch-size", "0"], "must be >= 1"),
    (lambda d: ["eval", "gqa", "--model", str(d), "--questions", str(d / "questions.jsonl"), "--answers",
                str(d / "a.jsonl"), "--dense", "--image-keep-rate", "0.2"], "exclude each other"),
    (lambda d: ["eval", "gqa", "--model", str(d / "no-model"), "--questions", str(d / "questions.jsonl"),
                "--answers", str(d / "a.jsonl")], "not found"),
    (lambda d: ["score", "gqa", "--answers", str(d / "questions.jsonl")], "--annotations"),
    (lambda d: ["score", "gqa", "--answers", str(d / "missing.jsonl"), "--annotations", "x"], "No answers"),
    (lambda d: ["score", "pope", "--answers", str(d / "questions.jsonl"), "--submission", str(d / "s.json")],
     "vqav2 and vizwiz"),
]


@pytest.mark.parametrize("argv, needle", EVAL_REFUSALS)
def test_eval_and_score_refuse_bad_input_in_one_line(tiny_bench, argv, needle):
    outcome = CliRunner().invoke(app, argv(tiny_bench))
    lines = [line for line in outcome.output.splitlines() if line.strip()]
    assert outcome.exit_code == 2 and len(lines) == 1, outcome.output
    assert lines[0].startswith("Error: ") and needle in lines[0], lines[0]
