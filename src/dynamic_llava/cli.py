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
) -> None:
    """Generate with a small random-weight LLaVA, dense and with Dynamic-LLaVA, and show what is kept and saved."""
    if max_new_tokens < 2:
        _fail(f"--max-new-tokens must be at least 2, got {max_new_tokens}.")
    if not 0.0 < image_keep_rate <= 1.0:
        _fail(f"--image-keep-rate must be in (0, 1] (1.0 keeps every image token), got {image_keep_rate}.")
    if seed < 0:
        _fail(f"--seed must be >= 0, got {seed}.")

    from .demo import run_demo  # imports torch and transformers: only when needed

    try:
        run_demo(max_new_tokens=max_new_tokens, image_keep_rate=image_keep_rate, seed=seed)
    except ValueError as err:
        _fail(str(err))


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
