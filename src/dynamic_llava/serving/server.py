"""An OpenAI-compatible HTTP server on FastAPI + uvicorn: ``POST /v1/chat/completions`` (streaming or not),
``GET /v1/models`` and ``GET /health``.

Requests are checked and tokenized first (a bad one gets a 4xx with OpenAI's error body and costs no model
time), then queued for the `Scheduler`, which a worker thread drives: concurrent requests decode together
(continuous batching) with their own sparsity, given in the extra body fields ``sparsity`` (`SparsityRequest`
fields) and ``policy`` (a name, or ``{"name": ..., parameters}``). ``usage`` reports the tokens kept and the
K/V bytes held. The global KV budget makes requests wait instead of running out of memory; a request that
waits or runs past the timeout ends with 408; on shutdown new requests get 503 while running ones finish.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from .batching import Job
from .engine import Engine
from .messages import RequestError

UNSUPPORTED = {"tools": "tool calls", "functions": "function calls", "logprobs": "log-probabilities",
               "response_format": "response formats", "audio": "audio", "modalities": "other modalities"}


def _error(status: int, message: str, param: str | None = None, code: str = "invalid_request") -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


def _read_body(body) -> dict:
    """The request's fields, checked for shape (the engine checks the values)."""
    if not isinstance(body, dict):
        raise RequestError("The request body must be a JSON object.")
    for name, what in UNSUPPORTED.items():
        if body.get(name) not in (None, False, [], {}):
            raise RequestError(f"{what.capitalize()} are not supported by this server ({name}).", param=name)
    n = body.get("n", 1)
    if n != 1:
        raise RequestError("n must be 1 (one answer per request).", param="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("stream must be true or false.", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("stream_options must be an object.", param="stream_options")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return dict(messages=body.get("messages"), sparsity=body.get("sparsity"), policy=body.get("policy"),
                max_new_tokens=max_tokens, temperature=body.get("temperature"), top_p=body.get("top_p"),
                seed=body.get("seed"), stop=body.get("stop"), stream=stream,
                include_usage=bool(options.get("include_usage", False)))


def create_app(engine: Engine, max_waiting: int = 256, shutdown_grace_s: float = 30.0) -> FastAPI:
    """The FastAPI app serving `engine`; the scheduler's worker thread starts and stops with the app."""
    state = {"closing": False, "thread": None}

    async def lifespan(app):
        thread = threading.Thread(target=engine.scheduler.run_forever, name="dynamic-llava-scheduler", daemon=True)
        thread.start()
        state["thread"] = thread
        yield
        state["closing"] = True  # new requests get 503; running and queued ones finish (up to the grace period)
        deadline = time.monotonic() + shutdown_grace_s
        while (engine.scheduler.running or engine.scheduler.waiting) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for job in list(engine.scheduler.waiting):
            job.cancelled = True
        engine.scheduler.stop()
        thread.join(timeout=10)

    app = FastAPI(title="dynamic-llava", lifespan=lifespan)

    @app.exception_handler(RequestError)
    async def request_error(request, error: RequestError):
        return _error(error.status, str(error), error.param, error.code)

    @app.get("/health")
    async def health():
        scheduler = engine.scheduler
        return {"status": "closing" if state["closing"] else "ok", "model": engine.model_id,
                "running": scheduler.running, "waiting": len(scheduler.waiting),
                "kv_reserved_bytes": scheduler.kv_in_use, "kv_budget_bytes": scheduler.kv_budget_bytes,
                "peak_kv_bytes": scheduler.peak_kv_bytes, "finished": dict(scheduler.finished)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model", "created": 0,
                                            "owned_by": "dynamic-llava"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        if state["closing"]:
            return _error(503, "The server is shutting down.", code="shutting_down")
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(400, "The request body is not valid JSON.")
        fields = _read_body(body)
        model = body.get("model")
        if model != engine.model_id:
            return _error(404, f"The model {model!r} does not exist here: this server serves {engine.model_id!r}.",
                          param="model", code="model_not_found")
        if len(engine.scheduler.waiting) >= max_waiting:
            return _error(429, "Too many requests are waiting: retry later.", code="rate_limit_exceeded")
        stream, include_usage = fields.pop("stream"), fields.pop("include_usage")
        job = await run_in_threadpool(engine.prepare, **fields)  # images decoded, prompt tokenized: before queuing
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job.on_token = lambda j, token: loop.call_soon_threadsafe(events.put_nowait, ("token", token))
        job.on_done = lambda j: loop.call_soon_threadsafe(events.put_nowait, ("done", None))
        engine.scheduler.submit(job)
        completion_id, created = "chatcmpl-" + uuid.uuid4().hex, int(time.time())
        timeout = engine.limits.request_timeout_s
        if stream:
            return StreamingResponse(_stream(engine, job, events, completion_id, created, include_usage, fields["stop"],
                                             timeout), media_type="text/event-stream")
        try:
            deadline = time.monotonic() + timeout
            while True:
                kind, _ = await asyncio.wait_for(events.get(), timeout=max(deadline - time.monotonic(), 0.001))
                if kind == "done":
                    break
        except asyncio.TimeoutError:
            job.cancelled = True
            return _error(408, f"The request took longer than the server's timeout of {timeout:g} s.", code="timeout")
        if job.error is not None:
            return _error(500, f"Generation failed: {type(job.error).__name__}: {job.error}", code="generation_failed")
        return {"id": completion_id, "object": "chat.completion", "created": created, "model": engine.model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": engine.text_of(job, fields["stop"])},
                             "finish_reason": _finish(job)}],
                "usage": engine.usage(job)}

    return app


def _finish(job: Job) -> str:
    return "length" if job.finish_reason == "length" else "stop"


async def _stream(engine: Engine, job: Job, events: asyncio.Queue, completion_id: str, created: int,
                  include_usage: bool, stop, timeout: float):
    """Server-sent events in OpenAI's chunk format; the text is re-decoded as it grows (whole characters only)."""

    def chunk(delta: dict, finish=None, usage=None) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": engine.model_id,
                "choices": [] if usage is not None else [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    sent = ""
    deadline = time.monotonic() + timeout
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            try:
                kind, _ = await asyncio.wait_for(events.get(), timeout=max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                job.cancelled = True
                error = {"message": f"The request took longer than the server's timeout of {timeout:g} s.",
                         "type": "invalid_request_error", "param": None, "code": "timeout"}
                yield f"data: {json.dumps({'error': error})}\n\n"
                return
            text = engine.text_of(job, stop)
            if kind == "token" and not text.endswith("\ufffd") and len(text) > len(sent) and text.startswith(sent):
                yield chunk({"content": text[len(sent):]})
                sent = text
            if kind == "done":
                if job.error is not None:
                    error = {"message": f"Generation failed: {type(job.error).__name__}: {job.error}",
                             "type": "server_error", "param": None, "code": "generation_failed"}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    return
                if text != sent and text.startswith(sent):
                    yield chunk({"content": text[len(sent):]})
                yield chunk({}, finish=_finish(job))
                if include_usage:
                    yield chunk({}, usage=engine.usage(job))
                yield "data: [DONE]\n\n"
                return
    finally:
        if not job.done:
            job.cancelled = True  # the client went away: the request leaves the batch at the next step


class BackgroundServer:
    """The server on a free port of 127.0.0.1 in a thread of this process, for tests, notebooks and load
    scripts: ``with BackgroundServer(engine) as server: OpenAI(base_url=server.url, ...)``."""

    def __init__(self, engine: Engine, max_waiting: int = 256, start_timeout_s: float = 30.0):
        import socket

        import uvicorn

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._server = uvicorn.Server(uvicorn.Config(create_app(engine, max_waiting=max_waiting), host="127.0.0.1",
                                                     port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, name="dynamic-llava-server", daemon=True)
        self._timeout = start_timeout_s

    def __enter__(self) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + self._timeout
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"The server did not start on port {self.port}.")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self._server.should_exit = True  # a graceful shutdown: running requests finish first
        self._thread.join(timeout=60)
        if self._thread.is_alive():
            raise RuntimeError("The server did not stop within 60 s.")


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, max_waiting: int = 256,
          log_level: str = "info") -> None:
    """Run the server until interrupted (Ctrl-C / SIGTERM end it gracefully)."""
    import uvicorn

    uvicorn.run(create_app(engine, max_waiting=max_waiting), host=host, port=port, log_level=log_level)


__all__ = ["BackgroundServer", "create_app", "serve"]
