"""Accuracy versus budget on the trained world model: every policy at the same keep rates.

* Image budget (keep 0.1 / 0.2 / 0.5 of each image's tokens; generated tokens all kept): exact match
  per question type and the teacher-forced perplexity of reference descriptions, for Dynamic-LLaVA's
  image predictor, FastV, CDPruner-style and DART-style selection and random selection, next to the
  dense model; with each point's exact prefill FLOPs. The training-free methods run on the dense model
  the Dynamic-LLaVA checkpoint was fine-tuned from (`baseline_checkpoint`), as the literature compares
  them, and again on the fine-tuned checkpoint ("... on the fine-tuned LM"), which isolates the choice
  of tokens from the language model's adaptation to pruned inputs.
* Text budget (0.2 / 0.5 / 0.8 of the generated tokens held in layers >= K; image tokens all kept):
  perplexity of reference listings (the objects in a random order, then backwards: the second part
  can only be read from the first), decoded with the KV cache, over the whole listing and over its
  second part, for the output-text predictor (its keep-probability threshold set on held-out listings
  so that it keeps that share), random selection, a StreamingLLM window and H2O heavy hitters (their
  windows sized to hold that share of a listing at its end).

The test split comes from any generator seed (`seed`), so a figure can be checked on scenes no model saw.
"""

from __future__ import annotations

import json
import statistics
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import costs
from ..evaluation import answer_perplexity, answer_questions, exact_match, first_turns
from ..evaluation.world import BACKWARDS, answer_perplexities, batch_inputs, prompt_inputs
from ..policies import (
    CDPrunerPolicy,
    DARTPolicy,
    FastVPolicy,
    H2OPolicy,
    LearnedPolicy,
    RandomPolicy,
    StreamingLLMPolicy,
)
from ..predictors import keep_log_prob
from ..world.assets import check_same_world
from ..world.scenes import write_split


@dataclass
class AccuracySettings:
    checkpoint: str = "checkpoints/tiny-dynamic-llava"
    baseline_checkpoint: str | None = "checkpoints/tiny-llava"  # the dense model; None: baselines on `checkpoint` only
    image_rates: tuple[float, ...] = (0.1, 0.2, 0.5)
    text_rates: tuple[float, ...] = (0.2, 0.5, 0.8)
    questions: int = 1200  # test records read (short questions, descriptions and listings among them)
    calibration: int = 100  # validation listings that set the output-text threshold
    seed: int = 0  # the generator seed of the test and calibration splits
    batch_size: int = 32


class _KeepProbabilities(LearnedPolicy):
    """Keeps every generated token and records the output-text predictor's keep probability of each."""

    def __init__(self):
        super().__init__(image_keep_rate=1.0)
        self.seen: list[torch.Tensor] = []

    def text_keep(self, model, hidden, positions, threshold=None):
        self.seen.append(keep_log_prob(model.text_predictor(hidden)).exp().flatten())
        return torch.ones(hidden.shape[:-1], dtype=torch.bool, device=hidden.device)


def calibrate_text_threshold(model, processor, items, image_root, rates) -> list[float]:
    """For each rate, the keep-probability threshold at which the output-text predictor keeps that share of
    the answer tokens of `items` (teacher forced, with the cache)."""
    recorder = _KeepProbabilities()
    answer_perplexity(model, processor, items, image_root, policy=recorder, progress=False)
    probs = torch.cat(recorder.seen)
    return [float(torch.quantile(probs, 1.0 - rate)) for rate in rates]


def _exact_match(model, processor, items, image_root, policy, batch_size):
    answers = answer_questions(model, processor, items, image_root, batch_size, 6, policy=policy, progress=False)
    by_type = defaultdict(list)
    for a in answers:
        by_type[a["type"]].append(exact_match(a["prediction"], a["answer"]))
    per_type = {t: sum(v) / len(v) for t, v in sorted(by_type.items())}
    return per_type, sum(sum(v) for v in by_type.values()) / max(len(answers), 1)


def _prefill_flops(model, prompt_tokens: int, image_tokens: int, kept: int, predictor: bool) -> int:
    config = model.config
    flops = costs.prefill_flops(config.text_config, prompt_tokens, config.sparse_layer,
                                prompt_tokens - image_tokens + kept)
    flops += costs.vision_flops(config)
    return flops + (costs.image_predictor_flops(config, image_tokens) if predictor else 0)


@torch.no_grad()
def run_accuracy(settings: AccuracySettings, log=print) -> dict:
    """Run both sweeps; returns a JSON-ready dict."""
    from .workloads import load_world_model

    clutter = check_same_world(settings.checkpoint, settings.baseline_checkpoint)  # scenes of the checkpoint's world
    model, processor = load_world_model(settings.checkpoint)
    model.config.text_keep_rate = 1.0  # image sweep: generated tokens all kept
    dense = None
    if settings.baseline_checkpoint is not None:
        dense, _ = load_world_model(settings.baseline_checkpoint, quiet=True)
        dense.config.image_keep_rate = dense.config.text_keep_rate = 1.0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        test = first_turns(json.loads(write_split(root, "test", settings.questions, seed=settings.seed,
                                                  clutter=clutter).read_text()))
        held_out = first_turns(json.loads(
            write_split(root, "validation", settings.calibration, mix={"list": 1.0}, seed=settings.seed,
                        clutter=clutter).read_text()))
        images = root / "images"
        short = [i for i in test if i["type"] not in ("describe", "list")]
        long = [i for i in test if i["type"] == "describe"]
        listings = [i for i in test if i["type"] == "list"]
        per_image = model.tokens_per_image()
        prompt_tokens = batch_inputs(processor, short[:1], images, blank=False)["input_ids"].shape[1]
        counts = {t: sum(i["type"] == t for i in short) for t in sorted({i["type"] for i in short})}
        report = {"settings": asdict(settings), "world_clutter": clutter, "short_questions": len(short),
                  "questions_per_type": counts, "descriptions": len(long), "listings": len(listings),
                  "image_tokens": per_image, "image_sweep": [], "text_sweep": []}

        def image_point(method, rate, policy, predictor, on=model):
            per_type, overall = _exact_match(on, processor, short, images, policy, settings.batch_size)
            ppl = answer_perplexity(on, processor, long, images, policy=policy, progress=False)
            kept = per_image if rate >= 1.0 else int(rate * per_image)
            point = {"method": method, "image_keep_rate": rate, "image_tokens_kept": kept, "accuracy": per_type,
                     "accuracy_all": overall, "describe_ppl": ppl,
                     "prefill_flops": _prefill_flops(model, prompt_tokens, per_image, kept, predictor)}
            report["image_sweep"].append(point)
            log(f"image keep {rate}: {method}: accuracy {overall:.1%}, description PPL {ppl:.3f}")

        if dense is not None:
            image_point("dense", 1.0, LearnedPolicy(image_keep_rate=1.0), False, on=dense)
        image_point("dynamic-llava" if dense is not None else "dense", 1.0, LearnedPolicy(image_keep_rate=1.0), False)
        baselines = {"fastv": lambda r: FastVPolicy(image_keep_rate=r),
                     "cdpruner": lambda r: CDPrunerPolicy(image_keep_rate=r),
                     "dart": lambda r: DARTPolicy(image_keep_rate=r),
                     "random": lambda r: RandomPolicy(image_keep_rate=r, seed=settings.seed)}
        diverse = model.config.image_selection == "diverse"
        for rate in settings.image_rates:
            image_point("dynamic-llava", rate, LearnedPolicy(image_keep_rate=rate), True)
            if diverse:  # the same checkpoint with the paper's top-k selection: what the diverse selection adds
                model.config.image_selection = "top"
                image_point("dynamic-llava, top-k selection", rate, LearnedPolicy(image_keep_rate=rate), True)
                model.config.image_selection = "diverse"
            for name, make in baselines.items():
                image_point(name, rate, make(rate), False, on=dense if dense is not None else model)
            if dense is not None:
                for name, make in baselines.items():
                    image_point(f"{name} on the fine-tuned LM", rate, make(rate), False)

        lengths = [len(processor.tokenizer(i["answer"], add_special_tokens=False).input_ids) + 1 for i in listings]
        typical = statistics.median(lengths)
        model.config.text_keep_rate = 0.5  # any rate < 1 turns the output-text predictor on
        thresholds = calibrate_text_threshold(model, processor, held_out, images, settings.text_rates)

        def text_point(method, rate, policy, window=None):
            stats = []
            ppl, backwards = answer_perplexities(model, processor, listings, images, policy=policy, progress=False,
                                                 stats=stats, after=BACKWARDS)
            report["text_sweep"].append({"method": method, "text_keep_rate": rate, "list_ppl": ppl,
                                         "list_backwards_ppl": backwards, "held_share_at_end": held_share(stats),
                                         "window": window})
            log(f"text keep {rate}: {method}: listing PPL {ppl:.3f}, its second part {backwards:.3f}")

        text_point("dense", 1.0, RandomPolicy(image_keep_rate=1.0, text_keep_rate=1.0))
        for rate, threshold in zip(settings.text_rates, thresholds):
            budget = max(1, round(rate * typical))
            text_point("dynamic-llava", rate, _ThresholdPolicy(image_keep_rate=1.0, threshold=threshold))
            text_point("random", rate, RandomPolicy(image_keep_rate=1.0, text_keep_rate=rate, seed=settings.seed))
            text_point("streamingllm", rate, _full_image(StreamingLLMPolicy(window=budget)), budget)
            text_point("h2o", rate, _full_image(H2OPolicy(heavy=budget // 2, recent=max(1, budget - budget // 2))),
                       budget)
        text_point("none kept", 0.0, _NoGeneratedText(image_keep_rate=1.0))
    return report


class _ThresholdPolicy(LearnedPolicy):
    """Dynamic-LLaVA with the output-text predictor's keep threshold moved to reach a chosen keep rate."""

    def __init__(self, image_keep_rate: float, threshold: float):
        super().__init__(image_keep_rate=image_keep_rate)
        self.threshold = threshold

    def text_keep(self, model, hidden, positions, threshold=None):
        return keep_log_prob(model.text_predictor(hidden)).exp() > self.threshold


class _NoGeneratedText(LearnedPolicy):
    """Layers >= K see no generated token (the control: what the answer's own text adds)."""

    def text_keep(self, model, hidden, positions, threshold=None):
        return torch.zeros(hidden.shape[:-1], dtype=torch.bool, device=hidden.device)


def _full_image(policy):
    policy.image_keep_rate = 1.0
    return policy


@torch.no_grad()
def kept_image_tokens(model, processor, image, question: str, policies: dict) -> dict[str, torch.Tensor]:
    """For one image and question: method -> bool [image tokens], the tokens each policy keeps after layer K."""
    inputs = prompt_inputs(processor, [question], [image])
    image_positions = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    masks = {}
    for name, policy in policies.items():
        out = model(**inputs, logits_to_keep=1, sparsity_policy=policy)
        kept = torch.ones(image_positions.numel(), dtype=torch.bool)
        if out.kept_index is not None:
            kept = torch.isin(image_positions, out.kept_index[0][out.kept_valid[0]])
        masks[name] = kept
    return masks


def held_share(stats: list) -> float:
    """Share of the generated tokens fed back that layers >= K still hold at the end (kept minus evicted)."""
    judged = held = 0
    for st in stats:
        if st.generated_tokens is None:
            continue
        judged += int(st.generated_tokens.sum())
        evicted = 0 if st.generated_tokens_evicted is None else int(st.generated_tokens_evicted.sum())
        held += int(st.generated_tokens_kept.sum()) - evicted
    return held / judged if judged else 1.0


__all__ = ["AccuracySettings", "calibrate_text_threshold", "held_share", "kept_image_tokens", "run_accuracy"]
