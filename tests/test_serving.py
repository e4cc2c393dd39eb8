"""Continuous batching equals one-by-one `generate()`; the OpenAI-compatible server, driven by the official
`openai` client against a server started on 127.0.0.1 for the test; `generate` / `chat` on the command line."""

from __future__ import annotations

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from dynamic_llava import DynamicLlavaCache, SparsityController, SparsityRequest
from dynamic_llava.cli import app
from dynamic_llava.serving import Engine, ImageLimits, Limits, RequestError
from dynamic_llava.serving.server import BackgroundServer, create_app
from dynamic_llava.world.scenes import render, sample_turn
from tiny import make_prompts, tiny_dynamic
from tiny_processor import tiny_processor

WORLD = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-dynamic-llava"
SETTINGS = [{}, {"image_keep_rate": 0.5}, {"kv_budget_tokens": 30}, {"text_keep_threshold": 0.0},
            {"image_keep_rate": 1.0, "text_keep_threshold": 0.8}]


def solo(model, job, stop_ids):
    """The job's tokens from `generate()` alone (greedy, same settings), up to its first end token: the reference."""
    ids = job.input_ids[None]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **job.image_inputs,
                             max_new_tokens=job.max_new_tokens, do_sample=False, sparsity_requests=job.request,
                             sparsity_policy=job.policy, pad_token_id=0)
    tokens = out[0, ids.shape[1]:].tolist()
    ends = [i for i, t in enumerate(tokens) if t in stop_ids]
    return tokens[: ends[0] + 1] if ends else tokens


def solo_text(engine, job) -> str:
    tokens = solo(engine.model, job, engine.stop_ids)
    return engine.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def png_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_continuous_batching_equals_one_by_one_as_requests_join_and_leave(monkeypatch):
    model, processor = tiny_dynamic(), tiny_processor()
    engine = Engine(model, processor, limits=Limits(max_batch_size=3))
    ids, mask, pixels = make_prompts([3, 9, 1, 5, 2, 7], [4, 1, 8, 2, 6, 3], seed=9)
    image_inputs = [{"pixel_values": pixels[i : i + 1]} for i in range(ids.shape[0])]
    from dynamic_llava.serving.batching import Job, RunningBatch

    joins = []  # the batch size each join found
    join = RunningBatch.join
    monkeypatch.setattr(RunningBatch, "join", lambda self, new: (joins.append(len(self)), join(self, new))[1])
    jobs = []
    for i in range(ids.shape[0]):
        n = int(mask[i].sum())
        request = SparsityRequest(**SETTINGS[i % len(SETTINGS)])
        jobs.append(Job(input_ids=ids[i, -n:], image_inputs=image_inputs[i], request=request,
                        max_new_tokens=[5, 12, 3, 9, 7, 10][i], stop_ids=engine.stop_ids))
    scheduler = engine.scheduler
    for job in jobs[:2]:
        scheduler.submit(job)
    scheduler.step()  # two run
    scheduler.submit(jobs[2])
    scheduler.step()  # a third joins a running batch
    for job in jobs[3:]:
        scheduler.submit(job)  # these wait for room (batch of 3) and join as others leave
    while not all(j.done for j in jobs):
        scheduler.step()
    assert joins[0] == 0 and sum(1 for n in joins[1:] if n > 0) >= 2, joins  # jobs joined running batches
    for job in jobs:
        assert job.error is None
        assert job.tokens == solo(model, job, engine.stop_ids), job.request


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_continuous_batching_qwen_equals_one_by_one(family):
    """Multimodal RoPE: each request decodes at its own positions (its image offset), text-only ones too."""
    from dynamic_llava.serving.batching import Job, Scheduler
    from tiny_qwen import make_batch, one, tiny_pair

    model, _ = tiny_pair(family)
    prompts = [[("text", 3), ("image", (4, 8)), ("text", 2)], [("text", 6)], [("text", 5), ("image", (8, 8)), ("text", 1)],
               [("text", 2), ("image", (4, 4)), ("text", 4), ("image", (4, 8))]]
    batch = make_batch(prompts, seed=3)
    scheduler = Scheduler(model, pad_token_id=0, max_batch_size=2)
    jobs, references = [], []
    for i in range(len(prompts)):
        alone = one(batch, i, prompts)
        request = SparsityRequest(**SETTINGS[i % len(SETTINGS)])
        images = {k: alone[k] for k in ("pixel_values", "image_grid_thw") if k in alone}
        job = Job(input_ids=alone["input_ids"][0], image_inputs=images,
                  token_inputs={"mm_token_type_ids": alone["mm_token_type_ids"][0]}, request=request,
                  max_new_tokens=[6, 9, 4, 8][i])
        jobs.append(job)
        with torch.no_grad():
            out = model.generate(**alone, max_new_tokens=job.max_new_tokens, do_sample=False, sparsity_requests=request)
        references.append(out[0, alone["input_ids"].shape[1]:].tolist())
    scheduler.run_until_done(jobs)  # batch of 2: the later ones join as the first ones leave
    for job, reference in zip(jobs, references):
        assert job.error is None and job.tokens == reference[: len(job.tokens)] and len(job.tokens) == job.max_new_tokens


def test_cache_concatenate_keeps_each_row():
    """Two caches joined side by side hold each row's K/V, the shorter one left-padded."""
    model = tiny_dynamic()
    caches, masks = [], []
    for seed, before in ((1, [3]), (2, [9])):
        ids, mask, pixels = make_prompts(before, [2], seed=seed)
        cache = DynamicLlavaCache.from_config(model.config)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, pixel_values=pixels, past_key_values=cache, use_cache=True)
        caches.append(cache)
        masks.append(mask)
    short, long = masks[0].shape[1], masks[1].shape[1]
    joined = DynamicLlavaCache.concatenate(caches, [long - short, 0])
    assert joined.layers[0].keys.shape[2] == long
    torch.testing.assert_close(joined.layers[0].keys[0, :, long - short :], caches[0].layers[0].keys[0])
    assert torch.count_nonzero(joined.layers[0].keys[0, :, : long - short]) == 0
    sparse = model.config.sparse_layer
    assert joined.table.lengths.tolist() == [caches[0].table.lengths.item(), caches[1].table.lengths.item()]
    n = caches[0].table.lengths.item()
    torch.testing.assert_close(joined.layers[sparse].keys[0, :, :n], caches[0].layers[sparse].keys[0, :, :n])


def test_engine_refuses_bad_requests_before_any_work():
    engine = Engine(tiny_dynamic(), tiny_processor(), limits=Limits(max_new_tokens=16))
    image = png_url(Image.new("RGB", (32, 32), "red"))
    user = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                         {"type": "text", "text": "what is in the picture?"}]}]
    cases = [
        (dict(messages=[]), "non-empty list"),
        (dict(messages=[{"role": "robot", "content": "hi"}]), "role"),
        (dict(messages=[{"role": "assistant", "content": "hi"}]), "last message"),
        (dict(messages=user, max_new_tokens=17), "more than this server allows"),
        (dict(messages=user, sparsity={"image_keep_rate": 2}), "Bad sparsity"),
        (dict(messages=user, sparsity={"bogus": 1}), "Unknown sparsity setting"),
        (dict(messages=user, sparsity={"kv_budget_tokens": 2}), "never dropped"),
        (dict(messages=user, policy="nope"), "Unknown policy"),
        (dict(messages=user, policy={"name": "h2o", "heavy": -1}), "Bad policy parameters"),
        (dict(messages=user, temperature=5), "temperature"),
        (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%"}}]}]),
         "malformed"),
        (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(b"not an image").decode()}}]}]), "could not be decoded"),
        (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/hostname"}}]}]),
         "Local image paths are off"),
        (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}]}]),
         "does not fetch"),
        (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}] * 5}]),
         "More than 4 images"),
        (dict(messages=[{"role": "user", "content": "hi " * 600}]), "more than this server"),
        (dict(messages=[{"role": "user", "content": "hi " * 162}], max_new_tokens=16), "positions; the model has"),
    ]
    for kwargs, message in cases:
        with pytest.raises(RequestError, match=message):
            engine.prepare(**kwargs)
    assert engine.scheduler.running == 0 and not engine.scheduler.waiting


def test_global_kv_budget_queues_requests_and_refuses_what_can_never_fit():
    model, processor = tiny_dynamic(), tiny_processor()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_url(Image.new("RGB", (32, 32)))}},
                                             {"type": "text", "text": "describe the image"}]}]
    probe = Engine(model, processor).prepare(messages, max_new_tokens=6)
    budget = int(probe.worst_kv_bytes * 1.5)  # room for one at a time
    engine = Engine(model, processor, controller=SparsityController(kv_budget_bytes=budget))
    jobs = [engine.prepare(messages, max_new_tokens=6) for _ in range(3)]
    most_running = 0
    for job in jobs:
        engine.scheduler.submit(job)
    while not all(j.done for j in jobs):
        engine.scheduler.step()
        most_running = max(most_running, engine.scheduler.running)
        assert engine.scheduler.kv_in_use <= budget
    assert most_running == 1 and all(j.error is None for j in jobs)
    assert jobs[0].tokens == jobs[1].tokens == jobs[2].tokens
    with pytest.raises(RequestError, match="more than the server's whole budget"):
        Engine(model, processor, controller=SparsityController(kv_budget_bytes=budget // 4)).prepare(messages,
                                                                                                     max_new_tokens=6)


# ---------------------------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def server():
    """The shipped world model served on a free port of 127.0.0.1 for this module; stopped after it."""
    engine = Engine.load(str(WORLD), limits=Limits(max_batch_size=4, max_new_tokens=96, request_timeout_s=60,
                                                   images=ImageLimits(max_images=2)),
                         controller=SparsityController(kv_budget_bytes=64 * 2**20))
    with BackgroundServer(engine, max_waiting=64) as running:  # leaving it stops the server, or raises
        client = openai.OpenAI(base_url=running.url, api_key="unused", max_retries=0, timeout=60)
        yield engine, client, running.port


def scene_message(seed: int, kind: str):
    scene, (question, answer) = sample_turn(np.random.default_rng(seed), kind)
    content = [{"type": "text", "text": question + "\n"}, {"type": "image_url", "image_url": {"url": png_url(render(scene))}}]
    return [{"role": "user", "content": content}], answer


def test_server_answers_like_generate_alone(server):
    engine, client, _ = server
    assert [m.id for m in client.models.list()] == ["tiny-dynamic-llava"]
    messages, _ = scene_message(1, "color")
    reply = client.chat.completions.create(model="tiny-dynamic-llava", messages=messages, max_tokens=12,
                                           extra_body={"sparsity": {"image_keep_rate": 0.5}})
    job = engine.prepare(messages, sparsity={"image_keep_rate": 0.5}, max_new_tokens=12)
    assert reply.choices[0].message.content == solo_text(engine, job)
    usage = reply.usage.model_extra
    assert usage["image_tokens"] == 64 and usage["image_tokens_kept"] == 32
    assert 0 < usage["kv_bytes"] < usage["dense_kv_bytes"]
    assert reply.usage.completion_tokens == len(solo(engine.model, job, engine.stop_ids))


def test_server_streams(server):
    engine, client, _ = server
    messages, _ = scene_message(2, "describe")
    plain = client.chat.completions.create(model="tiny-dynamic-llava", messages=messages, max_tokens=40)
    chunks = list(client.chat.completions.create(model="tiny-dynamic-llava", messages=messages, max_tokens=40,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content and len([c for c in chunks if c.choices]) > 3
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason


def test_server_mixes_concurrent_requests_without_mixing_them_up(server):
    engine, client, _ = server
    asks = [(scene_message(10 + i, ["count", "exist", "color", "shape", "position"][i % 5])[0],
             SETTINGS[i % len(SETTINGS)]) for i in range(10)]

    def ask(item):
        messages, settings = item
        return client.chat.completions.create(model="tiny-dynamic-llava", messages=messages, max_tokens=8,
                                              extra_body={"sparsity": settings}).choices[0].message.content

    with ThreadPoolExecutor(max_workers=6) as pool:
        together = list(pool.map(ask, asks))
    alone = [solo_text(engine, engine.prepare(messages, sparsity=settings, max_new_tokens=8))
             for messages, settings in asks]
    assert together == alone


def test_server_runs_requests_with_different_policies_side_by_side(server):
    engine, client, _ = server
    policies = ["learned", {"name": "streamingllm", "window": 4}, {"name": "h2o", "heavy": 2, "recent": 3}, "fastv"]
    asks = [(scene_message(30 + i, ["describe", "list"][i % 2])[0], policies[i % len(policies)]) for i in range(8)]

    def ask(item):
        messages, policy = item
        return client.chat.completions.create(model="tiny-dynamic-llava", messages=messages, max_tokens=24,
                                              extra_body={"policy": policy}).choices[0].message.content

    with ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(ask, asks))
    alone = [solo_text(engine, engine.prepare(messages, policy=policy, max_new_tokens=24)) for messages, policy in asks]
    assert together == alone


def test_server_drops_a_stream_the_client_left(server):
    import json
    import urllib.request

    engine, client, port = server
    before = dict(engine.scheduler.finished)
    messages, _ = scene_message(5, "describe")
    stream = client.chat.completions.create(model="tiny-dynamic-llava", messages=messages, max_tokens=90,
                                            stream=True, extra_body={"sparsity": {"text_keep_threshold": 0.0}})
    next(iter(stream))
    stream.close()  # the client goes away after the first chunk
    deadline = time.monotonic() + 20
    while engine.scheduler.finished["cancelled"] == before["cancelled"] and time.monotonic() < deadline:
        time.sleep(0.02)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as response:
        health = json.loads(response.read())
    assert health["finished"]["cancelled"] == before["cancelled"] + 1 and health["running"] == 0


@pytest.mark.parametrize("body, status, message", [
    (dict(model="gpt-4o"), 404, "does not exist here"),
    (dict(extra_body={"sparsity": {"image_keep_rate": 3}}), 400, "image_keep_rate"),
    (dict(extra_body={"policy": "nope"}), 400, "Unknown policy"),
    (dict(max_tokens=500), 400, "more than this server allows"),
    (dict(n=2), 400, "n must be 1"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]}]),
     400, "malformed"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + base64.b64encode(b"GIF89a broken").decode()}}]}]), 415, "could not be decoded"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]), 400,
     "Local image paths are off"),
    (dict(messages=[{"role": "user", "content": "is there a red circle ? " * 1000}]), 413, "more than this server"),
])
def test_server_bad_inputs_get_clear_4xx(server, body, status, message):
    engine, client, _ = server
    messages, _ = scene_message(3, "exist")
    kwargs = dict(model="tiny-dynamic-llava", messages=messages, max_tokens=4) | body
    with pytest.raises(openai.APIStatusError) as error:
        client.chat.completions.create(**kwargs)
    assert error.value.status_code == status and message in error.value.message
    assert client.chat.completions.create(model="tiny-dynamic-llava", messages=messages, max_tokens=2).choices  # alive


def test_server_health_and_raw_errors(server):
    import json
    import urllib.error
    import urllib.request

    engine, client, port = server
    base = f"http://127.0.0.1:{port}"
    with urllib.request.urlopen(f"{base}/health", timeout=10) as response:
        health = json.loads(response.read())
    assert health["status"] == "ok" and health["kv_budget_bytes"] == 64 * 2**20
    request = urllib.request.Request(f"{base}/v1/chat/completions", data=b"{not json", method="POST",
                                     headers={"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(request, timeout=10)
    assert error.value.code == 400 and "not valid JSON" in json.loads(error.value.read())["error"]["message"]


def test_server_times_out_a_request_and_keeps_serving():
    engine = Engine.load(str(WORLD), limits=Limits(request_timeout_s=0.001))
    app = create_app(engine)
    from fastapi.testclient import TestClient

    messages, _ = scene_message(4, "describe")
    with TestClient(app) as http:
        reply = http.post("/v1/chat/completions", json={"model": "tiny-dynamic-llava", "messages": messages,
                                                        "max_tokens": 60})
        assert reply.status_code == 408 and "timeout" in reply.json()["error"]["message"]
        deadline = time.monotonic() + 10
        while engine.scheduler.running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.scheduler.running == 0  # the cancelled request left the batch
    assert engine.scheduler._stopping  # the app's shutdown stopped the worker


# ---------------------------------------------------------------------------------------------- the command line


def test_generate_and_chat_on_the_command_line(tmp_path):
    scene, (question, answer) = sample_turn(np.random.default_rng(5), "color")
    image = tmp_path / "scene.png"
    render(scene).save(image)
    runner = CliRunner()
    result = runner.invoke(app, ["generate", str(WORLD), "--prompt", question + "\n<image>", "--image", str(image),
                                 "--image-keep-rate", "0.5", "--json"])
    assert result.exit_code == 0, result.output
    import json

    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["usage"]["image_tokens_kept"] == 32 and record["answer"]
    chat = runner.invoke(app, ["chat", str(WORLD)], input=f"/image {image}\n{question}\n/quit\n")
    assert chat.exit_code == 0, chat.output
    assert "model> " in chat.output and "image tokens kept" in chat.output
    missing = runner.invoke(app, ["generate", str(WORLD), "--prompt", "hi", "--image", str(tmp_path / "no.png")])
    assert missing.exit_code == 2 and "file not found" in missing.output
    bad = runner.invoke(app, ["generate", str(WORLD), "--prompt", "hi", "--kv-budget-tokens", "0"])
    assert bad.exit_code == 2 and "kv_budget_tokens" in bad.output
