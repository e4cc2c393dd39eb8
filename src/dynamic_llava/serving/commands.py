"""`dynamic-llava generate`, `chat` and `serve`: one engine (`engine.py`) behind all three."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

SETTINGS_HELP = "Per-request sparsity (default: the checkpoint's own settings)."


def _fail(message: str) -> None:
    from ..cli import _fail as fail

    fail(message)


def _sparsity(image_keep_rate, text_keep_threshold, kv_budget_tokens, kv_budget_bytes) -> dict:
    values = dict(image_keep_rate=image_keep_rate, text_keep_threshold=text_keep_threshold,
                  kv_budget_tokens=kv_budget_tokens, kv_budget_bytes=kv_budget_bytes)
    settings = {k: v for k, v in values.items() if v is not None}
    from ..control import SparsityRequest

    try:
        SparsityRequest.from_dict(settings)
    except (TypeError, ValueError) as error:
        _fail(str(error))
    return settings


def _policy(spec: str | None):
    """--policy NAME or --policy 'NAME key=value ...' (values read as JSON where they parse)."""
    if spec is None:
        return None
    name, *pairs = spec.split()
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            _fail(f"--policy {spec!r}: parameters are key=value, got {pair!r}.")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return {"name": name, **params} if params else name


def _engine(model: str, max_images: int = 16, max_new_tokens: int = 512, **limits):
    from .engine import Engine, Limits
    from .messages import ImageLimits

    if not Path(model).is_dir():
        _fail(f"{model} is not a checkpoint folder (config.json, weights and the processor's files).")
    try:
        return Engine.load(model, limits=Limits(max_new_tokens=max_new_tokens,
                                                images=ImageLimits(max_images=max_images, allow_local_files=True),
                                                **limits))
    except (OSError, ValueError, TypeError) as error:
        _fail(str(error))


def _content(prompt: str, images: list[str]) -> list[dict]:
    """A user message's parts: images where the prompt says ``<image>``, else first (LLaVA-1.5's order)."""
    pictures = [{"type": "image_url", "image_url": {"url": path}} for path in images]
    if "<image>" not in prompt:
        return pictures + [{"type": "text", "text": prompt}]
    pieces = prompt.split("<image>")
    if len(pieces) - 1 != len(images):
        raise ValueError(f"The prompt has {len(pieces) - 1} <image> marker(s) but {len(images)} image(s) go with it.")
    parts = []
    for i, piece in enumerate(pieces):
        if piece:
            parts.append({"type": "text", "text": piece})
        if i < len(pictures):
            parts.append(pictures[i])
    return parts


def _pair(prompts: list[str], images: list[str]) -> list[list[str]]:
    """Which images go with each prompt: one each, all to a single prompt, or one shared by every prompt."""
    if not images:
        return [[] for _ in prompts]
    if len(images) == len(prompts):
        return [[image] for image in images]
    if len(prompts) == 1:
        return [list(images)]
    if len(images) == 1:
        return [list(images) for _ in prompts]
    _fail(f"{len(prompts)} prompts and {len(images)} images: give one image per prompt, one image for all, or a "
          "single prompt for all the images.")


def _line(usage: dict) -> str:
    saved = 1 - usage["kv_bytes"] / usage["dense_kv_bytes"] if usage["dense_kv_bytes"] else 0.0
    return (f"image tokens kept {usage['image_tokens_kept']}/{usage['image_tokens']}, generated tokens kept "
            f"{usage['generated_tokens_kept']}/{usage['generated_tokens_judged']}, KV {usage['kv_bytes'] / 2**10:.1f} KiB "
            f"({saved:.0%} below dense)")


def generate(
    model: str = typer.Argument(..., help="Checkpoint folder with its processor (LLaVA, LLaVA-NeXT, OneVision)."),
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="A question (repeat for several; '<image>' places "
                                     "an image, else images come first)."),
    image: list[str] = typer.Option(None, "--image", "-i", help="An image file (repeat: one per prompt, or all for "
                                    "one prompt, or one for all)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", min=1, help="Most tokens per answer."),
    temperature: float = typer.Option(0.0, help="0: greedy; > 0 samples (with --seed for repeatable answers)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (with --temperature > 0)."),
    seed: int = typer.Option(None, help="Seed of the sampling generator."),
    image_keep_rate: float = typer.Option(None, "--image-keep-rate", help="Share of each image's tokens kept. "
                                          + SETTINGS_HELP),
    text_keep_threshold: float = typer.Option(None, "--text-keep-threshold", help="Keep a generated token when "
                                              "its keep probability exceeds this (0.5: trained rule; 0: keep all)."),
    kv_budget_tokens: int = typer.Option(None, "--kv-budget-tokens", help="Most tokens each layer >= K holds."),
    kv_budget_bytes: int = typer.Option(None, "--kv-budget-bytes", help="Most K/V bytes per answer, all layers."),
    policy: str = typer.Option(None, help="learned | fastv | cdpruner | dart | random | streamingllm | h2o, with "
                               "parameters as 'h2o heavy=32 recent=32'."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per answer, with its statistics."),
) -> None:
    """Answer questions about your own images (batched, each with the sparsity you set)."""
    from rich.console import Console

    from .messages import RequestError

    settings = _sparsity(image_keep_rate, text_keep_threshold, kv_budget_tokens, kv_budget_bytes)
    for path in image or []:
        if not Path(path).is_file():
            _fail(f"--image {path}: file not found.")
    groups = _pair(prompt, image or [])
    engine = _engine(model, max_new_tokens=max(max_new_tokens, 1))
    try:
        jobs = [engine.prepare([{"role": "user", "content": _content(text, pictures)}], sparsity=settings,
                               policy=_policy(policy), max_new_tokens=max_new_tokens, temperature=temperature,
                               top_p=top_p, seed=seed) for text, pictures in zip(prompt, groups)]
    except (RequestError, ValueError) as error:
        _fail(str(error))
    console = Console(stderr=True)
    with console.status(f"Answering {len(jobs)} prompt(s)"):
        engine.run(jobs)
    for text, pictures, job in zip(prompt, groups, jobs):
        answer, usage = engine.text_of(job), engine.usage(job)
        if as_json:
            typer.echo(json.dumps({"prompt": text, "images": pictures, "answer": answer,
                                   "finish_reason": job.finish_reason, "usage": usage}))
        else:
            typer.echo(f"> {text.replace(chr(10), ' ')}" + (f"  [{', '.join(pictures)}]" if pictures else ""))
            typer.echo(answer)
            typer.secho(f"  {_line(usage)}", fg=typer.colors.BRIGHT_BLACK)


CHAT_HELP = """Commands: /image PATH (attach to your next message), /reset (forget the conversation), /quit."""


def chat(
    model: str = typer.Argument(..., help="Checkpoint folder with its processor (LLaVA, LLaVA-NeXT, OneVision)."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n", min=1, help="Most tokens per answer."),
    image_keep_rate: float = typer.Option(None, "--image-keep-rate", help="Share of each image's tokens kept."),
    text_keep_threshold: float = typer.Option(None, "--text-keep-threshold", help="Generated-token keep threshold."),
    kv_budget_tokens: int = typer.Option(None, "--kv-budget-tokens", help="Most tokens each layer >= K holds."),
    kv_budget_bytes: int = typer.Option(None, "--kv-budget-bytes", help="Most K/V bytes per answer, all layers."),
    policy: str = typer.Option(None, help="As for generate."),
) -> None:
    """Talk to a model in the terminal; images by path. Each turn shows the tokens kept and the K/V held."""
    from .messages import RequestError

    settings = _sparsity(image_keep_rate, text_keep_threshold, kv_budget_tokens, kv_budget_bytes)
    engine = _engine(model, max_new_tokens=max_new_tokens)
    interactive = sys.stdin.isatty()
    typer.echo(f"Chatting with {engine.model_id}. {CHAT_HELP}")
    history: list[dict] = []
    pending: list[str] = []
    while True:
        try:
            line = input("you> " if interactive else "")
        except (EOFError, KeyboardInterrupt):
            typer.echo("")
            return
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        if line == "/reset":
            history, pending = [], []
            typer.echo("(conversation cleared)")
            continue
        if line.startswith("/image"):
            path = line[len("/image"):].strip()
            if not Path(path).is_file():
                typer.secho(f"No such image file: {path!r}", fg=typer.colors.RED, err=True)
            else:
                pending.append(path)
                typer.echo(f"(image attached to your next message: {path})")
            continue
        if line.startswith("/"):
            typer.secho(f"Unknown command {line.split()[0]}. {CHAT_HELP}", fg=typer.colors.RED, err=True)
            continue
        try:
            message = {"role": "user", "content": _content(line, pending)}
            job = engine.prepare(history + [message], sparsity=settings, policy=_policy(policy),
                                 max_new_tokens=max_new_tokens)
        except (RequestError, ValueError) as error:
            typer.secho(f"Error: {error}", fg=typer.colors.RED, err=True)
            continue
        engine.run([job])
        answer = engine.text_of(job)
        typer.echo(f"model> {answer}")
        typer.secho(f"  {_line(engine.usage(job))}", fg=typer.colors.BRIGHT_BLACK)
        history += [message, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        pending = []


def serve(
    model: str = typer.Argument(..., help="Checkpoint folder with its processor (LLaVA, LLaVA-NeXT, OneVision)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, min=1, max=65535, help="Port to listen on."),
    max_batch_size: int = typer.Option(8, "--max-batch-size", min=1, help="Requests decoding together at most."),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", min=1, help="The most max_tokens a request may ask."),
    max_images: int = typer.Option(4, "--max-images", min=0, help="Images per request at most."),
    max_image_mb: float = typer.Option(10.0, "--max-image-mb", min=0.001, help="Size of one image at most (MiB)."),
    kv_budget_bytes: int = typer.Option(None, "--kv-budget-bytes", min=1, help="K/V bytes all running requests may "
                                        "hold together (default: --kv-memory-fraction of the free memory)."),
    kv_memory_fraction: float = typer.Option(0.5, "--kv-memory-fraction", min=0.0, max=1.0, help="Share of the "
                                             "memory free after loading that K/V may use (when no --kv-budget-bytes)."),
    request_timeout: float = typer.Option(300.0, "--request-timeout", min=0.1, help="Seconds a request may wait and "
                                          "run."),
    max_waiting: int = typer.Option(256, "--max-waiting", min=1, help="Queued requests at most (then 429)."),
    allow_local_images: bool = typer.Option(False, "--allow-local-images", help="Accept image paths on this "
                                            "machine as image_url (off: data URLs only)."),
) -> None:
    """Serve the model over an OpenAI-compatible API (POST /v1/chat/completions, GET /v1/models, GET /health)."""
    try:
        import uvicorn  # noqa: F401
    except ImportError:
        _fail("serve needs FastAPI and uvicorn: pip install fastapi uvicorn.")
    from ..control import SparsityController
    from .engine import Engine, Limits
    from .messages import ImageLimits
    from .server import serve as run

    if not Path(model).is_dir():
        _fail(f"{model} is not a checkpoint folder (config.json, weights and the processor's files).")
    images = ImageLimits(max_images=max_images, max_image_bytes=int(max_image_mb * 2**20),
                         allow_local_files=allow_local_images)
    limits = Limits(max_batch_size=max_batch_size, max_new_tokens=max_new_tokens, images=images,
                    request_timeout_s=request_timeout)
    try:
        controller = (SparsityController(kv_budget_bytes=kv_budget_bytes) if kv_budget_bytes is not None
                      else lambda loaded: SparsityController.from_memory(loaded, fraction=kv_memory_fraction))
        engine = Engine.load(model, controller=controller, limits=limits)
    except (OSError, ValueError, TypeError) as error:
        _fail(str(error))
    typer.echo(f"Serving {engine.model_id} on http://{host}:{port}/v1 (KV budget "
               f"{engine.controller.kv_budget_bytes / 2**20:.0f} MiB, batch <= {max_batch_size})", err=True)
    run(engine, host=host, port=port, max_waiting=max_waiting)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
    app.command("chat")(chat)
    app.command("serve")(serve)


__all__ = ["chat", "generate", "register", "serve"]
