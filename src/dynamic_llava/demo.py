"""A self-contained demo: a small random-weight LLaVA, generated dense and with Dynamic-LLaVA.

Everything is built in-process from a config with a fixed seed (nothing is downloaded). The
weights are random, so the generated tokens mean nothing; what the demo shows is which tokens
Dynamic-LLaVA keeps and how much KV-cache memory that saves, sample by sample and layer by layer.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from rich import box
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from .config import DynamicLlavaConfig
from .modeling import DynamicLlavaForConditionalGeneration
from .policies import LearnedPolicy, RandomPolicy, TokenPolicy
from .stats import SparsityStats

PAD_ID, BOS_ID, EOS_ID, IMAGE_ID = 0, 1, 2, 3
VOCAB = 1024
IMAGE_SIZE, PATCH = 192, 16  # (192 / 16)^2 = 144 image tokens per image
MAX_POSITIONS = 2048
# (text before the image, text after it) for each prompt of the batch: three different lengths
PROMPT_SHAPES = ((5, 7), (12, 20), (30, 3))


def demo_config(image_keep_rate: float = 0.2, text_keep_rate: float = 0.5) -> DynamicLlavaConfig:
    """The embedded demo model: CLIP vision tower (144 tokens/image), 6-layer Llama decoder, K = 2."""
    return DynamicLlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=IMAGE_SIZE,
            patch_size=PATCH,
            projection_dim=64,
        ),
        text_config=dict(
            model_type="llama",
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=6,
            num_attention_heads=8,
            num_key_value_heads=4,
            vocab_size=VOCAB,
            max_position_embeddings=MAX_POSITIONS,
            pad_token_id=PAD_ID,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
        ),
        image_token_index=IMAGE_ID,
        vision_feature_layer=-1,
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
        sparse_layer=2,
        image_keep_rate=image_keep_rate,
        text_keep_rate=text_keep_rate,
        predictor_dim=64,
        predictor_heads=4,
        predictor_mlp_dim=128,
        predictor_blocks=2,
        predictor_head_dims=[32, 16],
        text_predictor_dims=[64, 32, 16],
    )


def build_demo_model(seed: int = 0) -> DynamicLlavaForConditionalGeneration:
    """The demo model with random weights drawn from `seed` (fp32, eval mode)."""
    config = demo_config()
    torch.manual_seed(seed)
    model = DynamicLlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = PAD_ID
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    return model


def demo_inputs(seed: int = 0, tokens_per_image: int = (IMAGE_SIZE // PATCH) ** 2) -> dict[str, torch.Tensor]:
    """A left-padded batch of 3 prompts of different lengths, each `<bos> text <image> text`, one random image each."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for before, after in PROMPT_SHAPES:
        seqs.append(
            torch.cat(
                [
                    torch.tensor([BOS_ID]),
                    torch.randint(IMAGE_ID + 1, VOCAB, (before,), generator=g),
                    torch.full((tokens_per_image,), IMAGE_ID),
                    torch.randint(IMAGE_ID + 1, VOCAB, (after,), generator=g),
                ]
            )
        )
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, width - len(s) :] = s
        attention_mask[i, width - len(s) :] = 1
    pixel_values = torch.randn(len(seqs), 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    return dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)


class LearnedImageRandomTextPolicy(LearnedPolicy):
    """Learned image predictor; random output-text decisions (used when the text predictor keeps everything)."""

    def __init__(self, text_keep_rate: float = 0.5, seed: int = 0):
        self._random = RandomPolicy(text_keep_rate=text_keep_rate, seed=seed)

    def text_keep(self, model, hidden, positions, threshold=None):
        return self._random.text_keep(model, hidden, positions)


def _generate(model, inputs, max_new_tokens: int, policy: TokenPolicy | None, repeats: int = 1):
    """Greedy generation; returns (new tokens, stats of the last run, best wall time over `repeats` runs)."""
    extra = {} if policy is None else {"sparsity_policy": policy}
    best = float("inf")
    for _ in range(repeats):
        stats = SparsityStats()
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,  # random weights may emit EOS: keep the lengths comparable
                do_sample=False,
                sparsity_stats=stats,
                **extra,
            )
        best = min(best, time.perf_counter() - start)
    return out[:, inputs["input_ids"].shape[1] :], stats, best


def _set_rates(model, image_keep_rate: float, text_keep_rate: float) -> None:
    model.config.image_keep_rate = image_keep_rate
    model.config.text_keep_rate = text_keep_rate


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def run_demo(
    max_new_tokens: int = 24,
    image_keep_rate: float = 0.2,
    seed: int = 0,
    *,
    repeats: int = 3,
    console: Console | None = None,
    show: bool = True,
) -> dict[str, Any]:
    """Generate dense and with Dynamic-LLaVA on the random-weight demo model; print tables; return the numbers.

    Parameters
    ----------
    max_new_tokens : int
        Greedy tokens generated per sample (>= 2, so that at least one generated token enters the cache).
    image_keep_rate : float
        Share of each image's tokens kept for layers >= K in the Dynamic-LLaVA run, in (0, 1].
    seed : int
        Seeds the weights, the prompts and the images.
    repeats : int
        Each run is timed this many times; the best wall time is reported.
    console, show :
        Where to print (default: a new rich `Console`); `show=False` prints nothing.

    Returns
    -------
    dict
        Per-sample lists (index = sample) and per-run totals; see the keys below.
    """
    if not isinstance(max_new_tokens, int) or max_new_tokens < 2:
        raise ValueError(f"max_new_tokens must be an integer >= 2, got {max_new_tokens!r}.")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}.")
    if not 0.0 < image_keep_rate <= 1.0:
        raise ValueError(f"image_keep_rate must be in (0, 1] (1.0 keeps every image token), got {image_keep_rate}.")
    inputs = demo_inputs(seed)
    longest = int(inputs["attention_mask"].sum(dim=1).max())
    if longest + max_new_tokens > MAX_POSITIONS:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} is too many: the longest prompt has {longest} tokens and the demo "
            f"model's context is {MAX_POSITIONS}, so at most {MAX_POSITIONS - longest} new tokens fit."
        )

    torch.manual_seed(seed)
    model = build_demo_model(seed)
    cfg, text_cfg = model.config, model.config.text_config
    per_image = model.tokens_per_image()
    n_layers, k_layer = text_cfg.num_hidden_layers, cfg.sparse_layer
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
    bytes_per_token = 2 * text_cfg.num_key_value_heads * head_dim * torch.finfo(model.dtype).bits // 8  # K and V

    # warm-up (first-call overheads would otherwise be charged to whichever run goes first)
    _set_rates(model, 1.0, 1.0)
    _generate(model, inputs, 2, None)
    _set_rates(model, image_keep_rate, 0.5)
    _generate(model, inputs, 2, None)

    _set_rates(model, 1.0, 1.0)
    dense_tokens, dense_stats, dense_time = _generate(model, inputs, max_new_tokens, None, repeats)

    _set_rates(model, image_keep_rate, 0.5)
    policy: TokenPolicy = LearnedPolicy()
    policy_name = "learned predictors (untrained)"
    dyn_tokens, dyn_stats, dyn_time = _generate(model, inputs, max_new_tokens, None, repeats)
    if bool((dyn_stats.generated_tokens_kept == dyn_stats.generated_tokens).all()):
        # the untrained text predictor kept every generated token: show text sparsification with random decisions
        policy = LearnedImageRandomTextPolicy(text_keep_rate=0.5, seed=seed)
        policy_name = "learned image predictor + random text (keep 0.5)"
        dyn_tokens, dyn_stats, dyn_time = _generate(model, inputs, max_new_tokens, policy, repeats)

    batch = inputs["input_ids"].shape[0]
    prompt_lengths = inputs["attention_mask"].sum(dim=1)
    judged = dyn_stats.generated_tokens
    in_cache = prompt_lengths + judged  # tokens one sample's dense cache holds per layer (no padding)

    def per_sample_layers(stats: SparsityStats) -> list[list[int]]:
        """[layer][sample] tokens held; dense layers count padding in `stats`, so use the unpadded length."""
        rows = []
        for layer, lengths in enumerate(stats.kv_lengths):
            rows.append(in_cache.tolist() if layer < k_layer else lengths.tolist())
        return rows

    dense_layers = per_sample_layers(dense_stats)
    dyn_layers = per_sample_layers(dyn_stats)
    dense_bytes = [sum(row[b] for row in dense_layers) * bytes_per_token for b in range(batch)]
    dyn_bytes = [sum(row[b] for row in dyn_layers) * bytes_per_token for b in range(batch)]
    saving = [100.0 * (1 - d / max(dn, 1)) for d, dn in zip(dyn_bytes, dense_bytes)]

    result: dict[str, Any] = {
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "image_keep_rate": image_keep_rate,
        "sparse_layer": k_layer,
        "num_layers": n_layers,
        "tokens_per_image": per_image,
        "kv_bytes_per_token_per_layer": bytes_per_token,
        "policy": policy_name,
        "prompt_tokens": prompt_lengths.tolist(),
        "image_tokens": dyn_stats.image_tokens.tolist(),
        "image_tokens_kept": dyn_stats.image_tokens_kept.tolist(),
        "generated_tokens": judged.tolist(),
        "generated_tokens_kept": dyn_stats.generated_tokens_kept.tolist(),
        "kv_bytes_dense": dense_bytes,
        "kv_bytes_dynamic": dyn_bytes,
        "kv_saving_percent": saving,
        "kv_lengths_dense": dense_layers,
        "kv_lengths_dynamic": dyn_layers,
        "batch_kv_bytes_dense": dense_stats.total_kv_bytes,
        "batch_kv_bytes_dynamic": dyn_stats.total_kv_bytes,
        "time_dense_s": dense_time,
        "time_dynamic_s": dyn_time,
        "timing_repeats": repeats,
        "output_tokens_dense": dense_tokens.tolist(),
        "output_tokens_dynamic": dyn_tokens.tolist(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "decoder_parameters": sum(
            p.numel() for n, p in model.model.language_model.named_parameters() if "predictor" not in n
        ),
    }
    if show:
        _print_report(console or Console(), result)
    return result


def _print_report(console: Console, r: dict[str, Any]) -> None:
    batch = len(r["prompt_tokens"])
    k = r["sparse_layer"]
    console.print(
        Panel(
            "[bold yellow]This model has RANDOM weights[/] (seed "
            f"{r['seed']}), built in-process: the trained demo model arrives in a later release.\n"
            "Its generated tokens are meaningless. The point is [bold]what Dynamic-LLaVA keeps[/] and "
            "[bold]the KV-cache memory it saves[/].",
            title="Dynamic-LLaVA demo",
            border_style="yellow",
        )
    )
    console.print(
        f"Model: CLIP vision tower {IMAGE_SIZE}px / patch {PATCH} -> {r['tokens_per_image']} image tokens per image; "
        f"Llama decoder, {r['num_layers']} layers, {r['decoder_parameters'] / 1e6:.1f}M params; "
        f"predictors read the input of layer K = {k}.\n"
        f"Batch: {batch} prompts of {', '.join(map(str, r['prompt_tokens']))} tokens (left padded), one random "
        f"image each; greedy, {r['max_new_tokens']} new tokens.\n"
        f"Dense run: keep rates 1.0 (same logits as a stock LlavaForConditionalGeneration). "
        f"Dynamic-LLaVA run: image keep rate {r['image_keep_rate']}, output-text decisions from {r['policy']}."
    )

    t = Table(title="Per sample: what Dynamic-LLaVA kept", box=box.SIMPLE_HEAVY)
    for col in ("sample", "prompt", "image kept", "generated kept", "KV dense", "KV Dynamic", "saving"):
        t.add_column(col, justify="right")
    for b in range(batch):
        t.add_row(
            str(b),
            str(r["prompt_tokens"][b]),
            f"{r['image_tokens_kept'][b]} / {r['image_tokens'][b]}",
            f"{r['generated_tokens_kept'][b]} / {r['generated_tokens'][b]}",
            _fmt_bytes(r["kv_bytes_dense"][b]),
            _fmt_bytes(r["kv_bytes_dynamic"][b]),
            f"[green]{r['kv_saving_percent'][b]:.1f} %[/]",
        )
    console.print(t)

    t = Table(title="KV-cache tokens held per layer (dense -> Dynamic-LLaVA)", box=box.SIMPLE_HEAVY)
    t.add_column("layer", justify="right")
    t.add_column("kind")
    for b in range(batch):
        t.add_column(f"sample {b}", justify="right")
    for layer, (dense_row, dyn_row) in enumerate(zip(r["kv_lengths_dense"], r["kv_lengths_dynamic"])):
        kind = "full (< K)" if layer < k else "sparse (>= K)"
        t.add_row(str(layer), kind, *(f"{d} -> {s}" for d, s in zip(dense_row, dyn_row)))
    console.print(t)

    t = Table(title=f"Runs (whole batch; best wall time of {r['timing_repeats']})", box=box.SIMPLE_HEAVY)
    for col in ("run", "wall time", "tokens / s", "KV-cache tensors"):
        t.add_column(col, justify="right" if col != "run" else "left")
    new_tokens = batch * r["max_new_tokens"]
    for name, secs, nbytes in (
        ("dense", r["time_dense_s"], r["batch_kv_bytes_dense"]),
        ("Dynamic-LLaVA", r["time_dynamic_s"], r["batch_kv_bytes_dynamic"]),
    ):
        t.add_row(name, f"{secs:.2f} s", f"{new_tokens / secs:.0f}", _fmt_bytes(nbytes))
    console.print(t)
    batch_saving = 100.0 * (1 - r["batch_kv_bytes_dynamic"] / max(r["batch_kv_bytes_dense"], 1))
    console.print(
        f"KV cache of the batch: {_fmt_bytes(r['batch_kv_bytes_dense'])} dense -> "
        f"{_fmt_bytes(r['batch_kv_bytes_dynamic'])} Dynamic-LLaVA ([green]{batch_saving:.1f} % less[/]; tensors "
        "as allocated, padding included).\n"
        f"Per-sample bytes count {r['kv_bytes_per_token_per_layer']} bytes per token per layer (K and V), without "
        "padding. Generated tokens are counted once they enter the cache: the last generated token is returned "
        "but never fed back, so each sample has max_new_tokens - 1 of them.\n"
        "[dim]At this size on CPU, wall time is dominated by per-step overheads, not by context length; "
        "the memory saving is the point.[/]"
    )


__all__ = ["run_demo", "build_demo_model", "demo_config", "demo_inputs", "LearnedImageRandomTextPolicy"]
