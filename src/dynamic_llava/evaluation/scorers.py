"""The scorers of the benchmarks LLaVA-1.5 and Dynamic-LLaVA report, as their official scripts compute them.

* VQAv2, VizWiz, TextVQA: VQA accuracy, min(1, humans who gave the answer / 3) averaged over the ten
  leave-one-out subsets of the ten human answers, after the official answer normalisation;
* GQA: exact match of the lower-cased answer without a final full stop (LLaVA's conversion for GQA's eval);
* POPE: accuracy, precision, recall, F1 and the share of "yes" per category, the answer read as LLaVA does;
* ScienceQA: the chosen option's letter, accuracy on all questions and on those with an image (SQA-IMG);
* MME: accuracy and accuracy+ (both questions of an image right) per subtask, summed to perception and
  cognition scores;
* MMBench, SEED-Bench: multiple-choice accuracy (MMBench's circular evaluation when options were rotated).

Each scorer takes the answers (``question_id`` -> predicted text) and the ground truth in a plain form;
`benchmarks.py` reads the official annotation files into that form.
"""

from __future__ import annotations

import re
from collections import defaultdict

# ---------------------------------------------------------------- VQA answer normalisation (VQA / EvalAI)

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
_PUNCTUATION = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!"]


def normalize_vqa_answer(answer: str) -> str:
    """The EvalAI VQA answer processing (as LLaVA's TextVQA evaluator and the VQAv2 / VizWiz servers apply it to
    every answer): lower case, punctuation, number words to digits, articles dropped, contractions."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCTUATION:
        if (p + " " in text or " " + p in text) or re.search(_COMMA_STRIP, text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out, re.UNICODE)
    words = []
    for word in out.lower().split():
        word = _NUMBERS.get(word, word)
        if word not in _ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, human_answers: list[str]) -> float:
    """VQA accuracy of one prediction against the (usually ten) human answers."""
    if not human_answers:
        raise ValueError("VQA accuracy needs the human answers of the question; none were given.")
    pred = normalize_vqa_answer(prediction)
    humans = [normalize_vqa_answer(a) for a in human_answers]
    if len(humans) == 1:
        return float(pred == humans[0])
    scores = []
    for i in range(len(humans)):
        others = humans[:i] + humans[i + 1 :]
        scores.append(min(1.0, sum(a == pred for a in others) / 3))
    return sum(scores) / len(scores)


def score_vqa(predictions: dict, answers: dict[object, list[str]]) -> dict:
    """{"accuracy": %, "questions": n} over the questions that have human answers."""
    ids = _answered(predictions, answers)
    accuracy = sum(vqa_accuracy(predictions[i], answers[i]) for i in ids) / len(ids)
    return {"accuracy": 100 * accuracy, "questions": len(ids)}


# ---------------------------------------------------------------- GQA


def score_gqa(predictions: dict, answers: dict[object, str]) -> dict:
    """Exact match after LLaVA's conversion for GQA's evaluation (lower case, final full stop dropped)."""
    ids = _answered(predictions, answers)
    right = sum(predictions[i].strip().rstrip(".").lower() == str(answers[i]).strip().lower() for i in ids)
    return {"accuracy": 100 * right / len(ids), "questions": len(ids)}


# ---------------------------------------------------------------- POPE


def pope_answer(text: str) -> str:
    """LLaVA's reading of a POPE answer: its first sentence is "no" if it says No / no / not, else "yes"."""
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def score_pope(predictions: dict, labels: dict[object, str], categories: dict[object, str] | None = None) -> dict:
    """Per category (and their mean): accuracy, precision, recall, F1 (in %) and the yes ratio."""
    ids = _answered(predictions, labels)
    groups = defaultdict(list)
    for i in ids:
        groups[(categories or {}).get(i, "all")].append(i)
    out = {}
    for category, members in sorted(groups.items()):
        tp = fp = tn = fn = 0
        for i in members:
            pred, label = pope_answer(predictions[i]) == "yes", str(labels[i]).strip().lower() == "yes"
            tp, fp = tp + (pred and label), fp + (pred and not label)
            tn, fn = tn + (not pred and not label), fn + (not pred and label)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[category] = {"accuracy": 100 * (tp + tn) / len(members), "precision": 100 * precision,
                         "recall": 100 * recall, "f1": 100 * f1, "yes_ratio": (tp + fp) / len(members),
                         "questions": len(members)}
    out["mean_f1"] = sum(v["f1"] for v in out.values()) / len(groups)
    out["mean_accuracy"] = sum(v["accuracy"] for k, v in out.items() if k != "mean_f1") / len(groups)
    return out


# ---------------------------------------------------------------- multiple choice (ScienceQA, MMBench, SEED)

_ANSWER_IS = re.compile(r"The answer is ([A-Z])\.")


def option_letter(text: str, options: str = "ABCDE") -> str | None:
    """The option a free-form answer chose: "B", "B. cat", or "... The answer is B." (ScienceQA's rules)."""
    text = text.strip()
    if text in options:
        return text or None
    if len(text) >= 3 and text[0] in options and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    if len(found) == 1:
        return found[0]
    if len(text) >= 2 and text[0] in options and not text[1].isalnum():  # "B)" or "B,"
        return text[0]
    return None


def score_scienceqa(predictions: dict, problems: dict[object, dict]) -> dict:
    """ScienceQA: `problems` id -> {"answer": index, "choices": [...], "image": file or None}; a question
    without a prediction counts as wrong, as in the official script."""
    if not problems:
        raise ValueError("No ScienceQA problems to score.")
    right = right_img = total_img = 0
    for pid, problem in problems.items():
        letter = option_letter(predictions.get(pid, "FAILED"), "ABCDE"[: len(problem["choices"])])
        correct = letter is not None and "ABCDE".index(letter) == int(problem["answer"])
        right += correct
        if problem.get("image"):
            total_img += 1
            right_img += correct
    return {"accuracy": 100 * right / len(problems), "img_accuracy": 100 * right_img / total_img if total_img else None,
            "questions": len(problems), "img_questions": total_img}


def score_multiple_choice(predictions: dict, answers: dict[object, str], groups: dict[object, object] | None = None,
                          categories: dict[object, str] | None = None) -> dict:
    """Accuracy (%) overall and per category. With `groups` (question id -> original question, for MMBench's
    rotated options) a question counts as right only if every rotation is (circular evaluation)."""
    ids = _answered(predictions, answers)
    right = {i: option_letter(predictions[i]) == str(answers[i]).strip().upper() for i in ids}
    if groups:
        merged = defaultdict(list)
        for i in ids:
            merged[groups.get(i, i)].append(right[i])
        right = {g: all(v) for g, v in merged.items()}
        categories = {groups.get(i, i): c for i, c in (categories or {}).items()}
    out = {"accuracy": 100 * sum(right.values()) / len(right), "questions": len(right)}
    if categories:
        per = defaultdict(list)
        for i, ok in right.items():
            per[categories.get(i, "other")].append(ok)
        out["categories"] = {c: 100 * sum(v) / len(v) for c, v in sorted(per.items())}
    return out


# ---------------------------------------------------------------- MME

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_answer(text: str) -> str:
    """MME's reading of an answer: "yes", "no" or "other" (from the start of the answer)."""
    text = text.strip().lower()
    if text in ("yes", "no"):
        return text
    start = text[:4]
    if "yes" in start:
        return "yes"
    if "no" in start:
        return "no"
    return "other"


def score_mme(predictions: dict, truth: dict[object, dict]) -> dict:
    """`truth`: question id -> {"answer": "Yes"/"No", "category": subtask, "image": name}. Per subtask the score
    is accuracy + accuracy+ (in %, each image has two questions); perception and cognition are their sums."""
    ids = _answered(predictions, truth)
    by_task = defaultdict(lambda: defaultdict(list))
    for i in ids:
        t = truth[i]
        by_task[t["category"]][t["image"]].append(mme_answer(predictions[i]) == str(t["answer"]).strip().lower())
    tasks = {}
    for task, images in sorted(by_task.items()):
        answers = [ok for per_image in images.values() for ok in per_image]
        acc = 100 * sum(answers) / len(answers)
        acc_plus = 100 * sum(all(v) for v in images.values()) / len(images)
        tasks[task] = {"accuracy": acc, "accuracy_plus": acc_plus, "score": acc + acc_plus, "questions": len(answers)}
    return {
        "perception": sum(v["score"] for k, v in tasks.items() if k in MME_PERCEPTION),
        "cognition": sum(v["score"] for k, v in tasks.items() if k in MME_COGNITION),
        "subtasks": tasks,
    }


def _answered(predictions: dict, truth: dict) -> list:
    """Question ids with ground truth; refuse when none of the predictions has any."""
    ids = [i for i in predictions if i in truth]
    if not ids:
        raise ValueError(
            f"None of the {len(predictions)} answers has ground truth ({len(truth)} annotated questions): the answers "
            "and the annotations come from different question files, or the question ids differ in type."
        )
    return ids


__all__ = [
    "MME_COGNITION", "MME_PERCEPTION", "mme_answer", "normalize_vqa_answer", "option_letter", "pope_answer",
    "score_gqa", "score_mme", "score_multiple_choice", "score_pope", "score_scienceqa", "score_vqa", "vqa_accuracy",
]
