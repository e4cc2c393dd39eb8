"""Continuous batching: requests join and leave a running batch between decode steps.

A `RunningBatch` holds the requests decoding together (one policy): one `DynamicLlavaCache`, one left-padded
attention mask and the per-sample control rows (`control.py`). New requests are prefilled together, then their
cache is joined to the running one (`DynamicLlavaCache.concatenate`: layers < K left-padded to one length, the
sparse layers' slots as they are); a finished request leaves at once (`batch_select_indices`), and columns that
became padding in every row are trimmed. Each decode step feeds every request its last token with its own
position (its real tokens so far), so a request decodes as it would alone (greedy: the same tokens; sampled:
its own seeded generator).

The `Scheduler` owns the model (one worker thread calls it): it admits queued jobs in arrival order while the
batch has room and their worst-case K/V fits the global budget (a job that does not fit waits; one that could
never fit is refused when prepared), prefills them, and steps every running batch in turn.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..cache import DynamicLlavaCache
from ..control import SparsityRequest, control_tensor, request_kv_bytes
from ..stats import SparsityStats


@dataclass
class Job:
    """One request: its prompt (no padding), image inputs, settings, and what decoding produced."""

    input_ids: torch.Tensor  # [n] long
    image_inputs: dict  # the processor's other outputs for this request alone (pixel_values, image_sizes, ...)
    request: SparsityRequest  # budgets in tokens (a byte budget is converted when the job is prepared)
    max_new_tokens: int
    token_inputs: dict = field(default_factory=dict)  # per-token inputs beside the ids ([n]: mm_token_type_ids)
    policy: object = None  # a TokenPolicy, or None for the learned one
    policy_key: str = "learned"
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: frozenset = frozenset()
    should_stop: Callable[[list[int]], bool] | None = None  # e.g. stop strings, checked after each token
    on_token: Callable[["Job", int], None] | None = None  # called from the worker thread
    on_done: Callable[["Job"], None] | None = None
    worst_kv_bytes: int = 0
    # filled while it runs
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: Exception | None = None
    cancelled: bool = False
    image_tokens: int = 0
    image_tokens_kept: int = 0
    generated_judged: int = 0
    generated_kept: int = 0
    kv_tokens_dense_layers: int = 0
    kv_tokens_sparse_layers: int = 0
    kv_bytes: int = 0
    dense_kv_bytes: int = 0
    submitted_at: float = field(default_factory=time.monotonic)
    finished_at: float | None = None
    _generator: torch.Generator | None = None
    _position_offset: int = 0  # multimodal RoPE: its positions run ahead of its token count by this much

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


def _sample(logits: torch.Tensor, jobs: list[Job]) -> list[int]:
    """Next token of each job: greedy at temperature 0, else sampled (top-p) from its own generator."""
    greedy = logits.argmax(dim=-1).tolist()
    out = []
    for row, job in enumerate(jobs):
        if job.temperature <= 0.0:
            out.append(greedy[row])
            continue
        probs = torch.softmax(logits[row].float() / job.temperature, dim=-1)
        if job.top_p < 1.0:
            ordered, order = probs.sort(descending=True)
            outside = ordered.cumsum(0) - ordered > job.top_p
            probs = probs.scatter(0, order, ordered.masked_fill(outside, 0.0))
        if job._generator is None:
            job._generator = torch.Generator(device=probs.device)
            job._generator.manual_seed(job.seed if job.seed is not None else torch.seed())
        out.append(int(torch.multinomial(probs, 1, generator=job._generator)))
    return out


class RunningBatch:
    """The requests decoding together under one policy (see the module docstring)."""

    def __init__(self, model, policy, pad_token_id: int):
        self.model, self.policy, self.pad = model, policy, pad_token_id
        self.mrope = hasattr(model.model, "get_rope_index")  # Qwen-VL: three position rows, offset by images
        self.jobs: list[Job] = []
        self.cache: DynamicLlavaCache | None = None
        self.mask: torch.Tensor | None = None  # [B, T] long, the padding mask of layers < K
        self.control: torch.Tensor | None = None  # [B, 3]
        self.last: torch.Tensor | None = None  # [B, 1] the token each job feeds next

    def __len__(self) -> int:
        return len(self.jobs)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _forward(self, **inputs):
        stats = SparsityStats()
        out = self.model(**inputs, use_cache=True, sparsity_policy=self.policy, sparsity_stats=stats, logits_to_keep=1)
        return out, stats

    def join(self, jobs: list[Job]) -> None:
        """Prefill `jobs` together, give each its first token, and add them to the running batch."""
        device = self.device
        width = max(int(j.input_ids.numel()) for j in jobs)
        ids = torch.full((len(jobs), width), self.pad, dtype=torch.long)
        mask = torch.zeros(len(jobs), width, dtype=torch.long)
        for row, job in enumerate(jobs):
            n = job.input_ids.numel()
            ids[row, width - n :], mask[row, width - n :] = job.input_ids, 1
        token_inputs = {}
        for key in sorted({k for j in jobs for k in j.token_inputs}):
            value = torch.zeros(len(jobs), width, dtype=torch.long)
            for row, job in enumerate(jobs):
                n = job.input_ids.numel()
                value[row, width - n :] = job.token_inputs[key]
            token_inputs[key] = value.to(device)
        ids, mask = ids.to(device), mask.to(device)
        image_inputs = _collate([j.image_inputs for j in jobs], device, self.model.dtype)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        if self.mrope and image_inputs:
            positions = None  # the stock model computes the multimodal positions (and each row's offset)
            self.model.model.rope_deltas = None
        cache = DynamicLlavaCache.from_config(self.model.config)
        cache.reserve(max(j.max_new_tokens for j in jobs))
        control = control_tensor(self.model, [j.request for j in jobs], len(jobs), self.policy, device=device)
        out, stats = self._forward(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                                   sparsity_control=control, **image_inputs, **token_inputs)
        if self.mrope and positions is None:
            for job, offset in zip(jobs, self.model.model.rope_deltas.view(-1).tolist()):
                job._position_offset = int(offset)
        image_tokens = stats.image_tokens.tolist() if stats.image_tokens is not None else [0] * len(jobs)
        image_kept = stats.image_tokens_kept.tolist() if stats.image_tokens_kept is not None else image_tokens
        for row, job in enumerate(jobs):
            job.image_tokens, job.image_tokens_kept = int(image_tokens[row]), int(image_kept[row])
        first = _sample(out.logits[:, -1], jobs)
        if self.cache is None:
            self.cache, self.mask, self.control = out.past_key_values, mask, control
            self.jobs = list(jobs)
        else:
            old, new = self.mask.shape[1], mask.shape[1]
            total = max(old, new)
            self.cache = DynamicLlavaCache.concatenate([self.cache, out.past_key_values], [total - old, total - new])
            pad = torch.nn.functional.pad
            self.mask = torch.cat([pad(self.mask, (total - old, 0)), pad(mask, (total - new, 0))])
            self.control = torch.cat([self.control, control])
            self.jobs += jobs
        tokens = torch.tensor(first, device=device).unsqueeze(1)
        self.last = tokens if self.last is None or len(self.jobs) == len(jobs) else torch.cat([self.last, tokens])
        self._after_tokens(list(zip(range(len(self.jobs) - len(jobs), len(self.jobs)), first)))

    def step(self) -> None:
        """One decode step for every job in the batch."""
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.jobs), 1)], dim=1)
        positions = self.mask.sum(dim=1, keepdim=True) - 1
        if self.mrope:  # the same position in all three rows, ahead by each request's image offset
            offsets = torch.tensor([j._position_offset for j in self.jobs], device=positions.device).unsqueeze(1)
            positions = (positions + offsets).unsqueeze(0).expand(3, -1, -1)
        out, stats = self._forward(input_ids=self.last, attention_mask=self.mask, position_ids=positions,
                                   past_key_values=self.cache, sparsity_control=self.control)
        self.cache = out.past_key_values
        if stats.generated_tokens is not None:
            judged, kept = stats.generated_tokens.tolist(), stats.generated_tokens_kept.tolist()
            for row, job in enumerate(self.jobs):
                job.generated_judged += int(judged[row])
                job.generated_kept += int(kept[row])
        chosen = _sample(out.logits[:, -1], self.jobs)
        self.last = torch.tensor(chosen, device=self.mask.device).unsqueeze(1)
        self._after_tokens(list(enumerate(chosen)))

    def _after_tokens(self, rows_tokens) -> None:
        """Record each new token, tell the job, and let finished (or cancelled) jobs leave."""
        for row, token in rows_tokens:
            job = self.jobs[row]
            job.tokens.append(token)
            if token in job.stop_ids:
                job.finish_reason = "stop"
            elif job.should_stop is not None and job.should_stop(job.tokens):
                job.finish_reason = "stop"
            elif len(job.tokens) >= job.max_new_tokens:
                job.finish_reason = "length"
            if job.on_token is not None:
                job.on_token(job, token)
        for job in self.jobs:
            if job.cancelled and job.finish_reason is None:
                job.finish_reason = "cancelled"
        leaving = [row for row, job in enumerate(self.jobs) if job.done]
        if leaving:
            self._leave(leaving)

    def _leave(self, rows: list[int]) -> None:
        sparse_lengths = self.cache.table.lengths.tolist()
        real = self.mask.sum(dim=1).tolist()
        for row in rows:
            job = self.jobs[row]
            job.kv_tokens_dense_layers, job.kv_tokens_sparse_layers = int(real[row]), int(sparse_lengths[row])
            job.kv_bytes = request_kv_bytes(self.model, int(real[row]), int(sparse_lengths[row]))
            job.dense_kv_bytes = request_kv_bytes(self.model, int(real[row]), int(real[row]))
            job.finished_at = time.monotonic()
        leaving = set(rows)
        stay = [row for row in range(len(self.jobs)) if row not in leaving]
        finished = [self.jobs[row] for row in rows]
        if stay:
            index = torch.tensor(stay, device=self.mask.device)
            self.cache.batch_select_indices(index)
            self.mask, self.control, self.last = self.mask[index], self.control[index], self.last[index]
            self.jobs = [self.jobs[row] for row in stay]
            unused = int((self.mask.sum(dim=0) == 0).long().cumprod(0).sum())  # leading columns padding everywhere
            if unused:
                self.cache.trim_left(unused)
                self.mask = self.mask[:, unused:]
        else:
            self.jobs, self.cache, self.mask, self.control, self.last = [], None, None, None, None
        for job in finished:
            if job.on_done is not None:
                job.on_done(job)

    def fail(self, error: Exception) -> None:
        """End every job with `error` (a step that raised): the batch is empty after."""
        for job in self.jobs:
            job.error, job.finish_reason, job.finished_at = error, "error", time.monotonic()
        jobs, self.jobs, self.cache, self.mask, self.control, self.last = self.jobs, [], None, None, None, None
        for job in jobs:
            if job.on_done is not None:
                job.on_done(job)


def _collate(parts: list[dict], device, dtype) -> dict:
    """One batch of per-request image inputs: tensors concatenated along their first dimension."""
    out = {}
    for key in sorted({k for p in parts for k in p}):
        values = [p[key] for p in parts if p.get(key) is not None]
        if values:
            value = torch.cat(values)
            out[key] = value.to(device, dtype) if value.is_floating_point() else value.to(device)
    return out


def policy_key(policy) -> str:
    """Requests with equal keys can share a batch."""
    if policy is None:
        return "learned"
    fields = getattr(policy, "__dataclass_fields__", {})
    return json.dumps([type(policy).__name__, {k: repr(getattr(policy, k)) for k in fields}], sort_keys=True)


class Scheduler:
    """Admits jobs, prefills them into running batches (one per policy) and steps the batches; see the module
    docstring. Call `submit` from any thread; `run_forever` (a worker thread) or `run_until_done` drives it."""

    def __init__(self, model, pad_token_id: int, max_batch_size: int = 8, kv_budget_bytes: int | None = None):
        self.model, self.pad, self.max_batch_size, self.kv_budget_bytes = model, pad_token_id, max_batch_size, kv_budget_bytes
        self.waiting: deque[Job] = deque()
        self.batches: dict[str, RunningBatch] = {}
        self.kv_in_use = 0  # worst-case bytes of the admitted jobs
        self.peak_kv_bytes = 0  # the most K/V bytes the running batches held at once (measured after each step)
        self.finished = {"stop": 0, "length": 0, "cancelled": 0, "error": 0}  # jobs ended, by reason
        self._wake = threading.Condition()
        self._stopping = False

    def submit(self, job: Job) -> None:
        with self._wake:
            self.waiting.append(job)
            self._wake.notify()

    @property
    def running(self) -> int:
        return sum(len(b) for b in self.batches.values())

    def _admit(self) -> dict[str, list[Job]]:
        admitted: dict[str, list[Job]] = {}
        with self._wake:
            while self.waiting:
                job = self.waiting[0]
                if job.cancelled:
                    self.waiting.popleft()
                    job.finish_reason, job.finished_at = "cancelled", time.monotonic()
                    self.finished["cancelled"] += 1
                    if job.on_done is not None:
                        job.on_done(job)
                    continue
                if self.running + sum(len(v) for v in admitted.values()) >= self.max_batch_size:
                    break
                if self.kv_budget_bytes is not None and self.kv_in_use + job.worst_kv_bytes > self.kv_budget_bytes:
                    break  # wait for memory: first come, first served
                self.waiting.popleft()
                self.kv_in_use += job.worst_kv_bytes
                admitted.setdefault(job.policy_key, []).append(job)
        return admitted

    def _releasing(self, done):
        """`done`, after the job's reserved K/V is given back and its ending counted."""

        def release(job: Job) -> None:
            self.kv_in_use -= job.worst_kv_bytes
            self.finished[job.finish_reason] = self.finished.get(job.finish_reason, 0) + 1
            if done is not None:
                done(job)

        return release

    def step(self) -> bool:
        """Admit what fits, then one decode step for each running batch; False when there was nothing to do."""
        admitted = self._admit()
        for key, jobs in admitted.items():
            for job in jobs:
                job.on_done = self._releasing(job.on_done)
            batch = self.batches.get(key)
            if batch is None:
                batch = self.batches[key] = RunningBatch(self.model, jobs[0].policy, self.pad)
            try:
                with torch.no_grad():
                    batch.join(jobs)
            except Exception as error:  # the prefill failed: these jobs end with the error, the batch runs on
                for job in jobs:
                    if not job.done:
                        job.error, job.finish_reason, job.finished_at = error, "error", time.monotonic()
                        job.on_done(job)
        worked = bool(admitted)
        for key in list(self.batches):
            batch = self.batches[key]
            if len(batch):
                try:
                    with torch.no_grad():
                        batch.step()
                except Exception as error:  # a failing step ends its batch's jobs with the error, not the server
                    batch.fail(error)
                worked = True
        held = sum(b.cache.nbytes() for b in self.batches.values() if b.cache is not None)
        self.peak_kv_bytes = max(self.peak_kv_bytes, held)
        for key in [k for k, b in self.batches.items() if not len(b)]:
            del self.batches[key]
        return worked

    def run_until_done(self, jobs: list[Job]) -> list[Job]:
        for job in jobs:
            self.submit(job)
        while any(not j.done for j in jobs):
            if not self.step() and any(not j.done for j in jobs):
                raise RuntimeError("The scheduler has waiting jobs it cannot admit (their K/V exceeds the budget).")
        return jobs

    def run_forever(self) -> None:
        while not self._stopping:
            if not self.step():
                with self._wake:
                    if not self.waiting and not self._stopping:
                        self._wake.wait(timeout=0.05)

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()


def worst_case_kv_bytes(model, prompt_tokens: int, max_new_tokens: int, request: SparsityRequest) -> int:
    """The most K/V bytes a job can hold: layers < K the whole context, layers >= K at most its budget."""
    context = prompt_tokens + max_new_tokens
    sparse = context if request.kv_budget_tokens is None else min(context, request.kv_budget_tokens)
    return request_kv_bytes(model, context, sparse)


__all__ = ["Job", "RunningBatch", "Scheduler", "policy_key", "worst_case_kv_bytes"]
