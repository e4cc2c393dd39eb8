"""Accuracy harness on the synthetic world: exact match per question type, long-answer chrF and perplexity,
tokens kept and KV bytes, all through the Dynamic-LLaVA engine (keep rates 1.0 = the dense model)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..cache import DynamicLlavaCache
from ..control import control_tensor
from ..stats import SparsityStats
from ..world.scenes import question_type
from .metrics import chrf, exact_match, perplexity


def first_turns(records: list[dict]) -> list[dict]:
    """One evaluation item per record: its first question (with the image) and the reference answer."""
    items = []
    for record in records:
        value = record["conversations"][0]["value"]
        question = value.replace("<image>\n", "").replace("\n<image>", "").strip()
        items.append({
            "id": record["id"], "image": record["image"], "question": question,
            "image_first": value.startswith("<image>"),
            "answer": record["conversations"][1]["value"], "type": question_type(question),
        })
    return items


def world_prompt(question: str, image_first: bool = False) -> list[dict]:
    """Chat messages asking `question` about one image (after the question, as the world's data has it)."""
    content = [{"type": "text", "text": question}, {"type": "image"}]
    return [{"role": "user", "content": content[::-1] if image_first else content}]


def prompt_inputs(processor, questions: list[str], images: list, image_first: list[bool] | None = None):
    """Left-padded model inputs asking each question about its (PIL) image through the chat template."""
    image_first = image_first or [False] * len(questions)
    texts = [processor.apply_chat_template(world_prompt(q, first), add_generation_prompt=True)
             for q, first in zip(questions, image_first)]
    processor.tokenizer.padding_side = "left"
    return processor(text=texts, images=images, padding=True, return_tensors="pt")


def batch_inputs(processor, items, image_root: Path, blank: bool = False):
    """Model inputs for items (question + image file); `blank` swaps each image for plain grey."""
    images = [Image.open(image_root / item["image"]).convert("RGB") for item in items]
    if blank:
        images = [Image.new("RGB", img.size, (115, 115, 115)) for img in images]
    return prompt_inputs(processor, [item["question"] for item in items], images,
                         [item.get("image_first", False) for item in items])


@torch.no_grad()
def answer_questions(model, processor, items, image_root, batch_size=32, max_new_tokens=80, blank=False,
                     policy=None, progress=True, requests=None):
    """Greedy answers for every item, with per-sample kept tokens and KV bytes. `requests`: one
    `SparsityRequest` per item (per-request sparsity), or None."""
    results = []
    for start in tqdm(range(0, len(items), batch_size), disable=not progress, desc="answering"):
        chunk = items[start : start + batch_size]
        inputs = batch_inputs(processor, chunk, Path(image_root), blank)
        stats = SparsityStats()
        extra = {} if requests is None else {"sparsity_requests": list(requests[start : start + batch_size])}
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, sparsity_stats=stats,
                             sparsity_policy=policy, pad_token_id=processor.tokenizer.pad_token_id, **extra)
        texts = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        per_layer_tokens = torch.stack(stats.kv_lengths).sum(dim=0) if stats.kv_lengths else None
        for i, (item, text) in enumerate(zip(chunk, texts)):
            results.append({
                **item, "prediction": text.strip(),
                "image_tokens_kept": int(stats.image_tokens_kept[i]) if stats.image_tokens_kept is not None else None,
                "generated_kept": int(stats.generated_tokens_kept[i]) if stats.generated_tokens_kept is not None else None,
                "generated": int(stats.generated_tokens[i]) if stats.generated_tokens is not None else None,
                "kv_tokens": int(per_layer_tokens[i]) if per_layer_tokens is not None else None,
            })
    return results


@torch.no_grad()
def answer_perplexity(model, processor, items, image_root, batch_size=16, policy=None, progress=True,
                      stats: list | None = None, after: str | None = None, requests=None) -> float:
    """Perplexity of the reference answers under teacher forcing, decoding with the KV cache (the
    output-text predictor decides, token by token, which answer tokens stay in layers >= K).
    Pass a list as `stats` to receive one `SparsityStats` per batch (tokens kept, evicted, KV held).
    With `after`, only the tokens that follow that text in each answer are scored (all are fed). `requests`: one
    `SparsityRequest` per item, or None."""
    whole, tail = answer_perplexities(model, processor, items, image_root, batch_size, policy, progress, stats, after,
                                      requests)
    return whole if after is None else tail


@torch.no_grad()
def answer_perplexities(model, processor, items, image_root, batch_size=16, policy=None, progress=True,
                        stats: list | None = None, after: str | None = None, requests=None) -> tuple[float, float]:
    """(perplexity of every answer token, perplexity of the tokens after `after`) from one teacher-forced pass;
    see `answer_perplexity`."""
    sums = torch.zeros(2, dtype=torch.float64)  # nll of all answer tokens, of those after `after`
    counts = torch.zeros(2, dtype=torch.long)
    tokenizer = processor.tokenizer
    for start in tqdm(range(0, len(items), batch_size), disable=not progress, desc="perplexity"):
        chunk = items[start : start + batch_size]
        inputs = batch_inputs(processor, chunk, Path(image_root), blank=False)
        answers = [tokenizer(item["answer"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
                   for item in chunk]
        length = max(len(a) for a in answers)
        targets = torch.full((len(chunk), length), tokenizer.pad_token_id)
        valid = torch.zeros(2, len(chunk), length, dtype=torch.bool)
        for i, (item, a) in enumerate(zip(chunk, answers)):
            targets[i, : len(a)] = torch.tensor(a)
            valid[0, i, : len(a)] = True
            valid[1, i, _scored_from(tokenizer, item["answer"], after) : len(a)] = True
        mask = inputs["attention_mask"]
        prompt_length = mask.shape[1]
        cache = DynamicLlavaCache.from_config(model.config)
        batch_stats = SparsityStats()
        if stats is not None:
            stats.append(batch_stats)
        control = None if requests is None else control_tensor(model, list(requests[start : start + batch_size]),
                                                              len(chunk), policy)
        out = model(**inputs, past_key_values=cache, use_cache=True, output_text_start=prompt_length,
                    sparsity_policy=policy, logits_to_keep=1, sparsity_stats=batch_stats, sparsity_control=control)
        nll = torch.zeros(len(chunk), length, dtype=torch.float64)
        for step in range(length):
            logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
            nll[:, step] = -logp.gather(1, targets[:, step : step + 1]).squeeze(1)
            if step == length - 1:
                break
            mask = torch.cat([mask, torch.ones(len(chunk), 1, dtype=mask.dtype)], dim=1)
            position = (mask.sum(dim=1, keepdim=True) - 1)
            out = model(input_ids=targets[:, step : step + 1], attention_mask=mask, position_ids=position,
                        past_key_values=cache, use_cache=True, output_text_start=prompt_length,
                        sparsity_policy=policy, sparsity_stats=batch_stats, sparsity_control=control)
        sums += (nll.unsqueeze(0) * valid).sum(dim=(1, 2))
        counts += valid.sum(dim=(1, 2))
    return perplexity(float(sums[0]), int(counts[0])), perplexity(float(sums[1]), int(counts[1]))


def _scored_from(tokenizer, answer: str, after: str | None) -> int:
    """Index of the first answer token that follows `after` (0: score every token)."""
    if after is None or after not in answer:
        return 0
    prefix = answer[: answer.index(after) + len(after)]
    return len(tokenizer(prefix, add_special_tokens=False).input_ids)


BACKWARDS = "backwards :"  # where a listing's second part, read from its first, begins


def _listing_parts(text: str) -> tuple[list[str], list[str]] | None:
    """(the first part's items, the second part's names) of a listing, or None if it has no second part."""
    if BACKWARDS not in text:
        return None
    first, tail = text.split(BACKWARDS, 1)
    items = [" ".join(i.split()) for i in first.strip().rstrip(".").split(";")]
    return items, [" ".join(n.split()) for n in tail.strip().rstrip(".").split(",")]


def listing_correct(prediction: str, reference: str) -> bool:
    """A listing is right when it names the reference's objects (in any order: the order is the model's
    choice) and its second part names them in exactly the reverse of the order its first part chose."""
    parsed, wanted = _listing_parts(prediction), _listing_parts(reference)
    if parsed is None or wanted is None:
        return False
    (items, tail), (reference_items, _) = parsed, wanted
    return sorted(items) == sorted(reference_items) and tail == _names(items)[::-1]


def _names(items: list[str]) -> list[str]:
    """The "<colour> <shape>" of each listing item ("a <size> <colour> <shape> at <cell>")."""
    return [" ".join(item.split()[2:4]) for item in items]


def listing_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Partial credit for listings, which `listing_correct` judges whole: the share of the references' items
    ("a <size> <colour> <shape> at <cell>") named exactly, and the share of listings whose second part
    reverses the order their own first part chose (right or wrong objects)."""
    named = wanted = reversed_ = 0
    for prediction, reference in zip(predictions, references, strict=True):
        parsed, target = _listing_parts(prediction), _listing_parts(reference)
        if target is None:
            raise ValueError(f"not a listing reference (no {BACKWARDS!r}): {reference!r}")
        wanted += len(target[0])
        if parsed is None:
            continue
        items, tail = parsed
        named += len(set(items) & set(target[0]))
        reversed_ += tail == _names(items)[::-1]
    return {"items_named": named / max(wanted, 1), "self_reversed": reversed_ / max(len(references), 1)}


def evaluate_world(model, processor, split_json, image_root, limit=None, batch_size=32, policy=None,
                   blank_control=True, progress=True) -> dict:
    """Per-type exact match (and with blank images, the chance control); for descriptions and listings chrF,
    exact match and perplexity (for listings also of their second part alone, which depends on the first,
    and `listing_scores`' partial credit); mean image tokens kept, generated tokens kept and KV tokens per
    sample."""
    records = json.loads(Path(split_json).read_text())[:limit]
    items = first_turns(records)
    short = [i for i in items if i["type"] not in ("describe", "list")]
    long = [i for i in items if i["type"] in ("describe", "list")]
    report: dict = {"samples": len(items)}
    answers = answer_questions(model, processor, short, image_root, batch_size, 6, policy=policy, progress=progress)
    by_type = defaultdict(list)
    for a in answers:
        by_type[a["type"]].append(exact_match(a["prediction"], a["answer"]))
    report["accuracy"] = {t: sum(v) / len(v) for t, v in sorted(by_type.items())}
    report["accuracy_all"] = sum(sum(v) for v in by_type.values()) / max(len(answers), 1)
    if blank_control:
        blank = answer_questions(model, processor, short, image_root, batch_size, 6, blank=True, policy=policy,
                                 progress=progress)
        blank_by_type = defaultdict(list)
        for a in blank:
            blank_by_type[a["type"]].append(exact_match(a["prediction"], a["answer"]))
        report["accuracy_blank_image"] = {t: sum(v) / len(v) for t, v in sorted(blank_by_type.items())}
    for kind in ("describe", "list"):
        chosen = [i for i in long if i["type"] == kind]
        if not chosen:
            continue
        done = answer_questions(model, processor, chosen, image_root, batch_size, 90, policy=policy,
                                progress=progress)
        report[f"{kind}_samples"] = len(done)
        report[f"{kind}_chrf"] = chrf([d["prediction"] for d in done], [d["answer"] for d in done])
        right = listing_correct if kind == "list" else exact_match
        report[f"{kind}_exact"] = sum(right(d["prediction"], d["answer"]) for d in done) / len(done)
        # for listings also the part that repeats the listing's own order backwards
        report[f"{kind}_ppl"], backwards = answer_perplexities(model, processor, chosen, image_root, batch_size, policy,
                                                               progress, after=BACKWARDS)
        if kind == "list":
            report["list_backwards_ppl"] = backwards
            scores = listing_scores([d["prediction"] for d in done], [d["answer"] for d in done])
            report.update({f"list_{name}": value for name, value in scores.items()})
        answers = answers + done
    report["image_tokens_kept"] = sum(a["image_tokens_kept"] or 0 for a in answers) / len(answers)
    kept = [a for a in answers if a["generated"]]
    report["generated_kept_share"] = sum(a["generated_kept"] for a in kept) / max(sum(a["generated"] for a in kept), 1)
    report["kv_tokens_per_sample"] = sum(a["kv_tokens"] or 0 for a in answers) / len(answers)
    return report


__all__ = ["BACKWARDS", "answer_perplexities", "answer_perplexity", "answer_questions", "batch_inputs",
           "evaluate_world", "first_turns", "listing_correct", "listing_scores", "prompt_inputs", "world_prompt"]
