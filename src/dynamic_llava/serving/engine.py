"""What `generate`, `chat` and `serve` share: a loaded model and processor, requests checked and turned into
`Job`s before any compute, and the scheduler that runs them (continuous batching, `batching.py`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


from ..auto import load_for_inference
from ..control import SparsityController, SparsityRequest, budget_tokens, check_budget_covers_prompt, mode_of
from ..policies import (
    CDPrunerPolicy,
    DARTPolicy,
    FastVPolicy,
    H2OPolicy,
    LearnedPolicy,
    RandomPolicy,
    StreamingLLMPolicy,
)
from .batching import Job, Scheduler, policy_key, worst_case_kv_bytes
from .messages import ImageLimits, RequestError, to_chat

POLICIES = {"learned": LearnedPolicy, "fastv": FastVPolicy, "cdpruner": CDPrunerPolicy, "dart": DARTPolicy,
            "random": RandomPolicy, "streamingllm": StreamingLLMPolicy, "h2o": H2OPolicy}
SERVED_FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")
TOKEN_INPUTS = ("mm_token_type_ids",)  # processor outputs aligned with the tokens (padded with them)


@dataclass
class Limits:
    """What one request may ask for, and how many run at once."""

    max_batch_size: int = 8
    max_new_tokens: int = 512
    max_prompt_tokens: int | None = None  # None: the model's context less one (the answer needs a position)
    images: ImageLimits = field(default_factory=ImageLimits)
    request_timeout_s: float = 300.0


def make_policy(spec) -> object | None:
    """A policy from a request's ``policy`` field: a name (``"fastv"``) or ``{"name": ..., **parameters}``."""
    if spec is None:
        return None
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, dict) and isinstance(spec.get("name"), str):
        params = {k: v for k, v in spec.items() if k != "name"}
        name = spec["name"]
    else:
        raise RequestError('policy must be a name or {"name": ..., parameters}.', param="policy")
    if name not in POLICIES:
        raise RequestError(f"Unknown policy {name!r}: choose one of {', '.join(POLICIES)}.", param="policy")
    try:
        policy = POLICIES[name](**params)
    except (TypeError, ValueError) as error:
        raise RequestError(f"Bad policy parameters for {name}: {error}", param="policy") from None
    return None if name == "learned" and not params else policy


class Engine:
    """A model ready to answer chat requests with per-request sparsity (see the module docstring)."""

    def __init__(self, model, processor, controller: SparsityController | None = None, limits: Limits | None = None,
                 model_id: str = "dynamic-llava"):
        family = model.config.model_type.removeprefix("dynamic_")
        if family not in SERVED_FAMILIES:
            raise ValueError(
                f"Serving supports {', '.join(SERVED_FAMILIES)} checkpoints; this one is {family!r}."
            )
        self.model, self.processor, self.model_id = model, processor, model_id
        self.controller = controller or SparsityController()
        self.limits = limits or Limits()
        self.tokenizer = processor.tokenizer
        self.tokenizer.padding_side = "left"
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else model.generation_config.pad_token_id or 0
        eos = model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        self.stop_ids = frozenset(eos)
        context = model.config.text_config.max_position_embeddings
        self.max_prompt_tokens = self.limits.max_prompt_tokens or context - 1
        self.scheduler = Scheduler(model, self.pad_token_id, self.limits.max_batch_size,
                                   self.controller.kv_budget_bytes)

    @classmethod
    def load(cls, path, controller: SparsityController | None = None, limits: Limits | None = None,
             device: str | None = None, dtype=None) -> "Engine":
        """Load a checkpoint folder (any served family) and its processor (`auto.load_for_inference`);
        `controller` may also be a function of the loaded model (e.g. `SparsityController.from_memory`)."""
        model, processor = load_for_inference(path, device, dtype)
        if callable(controller) and not isinstance(controller, SparsityController):
            controller = controller(model)
        return cls(model, processor, controller, limits, model_id=Path(path).name)

    # ------------------------------------------------------------------------------------------ requests -> jobs

    def prepare(self, messages, sparsity: dict | SparsityRequest | None = None, policy=None,
                max_new_tokens: int | None = None, temperature: float | None = None, top_p: float | None = None,
                seed: int | None = None, stop=None) -> Job:
        """A `Job` for one chat request, or a `RequestError` naming what is wrong (before any compute)."""
        limits = self.limits
        chat, images = to_chat(messages, limits.images)
        try:
            request = sparsity if isinstance(sparsity, SparsityRequest) else SparsityRequest.from_dict(sparsity or {})
            request = self.controller.resolve(request, mode_of(generating=True, use_cache=True))
        except (TypeError, ValueError) as error:
            raise RequestError(f"Bad sparsity settings: {error}", param="sparsity") from None
        token_policy = make_policy(policy)
        if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int)
                                           or max_new_tokens < 1):
            raise RequestError(f"max_tokens={max_new_tokens!r}: expected an integer >= 1.", param="max_tokens")
        if max_new_tokens is not None and max_new_tokens > limits.max_new_tokens:
            raise RequestError(f"max_tokens={max_new_tokens} is more than this server allows ({limits.max_new_tokens}).",
                               param="max_tokens")
        temperature = 0.0 if temperature is None else temperature
        top_p = 1.0 if top_p is None else top_p
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0.0 <= temperature <= 2.0:
            raise RequestError(f"temperature={temperature!r}: expected a number in [0, 2].", param="temperature")
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
            raise RequestError(f"top_p={top_p!r}: expected a number in (0, 1].", param="top_p")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise RequestError(f"seed={seed!r}: expected an integer.", param="seed")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
            raise RequestError("stop must be a string or a list of at most 4 non-empty strings.", param="stop")

        prompt = self.processor.apply_chat_template(chat, add_generation_prompt=True)
        try:
            inputs = self.processor(text=[prompt], images=images or None, return_tensors="pt")
        except (ValueError, TypeError, OSError) as error:
            raise RequestError(f"The processor could not read this request: {error}") from None
        ids = inputs.pop("input_ids")[0]
        inputs.pop("attention_mask", None)
        token_inputs = {k: inputs.pop(k)[0] for k in TOKEN_INPUTS if k in inputs}
        if ids.numel() > self.max_prompt_tokens:
            raise RequestError(f"The prompt has {ids.numel()} tokens (images included), more than this server's "
                               f"{self.max_prompt_tokens}: shorten it or send fewer / smaller images.",
                               status=413, param="messages", code="context_length_exceeded")
        positions = self.model.config.text_config.max_position_embeddings
        if max_new_tokens is None:  # as much as the server and the model's context allow
            max_new_tokens = max(min(limits.max_new_tokens, positions - int(ids.numel())), 1)
        context = int(ids.numel()) + max_new_tokens
        if context > positions:
            raise RequestError(f"The prompt's {ids.numel()} tokens and max_tokens={max_new_tokens} need {context} "
                               f"positions; the model has {self.model.config.text_config.max_position_embeddings}.",
                               param="max_tokens", code="context_length_exceeded")
        if request.has_budget:
            try:
                tokens = budget_tokens(self.model, request, context)
            except ValueError as error:
                raise RequestError(str(error), param="sparsity") from None
            request = SparsityRequest(image_keep_rate=request.image_keep_rate,
                                      text_keep_threshold=request.text_keep_threshold, kv_budget_tokens=int(tokens))
            try:
                check_budget_covers_prompt(tokens, int(ids.numel() - (ids == self.model.config.image_token_id).sum()))
            except ValueError as error:
                raise RequestError(str(error), param="sparsity") from None
        job = Job(input_ids=ids, image_inputs=dict(inputs), token_inputs=token_inputs, request=request,
                  max_new_tokens=max_new_tokens,
                  policy=token_policy, policy_key=policy_key(token_policy), temperature=float(temperature),
                  top_p=float(top_p), seed=seed, stop_ids=self.stop_ids,
                  should_stop=self._stop_strings(stops) if stops else None)
        job.worst_kv_bytes = worst_case_kv_bytes(self.model, int(ids.numel()), max_new_tokens, request)
        budget = self.controller.kv_budget_bytes
        if budget is not None and job.worst_kv_bytes > budget:
            raise RequestError(f"This request may hold {job.worst_kv_bytes} K/V bytes, more than the server's whole "
                               f"budget of {budget}: lower max_tokens or set a kv_budget.", status=413,
                               param="max_tokens")
        return job

    def _stop_strings(self, stops: list[str]):
        def should_stop(tokens: list[int]) -> bool:
            tail = self.tokenizer.decode(tokens[-32:], skip_special_tokens=True)
            return any(s in tail for s in stops)

        return should_stop

    def text_of(self, job: Job, stops=None) -> str:
        """The job's answer as text (special tokens and anything from a stop string on left out)."""
        text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
        for s in [stops] if isinstance(stops, str) else (stops or []):
            if s in text:
                text = text[: text.index(s)]
        return text.strip()

    def usage(self, job: Job) -> dict:
        """OpenAI's token counts plus what sparsification kept and the K/V bytes the request held."""
        prompt = int(job.input_ids.numel())
        return {"prompt_tokens": prompt, "completion_tokens": len(job.tokens), "total_tokens": prompt + len(job.tokens),
                "image_tokens": job.image_tokens, "image_tokens_kept": job.image_tokens_kept,
                "generated_tokens_judged": job.generated_judged, "generated_tokens_kept": job.generated_kept,
                "kv_tokens_layers_below_k": job.kv_tokens_dense_layers,
                "kv_tokens_layers_from_k": job.kv_tokens_sparse_layers,
                "kv_bytes": job.kv_bytes, "dense_kv_bytes": job.dense_kv_bytes}

    def run(self, jobs: list[Job]) -> list[Job]:
        """Run `jobs` to the end on this thread (continuous batching among them); raises the first job's error."""
        self.scheduler.run_until_done(jobs)
        for job in jobs:
            if job.error is not None:
                raise job.error
        return jobs


__all__ = ["Engine", "Limits", "POLICIES", "make_policy"]
