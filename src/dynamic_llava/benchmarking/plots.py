"""PNG plots of the benchmark reports (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

STYLE = {"dense": ("black", "*"), "dynamic-llava": ("tab:red", "o"), "fastv": ("tab:blue", "s"),
         "random": ("tab:gray", "^"), "cdpruner": ("tab:orange", "P"), "dart": ("tab:cyan", "X"), "streamingllm": ("tab:green", "D"), "h2o": ("tab:purple", "v")}


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def accuracy_vs_flops(report: dict, path: str | Path) -> Path:
    """Exact-match accuracy and description perplexity against prefill FLOPs, one line per method."""
    fig, (acc, ppl) = plt.subplots(1, 2, figsize=(10, 4))
    by_method: dict[str, list] = {}
    for point in report["image_sweep"]:
        by_method.setdefault(point["method"], []).append(point)
    for method, points in by_method.items():
        points = sorted(points, key=lambda p: p["prefill_flops"])
        base = method.split(" on the ")[0].split(", ")[0]  # "fastv on the fine-tuned LM": fastv's colour, dashed
        color, marker = STYLE.get(base, ("tab:orange", "x"))
        line = dict(marker=marker, color=color, label=method, markersize=12 if method == "dense" else 6,
                    linestyle="--" if base != method else "-", alpha=0.5 if base != method else 1.0)
        x = [p["prefill_flops"] / 1e9 for p in points]
        acc.plot(x, [100 * p["accuracy_all"] for p in points], **line)
        ppl.plot(x, [p["describe_ppl"] for p in points], **line)
        for p in points:
            acc.annotate(f"{p['image_keep_rate']:g}", (p["prefill_flops"] / 1e9, 100 * p["accuracy_all"]),
                         textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
    acc.set(xlabel="prefill GFLOPs per sample (exact)", ylabel="exact match, all short questions (%)",
            title="Accuracy vs prefill compute (labels: image keep rate)")
    ppl.set(xlabel="prefill GFLOPs per sample (exact)", ylabel="description perplexity (teacher forced)",
            title="Long-answer perplexity vs prefill compute")
    acc.legend(fontsize=7)
    acc.grid(alpha=0.3)
    ppl.grid(alpha=0.3)
    return _save(fig, Path(path))


def kv_vs_length(report: dict, path: str | Path) -> Path:
    """KV-cache bytes (solid) and process RSS growth (dotted) against generated tokens, per model and batch."""
    fig, panels = _per_run(report)
    for ax, run in panels:
        for method, r in run["methods"].items():
            color, marker = STYLE.get(method, ("tab:orange", "x"))
            lengths = sorted(int(n) for n in r["kv_bytes_by_length"])
            ax.plot(lengths, [r["kv_bytes_by_length"][_key(r["kv_bytes_by_length"], n)] / 2**20 for n in lengths],
                    marker=marker, color=color, label=method)
        ax.set(xlabel="generated tokens", ylabel="KV cache (MiB)")
    panels[0][0].legend()
    return _save(fig, Path(path))


def latency_vs_context(report: dict, path: str | Path) -> Path:
    """Per-token decode latency with the cache against the context length, per model and batch."""
    fig, panels = _per_run(report)
    for ax, run in panels:
        for method, r in run["methods"].items():
            color, _ = STYLE.get(method, ("tab:orange", "x"))
            steps = np.asarray(r["decode_step_s"]) * 1e3
            if steps.size == 0:
                continue
            window = max(1, steps.size // 32)  # running median hides single-step stalls
            smooth = np.array([np.median(steps[max(0, i - window): i + 1]) for i in range(steps.size)])
            context = run["prompt_tokens"] + 1 + np.arange(steps.size)
            ax.plot(context, smooth, color=color, label=method)
        ax.set(xlabel="context (tokens)", ylabel="ms per token")
    panels[0][0].legend()
    return _save(fig, Path(path))


def kept_overlay(image, kept: dict[str, torch.Tensor], grid: int, path: str | Path) -> Path:
    """The image once per method, the image patches it dropped greyed out. `kept`: method -> bool [grid*grid]."""
    fig, axes = plt.subplots(1, len(kept) + 1, figsize=(2.6 * (len(kept) + 1), 2.9))
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    axes[0].imshow(pixels)
    axes[0].set_title("image")
    cell = pixels.shape[0] / grid
    for ax, (method, mask) in zip(axes[1:], kept.items()):
        shade = pixels.copy()
        mask = mask.reshape(grid, grid).cpu().numpy()
        for r in range(grid):
            for c in range(grid):
                if not mask[r, c]:
                    ys, xs = slice(int(r * cell), int((r + 1) * cell)), slice(int(c * cell), int((c + 1) * cell))
                    shade[ys, xs] = 0.15 + 0.25 * shade[ys, xs]
        ax.imshow(shade)
        ax.set_title(f"{method} ({int(mask.sum())}/{mask.size})", fontsize=9)
    for ax in axes:
        ax.axis("off")
    return _save(fig, Path(path))


def _per_run(report: dict):
    """A figure with one gridded, titled panel per (model, batch) run of a speed report; (fig, [(ax, run)])."""
    runs = report["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.8), squeeze=False)
    for ax, run in zip(axes[0], runs):
        ax.set_title(f"{run['model']}, batch {run['batch']}")
        ax.grid(alpha=0.3)
    return fig, list(zip(axes[0], runs))


def _key(mapping: dict, n: int):
    return n if n in mapping else str(n)


__all__ = ["accuracy_vs_flops", "kept_overlay", "kv_vs_length", "latency_vs_context"]
