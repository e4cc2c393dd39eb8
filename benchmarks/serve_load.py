"""Load test of `dynamic-llava serve`: many concurrent clients, every answer checked against its one-by-one answer.

Starts the server on 127.0.0.1 (the shipped world model, in this process), sends REQUESTS chat requests from
CONCURRENCY threads with the official `openai` client (questions about fresh scenes, mixed per-request sparsity),
then answers each request again alone with `generate()` and compares. Runs "dense" (every request keeps every
token) and "Dynamic" (mixed settings) in turn, `--repeats` times each. Reports lost and mixed-up answers (summed
over the runs), and the medians of p50 / p99 latency, throughput and the peak K/V the running batches held.

    python benchmarks/serve_load.py --requests 200 --concurrency 16 --output results/serve_load.json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import torch

from dynamic_llava import SparsityController
from dynamic_llava.serving import Engine, Limits
from dynamic_llava.serving.server import BackgroundServer
from dynamic_llava.world.assets import world_clutter
from dynamic_llava.world.scenes import render, sample_turn

KINDS = ["count", "exist", "color", "shape", "position", "describe", "list"]
DYNAMIC = [{}, {"image_keep_rate": 0.5}, {"image_keep_rate": 0.1}, {"kv_budget_tokens": 40},
           {"text_keep_threshold": 0.3}, {"text_keep_threshold": 0.7, "kv_budget_tokens": 60}]
DENSE = [{"image_keep_rate": 1.0, "text_keep_threshold": 0.0}]


def png_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def make_requests(count: int, seed: int, settings: list[dict], clutter: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        scene, (question, answer) = sample_turn(rng, kind, clutter=clutter)
        content = [{"type": "text", "text": question + "\n"}, {"type": "image_url", "image_url": {"url": png_url(render(scene))}}]
        out.append({"messages": [{"role": "user", "content": content}], "sparsity": settings[i % len(settings)],
                    "max_tokens": 90 if kind in ("describe", "list") else 8, "kind": kind})
    return out


def run(label: str, checkpoint: str, requests: list[dict], concurrency: int, batch: int) -> dict:
    engine = Engine.load(checkpoint, limits=Limits(max_batch_size=batch, max_new_tokens=128, request_timeout_s=600),
                         controller=SparsityController(kv_budget_bytes=256 * 2**20))
    with BackgroundServer(engine, max_waiting=1024) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=600)

        def ask(item):
            started = time.perf_counter()
            reply = client.chat.completions.create(model=engine.model_id, messages=item["messages"],
                                                   max_tokens=item["max_tokens"],
                                                   extra_body={"sparsity": item["sparsity"]})
            return reply, time.perf_counter() - started

        began = time.perf_counter()
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            results = list(pool.map(lambda item: _safe(ask, item), requests))
        wall = time.perf_counter() - began
        peak = engine.scheduler.peak_kv_bytes

    lost = sum(1 for r in results if r[0] is None)
    mixed = 0
    for item, (reply, _) in zip(requests, results):  # each answer again, alone, with generate()
        if reply is None:
            continue
        job = engine.prepare(item["messages"], sparsity=item["sparsity"], max_new_tokens=item["max_tokens"])
        ids = job.input_ids[None]
        with torch.no_grad():
            out = engine.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **job.image_inputs,
                                        max_new_tokens=job.max_new_tokens, do_sample=False,
                                        sparsity_requests=job.request, pad_token_id=engine.pad_token_id)
        alone = engine.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        mixed += alone != reply.choices[0].message.content
    latencies = sorted(r[1] for r in results if r[0] is not None)
    tokens = sum(r[0].usage.completion_tokens for r in results if r[0] is not None)
    usage = [r[0].usage.model_extra for r in results if r[0] is not None]
    return {"label": label, "requests": len(requests), "concurrency": concurrency, "max_batch_size": batch,
            "lost": lost, "mixed_up": mixed, "wall_s": wall, "requests_per_s": len(requests) / wall,
            "tokens_per_s": tokens / wall, "p50_latency_s": statistics.median(latencies),
            "p99_latency_s": latencies[min(len(latencies) - 1, int(round(0.99 * (len(latencies) - 1))))],
            "peak_kv_bytes": peak, "mean_request_kv_bytes": statistics.mean(u["kv_bytes"] for u in usage),
            "mean_request_dense_kv_bytes": statistics.mean(u["dense_kv_bytes"] for u in usage),
            "mean_image_tokens_kept": statistics.mean(u["image_tokens_kept"] for u in usage)}


def _safe(fn, item):
    try:
        return fn(item)
    except Exception as error:  # counted as lost
        print(f"lost: {type(error).__name__}: {error}")
        return None, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="checkpoints/tiny-dynamic-llava")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each (medians reported; lost / mixed summed)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = {"dense": [], "Dynamic": []}
    clutter = world_clutter(args.checkpoint)
    for _ in range(args.repeats):  # alternate the two, so that drift on a shared machine hits both alike
        for label, settings in (("dense", DENSE), ("Dynamic", DYNAMIC)):
            requests = make_requests(args.requests, args.seed, settings, clutter)
            runs[label].append(run(label, args.checkpoint, requests, args.concurrency, args.max_batch_size))
    rows = []
    for label, repeats in runs.items():
        row = {k: statistics.median(r[k] for r in repeats) if isinstance(repeats[0][k], float) else repeats[0][k]
               for k in repeats[0]}
        row.update(lost=sum(r["lost"] for r in repeats), mixed_up=sum(r["mixed_up"] for r in repeats),
                   repeats=len(repeats), requests_per_s_all=[r["requests_per_s"] for r in repeats])
        rows.append(row)
    print(f"{'':8} {'requests':>8} {'lost':>5} {'mixed':>6} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p99 s':>7} "
          f"{'peak KV MiB':>12} {'KV/request KiB':>15} {'dense KiB':>10}")
    for r in rows:
        print(f"{r['label']:8} {r['requests']:>8} {r['lost']:>5} {r['mixed_up']:>6} {r['requests_per_s']:>7.2f} "
              f"{r['tokens_per_s']:>7.1f} {r['p50_latency_s']:>7.3f} {r['p99_latency_s']:>7.3f} "
              f"{r['peak_kv_bytes'] / 2**20:>12.2f} {r['mean_request_kv_bytes'] / 2**10:>15.1f} "
              f"{r['mean_request_dense_kv_bytes'] / 2**10:>10.1f}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
