#!/usr/bin/env python
"""Dense vs Dynamic-LLaVA engine benchmark on a random-weight model (CPU, no downloads).

Builds a DynamicLlavaForConditionalGeneration from a config (default: a ~280M-parameter Llama
language model, hidden 1024 x 16 layers, and a one-layer CLIP tower whose 336 px / 14 px patches
give 576 image tokens at negligible cost), then measures in one run, side by side:

1. prefill time, dense (image_keep_rate = text_keep_rate = 1.0) vs sparse (image_keep_rate 0.2,
   learned but untrained predictors), next to the paper-convention and exact FLOPs ratios;
2. per-token decode latency with the KV cache (greedy, steps timed one by one);
3. KV-cache bytes after many generated tokens with a forced RandomPolicy (image 0.2, text 0.5),
   checked against a real dense `generate()`;
plus a per-component breakdown of one prefill (forward hooks) and the peak RSS.

On a shared machine other processes stall our OpenMP threads badly (a 50 ms decode step can take
over a second), so the benchmark first waits (--wait-quiet) for the CPUs to be free, samples
/proc/stat around every timed call, takes medians over the calls during which other processes
stayed quiet, and prints how many those were and how busy the machine was.

Usage:
    PYTHONPATH=src python benchmarks/engine_benchmark.py [--quick] [--json PATH] [--profile]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

import torch

from dynamic_llava import (
    DynamicLlavaCache,
    DynamicLlavaConfig,
    DynamicLlavaForConditionalGeneration,
    RandomPolicy,
    SparsityStats,
    costs,
)

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = 0, 1, 2


# ----------------------------------------------------------------------------- setup


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short smoke run: fewer repeats and tokens")
    p.add_argument("--json", metavar="PATH", help="write all results to this JSON file")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler top ops of one dense and one sparse prefill")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--attn", choices=["sdpa", "eager"], default="sdpa")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wait-quiet", type=float, default=60.0, metavar="SECONDS",
                   help="before measuring, wait up to this long for other processes to leave the CPUs alone")
    p.add_argument("--quiet-threshold", type=float, default=0.10,
                   help="a timed prefill counts as quiet when other processes used less than this share of all CPUs")
    g = p.add_argument_group("model")
    g.add_argument("--hidden", type=int, default=1024)
    g.add_argument("--layers", type=int, default=16)
    g.add_argument("--intermediate", type=int, default=2816)
    g.add_argument("--heads", type=int, default=16)
    g.add_argument("--kv-heads", type=int, default=16)
    g.add_argument("--vocab", type=int, default=32064, help="llava-hf size; the image token is 32000")
    g.add_argument("--vision-hidden", type=int, default=64)
    g.add_argument("--vision-layers", type=int, default=1)
    g.add_argument("--image-size", type=int, default=336)
    g.add_argument("--patch-size", type=int, default=14)
    g = p.add_argument_group("sparsity")
    g.add_argument("--sparse-layer", type=int, default=2, help="K")
    g.add_argument("--image-keep-rate", type=float, default=0.2)
    g.add_argument("--text-keep-rate", type=float, default=0.5)
    g = p.add_argument_group("workload")
    g.add_argument("--text-before", type=int, default=20, help="text tokens before the image")
    g.add_argument("--text-after", type=int, default=20, help="text tokens after the image")
    g.add_argument("--repeats", type=int, default=None, help="timed prefill repeats (default 7, quick 2)")
    g.add_argument("--decode-tokens", type=int, default=None, help="new tokens for decode latency (default 64, quick 16)")
    g.add_argument("--kv-tokens", type=int, default=None, help="generated tokens for the KV-bytes run (default 512, quick 64)")
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 7
    if args.decode_tokens is None:
        args.decode_tokens = 16 if args.quick else 64
    if args.kv_tokens is None:
        args.kv_tokens = 64 if args.quick else 512
    return args


def build_model(args) -> DynamicLlavaForConditionalGeneration:
    image_token = 32000 if args.vocab > 32000 else args.vocab - 1
    patches = (args.image_size // args.patch_size) ** 2
    prompt_len = args.text_before + patches + args.text_after
    config = DynamicLlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=args.vision_hidden,
            intermediate_size=4 * args.vision_hidden,
            num_hidden_layers=args.vision_layers,
            num_attention_heads=max(1, args.vision_hidden // 32),
            image_size=args.image_size,
            patch_size=args.patch_size,
            projection_dim=args.vision_hidden,
        ),
        text_config=dict(
            model_type="llama",
            hidden_size=args.hidden,
            intermediate_size=args.intermediate,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads,
            vocab_size=args.vocab,
            max_position_embeddings=max(2048, prompt_len + max(args.kv_tokens, args.decode_tokens) + 8),
            pad_token_id=PAD_TOKEN,
            bos_token_id=BOS_TOKEN,
            eos_token_id=EOS_TOKEN,
        ),
        image_token_index=image_token,
        vision_feature_layer=-1,
        image_seq_length=patches,
        sparse_layer=args.sparse_layer,
        image_keep_rate=args.image_keep_rate,
        text_keep_rate=args.text_keep_rate,
    )
    config._attn_implementation = args.attn
    torch.manual_seed(args.seed)
    model = DynamicLlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation(args.attn)
    model.to(getattr(torch, args.dtype))
    # the engine reads the sparsity settings from this object at every call
    assert model.model.language_model.sparsity is model.config
    return model


def make_inputs(model, args):
    """One prompt: text, the image's placeholder tokens, text. Returns input_ids [1, N], pixel_values."""
    g = torch.Generator().manual_seed(args.seed)
    image_token = model.config.image_token_id
    per_image = model.tokens_per_image()
    high = min(image_token, model.config.text_config.vocab_size)
    ids = torch.cat(
        [
            torch.tensor([BOS_TOKEN]),
            torch.randint(4, high, (args.text_before - 1,), generator=g),
            torch.full((per_image,), image_token),
            torch.randint(4, high, (args.text_after,), generator=g),
        ]
    ).unsqueeze(0)
    pixels = torch.randn(1, 3, args.image_size, args.image_size, generator=g).to(model.dtype)
    return ids, pixels


def set_mode(model, args, dense: bool) -> None:
    model.config.image_keep_rate = 1.0 if dense else args.image_keep_rate
    model.config.text_keep_rate = 1.0 if dense else args.text_keep_rate


def count_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def median(xs):
    return statistics.median(xs) if xs else float("nan")


# ----------------------------------------------------------------------------- measurements


def prefill(model, ids, pixels, policy=None, stats=None):
    return model(
        input_ids=ids, pixel_values=pixels, use_cache=True, logits_to_keep=1, sparsity_policy=policy, sparsity_stats=stats
    )


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


class CpuMonitor:
    """CPU used by OTHER processes (all CPUs' busy time from /proc/stat minus this process's CPU time).

    On a small shared machine other processes stall our OpenMP threads far beyond their share of the
    CPU, so timings taken while others are busy are flagged and left out of the medians when enough
    quiet ones exist. All methods return None where /proc/stat is missing.
    """

    def __init__(self):
        self.start = self.sample()

    @staticmethod
    def sample():
        try:
            with open("/proc/stat") as fh:
                fields = [int(x) for x in fh.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK"), time.process_time(), time.perf_counter()

    @staticmethod
    def others(a, b):
        """Share of all CPUs kept busy by other processes between samples a and b (0..1)."""
        if a is None or b is None:
            return None
        busy, own, wall = (y - x for x, y in zip(a, b))
        return max(0.0, busy - own) / (max(wall, 1e-9) * (os.cpu_count() or 1))

    def since_start(self):
        return self.others(self.start, self.sample())

    def wait_quiet(self, max_wait: float, threshold: float, log) -> float | None:
        """Wait (up to max_wait seconds) for a 2 s window with others below threshold; return the last share."""
        deadline = time.perf_counter() + max_wait
        while True:
            a = self.sample()
            time.sleep(2.0)
            share = self.others(a, self.sample())
            if share is None or share < threshold or time.perf_counter() >= deadline:
                return share
            log(f"   machine busy: other processes use {share:.0%} of the CPUs; waiting")


def measure_prefill(model, args, ids, pixels, log):
    """Interleaved repeats of dense, sparse (learned predictor) and sparse (RandomPolicy, no predictor).

    Returns wall times, process CPU times, other processes' CPU share during each call, and checks.
    """
    random_policy = RandomPolicy(image_keep_rate=args.image_keep_rate, seed=args.seed)
    variants = {
        "dense": (True, None),
        "sparse": (False, None),
        "sparse_random": (False, random_policy),
    }
    times = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    busy = {name: [] for name in variants}
    checks = {}
    for rep in range(args.repeats + 1):  # repeat 0 is the warm-up
        for name, (dense, policy) in variants.items():
            set_mode(model, args, dense)
            stats = SparsityStats()
            s0, c0, t0 = CpuMonitor.sample(), time.process_time(), time.perf_counter()
            out = prefill(model, ids, pixels, policy, stats)
            dt, ct, s1 = time.perf_counter() - t0, time.process_time() - c0, CpuMonitor.sample()
            if rep == 0:
                kept = None if out.kept_index is None else int(out.kept_valid.sum())
                checks[name] = {
                    "tokens_after_K": kept if kept is not None else ids.shape[1],
                    "image_tokens_kept": int(stats.image_tokens_kept[0]) if stats.image_tokens_kept is not None else None,
                    "kv_lengths": [int(t[0]) for t in stats.kv_lengths],
                }
            else:
                times[name].append(dt)
                cpu[name].append(ct)
                busy[name].append(CpuMonitor.others(s0, s1))
        if rep == 0:
            log("   warm-up done")
        else:
            log(
                f"   repeat {rep}/{args.repeats}: "
                + ", ".join(f"{n} {times[n][-1]:.3f}s (others {fmt_share(busy[n][-1])})" for n in variants)
            )
    return times, cpu, busy, checks


def quiet_median(times, shares, threshold):
    """Median over the calls during which other processes stayed below threshold (all calls if none did)."""
    quiet = [t for t, s in zip(times, shares) if s is not None and s < threshold]
    return (median(quiet), len(quiet)) if quiet else (median(times), 0)


def quiet_steps(times, shares, threshold):
    """The steps during which other processes stayed below threshold, if at least a quarter of them did
    (else all steps); and whether the filter was applied. /proc/stat ticks are 10 ms, so a ~50 ms
    step's share is only good to about +-10%: use a looser threshold than for whole prefills."""
    quiet = [t for t, s in zip(times, shares) if s is not None and s < threshold]
    return (quiet, True) if len(quiet) >= max(1, len(times) // 4) else (list(times), False)


def time_quiet(fn, repeats, threshold):
    """Warm-up + repeats calls of fn; the quiet median and how many calls were quiet."""
    fn()
    times, shares = [], []
    for _ in range(repeats):
        s0 = CpuMonitor.sample()
        times.append(timed(fn)[0])
        shares.append(CpuMonitor.others(s0, CpuMonitor.sample()))
    return quiet_median(times, shares, threshold)


def fmt_share(x):
    return "n/a" if x is None else f"{x:.0%}"


def measure_components(model, args, ids, pixels, repeats: int):
    """Time the parts of one prefill with forward hooks: vision tower + projector, layers < K,
    image predictor, layers >= K, final norm + lm_head; the rest (embedding, masks, top-k, gather,
    sort, cache bookkeeping) is what is left of the total."""
    lm = model.model.language_model
    k = model.config.sparse_layer
    groups = {
        "vision tower + projector": [model.model.vision_tower, model.model.multi_modal_projector],
        "layers < K": list(lm.layers[:k]),
        "image predictor": [lm.image_predictor] if lm.image_predictor is not None else [],
        "layers >= K": list(lm.layers[k:]),
        "norm + lm_head": [lm.norm, model.lm_head],
    }
    acc = {name: 0.0 for name in groups}
    starts = {}
    handles = []
    for name, modules in groups.items():
        for m in modules:
            def pre(mod, inp, _m=m):
                starts[id(_m)] = time.perf_counter()

            def post(mod, inp, out, _m=m, _name=name):
                acc[_name] += time.perf_counter() - starts[id(_m)]

            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
    runs = {"dense": [], "sparse": []}
    try:
        for rep in range(repeats + 1):  # 0: warm-up
            for mode in runs:
                set_mode(model, args, mode == "dense")
                for name in acc:
                    acc[name] = 0.0
                s0 = CpuMonitor.sample()
                total, _ = timed(lambda: prefill(model, ids, pixels))
                share = CpuMonitor.others(s0, CpuMonitor.sample())
                parts = dict(acc)
                parts["other (embed, masks, select, gather, cache)"] = total - sum(parts.values())
                parts["total"] = total
                if rep:
                    runs[mode].append((parts, share))
    finally:
        for h in handles:
            h.remove()
    result = {}
    for mode, rs in runs.items():
        quiet = [parts for parts, share in rs if share is not None and share < args.quiet_threshold]
        use = quiet or [parts for parts, _ in rs]
        result[mode] = {name: median([r[name] for r in use]) for name in use[0]}
        result[mode]["quiet_runs"] = len(quiet)
    return result


def greedy(logits, suppress):
    logits = logits[:, -1].float()
    logits[:, suppress] = float("-inf")
    return logits.argmax(-1, keepdim=True)


def measure_decode(model, args, ids, pixels, n_new: int):
    """Greedy decode with a DynamicLlavaCache, dense and sparse advanced step by step in turn (so a busy
    machine slows both alike), each step timed alone. Returns {mode: (step seconds, stats)}."""
    set_mode(model, args, True)  # dense: config rates 1.0; sparse is driven entirely by its RandomPolicy
    suppress = [model.config.image_token_id]
    start = ids.shape[1]
    runs = {}
    for name, policy in (("dense", None), ("sparse", RandomPolicy(args.image_keep_rate, args.text_keep_rate, seed=args.seed))):
        cache = DynamicLlavaCache.from_config(model.config)
        kw = dict(past_key_values=cache, use_cache=True, logits_to_keep=1, sparsity_policy=policy, output_text_start=start)
        stats = SparsityStats()
        out = model(input_ids=ids, pixel_values=pixels, sparsity_stats=stats, **kw)
        runs[name] = {"kw": kw, "stats": stats, "tok": greedy(out.logits, suppress), "steps": [], "busy": []}
    for step in range(n_new - 1):
        for name in ("dense", "sparse") if step % 2 == 0 else ("sparse", "dense"):
            r = runs[name]
            s0 = CpuMonitor.sample()
            dt, out = timed(lambda: model(input_ids=r["tok"], sparsity_stats=r["stats"], **r["kw"]))
            r["busy"].append(CpuMonitor.others(s0, CpuMonitor.sample()))
            r["tok"] = greedy(out.logits, suppress)
            r["steps"].append(dt)
    return {name: (r["steps"], r["busy"], r["stats"]) for name, r in runs.items()}


class StepClock:
    """A logits processor that only records when each generation step reaches it (and the CPU counters)."""

    def __init__(self):
        self.stamps = []
        self.cpu = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        self.cpu.append(CpuMonitor.sample())
        return scores


def measure_generate(model, args, ids, pixels, dense: bool, n_new: int):
    """`generate()` n_new tokens greedily (forced length). Returns total time, prefill time (start to
    the first logits), decode step times, stats and the cache."""
    from transformers import LogitsProcessorList

    set_mode(model, args, dense)
    policy = None if dense else RandomPolicy(args.image_keep_rate, args.text_keep_rate, seed=args.seed)
    stats = SparsityStats()
    cache = DynamicLlavaCache.from_config(model.config)
    clock = StepClock()
    t0 = time.perf_counter()
    out = model.generate(
        input_ids=ids,
        pixel_values=pixels,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=n_new,
        min_new_tokens=n_new,
        do_sample=False,
        pad_token_id=PAD_TOKEN,
        suppress_tokens=[model.config.image_token_id],
        logits_processor=LogitsProcessorList([clock]),
        past_key_values=cache,
        sparsity_policy=policy,
        sparsity_stats=stats,
    )
    total = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + n_new, out.shape
    steps = [b - a for a, b in zip(clock.stamps[:-1], clock.stamps[1:])]
    busy = [CpuMonitor.others(a, b) for a, b in zip(clock.cpu[:-1], clock.cpu[1:])]
    return {"total_s": total, "prefill_s": clock.stamps[0] - t0, "steps_s": steps, "steps_busy": busy}, stats, cache


# ----------------------------------------------------------------------------- output


def print_table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(r[i])) for r in [columns, *rows]) for i in range(len(columns))]
        print(f"\n{title}")
        print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
        print("  ".join("-" * w for w in widths))
        for r in rows:
            print("  ".join(("" if v is None else str(v)).ljust(w) for v, w in zip(r, widths)))
        return
    table = Table(title=title, title_justify="left", show_lines=False)
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i in (0, len(columns) - 1) else "right", overflow="fold")
    for r in rows:
        if r[0].startswith("--"):
            table.add_section()
            table.add_row(f"[bold]{r[0].strip('- ')}[/bold]", *["" for _ in r[1:]])
        else:
            table.add_row(*[("" if v is None else str(v)) for v in r])
    Console(width=160).print(table)


def fmt_s(x):
    return f"{x:.3f} s"


def fmt_ms(x):
    return f"{1e3 * x:.1f} ms"


def fmt_g(x):
    return f"{x / 1e9:.2f} G"


def fmt_mib(x):
    return f"{x / 2**20:.1f} MiB"


# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    load = CpuMonitor()
    torch.set_num_threads(args.threads)

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    log("building model")
    model = build_model(args)
    cfg, text = model.config, model.config.text_config
    k, n_layers, width = cfg.sparse_layer, text.num_hidden_layers, text.hidden_size
    ids, pixels = make_inputs(model, args)
    n_tokens = ids.shape[1]
    per_image = model.tokens_per_image()
    n_kept_image = max(1, int(args.image_keep_rate * per_image + 1e-6))
    n_kept = n_tokens - per_image + n_kept_image
    lm = model.model.language_model
    predictors = sum(count_params(m) for m in (lm.image_predictor, lm.text_predictor) if m is not None)
    params = {
        "total": count_params(model),
        "language_model_and_lm_head": count_params(lm) - predictors + count_params(model.lm_head),
        "vision_tower_and_projector": count_params(model.model.vision_tower) + count_params(model.model.multi_modal_projector),
        "predictors": predictors,
    }
    if params["total"] < 100e6:
        log(f"warning: only {params['total'] / 1e6:.1f}M parameters (the reference setup has >= 100M)")
    log(
        f"model: {params['total'] / 1e6:.1f}M parameters (LM+head {params['language_model_and_lm_head'] / 1e6:.1f}M, "
        f"vision+projector {params['vision_tower_and_projector'] / 1e6:.2f}M, predictors {params['predictors'] / 1e6:.2f}M); "
        f"prompt {n_tokens} tokens ({per_image} image); K={k}; {args.dtype}; {args.threads} threads; attn {args.attn}"
    )
    results = {
        "settings": vars(args),
        "env": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
        },
        "params": params,
        "prompt": {"tokens": n_tokens, "image_tokens": per_image, "kept_image_tokens": n_kept_image, "tokens_after_K": n_kept},
    }

    if args.wait_quiet > 0:
        share = load.wait_quiet(args.wait_quiet, args.quiet_threshold / 2, log)
        log(f"   other processes' CPU share before measuring: {fmt_share(share)}")

    # ---- FLOPs ---------------------------------------------------------------------------------------------------------
    paper_dense = costs.paper_prefill_flops(n_layers, width, k, per_image, per_image)
    paper_sparse = costs.paper_prefill_flops(n_layers, width, k, per_image, n_kept_image)
    lm_dense = costs.prefill_flops(text, n_tokens, k)
    lm_sparse = costs.prefill_flops(text, n_tokens, k, n_kept)
    vision = costs.vision_flops(cfg)
    predictor = costs.image_predictor_flops(cfg, per_image)
    full_dense, full_sparse = lm_dense + vision, lm_sparse + vision + predictor
    f = results["flops"] = {
        "paper_dense": paper_dense,
        "paper_sparse": paper_sparse,
        "paper_ratio": paper_dense / paper_sparse,
        "exact_lm_dense": lm_dense,
        "exact_lm_sparse": lm_sparse,
        "exact_lm_ratio": lm_dense / lm_sparse,
        "vision_and_projector": vision,
        "image_predictor": predictor,
        "exact_full_dense": full_dense,
        "exact_full_sparse": full_sparse,
        "exact_full_ratio": full_dense / full_sparse,
        "exact_no_predictor_ratio": full_dense / (full_sparse - predictor),
    }

    with torch.inference_mode():
        # ---- 1. prefill --------------------------------------------------------------------------------------------
        log(f"1. prefill: dense / sparse / sparse with RandomPolicy, interleaved, warm-up + {args.repeats} repeats")
        ptimes, pcpu, pbusy, checks = measure_prefill(model, args, ids, pixels, log)
        assert checks["sparse"]["tokens_after_K"] == n_kept, checks
        assert checks["dense"]["tokens_after_K"] == n_tokens, checks
        pre, n_quiet = {}, {}
        for name in ptimes:
            pre[name], n_quiet[name] = quiet_median(ptimes[name], pbusy[name], args.quiet_threshold)
        pre_min = {name: min(t) for name, t in ptimes.items()}
        vision_time, _ = time_quiet(lambda: model.model.get_image_features(pixel_values=pixels), args.repeats, args.quiet_threshold)
        hidden_in = torch.randn(1, per_image, width, dtype=model.dtype)
        predictor_time = (
            time_quiet(lambda: lm.image_predictor(hidden_in), args.repeats, args.quiet_threshold)[0] if lm.image_predictor else 0.0
        )
        time_ratio = pre["dense"] / pre["sparse"]
        p = results["prefill"] = {
            "wall_s": ptimes,
            "cpu_s": pcpu,
            "other_processes_cpu_share": pbusy,
            "quiet_repeats": n_quiet,
            "median_s": pre,
            "min_s": pre_min,
            "time_ratio": time_ratio,
            "time_ratio_min": pre_min["dense"] / pre_min["sparse"],
            "time_ratio_no_predictor": pre["dense"] / pre["sparse_random"],
            "compared_to": "flops.exact_full_ratio (whole model: LM + lm_head + vision/projector + image predictor)",
            "deviation": time_ratio / f["exact_full_ratio"] - 1,
            "within_10pct": abs(time_ratio / f["exact_full_ratio"] - 1) <= 0.10,
            "vision_and_projector_s": vision_time,
            "image_predictor_s": predictor_time,
            "checks": checks,
        }

        log("   per-component breakdown (forward hooks)")
        comp = results["prefill_components_s"] = measure_components(model, args, ids, pixels, max(1, min(3, args.repeats)))

        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            for mode, dense in (("dense", True), ("sparse", False)):
                set_mode(model, args, dense)
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    prefill(model, ids, pixels)
                print(f"\ntorch.profiler, {mode} prefill, top ops by self CPU time:")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))

        # ---- 2. decode latency -------------------------------------------------------------------------------------
        log(f"2. decode latency: {args.decode_tokens} new tokens, dense and sparse steps interleaved")
        if args.wait_quiet > 0:
            load.wait_quiet(args.wait_quiet, args.quiet_threshold / 2, log)
        step_threshold = max(args.quiet_threshold, 0.3)
        s0 = CpuMonitor.sample()
        dec = measure_decode(model, args, ids, pixels, args.decode_tokens)
        decode_busy = CpuMonitor.others(s0, CpuMonitor.sample())
        (dsteps_all, dbusy, _), (ssteps_all, sbusy, sstats) = dec["dense"], dec["sparse"]
        dsteps, dfiltered = quiet_steps(dsteps_all, dbusy, step_threshold)
        ssteps, sfiltered = quiet_steps(ssteps_all, sbusy, step_threshold)
        mid = args.decode_tokens // 2
        dec_flops_dense = costs.decode_step_flops(text, n_tokens + mid, k)
        dec_flops_sparse = costs.decode_step_flops(text, n_tokens + mid, k, n_kept + int(args.text_keep_rate * mid))
        d = results["decode"] = {
            "new_tokens": args.decode_tokens,
            "dense_step_s": dsteps_all,
            "sparse_step_s": ssteps_all,
            "dense_step_other_share": dbusy,
            "sparse_step_other_share": sbusy,
            "quiet_steps": {"dense": len(dsteps) if dfiltered else 0, "sparse": len(ssteps) if sfiltered else 0},
            "dense_median_s": median(dsteps),
            "sparse_median_s": median(ssteps),
            "dense_min_s": min(dsteps),
            "sparse_min_s": min(ssteps),
            "ratio_median": median(dsteps) / median(ssteps),
            "ratio_min": min(dsteps) / min(ssteps),
            "exact_flops_dense_mid": dec_flops_dense,
            "exact_flops_sparse_mid": dec_flops_sparse,
            "exact_flops_ratio_mid": dec_flops_dense / dec_flops_sparse,
            "sparse_generated_kept": sstats.summary()["generated_tokens_kept"],
            "sparse_generated_judged": sstats.summary()["generated_tokens"],
            "other_processes_cpu_share": decode_busy,
        }

        # ---- 3. KV bytes -------------------------------------------------------------------------------------------
        log(f"3. KV bytes: generate() {args.kv_tokens} tokens, sparse (RandomPolicy) then dense")
        if args.wait_quiet > 0:
            load.wait_quiet(args.wait_quiet, args.quiet_threshold / 2, log)
        s0 = CpuMonitor.sample()
        sgen_t, sgen, scache = measure_generate(model, args, ids, pixels, False, args.kv_tokens)
        log(f"   sparse generate {sgen_t['total_s']:.1f}s")
        dgen_t, dgen, dcache = measure_generate(model, args, ids, pixels, True, args.kv_tokens)
        generate_busy = CpuMonitor.others(s0, CpuMonitor.sample())
        log(f"   dense generate {dgen_t['total_s']:.1f}s")

    dtype_bytes = torch.finfo(model.dtype).bits // 8
    per_tok = costs.kv_bytes_per_token(text, dtype_bytes)
    s_len = [int(t[0]) for t in sgen.kv_lengths]
    d_len = [int(t[0]) for t in dgen.kv_lengths]
    in_cache_generated = d_len[0] - n_tokens  # the last generated token is never fed back
    gen_kept_in_cache = s_len[k] - n_kept
    kv = results["kv"] = {
        "generated_tokens": args.kv_tokens,
        "dense_bytes_generate": dgen.total_kv_bytes,
        "dense_bytes_cache_nbytes": dcache.nbytes(),
        "dense_bytes_expected": per_tok * sum(d_len),
        "dense_equivalent_from_sparse_run": sgen.dense_kv_bytes,
        "sparse_bytes": sgen.total_kv_bytes,
        "sparse_bytes_cache_nbytes": scache.nbytes(),
        "sparse_bytes_expected": per_tok * sum(s_len),
        "saving": 1 - sgen.total_kv_bytes / dgen.total_kv_bytes,
        "dense_lengths": d_len,
        "sparse_lengths": s_len,
        "generated_in_cache": in_cache_generated,
        "generated_kept_in_layers_ge_K": gen_kept_in_cache,
        "stats_generated_kept": sgen.summary()["generated_tokens_kept"],
        "stats_generated_judged": sgen.summary()["generated_tokens"],
        "generate_dense": dgen_t,
        "generate_sparse": sgen_t,
        "other_processes_cpu_share": generate_busy,
    }
    agree = (
        kv["dense_bytes_generate"] == kv["dense_bytes_cache_nbytes"] == kv["dense_bytes_expected"]
        == kv["dense_equivalent_from_sparse_run"]
    )
    kv["dense_counts_agree"] = agree
    kv["sparse_counts_agree"] = kv["sparse_bytes"] == kv["sparse_bytes_cache_nbytes"] == kv["sparse_bytes_expected"]
    def gen_median(run, part=slice(None)):
        steps, _ = quiet_steps(run["steps_s"][part], run["steps_busy"][part], step_threshold)
        return median(steps)

    quarter = max(1, (args.kv_tokens - 1) // 4)
    gd, gs = gen_median(dgen_t), gen_median(sgen_t)
    gd_first, gs_first = gen_median(dgen_t, slice(0, quarter)), gen_median(sgen_t, slice(0, quarter))
    gd_last, gs_last = gen_median(dgen_t, slice(-quarter, None)), gen_median(sgen_t, slice(-quarter, None))
    gen_quiet = {
        name: sum(1 for x in run["steps_busy"] if x is not None and x < step_threshold)
        for name, run in (("dense", dgen_t), ("sparse", sgen_t))
    }
    kv["generate_quiet_steps"] = gen_quiet

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    runtime = time.perf_counter() - t_start
    others = load.since_start()
    results["peak_rss_bytes"] = peak
    results["runtime_s"] = runtime
    results["other_processes_cpu_share"] = others

    # ---- table ---------------------------------------------------------------------------------------------------------
    rows = [
        ["-- 1. prefill", "", "", "", ""],
        ["prompt tokens (after layer K)", f"{n_tokens} ({n_tokens})", f"{n_tokens} ({n_kept})", "",
         f"{per_image} image tokens, {n_kept_image} kept"],
        ["paper FLOPs (image tokens only)", fmt_g(f["paper_dense"]), fmt_g(f["paper_sparse"]), f"{f['paper_ratio']:.2f}x",
         "32NC^2 + 4N^2C per layer"],
        ["exact FLOPs, language model", fmt_g(f["exact_lm_dense"]), fmt_g(f["exact_lm_sparse"]), f"{f['exact_lm_ratio']:.2f}x",
         "all tokens, real FFN, causal, lm_head on last token"],
        ["exact FLOPs, whole model", fmt_g(f["exact_full_dense"]), fmt_g(f["exact_full_sparse"]), f"{f['exact_full_ratio']:.2f}x",
         f"LM + vision/projector {fmt_g(f['vision_and_projector'])} + image predictor {fmt_g(f['image_predictor'])} (sparse only)"],
        ["prefill time (median)", fmt_s(pre["dense"]), fmt_s(pre["sparse"]), f"{p['time_ratio']:.2f}x",
         f"learned (untrained) predictor; target: within 10% of the exact whole-model ratio {f['exact_full_ratio']:.2f}x: "
         f"{'MET' if p['within_10pct'] else 'NOT MET'} ({p['deviation']:+.1%})"],
        ["  quiet repeats used for the median", f"{n_quiet['dense']}/{args.repeats}", f"{n_quiet['sparse']}/{args.repeats}", "",
         f"others < {args.quiet_threshold:.0%} of the CPUs during the call (0: all repeats used)"],
        ["prefill time (min)", fmt_s(pre_min["dense"]), fmt_s(pre_min["sparse"]), f"{p['time_ratio_min']:.2f}x",
         f"of {args.repeats} interleaved repeats"],
        ["prefill time, RandomPolicy (median)", fmt_s(pre["dense"]), fmt_s(pre["sparse_random"]), f"{p['time_ratio_no_predictor']:.2f}x",
         f"no predictor; exact ratio without predictor {f['exact_no_predictor_ratio']:.2f}x"],
        ["effective GFLOP/s (median)", f"{f['exact_full_dense'] / pre['dense'] / 1e9:.1f}", f"{f['exact_full_sparse'] / pre['sparse'] / 1e9:.1f}",
         "", "exact whole-model FLOPs / time"],
        ["vision tower + projector", f"{fmt_ms(vision_time)} ({vision_time / pre['dense']:.1%})",
         f"{fmt_ms(vision_time)} ({vision_time / pre['sparse']:.1%})", "", "standalone, share of prefill"],
        ["image predictor", "-", f"{fmt_ms(predictor_time)} ({predictor_time / pre['sparse']:.1%})", "", "standalone, share of sparse prefill"],
        ["-- prefill breakdown (forward hooks, median)", "", "", "", ""],
    ]
    for name in comp["dense"]:
        dv, sv = comp["dense"][name], comp["sparse"][name]
        if name == "quiet_runs":
            rows.append(["  quiet runs used", f"{dv}", f"{sv}", "", f"of {max(1, min(3, args.repeats))} (0: all runs used)"])
            continue
        rows.append([f"  {name}", fmt_ms(dv), fmt_ms(sv), f"{dv / sv:.2f}x" if dv > 1e-4 and sv > 1e-4 else "-", ""])
    rows += [
        ["-- 2. decode with cache", "", "", "", ""],
        ["per-token latency (median)", fmt_ms(d["dense_median_s"]), fmt_ms(d["sparse_median_s"]), f"{d['ratio_median']:.2f}x",
         f"{d['new_tokens'] - 1} steps each, interleaved; sparse: RandomPolicy(image {args.image_keep_rate}, text {args.text_keep_rate})"],
        ["  quiet steps used for the median", f"{d['quiet_steps']['dense']}/{d['new_tokens'] - 1}",
         f"{d['quiet_steps']['sparse']}/{d['new_tokens'] - 1}", "", f"others < {step_threshold:.0%} during the step (0: all steps used)"],
        ["per-token latency (min)", fmt_ms(d["dense_min_s"]), fmt_ms(d["sparse_min_s"]), f"{d['ratio_min']:.2f}x",
         f"other processes used {fmt_share(decode_busy)} of the CPUs meanwhile"],
        ["exact FLOPs per decode step (mid-run)", fmt_g(d["exact_flops_dense_mid"]), fmt_g(d["exact_flops_sparse_mid"]),
         f"{d['exact_flops_ratio_mid']:.2f}x", "incl. lm_head (vocabulary projection)"],
        [f"generate(): per-token (median, {args.kv_tokens - 1} steps)", fmt_ms(gd), fmt_ms(gs), f"{gd / gs:.2f}x",
         f"section 3 runs, steps timed by a logits processor; quiet steps {gen_quiet['dense']}/{gen_quiet['sparse']}; "
         f"others used {fmt_share(generate_busy)} of the CPUs"],
        ["generate(): per-token, first / last quarter", f"{fmt_ms(gd_first)} / {fmt_ms(gd_last)}", f"{fmt_ms(gs_first)} / {fmt_ms(gs_last)}",
         f"{gd_first / gs_first:.2f}x / {gd_last / gs_last:.2f}x", "context grows over the run"],
        ["generate(): prefill, total", f"{fmt_s(dgen_t['prefill_s'])}, {fmt_s(dgen_t['total_s'])}",
         f"{fmt_s(sgen_t['prefill_s'])}, {fmt_s(sgen_t['total_s'])}", f"{dgen_t['total_s'] / sgen_t['total_s']:.2f}x",
         "prefill: call to first logits (sparse: RandomPolicy, no predictor); ratio of the totals"],
        ["-- 3. KV cache", "", "", "", ""],
        [f"KV bytes after {args.kv_tokens} generated tokens", fmt_mib(kv["dense_bytes_generate"]), fmt_mib(kv["sparse_bytes"]),
         f"{kv['dense_bytes_generate'] / kv['sparse_bytes']:.2f}x",
         f"saving {kv['saving']:.1%}; {args.dtype}: {per_tok} B per token per layer"],
        ["dense bytes: generate / cache.nbytes() / sparse run's dense_kv_bytes", "", "", "",
         f"{kv['dense_bytes_generate']} / {kv['dense_bytes_cache_nbytes']} / {kv['dense_equivalent_from_sparse_run']}: "
         + ("agree" if agree else "DISAGREE")],
        ["tokens held, layer 0 / layer K", f"{d_len[0]} / {d_len[k]}", f"{s_len[0]} / {s_len[k]}", "", ""],
        ["generated-token KV in layers >= K", f"{in_cache_generated}/{in_cache_generated}", f"{gen_kept_in_cache}/{in_cache_generated}", "",
         f"kept/total {gen_kept_in_cache / max(1, in_cache_generated):.1%} (stats: {kv['stats_generated_kept']}/{kv['stats_generated_judged']}); "
         "the last generated token is never fed back"],
        ["-- process", "", "", "", ""],
        ["peak RSS", fmt_mib(peak), "", "", "resource.getrusage ru_maxrss (whole run)"],
        ["CPU used by other processes", fmt_share(others), "", "",
         "share of all CPUs over the whole run; above ~5% the timings are disturbed"],
        ["runtime", f"{runtime:.1f} s", "", "", ""],
    ]
    print(
        f"Dynamic-LLaVA engine benchmark: {params['total'] / 1e6:.1f}M params "
        f"(LM+head {params['language_model_and_lm_head'] / 1e6:.1f}M, vision+projector {params['vision_tower_and_projector'] / 1e6:.2f}M, "
        f"predictors {params['predictors'] / 1e6:.2f}M), hidden {width} x {n_layers} layers, K={k}, {args.dtype}, "
        f"{args.threads} threads, batch 1, attn {args.attn}, torch {torch.__version__}"
    )
    print_table("dense vs sparse", ["measure", "dense", "sparse", "dense/sparse", "note"], rows)

    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2, default=str)
        print(f"results written to {args.json}")
    return results


if __name__ == "__main__":
    main()
