"""The speed benchmark command: every method, every model, batch 1 and 8, in one run; a table and JSON."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ..validation import check_integer, check_rate
from .methods import methods_at_budget
from .speed import measure_methods
from .workloads import (
    load_world_model,
    next_random_workload,
    qwen_random_workload,
    random_workload,
    wide_model,
    wide_next_model,
    wide_qwen_model,
    world_workload,
)


BENCH_MODELS = ("tiny", "wide", "wide-qwen", "wide-next")


@dataclass
class SpeedSettings:
    """What `dynamic-llava bench` measures. Lengths are per model: the tiny model decodes far further in
    the same time than the wide one, whose per-token cost is its 1 GB of weights per layer."""

    models: tuple[str, ...] = ("tiny", "wide")
    batches: tuple[int, ...] = (1, 8)
    image_keep_rate: float = 0.2
    text_keep_rate: float = 0.5
    checkpoint: str = "checkpoints/tiny-dynamic-llava"
    tiny_decode_tokens: int = 1024
    tiny_no_cache_tokens: int = 64
    wide_layers: int = 4
    wide_decode_tokens: int = 128
    wide_no_cache_tokens: int = 2
    repeats: int = 3
    threads: int | None = None
    seed: int = 0
    quick: bool = False  # tiny lengths, for a smoke run
    extra: dict = field(default_factory=dict)

    def check(self) -> None:
        """Raise a clear error for settings that cannot run, before any model is loaded."""
        if not self.models:
            raise ValueError("models=(): expected at least one of 'tiny', 'wide'.")
        for name in self.models:
            if name not in BENCH_MODELS:
                raise ValueError(f"models={','.join(self.models)!r}: unknown model {name!r}; choose from "
                                 f"{', '.join(BENCH_MODELS)} (tiny: the trained world model, wide / wide-qwen / wide-next: random weights).")
        if not self.batches:
            raise ValueError("batches=(): expected at least one batch size.")
        for batch in self.batches:
            check_integer("batches", batch, 1)
        check_rate("image_keep_rate", self.image_keep_rate)
        check_rate("text_keep_rate", self.text_keep_rate)
        for name in ("tiny_decode_tokens", "tiny_no_cache_tokens", "wide_decode_tokens", "wide_no_cache_tokens",
                     "repeats"):
            check_integer(name, getattr(self, name), 1)
        check_integer("wide_layers", self.wide_layers, 3, hint="the wide model prunes after layer K = 2")
        if self.threads is not None:
            check_integer("threads", self.threads, 1, hint="0 or None uses torch's default")
        check_integer("seed", self.seed, 0)


def _model_and_workloads(name: str, settings: SpeedSettings):
    if name == "tiny":
        decode = settings.tiny_decode_tokens
        model, processor = load_world_model(settings.checkpoint, max_positions=400 + decode)
        trained = True
        make = lambda batch: world_workload(model, processor, batch, seed=settings.seed)  # noqa: E731
        lengths = (decode, settings.tiny_no_cache_tokens)
    elif name == "wide":
        model = wide_model(layers=settings.wide_layers, seed=settings.seed)
        trained = False
        make = lambda batch: random_workload(model, batch, seed=settings.seed)  # noqa: E731
        lengths = (settings.wide_decode_tokens, settings.wide_no_cache_tokens)
    elif name == "wide-qwen":
        model = wide_qwen_model(layers=settings.wide_layers, seed=settings.seed)
        trained = False
        make = lambda batch: qwen_random_workload(model, batch, seed=settings.seed)  # noqa: E731
        lengths = (settings.wide_decode_tokens, settings.wide_no_cache_tokens)
    elif name == "wide-next":
        model = wide_next_model(layers=settings.wide_layers, seed=settings.seed)
        trained = False
        make = lambda batch: next_random_workload(model, batch, seed=settings.seed)  # noqa: E731
        lengths = (settings.wide_decode_tokens, settings.wide_no_cache_tokens)
    else:
        raise ValueError(f"Unknown benchmark model {name!r}: use {' or '.join(repr(m) for m in BENCH_MODELS)}.")
    return model, trained, make, lengths


def run_speed(settings: SpeedSettings, console: Console | None = None) -> dict:
    """Run the speed benchmark; returns a JSON-ready dict {"settings", "machine", "runs": [...]}."""
    settings.check()
    console = console or Console(stderr=True)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    report = {"settings": asdict(settings), "machine": machine(), "runs": []}
    started = time.perf_counter()
    for name in settings.models:
        model, trained, make, (decode, no_cache) = _model_and_workloads(name, settings)
        if settings.quick:
            decode, no_cache = min(decode, 32), min(no_cache, 4)
        methods = methods_at_budget(settings.image_keep_rate, settings.text_keep_rate, trained, settings.seed)
        params = sum(p.numel() for p in model.parameters())
        for batch in settings.batches:
            workload = make(batch)

            def log(message, name=name, batch=batch):
                console.log(f"[{time.perf_counter() - started:6.0f}s] {name} batch {batch}: {message}")

            # prefill work grows with the batch: time batch b about repeats / b times (at least once)
            repeats = 1 if settings.quick else max(1, settings.repeats // batch)
            results = measure_methods(model, workload, methods, repeats=repeats, decode_tokens=decode,
                                      no_cache_tokens=no_cache, warmup=batch == settings.batches[0], log=log)
            report["runs"].append({
                "model": name, "parameters": params, "trained_predictors": trained, "batch": batch,
                "prompt_tokens": workload.prompt_tokens, "image_tokens": workload.image_tokens,
                "decode_tokens": decode, "no_cache_tokens": no_cache, "prefill_repeats": repeats, "hidden": model.config.text_config.hidden_size,
                "layers": model.config.text_config.num_hidden_layers, "sparse_layer": model.config.sparse_layer,
                "methods": results,
            })
        del model
    report["runtime_s"] = time.perf_counter() - started
    return report


def machine() -> dict:
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": platform.processor() or
            platform.machine(), "cuda": torch.cuda.is_available()}


def speed_table(report: dict) -> Table:
    """One row per (model, batch, method)."""
    table = Table(title="Speed and memory, side by side (ratios against dense in the same run)", title_justify="left")
    for column in ("model", "batch", "method", "img kept", "prefill", "speed-up", "FLOPs ideal", "meas./ideal",
                   "decode /tok", "vs dense", "no cache", "KV at end", "KV vs dense", "gen KV kept", "peak RSS +"):
        table.add_column(column, justify="left" if column in ("model", "method") else "right")
    for run in report["runs"]:
        table.add_section()
        for name, r in run["methods"].items():
            table.add_row(
                f"{run['model']} ({run['parameters'] / 1e6:.0f}M)", str(run["batch"]), name,
                f"{r['image_tokens_kept']}/{run['image_tokens']}", f"{r['prefill_s']:.3f} s",
                f"{r['prefill_speedup']:.2f}x", f"{r['flops_speedup']:.2f}x", f"{r['speedup_vs_flops_ideal']:.2f}",
                f"{r['decode_ms_per_token_last_quarter']:.1f} ms", f"{r['decode_ratio']:.2f}",
                f"{r['no_cache_s']:.2f} s" if "no_cache_s" in r else "-",
                f"{r['kv_bytes_final'] / 2**20:.1f} MiB", f"{r['kv_ratio']:.2f}", f"{r['generated_kv_kept_share']:.0%}",
                f"{r['peak_rss_increase_bytes'] / 2**20:.0f} MiB",
            )
    return table


def write_report(report: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    tmp.replace(path)
    return path


__all__ = ["SpeedSettings", "machine", "run_speed", "speed_table", "write_report"]
