"""The server under faults (the serve load test's traffic on a tiny model, in-process): clients
that disconnect mid-stream, a malformed request every Nth, an adapter unloaded while requests
for it are in flight, a slow client reading its stream a chunk at a time. Requests for the
other adapters all succeed with the text they give alone, nothing leaks (concurrency slots,
queued rows, adapter slots), memory stays bounded, and the server keeps answering."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

import lorakit

from ..serve.test_engine import PROMPTS, adapters_dir, llama_adapters, make_engine  # noqa: F401  (fixtures)
from ..serve.test_server import Server
from ..train.conftest import model_dirs  # noqa: F401  (fixture)

HEALTHY = ["a", "c", None]  # adapters whose requests must never fail (None: the base)
FAULTED = "b"  # the adapter the faults are aimed at; unloaded mid-test
MALFORMED_EVERY = 4


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def body(model: str | None, max_tokens: int = 16, **extra) -> dict:
    return {"model": model or "tiny", "prompt": PROMPTS[model], "max_tokens": max_tokens, "temperature": 0, **extra}


MALFORMED = [  # (content, why) sent as the body of a completion request
    (b'{"model": "a", "prompt": ', "truncated JSON"),
    (json.dumps({"model": "a", "prompt": "a b", "max_tokens": "lots"}).encode(), "wrong type"),
    (json.dumps({"model": "a", "prompt": "a b", "temperature": -3}).encode(), "out of range"),
    (json.dumps({"model": "no/such", "prompt": "a b"}).encode(), "unknown model"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    (json.dumps({"model": "a", "prompt": []}).encode(), "empty prompt list"),
]


def wait_until(condition, limit_s: float = 120) -> None:
    """Poll `condition` until it holds; the limit only guards against a hang."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "the traffic made no progress"
        time.sleep(0.05)


@pytest.fixture
def server(model_dirs, adapters_dir):
    with Server(make_engine(model_dirs, adapters_dir, max_adapters=4)) as running:
        yield running


def test_faults_do_not_touch_other_adapters(server):
    client = server.client
    expected = {name: server.text(name, PROMPTS[name], 16) for name in [*HEALTHY, FAULTED]}  # each alone
    baseline = rss_mib()
    stop = threading.Event()
    failures, done, malformed, samples = [], [], [], [baseline]
    faults = {"disconnects": 0, "malformed": 0, "slow_streams": 0, "in_flight_at_unload": 0}

    def healthy_client(seed: int) -> None:
        """The load test's traffic, with a malformed request every Nth."""
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for i in range(seed, 10**6):
                if stop.is_set():
                    return
                if i % MALFORMED_EVERY == 0:
                    content, why = MALFORMED[i % len(MALFORMED)]
                    r = http.post("/v1/completions", content=content, headers={"content-type": "application/json"})
                    malformed.append((why, r.status_code))
                    continue
                name = HEALTHY[i % len(HEALTHY)]
                stream = i % 2 == 0
                try:
                    if stream:
                        with http.stream("POST", "/v1/completions", json=body(name, stream=True)) as r:
                            lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
                        ok = r.status_code == 200 and lines[-1] == "[DONE]"
                        text = "".join(json.loads(ln)["choices"][0]["text"] for ln in lines[:-1]) if ok else None
                    else:
                        r = http.post("/v1/completions", json=body(name))
                        ok = r.status_code == 200
                        text = r.json()["choices"][0]["text"] if ok else None
                except httpx.HTTPError as e:
                    ok, text = False, repr(e)
                (done if ok and text == expected[name] else failures).append((name, text))

    def disconnecting_client() -> None:
        """Opens a stream, reads one chunk, hangs up."""
        with httpx.Client(base_url=server.url, timeout=60) as http:
            while not stop.is_set():
                with http.stream("POST", "/v1/completions", json=body(FAULTED, 30, stream=True)) as r:
                    if r.status_code == 404:  # FAULTED unloaded: disconnect from the base instead
                        continue
                    next(r.iter_lines())
                faults["disconnects"] += 1

    def slow_client() -> None:
        """Reads its stream one chunk every 0.2 s."""
        with httpx.Client(base_url=server.url, timeout=60) as http:
            while not stop.is_set():
                with http.stream("POST", "/v1/completions", json=body(None, 20, stream=True)) as r:
                    for _ in r.iter_lines():
                        time.sleep(0.2)
                faults["slow_streams"] += 1

    def memory() -> None:
        while not stop.wait(0.2):
            samples.append(rss_mib())

    threads = [
        threading.Thread(target=f, args=a)
        for f, a in [(healthy_client, (k,)) for k in range(1, 4)]
        + [(disconnecting_client, ()), (slow_client, ()), (memory, ())]
    ]
    for t in threads:
        t.start()
    try:
        # Traffic of every kind is flowing before the unload (progress, not a fixed sleep).
        wait_until(lambda: len(done) >= 5 and faults["disconnects"] >= 1 and malformed)
        # Unload FAULTED while requests for it are in flight: they finish on its weights.
        with httpx.Client(base_url=server.url, timeout=60) as http:
            streams = [http.stream("POST", "/v1/completions", json=body(FAULTED, 16, stream=True)) for _ in range(3)]
            responses = [s.__enter__() for s in streams]
            faults["in_flight_at_unload"] = server.engine.adapters()[1]["in_use"]
            assert http.delete(f"/v1/adapters/{FAULTED}").status_code == 200
            texts = []
            for s, r in zip(streams, responses):
                lines = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
                texts.append("".join(json.loads(ln)["choices"][0]["text"] for ln in lines[:-1]))
                s.__exit__(None, None, None)
            assert texts == [expected[FAULTED]] * 3
            assert http.post("/v1/completions", json=body(FAULTED)).status_code == 404
        wait_until(lambda: len(done) >= 20 and faults["disconnects"] >= 3 and faults["slow_streams"] >= 1)
    finally:
        stop.set()
        for t in threads:
            t.join(60)

    faults["malformed"] = len(malformed)
    print(
        f"\nserver faults: {faults}; {len(done)} requests for other adapters succeeded, {len(failures)} failed; "
        f"RSS {baseline:.0f} -> max {max(samples):.0f} MiB over {len(samples)} samples"
    )
    assert failures == [], failures[:3]  # no request for another adapter failed
    assert len(done) >= 20 and {name for name, _ in done} == set(HEALTHY)
    assert malformed and all(400 <= status < 500 for _, status in malformed), malformed
    assert faults["disconnects"] >= 3 and faults["slow_streams"] >= 1 and faults["in_flight_at_unload"] >= 1, faults

    # Nothing leaked: concurrency slots, queued or running rows, the unloaded adapter's slot.
    stats = server.engine.stats
    wait_until(lambda: not (server.app.state.gate.active or stats()["running"] or stats()["waiting"]), 30)
    assert len(lorakit.adapter_names(server.engine.model)) == 2  # a and c; b's slot left with its last request
    # Memory bounded; still answering.
    assert max(samples) - baseline < 300, (baseline, max(samples))
    assert client.get("/health").json()["status"] == "ok"
    assert server.text("a", PROMPTS["a"], 16) == expected["a"]
