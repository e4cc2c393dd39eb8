"""Side-by-side speed and memory of the methods on one model: prefill time, per-token decode time with the
KV cache, total time without it, KV bytes and process memory as the generated length grows.

Every method runs on the same model object and the same inputs in one process; prefill repeats are
interleaved across methods so a busy machine slows them alike. Times are wall-clock medians; memory
is the KV cache's own byte count (`DynamicLlavaCache.nbytes`) and the process's resident set, sampled
by a thread every few milliseconds during each `generate()`.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessorList

from .. import costs
from ..cache import DynamicLlavaCache
from ..stats import SparsityStats
from .methods import Method, apply


def rss_bytes() -> int:
    """Resident set size of this process (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class PeakRss:
    """Context manager: the highest resident set size seen while the block runs (a sampling thread)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.start, self.peak = interval, 0, 0
        self._stop = threading.Event()

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


class StepRecorder:
    """A logits processor that records, at every generation step, the time, the KV bytes held and the RSS."""

    def __init__(self, cache: DynamicLlavaCache | None):
        self.cache, self.times, self.kv_bytes, self.rss = cache, [], [], []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        self.kv_bytes.append(self.cache.nbytes() if self.cache is not None else 0)
        self.rss.append(rss_bytes())
        return scores


@dataclass
class Workload:
    """One batch of prompts for a model: generate() inputs plus what the cost model needs."""

    inputs: dict
    prompt_tokens: int
    image_tokens: int  # per sample
    batch: int
    pad_token_id: int
    suppress: list[int] = field(default_factory=list)  # never generated (e.g. the image token)
    vision_passes: int = 1  # vision-tower passes per image (LLaVA-NeXT: one per anyres tile and the overview)


def _generate(model, workload: Workload, policy, new_tokens: int, use_cache: bool, recorder=None, cache=None,
              stats=None):
    return model.generate(
        **workload.inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
        use_cache=use_cache, past_key_values=cache, pad_token_id=workload.pad_token_id,
        suppress_tokens=workload.suppress or None, sparsity_policy=policy, sparsity_stats=stats,
        logits_processor=LogitsProcessorList([recorder]) if recorder is not None else None,
    )


def exact_prefill_flops(model, method: Method, workload: Workload, image_tokens_kept: int) -> int:
    """Exact FLOPs of one batch's prefill: language model (layers >= K on the kept tokens), lm_head of the
    last token, vision tower and projector, and the image predictor when the method runs it."""
    config, text = model.config, model.config.text_config
    k = config.sparse_layer
    kept_tokens = workload.prompt_tokens - workload.image_tokens + image_tokens_kept
    per_sample = costs.prefill_flops(text, workload.prompt_tokens, k, kept_tokens)
    if hasattr(config.vision_config, "image_size"):  # a CLIP tower (LLaVA); Qwen-VL's here is one tiny layer
        per_sample += costs.vision_flops(config, workload.vision_passes)
    runs_predictor = method.name == "dynamic-llava" and image_tokens_kept < workload.image_tokens
    if runs_predictor:
        per_sample += costs.image_predictor_flops(config, workload.image_tokens)
    return per_sample * workload.batch


def _generated_kept_share(model, stats: SparsityStats, workload: Workload, decode_tokens: int) -> float:
    """Share of the generated tokens in the cache whose K/V layer K holds (mean over the batch; 1.0: all).
    The last generated token is never fed back, so the cache has seen ``decode_tokens - 1`` of them."""
    k = model.config.sparse_layer
    if decode_tokens < 2 or len(stats.kv_lengths) <= k:
        return 1.0
    prompt_kept = workload.prompt_tokens - workload.image_tokens + int(stats.image_tokens_kept[0]) \
        if stats.image_tokens_kept is not None else workload.prompt_tokens
    held = stats.kv_lengths[k].double().mean().item() - prompt_kept
    return held / (decode_tokens - 1)


@torch.inference_mode()
def measure_methods(model, workload: Workload, methods: list[Method], repeats: int = 3, decode_tokens: int = 256,
                    no_cache_tokens: int = 16, checkpoints: tuple[int, ...] | None = None, warmup: bool = True,
                    log=print) -> dict:
    """Measure every method on `workload`; returns {method name: results} (see the module docstring).
    KV bytes and RSS are reported at the generated lengths in `checkpoints` (default: powers of two and the end).
    `warmup`: run every method once untimed first (skip it when the model already ran a workload)."""
    if checkpoints is None:
        checkpoints = tuple(sorted({2**i for i in range(decode_tokens.bit_length()) if 2**i <= decode_tokens}
                                   | {decode_tokens}))
    results = {m.name: {} for m in methods}
    # 1. prefill, interleaved; the first pass records what was kept (and is not timed when it warms up)
    times = {m.name: [] for m in methods}
    for rep in range(repeats + int(warmup)):
        for method in methods:
            policy = apply(model, method)
            stats = SparsityStats()
            start = time.perf_counter()
            model(**workload.inputs, use_cache=True, logits_to_keep=1, sparsity_policy=policy, sparsity_stats=stats)
            elapsed = time.perf_counter() - start
            if rep == 0:
                kept = stats.image_tokens_kept
                kept = workload.image_tokens if kept is None else int(kept[0])
                results[method.name]["image_tokens_kept"] = kept
                results[method.name]["prefill_flops"] = exact_prefill_flops(model, method, workload, kept)
            if rep > 0 or not warmup:
                times[method.name].append(elapsed)
        log(f"prefill pass {rep + 1}/{repeats + int(warmup)}" + (" (warm-up)" if warmup and rep == 0 else ""))
    for method in methods:
        results[method.name]["prefill_s"] = statistics.median(times[method.name])
        results[method.name]["prefill_all_s"] = times[method.name]
    # 2. decoding with the cache: per-step time, KV bytes and RSS as the context grows
    for method in methods:
        policy = apply(model, method)
        cache = DynamicLlavaCache.from_config(model.config)
        recorder, stats = StepRecorder(cache), SparsityStats()
        with PeakRss() as peak:
            start = time.perf_counter()
            _generate(model, workload, policy, decode_tokens, True, recorder, cache, stats)
            total = time.perf_counter() - start
        steps = [b - a for a, b in zip(recorder.times[:-1], recorder.times[1:])]
        # recorder entry i is taken after i + 1 tokens were produced; the cache then holds i generated tokens
        marks = [n for n in checkpoints if n <= len(recorder.kv_bytes)]
        summary = stats.summary()
        results[method.name].update({
            "generate_s": total,
            "decode_step_s": steps,
            "decode_ms_per_token": 1e3 * statistics.median(steps) if steps else float("nan"),
            "decode_ms_per_token_last_quarter": 1e3 * statistics.median(steps[-max(1, len(steps) // 4):])
            if steps else float("nan"),
            "kv_bytes_by_length": {n: recorder.kv_bytes[n - 1] for n in marks},
            "rss_bytes_by_length": {n: recorder.rss[n - 1] for n in marks},
            "kv_bytes_final": cache.nbytes(),
            "kv_bytes_dense_equivalent": stats.dense_kv_bytes,
            "generated_tokens_kept": summary["generated_tokens_kept"],
            "generated_tokens": summary["generated_tokens"],
            "peak_rss_bytes": peak.peak,
            "peak_rss_increase_bytes": peak.peak - peak.start,
            "context_at_end": workload.prompt_tokens + decode_tokens,
            "generated_kv_kept_share": _generated_kept_share(model, stats, workload, decode_tokens),
        })
        log(f"{method.name}: decoded {decode_tokens} tokens with the cache in {total:.1f} s")
    # 3. decoding without a cache: every step recomputes the sequence
    if no_cache_tokens > 0:
        for method in methods:
            policy = apply(model, method)
            start = time.perf_counter()
            _generate(model, workload, policy, no_cache_tokens, False)
            results[method.name]["no_cache_s"] = time.perf_counter() - start
            results[method.name]["no_cache_tokens"] = no_cache_tokens
        log(f"decoded {no_cache_tokens} tokens without a cache with every method")
    dense = results.get("dense")
    for name, r in results.items():
        if dense is None:
            break
        r["prefill_speedup"] = dense["prefill_s"] / r["prefill_s"]
        r["flops_speedup"] = dense["prefill_flops"] / r["prefill_flops"]
        r["speedup_vs_flops_ideal"] = r["prefill_speedup"] / r["flops_speedup"]
        r["decode_ratio"] = r["decode_ms_per_token_last_quarter"] / dense["decode_ms_per_token_last_quarter"]
        r["kv_ratio"] = r["kv_bytes_final"] / dense["kv_bytes_final"]
        if "no_cache_s" in r:
            r["no_cache_speedup"] = dense["no_cache_s"] / r["no_cache_s"]
    return results


__all__ = ["PeakRss", "StepRecorder", "Workload", "exact_prefill_flops", "measure_methods",
           "rss_bytes"]
