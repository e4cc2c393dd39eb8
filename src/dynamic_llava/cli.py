"""Command line: `dynamic-llava demo` and `dynamic-llava version`."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="dynamic-llava",
    help="Dynamic-LLaVA: vision-language context sparsification for LLaVA models on HuggingFace transformers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(message: str) -> None:
    """Print a one-line error and exit with status 2 (bad usage)."""
    typer.secho(f"Error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code=2)


@app.command()
def demo(
    max_new_tokens: int = typer.Option(24, "--max-new-tokens", "-n", help="Greedy tokens generated per sample (>= 2)."),
    image_keep_rate: float = typer.Option(
        0.2, "--image-keep-rate", help="Share of each image's tokens kept after layer K, in (0, 1]."
    ),
    seed: int = typer.Option(0, "--seed", help="Seeds the random weights, prompts and images."),
    checkpoints: str = typer.Option("checkpoints", help="Folder of the trained world models (tiny-llava, ...)."),
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

    if not random_weights and checkpoints_present(checkpoints):
        run_world_demo(checkpoints, image_keep_rate=image_keep_rate)
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
    seed: int = typer.Option(42, help="Seed of data order, Gumbel noise and fresh predictors."),
    gradient_checkpointing: bool = typer.Option(False, help="Recompute activations in backward (non-reentrant)."),
    bf16: bool = typer.Option(False, help="Load and train in bfloat16."),
    image_keep_rate: float = typer.Option(None, help="Target share of image tokens kept (default: the model's)."),
    text_keep_rate: float = typer.Option(None, help="Target share of answer tokens kept (default: the model's)."),
    sparse_layer: int = typer.Option(None, help="Layer K whose input the predictors read (default: the model's)."),
    budget_weight: float = typer.Option(None, help="lambda of the budget loss (default: the model's, 100)."),
    min_answer_tokens: int = typer.Option(None, help="Answers shorter than this keep every token (default 50)."),
    on_bad_record: str = typer.Option("skip", help="skip | raise: what to do with a malformed record."),
    chat_template: str = typer.Option(
        None, help='"llava_v1" (answers end with </s>) or a Jinja template; default: the processor\'s.'
    ),
    deepspeed: str = typer.Option(None, help="DeepSpeed JSON config (multi-GPU), e.g. configs/deepspeed_zero2.json."),
    resume: bool = typer.Option(True, help="Resume from the newest checkpoint in OUTPUT_DIR if there is one."),
) -> None:
    """Sparsification-aware fine-tuning. Multi-process: `torchrun --nproc_per_node N -m dynamic_llava.cli train ...`."""
    from .training import TrainingRecipe
    from .training import train as run_training

    sparsity = {
        name: value
        for name, value in dict(
            image_keep_rate=image_keep_rate, text_keep_rate=text_keep_rate, sparse_layer=sparse_layer,
            budget_weight=budget_weight, min_answer_tokens=min_answer_tokens,
        ).items()
        if value is not None
    }
    recipe = TrainingRecipe(
        model=model, data=data, images=images, output_dir=output_dir, trainable=trainable,
        freeze_projector=freeze_projector, image_only=image_only, learning_rate=learning_rate,
        predictor_learning_rate=predictor_learning_rate, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
        gradient_accumulation_steps=gradient_accumulation_steps, save_steps=save_steps, seed=seed,
        max_grad_norm=max_grad_norm,
        gradient_checkpointing=gradient_checkpointing, bf16=bf16, on_bad_record=on_bad_record,
        chat_template=chat_template, deepspeed=deepspeed, resume=resume, sparsity=sparsity,
    )
    try:
        final = run_training(recipe)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    typer.echo(f"Trained model saved to {final}")


@app.command()
def world(
    output: str = typer.Option("checkpoints", help="Where the dense and Dynamic-LLaVA checkpoints are written."),
    work: str = typer.Option("runs/world", help="Data and intermediate runs."),
    seed: int = typer.Option(0, help="Seeds the world, the weights and the data order."),
    describe_steps: int = typer.Option(600, help="Dense steps on descriptions only (stage 1)."),
    dense_steps: int = typer.Option(1500, help="Dense steps on every question type (stage 2)."),
    dynamic_steps: int = typer.Option(300, help="Dynamic-LLaVA fine-tuning steps."),
    eval_limit: int = typer.Option(600, help="Test samples evaluated per model."),
) -> None:
    """Build the synthetic world from nothing: data, a tiny dense LLaVA, its Dynamic-LLaVA, and their accuracy."""
    import json

    from .world.build import WorldRecipe, build_world

    report = build_world(WorldRecipe(
        output=output, work=work, seed=seed, describe_steps=describe_steps, dense_steps=dense_steps,
        dynamic_steps=dynamic_steps, eval_limit=eval_limit,
    ))
    typer.echo(json.dumps(report, indent=2))


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
