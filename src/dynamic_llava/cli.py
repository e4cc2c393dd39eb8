"""Command line: `dynamic-llava demo`, `generate`, `chat`, `serve`, `train`, `world`, `bench`, `bench-accuracy`,
`costs`, `convert`, `eval`, `score` and `version`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from typer.core import TyperGroup
from typer.core import _click  # the click that typer runs on (it ships its own)


DEBUG_VARIABLE = "DYNAMIC_LLAVA_DEBUG"


class _OneLineErrors(TyperGroup):
    """Usage errors (a bad option value, a missing argument) print one line and exit 2, as `_fail` does; an
    unforeseen failure prints one line and exits 1 (with the traceback when DYNAMIC_LLAVA_DEBUG is set)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _click.exceptions.NoArgsIsHelpError as error:
            typer.echo(error.ctx.get_help() if error.ctx else error.format_message())
            sys.exit(2)
        except _click.exceptions.UsageError as error:
            where = f" (see {error.ctx.command_path} --help)" if error.ctx else ""
            typer.secho(f"Error: {error.format_message()}{where}", err=True, fg=typer.colors.RED)
            sys.exit(2)
        except _click.exceptions.ClickException as error:
            error.show()
            sys.exit(error.exit_code)
        except typer.Abort:
            typer.secho("Aborted.", err=True)
            sys.exit(1)
        except Exception as error:  # a failure no check foresaw: one line, the traceback on request
            if os.environ.get(DEBUG_VARIABLE):
                raise
            message = " ".join(str(error).split())
            typer.secho(f"Error: {type(error).__name__}: {message} (set {DEBUG_VARIABLE}=1 for the traceback)",
                        err=True, fg=typer.colors.RED)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="dynamic-llava",
    help="Dynamic-LLaVA: vision-language context sparsification for LLaVA models on HuggingFace transformers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_OneLineErrors,
)


def _fail(message: str, code: int = 2) -> None:
    """Print a one-line error and exit with status 2 (bad usage) or ``code`` (a run that failed)."""
    typer.secho(f"Error: {' '.join(str(message).split())}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=code)


def _writable_folder(folder: str, option: str) -> None:
    """Create ``folder`` if needed and fail now, not after the work, when results cannot be written there."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        _fail(f"{option} {folder} is a file: pass a folder for the results.")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        _fail(f"{option} {folder} cannot be created: {err.strerror or err}.")
    if not os.access(path, os.W_OK | os.X_OK):
        _fail(f"{option} {folder} is not writable: pass a folder you can write to.")


@app.command()
def demo(
    max_new_tokens: int = typer.Option(24, "--max-new-tokens", "-n", help="Greedy tokens generated per sample (>= 2)."),
    image_keep_rate: float = typer.Option(
        0.2, "--image-keep-rate", help="Share of each image's tokens kept after layer K, in (0, 1]."
    ),
    seed: int = typer.Option(0, "--seed", help="Seeds the random weights, prompts and images."),
    checkpoints: str = typer.Option(None, help="Folder of the trained world models (tiny-llava, ...); default: "
                                    "checkpoints/ when it holds them, else the random-weight demo."),
    random_weights: bool = typer.Option(False, "--random-weights", help="Use the random-weight model even if "
                                        "trained checkpoints are there."),
) -> None:
    """Dense vs Dynamic-LLaVA side by side: on the trained world models when present (questions answered,
    accuracy, tokens kept, KV saved), else on a random-weight LLaVA (what is kept and saved)."""
    if max_new_tokens < 2:
        _fail(f"--max-new-tokens must be at least 2, got {max_new_tokens}.")
    if not 0.0 < image_keep_rate <= 1.0:
        _fail(f"--image-keep-rate must be in (0, 1] (1.0 keeps every image token), got {image_keep_rate}.")
    if seed < 0:
        _fail(f"--seed must be >= 0, got {seed}.")
    from .world.demo import checkpoints_present, run_world_demo

    if checkpoints is not None and random_weights:
        _fail("--checkpoints and --random-weights exclude each other: pass one.")
    if checkpoints is not None and not checkpoints_present(checkpoints):
        _fail(f"--checkpoints {checkpoints} does not hold the world models (tiny-llava/ and tiny-dynamic-llava/ with "
              "config.json): build them with `make world`, or drop --checkpoints for the random-weight demo.")
    folder = checkpoints or "checkpoints"
    if not random_weights and checkpoints_present(folder):
        run_world_demo(folder, image_keep_rate=image_keep_rate)
        return

    from .demo import run_demo  # imports torch and transformers: only when needed

    try:
        run_demo(max_new_tokens=max_new_tokens, image_keep_rate=image_keep_rate, seed=seed)
    except ValueError as err:
        _fail(str(err))


@app.command()
def train(
    model: str = typer.Argument(..., help="llava-hf or Dynamic-LLaVA checkpoint folder (with its processor)."),
    data: str = typer.Argument(..., help="LLaVA conversation JSON (id, image, conversations)."),
    images: str = typer.Argument(..., help="Folder the records' image paths are relative to."),
    output_dir: str = typer.Argument(..., help="Checkpoints go here; the trained model to OUTPUT_DIR/final."),
    trainable: str = typer.Option("full", help="What trains: predictors | full | lora."),
    freeze_projector: bool = typer.Option(False, help="Keep the multimodal projector frozen."),
    image_only: bool = typer.Option(False, help='Train the "I" model: no output-text predictor.'),
    learning_rate: float = typer.Option(5e-6, help="Learning rate of the language model (and projector)."),
    predictor_learning_rate: float = typer.Option(2e-4, help="Learning rate of the predictors."),
    epochs: float = typer.Option(1.0, help="Passes over the data (ignored when --max-steps > 0)."),
    max_steps: int = typer.Option(-1, help="Optimizer steps (overrides --epochs when > 0)."),
    batch_size: int = typer.Option(4, help="Samples per device per step."),
    gradient_accumulation_steps: int = typer.Option(1, help="Micro-batches per optimizer step."),
    save_steps: int = typer.Option(500, help="Checkpoint every N optimizer steps."),
    max_grad_norm: float = typer.Option(1.0, help="Gradient clipping norm (0: off)."),
    loss_average: str = typer.Option("token", help="token | answer: average the LM loss over the batch's answer "
                                     "tokens, or over its answers (each answer's mean: short answers weigh as much "
                                     "as long ones)."),
    distill_weight: float = typer.Option(0.0, help="Weight of KL(dense teacher || sparse model) on the answer "
                                         "tokens, the teacher being the starting model with every token kept "
                                         "(0: the paper's loss, no teacher)."),
    hidden_distill_weight: float = typer.Option(0.0, help="Weight of the relative squared error between the sparse "
                                                "model's and that teacher's last hidden states on the text tokens "
                                                "(0: off)."),
    seed: int = typer.Option(42, help="Seed of data order, Gumbel noise and fresh predictors."),
    gradient_checkpointing: bool = typer.Option(False, help="Recompute activations in backward (non-reentrant)."),
    bf16: bool = typer.Option(False, help="Load and train in bfloat16."),
    image_keep_rate: float = typer.Option(None, help="Target share of image tokens kept (default: the model's)."),
    image_keep_range: str = typer.Option(None, help="LOW,HIGH: train each step at an image keep rate drawn from "
                                         "[LOW, HIGH] (the saved model keeps --image-keep-rate); with "
                                         "--image-mask-sampling top_share it sets the tokens kept."),
    text_keep_rate: float = typer.Option(None, help="Target share of answer tokens kept (default: the model's)."),
    sparse_layer: int = typer.Option(None, help="Layer K whose input the predictors read (default: the model's)."),
    budget_weight: float = typer.Option(None, help="lambda of the budget loss (default: the model's, 100)."),
    min_answer_tokens: int = typer.Option(None, help="Answers shorter than this keep every token (default 50)."),
    mask_gradient: str = typer.Option(None, help="balanced | raw: how the LM loss's gradient reaches the keep masks "
                                      "(default: the model's, balanced; raw is the authors' estimator)."),
    image_mask_sampling: str = typer.Option(None, help="gumbel | top_share: the training image mask, sampled per "
                                            "token (the paper's) or each image's inference share (default: gumbel)."),
    image_selection: str = typer.Option(None, help="top | diverse: which image tokens the learned scores keep, the "
                                        "highest (the paper's) or distinct ones by greedy DPP (default: top)."),
    on_bad_record: str = typer.Option("skip", help="skip | raise: what to do with a malformed record."),
    chat_template: str = typer.Option(
        None, help='"llava_v1" (answers end with </s>) or a Jinja template; default: the processor\'s.'
    ),
    deepspeed: str = typer.Option(None, help="DeepSpeed JSON config (multi-GPU), e.g. configs/deepspeed_zero2.json."),
    max_length: int = typer.Option(None, help="Records longer than this many tokens are bad records (default: the "
                                   "model's context)."),
    resume: bool = typer.Option(True, "--resume/--restart", help="Resume this run from the newest checkpoint in "
                                "OUTPUT_DIR, or start over, moving the old checkpoints and final/ to "
                                "OUTPUT_DIR/previous (replacing what an earlier restart put there)."),
) -> None:
    """Sparsification-aware fine-tuning. Multi-process: `torchrun --nproc_per_node N -m dynamic_llava.cli train ...`."""
    from .training import TrainingRecipe
    from .training import train as run_training

    sparsity = {
        name: value
        for name, value in dict(
            image_keep_rate=image_keep_rate, text_keep_rate=text_keep_rate, sparse_layer=sparse_layer,
            budget_weight=budget_weight, min_answer_tokens=min_answer_tokens, mask_gradient=mask_gradient,
            image_mask_sampling=image_mask_sampling, image_selection=image_selection,
        ).items()
        if value is not None
    }
    recipe = TrainingRecipe(
        model=model, data=data, images=images, output_dir=output_dir, trainable=trainable,
        freeze_projector=freeze_projector, image_only=image_only, learning_rate=learning_rate,
        predictor_learning_rate=predictor_learning_rate, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps, save_steps=save_steps, seed=seed,
        max_grad_norm=max_grad_norm, loss_average=loss_average, distill_weight=distill_weight,
        hidden_distill_weight=hidden_distill_weight, gradient_checkpointing=gradient_checkpointing, bf16=bf16,
        on_bad_record=on_bad_record, image_keep_rate_range=_keep_range(image_keep_range),
        chat_template=chat_template, deepspeed=deepspeed, resume=resume, sparsity=sparsity, max_length=max_length,
    )
    from .training import NonFiniteError

    try:
        recipe.check()
    except (OSError, TypeError, ValueError) as err:
        _fail(str(err))
    try:
        final = run_training(recipe)
    except (NonFiniteError, OSError) as err:
        _fail(str(err), code=1)  # the run failed; what it saved before stays
    except (TypeError, ValueError) as err:
        _fail(str(err))
    typer.echo(f"Trained model saved to {final}")


@app.command()
def world(
    output: str = typer.Option("checkpoints", help="Where the dense and Dynamic-LLaVA checkpoints are written."),
    work: str = typer.Option("runs/world", help="Data, cached stages and intermediate runs (a rerun resumes)."),
    seed: int = typer.Option(0, min=0, help="Seeds the world, the weights and the data order."),
    clutter: int = typer.Option(0, min=0, max=32, help="A cluttered world: CLUTTER / 2 to CLUTTER specks per scene "
                                "that no question asks about (0: the plain world of the shipped models)."),
    vision_steps: int = typer.Option(1200, min=1, help="Vision-tower pre-training steps on patch labels (stage 0)."),
    vision_tower: str = typer.Option(None, help="Reuse the vision tower an earlier build saved (WORK/vision_tower)."),
    dense: str = typer.Option(None, help="Fine-tune from the dense model an earlier build saved (OUTPUT/tiny-llava): "
                              "stages 0-2 skipped."),
    pool_size: int = typer.Option(20000, min=100, help="Training scenes whose tower features are cached."),
    question_steps: int = typer.Option(4000, min=1, help="Most dense steps on short questions (ends at the target)."),
    long_steps: int = typer.Option(1500, min=1, help="Most dense steps on questions, descriptions and listings."),
    polish_steps: int = typer.Option(800, min=1, help="Dense steps at a decaying learning rate, counting weighted up."),
    dynamic_steps: int = typer.Option(800, min=1, help="Dynamic-LLaVA fine-tuning steps."),
    image_mask_sampling: str = typer.Option("gumbel", help="gumbel | top_share: the fine-tune's image masks, "
                                            "sampled per token (the paper's) or each image's inference share."),
    image_selection: str = typer.Option("diverse", help="top | diverse: which image tokens the fine-tuned model's "
                                        "scores keep, saved in its config (top: the paper's top-k)."),
    distill_weight: float = typer.Option(1.0, min=0.0, help="The fine-tune's weight of KL(dense model || "
                                         "Dynamic-LLaVA) on the answer tokens (0: the paper's loss alone)."),
    hidden_distill_weight: float = typer.Option(5.0, min=0.0, help="The fine-tune's weight of the relative "
                                                "squared error to the dense model's last hidden states on the text "
                                                "tokens (0: off)."),
    image_keep_range: str = typer.Option(None, help="LOW,HIGH: each fine-tune step at an image keep rate drawn "
                                         "from [LOW, HIGH] (the saved model keeps 0.2); pair it with "
                                         "--image-mask-sampling top_share."),
    test_size: int = typer.Option(1200, min=10, help="Records in each test split (the build's seed and a fresh one)."),
) -> None:
    """Build the synthetic world from nothing: data, a tiny dense LLaVA, its Dynamic-LLaVA, and their accuracy."""
    import json
    from pathlib import Path

    from .config import IMAGE_MASK_SAMPLINGS, IMAGE_SELECTIONS
    from .world.build import WorldRecipe, build_world

    _writable_folder(output, "--output")
    _writable_folder(work, "--work")
    if vision_tower is not None and not (Path(vision_tower) / "model.safetensors").is_file():
        _fail(f"--vision-tower {vision_tower}: no model.safetensors there (a folder an earlier build wrote as "
              "WORK/vision_tower).")
    if dense is not None and not (Path(dense) / "model.safetensors").is_file():
        _fail(f"--dense {dense}: no model.safetensors there (a folder an earlier build wrote as OUTPUT/tiny-llava).")
    if image_mask_sampling not in IMAGE_MASK_SAMPLINGS:
        _fail(f"--image-mask-sampling {image_mask_sampling}: choose {' or '.join(IMAGE_MASK_SAMPLINGS)}.")
    if image_selection not in IMAGE_SELECTIONS:
        _fail(f"--image-selection {image_selection}: choose {' or '.join(IMAGE_SELECTIONS)}.")
    report = build_world(WorldRecipe(
        output=output, work=work, seed=seed, clutter=clutter, vision_steps=vision_steps, vision_tower=vision_tower,
        pool_size=pool_size, question_steps=question_steps, long_steps=long_steps, polish_steps=polish_steps,
        dynamic_steps=dynamic_steps, dense=dense, dynamic_image_mask_sampling=image_mask_sampling,
        dynamic_image_selection=image_selection, dynamic_distill_weight=distill_weight,
        dynamic_hidden_distill_weight=hidden_distill_weight, test_size=test_size,
        dynamic_image_keep_range=_keep_range(image_keep_range),
    ), log=typer.echo)
    typer.echo(json.dumps(report, indent=2))


def _keep_range(value: str | None) -> tuple[float, float] | None:
    """--image-keep-range LOW,HIGH as a checked pair of rates (None when not given)."""
    if value is None:
        return None
    from .validation import check_rate_range

    try:
        return check_rate_range("--image-keep-range", _split(value, float, "--image-keep-range"))
    except (TypeError, ValueError):
        _fail(f"--image-keep-range {value}: give LOW,HIGH with 0 < LOW <= HIGH <= 1, e.g. 0.1,0.3.")


def _split(value: str, kind, option: str) -> tuple:
    try:
        return tuple(kind(v) for v in value.split(",") if v.strip())
    except ValueError:
        _fail(f"{option} takes a comma-separated list, got {value!r}.")


@app.command()
def bench(
    models: str = typer.Option("tiny,wide", help="Comma-separated: tiny (the trained world model), wide (random "
                               "weights, LLaVA-1.5-7B layer width, few layers), wide-qwen (the same at Qwen2-VL-7B's "
                               "width, multimodal RoPE), wide-next (LLaVA-NeXT-7B's width, anyres tiles)."),
    batches: str = typer.Option("1,8", help="Comma-separated batch sizes."),
    checkpoint: str = typer.Option("checkpoints/tiny-dynamic-llava", help="The trained world model (for tiny)."),
    image_keep_rate: float = typer.Option(0.2, help="Image-token budget shared by every pruning method."),
    text_keep_rate: float = typer.Option(0.5, help="Generated-token budget (Dynamic-LLaVA's target, random's rate)."),
    tiny_decode_tokens: int = typer.Option(1024, help="Tokens generated with the cache on the tiny model."),
    wide_decode_tokens: int = typer.Option(128, help="Tokens generated with the cache on the wide model."),
    wide_layers: int = typer.Option(4, help="Decoder layers of the wide model (K = 2)."),
    repeats: int = typer.Option(3, help="Timed prefill repeats per method (after one warm-up)."),
    threads: int = typer.Option(0, help="torch threads (0: torch's default)."),
    quick: bool = typer.Option(False, help="Smoke run: short generations, one repeat."),
    output: str = typer.Option("results", help="Folder for speed.json and the plots."),
) -> None:
    """Dense, Dynamic-LLaVA, FastV and random side by side at equal budgets: prefill time vs the FLOPs ideal,
    per-token decode time, time without a cache, KV bytes and process memory vs generated length."""
    from rich.console import Console

    from .benchmarking import SpeedSettings, run_speed, speed_table, write_report

    model_names = tuple(name.strip() for name in _split(models, str, "--models"))
    batch_sizes = _split(batches, int, "--batches")
    if not batch_sizes or min(batch_sizes) < 1:
        _fail(f"--batches must be positive integers, got {batches!r}.")
    for rate, option in ((image_keep_rate, "--image-keep-rate"), (text_keep_rate, "--text-keep-rate")):
        if not 0.0 < rate <= 1.0:
            _fail(f"{option} must be in (0, 1], got {rate}.")
    if threads < 0:
        _fail(f"--threads must be >= 0 (0: torch's default), got {threads}.")
    settings = SpeedSettings(
        models=model_names, batches=batch_sizes, image_keep_rate=image_keep_rate, text_keep_rate=text_keep_rate,
        checkpoint=checkpoint, tiny_decode_tokens=tiny_decode_tokens, wide_decode_tokens=wide_decode_tokens,
        wide_layers=wide_layers, repeats=repeats, threads=threads or None, quick=quick,
    )
    try:
        settings.check()
    except (TypeError, ValueError) as err:
        _fail(str(err).replace("models=", "--models ", 1))
    if "tiny" in model_names and not (Path(checkpoint) / "config.json").is_file():
        _fail(f"No trained world model at {checkpoint}: build it with `make world`, pass --checkpoint, or "
              "benchmark the random-weight model only with --models wide.")
    _writable_folder(output, "--output")
    try:
        report = run_speed(settings)
    except ValueError as err:
        _fail(str(err))
    Console(width=200).print(speed_table(report))
    path = write_report(report, Path(output) / "speed.json")
    from .benchmarking.plots import kv_vs_length, latency_vs_context

    plots = [kv_vs_length(report, Path(output) / "kv_vs_length.png"),
             latency_vs_context(report, Path(output) / "latency_vs_context.png")]
    typer.echo(f"Results written to {path}; plots: {', '.join(str(p) for p in plots)}")


@app.command("bench-accuracy")
def bench_accuracy(
    checkpoint: str = typer.Option("checkpoints/tiny-dynamic-llava", help="The trained world model."),
    baseline_checkpoint: str = typer.Option("checkpoints/tiny-llava", help="The dense model it was fine-tuned "
                                            "from: the training-free baselines run on it ('none': on CHECKPOINT)."),
    questions: int = typer.Option(1200, help="Test records evaluated (short questions, descriptions, listings)."),
    seed: int = typer.Option(0, min=0, help="Generator seed of the test split (the shipped models were built on 0)."),
    output: str = typer.Option("results", help="Folder for accuracy.json and the plots."),
) -> None:
    """Accuracy vs budget on the trained world model: every policy at image keep 0.1 / 0.2 / 0.5 and text keep
    0.2 / 0.5 / 0.8 (exact match, description and listing perplexity), with a kept-token overlay."""
    from pathlib import Path

    from rich.console import Console

    from .benchmarking import AccuracySettings, run_accuracy, write_report
    from .benchmarking.report import accuracy_tables, kept_overlay_figure

    if not (Path(checkpoint) / "config.json").is_file():
        _fail(f"No trained world model at {checkpoint}: build it with `make world` or pass --checkpoint.")
    baseline = None if baseline_checkpoint.lower() == "none" else baseline_checkpoint
    if baseline is not None and not (Path(baseline) / "config.json").is_file():
        _fail(f"No dense model at {baseline} (--baseline-checkpoint): pass the folder of the model the checkpoint "
              "was fine-tuned from, or 'none' to run the baselines on --checkpoint.")
    if questions < 10:
        _fail(f"--questions must be at least 10, got {questions}.")
    from .world.assets import check_same_world

    try:
        check_same_world(checkpoint, baseline, "--baseline-checkpoint")
    except ValueError as err:
        _fail(str(err))
    _writable_folder(output, "--output")
    console = Console(width=160)
    report = run_accuracy(AccuracySettings(checkpoint=checkpoint, baseline_checkpoint=baseline, questions=questions,
                                           seed=seed), log=console.log)
    for table in accuracy_tables(report):
        console.print(table)
    path = write_report(report, Path(output) / "accuracy.json")
    from .benchmarking.plots import accuracy_vs_flops

    plots = [accuracy_vs_flops(report, Path(output) / "accuracy_vs_flops.png"),
             kept_overlay_figure(checkpoint, Path(output) / "kept_tokens.png")]
    typer.echo(f"Results written to {path}; plots: {', '.join(str(p) for p in plots)}")


@app.command("costs")
def costs_command(
    model: str = typer.Argument(..., help="A llava-hf or Dynamic-LLaVA checkpoint folder (only config.json is read)."),
    text_tokens: int = typer.Option(40, help="Text tokens in the prompt besides the image tokens."),
    new_tokens: int = typer.Option(256, help="Tokens generated."),
    image_keep_rate: float = typer.Option(None, help="Share of image tokens kept (default: the config's, 0.2)."),
    text_keep_rate: float = typer.Option(None, help="Share of generated tokens kept (default: the config's, 0.5)."),
    dtype_bytes: int = typer.Option(2, help="Bytes per KV element (2: fp16/bf16)."),
) -> None:
    """FLOPs (paper convention and exact) and KV bytes of one sample, dense vs Dynamic-LLaVA, from a config alone."""
    from rich.console import Console
    from rich.table import Table

    from . import DynamicLlavaConfig
    from .costs import estimate

    from .checkpoints import check_checkpoint_folder

    try:
        check_checkpoint_folder(model)  # a file (config.json itself), or a folder without config.json
    except OSError as err:
        _fail(str(err))
    if not (Path(model) / "config.json").is_file():
        _fail(f"No config.json in {model}: pass a llava-hf or Dynamic-LLaVA checkpoint folder.")
    for rate, option in ((image_keep_rate, "--image-keep-rate"), (text_keep_rate, "--text-keep-rate")):
        if rate is not None and not 0.0 < rate <= 1.0:
            _fail(f"{option} must be in (0, 1], got {rate}.")
    if text_tokens < 0 or new_tokens < 0:
        _fail("--text-tokens and --new-tokens must be >= 0.")
    if dtype_bytes < 1:
        _fail(f"--dtype-bytes must be >= 1 (2: fp16/bf16, 4: fp32, 1: 8-bit), got {dtype_bytes}.")
    try:
        config = DynamicLlavaConfig.from_pretrained(model)
    except (ValueError, TypeError, OSError) as err:
        _fail(str(err))
    c = estimate(config, text_tokens, new_tokens, image_keep_rate, text_keep_rate, dtype_bytes=dtype_bytes)
    table = Table(title=f"{model}: {c['prompt_tokens']} prompt tokens ({c['image_tokens_kept']}/{c['image_tokens']} "
                        f"image tokens kept), {new_tokens} generated", title_justify="left")
    for column in ("cost", "dense", "Dynamic-LLaVA", "ratio"):
        table.add_column(column, justify="left" if column == "cost" else "right")
    rows = [("prefill TFLOPs, paper convention", "paper_prefill", 1e12), ("prefill TFLOPs, exact", "prefill", 1e12),
            ("decoding TFLOPs with KV cache", "decode_with_cache", 1e12),
            ("decoding TFLOPs without cache", "decode_without_cache", 1e12)]
    for label, key, scale in rows:
        dense, sparse = c[key]["dense"], c[key]["sparse"]
        table.add_row(label, f"{dense / scale:.2f}", f"{sparse / scale:.2f}", f"{dense / sparse:.2f}x" if sparse else "-")
    dense_kv, sparse_kv = sum(c["kv_bytes_per_layer"]["dense"]), sum(c["kv_bytes_per_layer"]["sparse"])
    table.add_row("KV cache at the end (MiB)", f"{dense_kv / 2**20:.1f}", f"{sparse_kv / 2**20:.1f}",
                  f"{dense_kv / sparse_kv:.2f}x")
    Console().print(table)


@app.command()
def convert(
    source: str = typer.Argument(..., help="Checkpoint folder: the authors' Dynamic-LLaVA release, an original LLaVA-1.5 "
                                 "one, or a llava-hf one."),
    output: str = typer.Argument(..., help="Folder to write the Dynamic-LLaVA checkpoint to (must not hold files)."),
    vision_tower: str = typer.Option(None, "--vision-tower", help="CLIP folder of the vision tower (LLaVA-1.5 "
                                     "releases do not store it: a local openai/clip-vit-large-patch14-336)."),
    tokenizer: str = typer.Option(None, "--tokenizer", help="Folder with the tokenizer (default: the source)."),
    dtype: str = typer.Option(None, "--dtype", help="float16, bfloat16 or float32 (default: the source's)."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest output shard, e.g. 5GB or 500MB."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT (only once the new one is complete)."),
) -> None:
    """Convert released weights into a Dynamic-LLaVA checkpoint, streaming shard by shard; every tensor is placed
    or named, and what cannot be mapped is refused before anything is written."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    text = max_shard_size.strip().upper()
    unit = next((u for u in sorted(units, key=len, reverse=True) if text.endswith(u)), "B")
    try:
        size = int(float(text[: len(text) - len(unit)] if text.endswith(unit) else text) * units[unit])
    except ValueError:
        size = 0
    if size < 1:
        _fail(f"--max-shard-size {max_shard_size!r}: give a size such as 5GB or 500MB.")
    from .conversion import ConversionError
    from .conversion import convert as run_conversion

    try:
        report = run_conversion(source, output, vision_tower=vision_tower, tokenizer=tokenizer, dtype=dtype,
                                max_shard_size=size, overwrite=overwrite)
    except ConversionError as err:
        _fail(str(err))
    for line in report.lines():
        typer.echo(line)


HEADLINE = {"vqav2": ("accuracy",), "vizwiz": ("accuracy",), "textvqa": ("accuracy",), "gqa": ("accuracy",),
            "pope": ("mean_f1", "mean_accuracy"), "scienceqa": ("img_accuracy", "accuracy"),
            "mme": ("perception", "cognition"), "mmbench": ("accuracy",), "seed": ("accuracy",)}


@app.command("eval")
def eval_command(
    task: str = typer.Argument(..., help="vqav2, gqa, vizwiz, textvqa, pope, scienceqa, mme, mmbench or seed."),
    model: str = typer.Option(..., "--model", help="Checkpoint folder with its processor (LLaVA, Qwen2-VL, ...)."),
    questions: str = typer.Option(..., "--questions", help="The question file in LLaVA-1.5's format."),
    answers: str = typer.Option(..., "--answers", help="Answers JSONL to append to (a rerun continues it)."),
    images: str = typer.Option(None, "--images", help="Folder the questions' image paths are relative to."),
    annotations: str = typer.Option(None, "--annotations", help="Ground truth: score the answers when given."),
    dense: bool = typer.Option(False, "--dense", help="Keep every token (keep rates 1.0): the dense model."),
    image_keep_rate: float = typer.Option(None, "--image-keep-rate", help="Override the checkpoint's image keep rate."),
    batch_size: int = typer.Option(8, "--batch-size", help="Questions per batch (>= 1)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Most tokens per answer (LLaVA-1.5 uses 128)."),
    limit: int = typer.Option(None, "--limit", help="Answer only the first N questions."),
    all_rounds: bool = typer.Option(False, "--all-rounds", help="MMBench: ask every rotation of the options "
                                    "(circular evaluation)."),
) -> None:
    """Answer a benchmark's questions (batched, greedy, resumable) and score them when the ground truth is given."""
    from .evaluation.benchmarks import TASKS, BenchmarkError, answer_benchmark, read_questions, score_answers

    if task not in TASKS:
        _fail(f"Unknown task {task!r}: choose one of {', '.join(TASKS)}.")
    if batch_size < 1 or max_new_tokens < 1 or (limit is not None and limit < 1):
        _fail("--batch-size, --max-new-tokens and --limit must be >= 1.")
    if dense and image_keep_rate is not None:
        _fail("--dense and --image-keep-rate exclude each other: --dense keeps every token.")
    if image_keep_rate is not None and not 0.0 < image_keep_rate <= 1.0:
        _fail(f"--image-keep-rate must be in (0, 1], got {image_keep_rate}.")
    if Path(answers).is_dir():
        _fail(f"--answers {answers} is a folder: pass the answers file to write.")
    try:
        items = read_questions(task, questions, all_rounds=all_rounds)[:limit]
    except BenchmarkError as err:
        _fail(str(err))
    loaded = _load_for_inference(model, dense, image_keep_rate)
    try:
        done = answer_benchmark(*loaded, items, answers, images=images, batch_size=batch_size,
                                max_new_tokens=max_new_tokens, model_id=Path(model).name + ("-dense" if dense else ""))
    except BenchmarkError as err:
        _fail(str(err))
    typer.echo(f"Answered {done['answered']} question(s) ({done['skipped']} were already in {answers}).")
    if annotations is not None or task == "mmbench":
        try:
            _print_scores(task, [answers], score_answers, annotations, questions)
        except (BenchmarkError, ValueError) as err:
            _fail(str(err))


@app.command("score")
def score_command(
    task: str = typer.Argument(..., help="vqav2, gqa, vizwiz, textvqa, pope, scienceqa, mme, mmbench or seed."),
    answers: list[str] = typer.Option(..., "--answers", help="Answers JSONL; repeat to compare (e.g. dense, Dynamic)."),
    annotations: str = typer.Option(None, "--annotations", help="The benchmark's ground truth file or folder."),
    questions: str = typer.Option(None, "--questions", help="The question file (POPE categories, the ScienceQA "
                                  "split, MME's folder layout)."),
    submission: str = typer.Option(None, "--submission", help="vqav2 / vizwiz test splits: write the answers in "
                                   "the evaluation server's format to this file instead of scoring."),
) -> None:
    """Score answer files side by side with the benchmark's official rule, with tokens kept, FLOPs and latency."""
    from .evaluation.benchmarks import TASKS, BenchmarkError, score_answers, write_submission

    if task not in TASKS:
        _fail(f"Unknown task {task!r}: choose one of {', '.join(TASKS)}.")
    if submission is not None:
        if len(answers) != 1:
            _fail("--submission writes one answers file: pass one --answers.")
        try:
            typer.echo(f"Wrote {write_submission(task, answers[0], submission)}: upload it to the {task} server.")
        except BenchmarkError as err:
            _fail(str(err))
        return
    try:
        _print_scores(task, answers, score_answers, annotations, questions)
    except (BenchmarkError, ValueError) as err:
        _fail(str(err))


def _load_for_inference(model: str, dense: bool, image_keep_rate: float | None):
    """The model (eval mode, on the GPU when there is one) and its processor, or a one-line error."""
    from .auto import load_for_inference

    settings = {"image_keep_rate": 1.0, "text_keep_rate": 1.0} if dense else {}
    if image_keep_rate is not None:
        settings["image_keep_rate"] = image_keep_rate
    try:
        return load_for_inference(model, **settings)
    except (OSError, ValueError, TypeError) as err:
        _fail(str(err))


def _print_scores(task, answer_files, score, annotations, questions) -> None:
    from rich.console import Console
    from rich.table import Table

    results = [score(task, path, annotations, questions) for path in answer_files]
    table = Table(title=f"{task}", title_justify="left")
    table.add_column("answers")
    for name in (*HEADLINE[task], "questions", "image tokens kept", "prefill TFLOPs", "KV tokens", "latency s"):
        table.add_column(name, justify="right")
    for path, result in zip(answer_files, results):
        cost = result["cost"]
        count = result.get("questions", result["cost"].get("answers", ""))
        shown = [f"{result[k]:.2f}" if isinstance(result.get(k), float) else str(result.get(k)) for k in HEADLINE[task]]
        kept = f"{cost.get('image_tokens_kept', 0):.1f} / {cost.get('image_tokens', 0):.1f}"
        table.add_row(path, *shown, str(count), kept, f"{cost.get('prefill_tflops', 0):.4f}",
                      f"{cost.get('kv_tokens', 0):.0f}", f"{cost.get('latency_s', 0):.3f}")
    Console(width=200).print(table)


@app.command()
def version() -> None:
    """Print the versions of dynamic-llava, transformers and torch."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    from . import __version__

    def dist(name: str) -> str:
        try:
            return dist_version(name)
        except PackageNotFoundError:
            return "not installed"

    typer.echo(f"dynamic-llava {__version__} (transformers {dist('transformers')}, torch {dist('torch')})")


from .serving.commands import register as _register_serving  # noqa: E402  (generate, chat, serve)

_register_serving(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
