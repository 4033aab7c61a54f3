"""The real server (uvicorn on a loopback port, in a thread) spoken to over HTTP: OpenAI
endpoints for several adapters at once, streaming, hot load / replace / unload while
requests run, the directory watch, LRU eviction, every refusal, metrics, classification,
the OpenAI client, and the `lorakit serve` command itself."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn

import lorakit
from lorakit.serve import Engine, EngineConfig
from lorakit.serve.app import Limits, create_app

from ..train.conftest import model_dirs  # noqa: F401  (fixture)
from .test_engine import PROMPTS, adapters_dir, llama_adapters, make_adapter, make_engine, reference  # noqa: F401


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn serving `engine` in a background thread, with an httpx client bound to it."""

    def __init__(self, engine: Engine, limits: Limits | None = None) -> None:
        self.engine = engine
        self.app = create_app(engine, limits or Limits(max_body_bytes=50_000))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.client = httpx.Client(base_url=self.url, timeout=30)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(10)

    def complete(self, model: str | None, prompt: str, max_tokens: int = 12, **extra) -> httpx.Response:
        return self.client.post(
            "/v1/completions",
            json={"model": model or "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra},
        )

    def text(self, model: str | None, prompt: str, max_tokens: int = 12) -> str:
        response = self.complete(model, prompt, max_tokens)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    def events(self, path: str, body: dict) -> list:
        with self.client.stream("POST", path, json=body) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            lines = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        return [json.loads(line) for line in lines[:-1]]

    def metric(self, name: str, **labels: str) -> float:
        """The value of one Prometheus sample (0 if absent)."""
        text = self.client.get("/metrics").text
        for line in text.splitlines():
            sample, _, value = line.rpartition(" ")
            if sample.split("{")[0] == name and all(f'{k}="{v}"' in sample for k, v in labels.items()):
                return float(value)
        return 0.0


@pytest.fixture
def serve(model_dirs, adapters_dir):
    """Start a server on a copy of the adapters dir; options go to EngineConfig / Limits."""
    with contextlib.ExitStack() as stack:

        def start(limits: Limits | None = None, **config) -> Server:
            return stack.enter_context(Server(make_engine(model_dirs, adapters_dir, **config), limits))

        yield start


def ref(model_dirs, adapters_dir, name: str | None, prompt: str, max_tokens: int = 12, **kw) -> str:
    return reference(model_dirs["llama"], adapters_dir / name if name else None, prompt, max_tokens, **kw)


@contextlib.contextmanager
def worker_paused(engine: Engine, queued: int):
    """Hold the worker between two steps until `queued` requests wait in its inbox, so they
    all reach the same batch."""
    release, entered = threading.Event(), threading.Event()
    holder = threading.Thread(target=engine._call, args=(lambda: (entered.set(), release.wait(20)),))
    holder.start()
    assert entered.wait(10)
    try:
        yield lambda: engine._inbox.qsize() >= queued
    finally:
        release.set()
        holder.join()


class SlowSteps:
    """While `on`, each decode step takes a while, so a request is reliably still running."""

    def __init__(self, monkeypatch, engine: Engine, seconds: float = 0.03) -> None:
        self.on = True
        decode = engine._decode
        monkeypatch.setattr(engine, "_decode", lambda: (self.on and time.sleep(seconds), decode()))


# -- generation ------------------------------------------------------------------------------
def test_completions_and_chat_for_several_adapters_at_once(serve, model_dirs, adapters_dir):
    server = serve()
    names = ["a", "b", "c", None] * 2
    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda n: server.text(n, PROMPTS[n]), names))
    assert texts == [ref(model_dirs, adapters_dir, n, PROMPTS[n]) for n in names]
    base_by_path = server.text(str(model_dirs["llama"]), PROMPTS[None])  # --model's own name is the base too
    assert base_by_path == texts[3]

    chat = server.client.post(
        "/v1/chat/completions",
        json={"model": "b", "messages": [{"role": "user", "content": "the film"}], "max_tokens": 8, "temperature": 0},
    )
    body = chat.json()
    assert chat.status_code == 200 and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": ref(model_dirs, adapters_dir, "b", "the film\n", 8, special_tokens=False),
    }
    assert (
        body["usage"]["prompt_tokens"] == 2 and body["usage"]["total_tokens"] == 2 + body["usage"]["completion_tokens"]
    )


def test_mixed_batch_gives_what_each_adapter_gives_alone(serve):
    server = serve()
    requests = [(n, p) for n in ["a", "b", "c", None] for p in (PROMPTS["a"], PROMPTS["c"])]
    alone = [server.text(n, p) for n, p in requests]  # one at a time
    prefills = server.metric("lorakit_batch_rows_count", kind="prefill")
    with ThreadPoolExecutor(len(requests)) as pool:
        with worker_paused(server.engine, len(requests)) as all_queued:
            futures = [pool.submit(server.text, n, p) for n, p in requests]
            while not all_queued():
                time.sleep(0.01)
        together = [f.result() for f in futures]
    assert together == alone
    assert server.metric("lorakit_batch_rows_count", kind="prefill") == prefills + 1  # one 8-row prefill
    assert server.metric("lorakit_batch_rows_bucket", kind="decode", le="4.0") < server.metric(
        "lorakit_batch_rows_count", kind="decode"
    )  # decode steps of >4 rows


def test_streaming_chunks_add_up_to_the_non_streaming_text(serve):
    server = serve()
    body = {"model": "a", "prompt": PROMPTS["a"], "max_tokens": 20, "temperature": 0}
    whole = server.client.post("/v1/completions", json=body).json()
    chunks = server.events("/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert len(chunks) > 3 and "".join(c["choices"][0]["text"] for c in chunks[:-1]) == whole["choices"][0]["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]

    chat = {
        "model": "c",
        "messages": [{"role": "user", "content": "alice met bob"}],
        "max_tokens": 10,
        "temperature": 0,
    }
    reply = server.client.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]
    deltas = server.events("/v1/chat/completions", {**chat, "stream": True})
    assert deltas[0]["object"] == "chat.completion.chunk" and deltas[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(d["choices"][0]["delta"]["content"] or "" for d in deltas) == reply
    assert deltas[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_models_health_and_metrics(serve):
    server = serve()
    models = server.client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny", "a", "b", "c"]
    assert all(m["object"] == "model" and m["parent"] == "tiny" for m in models["data"][1:])
    assert server.client.get("/health").json() == {
        "status": "ok",
        "model": "tiny",
        "task": "causal-lm",
        "adapters_known": 3,
        "adapters_loaded": 3,
        "waiting": 0,
        "running": 0,
    }
    tokens = sum(server.complete("a", PROMPTS["a"], 5).json()["usage"]["completion_tokens"] for _ in range(2))
    server.complete("nope", "a b")
    assert server.metric("lorakit_requests_total", endpoint="/v1/completions", adapter="a", status="200") == 2
    assert server.metric("lorakit_requests_total", endpoint="/v1/completions", adapter="unknown", status="404") == 1
    assert server.metric("lorakit_generated_tokens_total", adapter="a") == tokens
    assert server.metric("lorakit_request_seconds_count", endpoint="/v1/completions") == 3
    assert (
        server.metric("lorakit_adapters_loaded") == 3 and server.metric("lorakit_batch_rows_count", kind="decode") > 0
    )


# -- adapters at run time ----------------------------------------------------------------------
def test_load_replace_and_unload_while_requests_run(serve, monkeypatch, model_dirs, adapters_dir):
    spare = make_adapter(model_dirs["llama"], adapters_dir / "spare" / "x", seed=9, r=4)
    server = serve()
    slow = SlowSteps(monkeypatch, server.engine)
    body = {"prompt": PROMPTS["a"], "max_tokens": 20, "temperature": 0, "stream": True}

    def in_model() -> int:
        return len(lorakit.adapter_names(server.engine.model))

    def stream_while(model: str, action) -> tuple[str, object]:
        slow.on = True
        with server.client.stream("POST", "/v1/completions", json={"model": model, **body}) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))  # the request is running
            result = action()
            rest = [line for line in lines if line.startswith("data: {")]
        slow.on = False
        text = "".join(json.loads(line[6:])["choices"][0]["text"] for line in [first, *rest])
        return text, result

    # Replace a while a request runs on it: that request finishes on the old weights.
    def replace_a():
        return server.client.post("/v1/adapters", json={"name": "a", "path": "spare/x"}), in_model()

    text, (replaced, during) = stream_while("a", replace_a)
    assert replaced.status_code == 201 and replaced.json()["replaced"] is True
    assert during == 4 and in_model() == 3  # both versions of a, then only the new one
    assert text == ref(model_dirs, adapters_dir, "a", PROMPTS["a"], 20)
    assert server.text("a", PROMPTS["a"], 20) == reference(model_dirs["llama"], spare, PROMPTS["a"], 20)

    # Unload b while a request runs on it: the request completes, new ones get 404.
    def unload_b():
        gone = server.client.delete("/v1/adapters/b")
        return gone, server.complete("b", "a b"), in_model()

    body["prompt"] = PROMPTS["b"]
    text, (gone, after, held) = stream_while("b", unload_b)
    assert gone.status_code == 200 and after.status_code == 404
    assert text == ref(model_dirs, adapters_dir, "b", PROMPTS["b"], 20)
    assert held == 3 and in_model() == 2  # b stays until its request is done

    # Load a new name at run time.
    loaded = server.client.post("/v1/adapters", json={"name": "new.one", "path": str(spare)})
    assert loaded.status_code == 201 and loaded.json()["replaced"] is False
    assert server.text("new.one", PROMPTS["a"], 20) == server.text("a", PROMPTS["a"], 20)
    listed = server.client.get("/v1/adapters").json()
    assert [a["name"] for a in listed["data"]] == ["a", "c", "new.one"]


def test_directory_watch_adds_and_removes_adapters(serve, model_dirs, adapters_dir):
    server = serve(watch_interval_s=0.1)

    def wait_for(predicate) -> None:
        deadline = time.monotonic() + 10
        while not predicate():
            assert time.monotonic() < deadline
            time.sleep(0.05)

    def model_ids() -> list[str]:
        return [m["id"] for m in server.client.get("/v1/models").json()["data"]]

    shutil.copytree(adapters_dir / "c", adapters_dir / "c2")
    wait_for(lambda: "c2" in model_ids())
    assert server.text("c2", PROMPTS["c"]) == server.text("c", PROMPTS["c"])
    shutil.rmtree(adapters_dir / "c2")
    wait_for(lambda: "c2" not in model_ids())
    assert server.complete("c2", "a b").status_code == 404


def test_lru_eviction_with_one_slot_reloads_on_demand(serve, model_dirs, adapters_dir):
    server = serve(max_adapters=1)
    order = ["a", "b", "a", "c", "a"]
    texts = [server.text(n, PROMPTS["a"]) for n in order]
    assert texts == [ref(model_dirs, adapters_dir, n, PROMPTS["a"]) for n in order]
    assert server.client.get("/v1/adapters").json()["loaded"] == ["a"]
    assert len(lorakit.adapter_names(server.engine.model)) == 1
    evictions = sum(server.metric("lorakit_adapter_evictions_total", adapter=n) for n in "abc")
    assert evictions >= len(order) - 1
    with ThreadPoolExecutor(6) as pool:  # concurrent requests for 3 adapters, one slot
        together = list(pool.map(lambda n: server.text(n, PROMPTS["a"]), ["a", "b", "c"] * 2))
    assert together == [ref(model_dirs, adapters_dir, n, PROMPTS["a"]) for n in ["a", "b", "c"] * 2]


# -- refusals --------------------------------------------------------------------------------
def test_errors_have_the_right_status_and_reason(serve, model_dirs, adapters_dir):
    import transformers as tf

    server = serve()
    post = server.client.post

    unknown = server.complete("nope", "a b")
    assert unknown.status_code == 404 and unknown.json()["error"]["known"] == ["tiny", "a", "b", "c"]
    bad_json = post(
        "/v1/completions", content=b'{"model": "a", "prompt": ', headers={"content-type": "application/json"}
    )
    assert bad_json.status_code == 400 and "malformed JSON" in bad_json.json()["error"]["message"]
    bad_value = server.complete("a", "a b", temperature=5)
    assert bad_value.status_code == 400 and "temperature" in bad_value.json()["error"]["message"]
    too_long = server.complete("a", "a b", max_tokens=100)
    assert too_long.status_code == 400 and "context" in too_long.json()["error"]["message"]
    huge = "a " * 30_000
    assert server.complete("a", huge).status_code == 413
    chunked = post(
        "/v1/completions",
        content=iter([b'{"model": "a", "prompt": "', huge.encode(), b'"}']),
        headers={"content-type": "application/json"},
    )
    assert chunked.status_code == 413

    assert post("/v1/adapters", json={"name": "../evil", "path": "a"}).status_code == 400
    assert post("/v1/adapters", json={"name": "tiny", "path": "a"}).status_code == 400  # the base's name
    outside = post("/v1/adapters", json={"name": "evil", "path": "../../etc"})
    assert outside.status_code == 403 and "--allow-any-path" in outside.json()["error"]["message"]
    assert server.client.delete("/v1/adapters/...").status_code == 400
    assert server.client.delete("/v1/adapters/nope").status_code == 404

    wider = tf.LlamaForCausalLM(
        tf.LlamaConfig(
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=31,
        )
    )
    lorakit.save_adapter(lorakit.inject(wider, lorakit.LoraConfig(r=4)), adapters_dir / "spare" / "wide")
    refused = post("/v1/adapters", json={"name": "wide", "path": "spare/wide"})
    assert refused.status_code == 422 and "shape" in refused.json()["error"]["message"]
    assert post("/v1/classify", json={"model": "a", "input": "a b"}).status_code == 400  # not a classifier
    assert server.text("a", "a b", 2) == ref(model_dirs, adapters_dir, "a", "a b", 2)  # still serving, unchanged


def test_over_the_concurrency_cap_is_429(serve, monkeypatch):
    server = serve(Limits(max_concurrent=1))
    SlowSteps(monkeypatch, server.engine)
    with server.client.stream(
        "POST",
        "/v1/completions",
        json={"model": "a", "prompt": "a b", "max_tokens": 20, "temperature": 0, "stream": True},
    ) as running:
        lines = running.iter_lines()
        next(lines)
        refused = server.complete("b", "a b", 2)
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
        assert "data: [DONE]" in list(lines)
    assert server.complete("b", "a b", 2).status_code == 200  # the slot is free again


def test_requests_past_their_timeout_get_504(serve):
    server = serve(request_timeout_s=0.0)
    late = server.complete("a", "a b", 5)
    assert late.status_code == 504 and late.json()["error"]["type"] == "timeout"


# -- classification, the OpenAI client, the command ----------------------------------------------
def test_classify_endpoint_with_bert_adapters(model_dirs, tmp_path):
    from lorakit.train.api import load_trained

    root = tmp_path / "cls"
    for i, name in enumerate(["sentiment", "other"]):
        make_adapter(model_dirs["bert"], root / name, seed=i, task="classification", labels=["neg", "pos"], r=4)
    engine = Engine.from_pretrained(
        str(model_dirs["bert"]), root, served_name="tiny-bert", config=EngineConfig(watch_interval_s=0)
    )
    texts = ["the film was very good", "the food was awful", "bob"]
    with Server(engine) as server:
        response = server.client.post("/v1/classify", json={"model": "sentiment", "input": texts})
        single = server.client.post("/v1/classify", json={"model": "other", "input": texts[0]}).json()
        wrong = server.complete("sentiment", "a b")
    body = response.json()
    assert response.status_code == 200 and [d["index"] for d in body["data"]] == [0, 1, 2]
    expected = load_trained(str(model_dirs["bert"]), root / "sentiment")
    enc = expected.tokenizer(texts, return_tensors="pt", padding=True)
    import torch

    with torch.no_grad():
        probs = expected.model(**enc).logits.softmax(-1)
    for row, p in zip(body["data"], probs.tolist()):
        assert row["scores"] == pytest.approx(dict(zip(["neg", "pos"], p)), abs=1e-5)
        assert row["label"] == max(row["scores"], key=row["scores"].get)
    assert single["data"][0]["scores"] != body["data"][0]["scores"]  # each adapter its own head
    assert wrong.status_code == 400 and "classification" in wrong.json()["error"]["message"]


def test_openai_client_talks_to_the_server(serve, model_dirs, adapters_dir):
    import openai

    server = serve()
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    done = client.completions.create(model="a", prompt=PROMPTS["a"], max_tokens=12, temperature=0)
    assert done.choices[0].text == ref(model_dirs, adapters_dir, "a", PROMPTS["a"])
    stream = client.chat.completions.create(
        model="c", messages=[{"role": "user", "content": "the film"}], max_tokens=8, temperature=0, stream=True
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert streamed == ref(model_dirs, adapters_dir, "c", "the film\n", 8, special_tokens=False)
    assert [m.id for m in client.models.list()] == ["tiny", "a", "b", "c"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="a b", max_tokens=2)


@pytest.mark.slow  # a fresh interpreter importing torch and transformers: several seconds
def test_lorakit_serve_command(model_dirs, adapters_dir):
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lorakit",
            "serve",
            "--model",
            str(model_dirs["llama"]),
            "--adapters",
            str(adapters_dir),
            "--port",
            str(port),
            "--served-name",
            "tiny",
            "--max-adapters",
            "2",
            "--watch-interval",
            "0",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stdout.read()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health").status_code == 200:
                    break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        response = httpx.post(
            url + "/v1/completions", json={"model": "b", "prompt": PROMPTS["b"], "max_tokens": 12, "temperature": 0}
        )
        assert response.json()["choices"][0]["text"] == ref(model_dirs, adapters_dir, "b", PROMPTS["b"])
        assert httpx.get(url + "/health").json()["adapters_loaded"] == 2
    finally:
        process.terminate()
        process.wait(20)
    assert not re.search(r"Traceback", process.stdout.read())
