"""The serving engine without HTTP: mixed continuous batching against Hugging Face's own
greedy generate, rows joining a running batch, the baseline mode, the LRU, hot load /
replace / unload while a request runs, the directory scan, and refusals."""

from __future__ import annotations

import functools
import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.models import load_model, load_tokenizer
from lorakit.serve import (
    AdapterRefused,
    Busy,
    Engine,
    EngineConfig,
    EngineError,
    Forbidden,
    Timeout,
    UnknownAdapter,
)
from lorakit.serve.engine import EngineEvents, Sampling
from lorakit.serve.errors import check_name
from lorakit.train.tasks import task_class

from ..train.conftest import model_dirs  # noqa: F401  (fixture)

PROMPTS = {"a": "the film was very good", "b": "a b c", "c": "alice met bob in paris", None: "the food"}
# Three adapters that differ in rank and targets, so a mixed batch pads ranks and skips layers.
SPECS = {
    "a": dict(r=4, seed=1),
    "b": dict(r=8, target_modules=["q_proj", "v_proj", "o_proj"], seed=2),
    "c": dict(r=2, target_modules="all-linear", seed=3),
}


def make_adapter(model_dir: Path, out: Path, *, seed: int, task: str = "causal-lm", labels=None, **config) -> Path:
    """A random adapter (B drawn large enough to change greedy outputs), saved in PEFT format."""
    loaded = load_model(str(model_dir), task_class(task).auto_class, label_names=labels)
    torch.manual_seed(seed)
    model = lorakit.inject(
        loaded.model,
        lorakit.LoraConfig(lora_alpha=8, init_lora_weights=False, modules_to_save=loaded.new_modules or None, **config),
    )
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.lora_B["default"].normal_(std=0.5)
    lorakit.save_adapter(model, out)
    if labels:
        (out / "lorakit_task.json").write_text(json.dumps({"task": task, "labels": labels, "model": str(model_dir)}))
    return out


@pytest.fixture(scope="session")
def llama_adapters(model_dirs, tmp_path_factory) -> Path:
    """A pristine adapters dir (a, b, c); tests copy it before changing anything."""
    root = tmp_path_factory.mktemp("serve-adapters")
    for name, spec in SPECS.items():
        make_adapter(model_dirs["llama"], root / name, **spec)
    return root


@pytest.fixture
def adapters_dir(llama_adapters, tmp_path) -> Path:
    return Path(shutil.copytree(llama_adapters, tmp_path / "adapters"))


@functools.cache
def reference(
    model_dir: Path, adapter_dir: Path | None, prompt: str, max_tokens: int, special_tokens: bool = True
) -> str:
    """Hugging Face's own greedy generate on a fresh model: what the server must reproduce."""
    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), "AutoModelForCausalLM").model.eval()
    if adapter_dir is not None:
        lorakit.load_adapter(model, adapter_dir)
    enc = tokenizer(prompt, return_tensors="pt", add_special_tokens=special_tokens)
    out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def make_engine(model_dirs, adapters_dir: Path, **config) -> Engine:
    model_dir = model_dirs["llama"]
    config.setdefault("watch_interval_s", 0)
    return Engine(
        load_model(str(model_dir), "AutoModelForCausalLM").model,
        load_tokenizer(str(model_dir)),
        "causal-lm",
        adapters_dir,
        name="tiny",
        aliases=[str(model_dir)],
        config=EngineConfig(**config),
    )


class Recorder(EngineEvents):
    def __init__(self) -> None:
        self.batches: list[tuple[str, int]] = []
        self.evicted: list[str] = []

    def on_batch(self, kind: str, rows: int) -> None:
        self.batches.append((kind, rows))

    def on_evict(self, name: str) -> None:
        self.evicted.append(name)


# -- batching --------------------------------------------------------------------------------
def test_mixed_batch_equals_hugging_face_generate_per_adapter(model_dirs, adapters_dir):
    engine = make_engine(model_dirs, adapters_dir)
    engine.events = recorder = Recorder()
    names = list(PROMPTS)
    with engine:
        out = engine.generate([PROMPTS[n] for n in names], names, max_tokens=12)
    expected = [reference(model_dirs["llama"], adapters_dir / n if n else None, PROMPTS[n], 12) for n in names]
    assert [e.text for e in out] == expected
    assert len(set(expected)) == 4  # the adapters really differ
    assert ("prefill", 4) in recorder.batches  # all four in one forward pass
    assert all(e.prompt_tokens == len(PROMPTS[n].split()) for e, n in zip(out, names))


def test_requests_join_a_running_batch(model_dirs, adapters_dir):
    """Rows submitted while another is decoding join at the next step (continuous batching)
    and still produce exactly what they produce alone."""
    engine = make_engine(model_dirs, adapters_dir)
    engine.events = recorder = Recorder()
    late = {}

    with engine:
        (first,) = engine.generation_jobs([engine.encode_prompt(PROMPTS["a"])], "a", Sampling(max_tokens=40))
        joiners = [
            job
            for name in "bc"
            for job in engine.generation_jobs([engine.encode_prompt(PROMPTS[name])], name, Sampling(max_tokens=12))
        ]
        joiners[1].index = 1
        done = threading.Event()

        def on_first(event):
            if event.delta and not late:  # a is running: submit the others from inside its step
                late["submitted"] = True
                engine.submit(joiners, lambda e: e.final and late.setdefault(e.index, e))
            if event.final:
                late["a"] = event
                done.set()

        engine.submit([first], on_first)
        assert done.wait(10)
    assert late["a"].text == reference(model_dirs["llama"], adapters_dir / "a", PROMPTS["a"], 40)
    assert late[0].text == reference(model_dirs["llama"], adapters_dir / "b", PROMPTS["b"], 12)
    assert late[1].text == reference(model_dirs["llama"], adapters_dir / "c", PROMPTS["c"], 12)
    assert ("decode", 3) in recorder.batches and ("prefill", 2) in recorder.batches


def test_baseline_mode_batches_one_adapter_at_a_time(model_dirs, adapters_dir):
    engine = make_engine(model_dirs, adapters_dir, mixed=False)
    seen: list[set] = []
    original = engine._adapters_for

    def spy(jobs):
        seen.append({j.adapter for j in jobs})
        return original(jobs)

    engine._adapters_for = spy
    names = ["a", "b", "a", None, "c"]
    with engine:
        out = engine.generate([PROMPTS[n] for n in names], names, max_tokens=6)
    assert [e.text for e in out] == [
        reference(model_dirs["llama"], adapters_dir / n if n else None, PROMPTS[n], 6) for n in names
    ]
    assert all(len(s) == 1 for s in seen) and {"a"} in seen and {None} in seen


def sampled_reference(
    model_dir: Path, adapter_dir: Path, prompt: str, max_tokens: int, temperature: float, top_p: float, seed: int
) -> list[int]:
    """The sampling written out: a fresh model, the whole sequence recomputed each step, one
    draw per token from softmax(logits / T) kept to the top-p nucleus, a generator seeded once."""
    tokenizer = load_tokenizer(str(model_dir))
    model = lorakit.load_adapter(load_model(str(model_dir), "AutoModelForCausalLM").model.eval(), adapter_dir)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    generator, tokens = torch.Generator().manual_seed(seed), []
    for _ in range(max_tokens):
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1].float()
        probs = (logits / temperature).softmax(-1)
        order = probs.argsort(descending=True)
        mass_before = probs[order].cumsum(0) - probs[order]
        keep = torch.zeros_like(probs, dtype=torch.bool)
        keep[order[mass_before <= top_p]] = True  # the nucleus: mass before a token <= top_p
        token = int(torch.multinomial(torch.where(keep, probs, 0.0), 1, generator=generator))
        tokens.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], 1)
    return tokens


@pytest.mark.parametrize("top_p", [1.0, 0.6])
def test_sampling_follows_the_written_out_sampler(model_dirs, adapters_dir, top_p):
    with make_engine(model_dirs, adapters_dir) as engine:
        out = engine.generate([PROMPTS["a"]], "a", max_tokens=10, temperature=1.3, top_p=top_p, seed=7)[0]
        again = engine.generate([PROMPTS["a"]], "a", max_tokens=10, temperature=1.3, top_p=top_p, seed=7)[0]
        greedy = engine.generate([PROMPTS["a"]], "a", max_tokens=10)[0]
    expected = sampled_reference(model_dirs["llama"], adapters_dir / "a", PROMPTS["a"], 10, 1.3, top_p, 7)
    tokenizer = load_tokenizer(str(model_dirs["llama"]))
    assert out.text == tokenizer.decode(expected, skip_special_tokens=True) and out.completion_tokens == 10
    assert again.text == out.text  # the seed reproduces the request
    assert out.text != greedy.text  # a sampler that is greedy by mistake fails here


def test_top_p_keeps_only_the_nucleus():
    """p = [.5, .3, .15, .05], top_p = .7: only tokens 0 and 1 can come out, at 5:3."""
    from lorakit.serve.sampling import sample

    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    generator = torch.Generator().manual_seed(0)
    draws = [sample(logits, Sampling(temperature=1.0, top_p=0.7), generator) for _ in range(4000)]
    counts = [draws.count(t) for t in range(4)]
    assert counts[2] == counts[3] == 0
    assert counts[0] / 4000 == pytest.approx(0.5 / 0.8, abs=0.03)
    everything = [sample(logits, Sampling(temperature=1.0), generator) for _ in range(4000)]
    assert everything.count(3) > 0  # without top-p the tail is reachable


def test_stop_strings_cut(model_dirs, adapters_dir):
    with make_engine(model_dirs, adapters_dir) as engine:
        greedy = engine.generate([PROMPTS["a"]], "a", max_tokens=12)[0].text
        stop_word = greedy.split()[2]
        stopped = engine.generate([PROMPTS["a"]], "a", max_tokens=12, stop=(stop_word,))[0]
    assert stopped.finish_reason == "stop" and stop_word not in stopped.text
    assert stopped.text == greedy[: greedy.index(stop_word)]


# -- the registry ----------------------------------------------------------------------------
def test_lru_eviction_and_reload_on_demand(model_dirs, adapters_dir):
    engine = make_engine(model_dirs, adapters_dir, max_adapters=1)
    engine.events = recorder = Recorder()
    with engine:
        assert len(engine.loaded_names()) == 1 and len(engine.adapters()) == 3  # all validated, one kept
        first = engine.generate([PROMPTS["a"]], "a", max_tokens=8)[0].text
        assert engine.loaded_names() == ["a"]
        engine.generate([PROMPTS["b"]], "b", max_tokens=8)
        assert engine.loaded_names() == ["b"] and recorder.evicted[-1] == "a"
        again = engine.generate([PROMPTS["a"]], "a", max_tokens=8)[0].text
        assert engine.loaded_names() == ["a"] and recorder.evicted[-1] == "b"
        assert len(lorakit.adapter_names(engine.model)) == 1  # evicted weights left the model
    assert first == again == reference(model_dirs["llama"], adapters_dir / "a", PROMPTS["a"], 8)


def test_unload_and_replace_wait_for_the_request_in_flight(model_dirs, adapters_dir, tmp_path):
    """Called from inside a running request's step: the request keeps its version of the
    adapter to the end; the model drops that version only afterwards."""
    spare = make_adapter(model_dirs["llama"], adapters_dir / "spare" / "x", seed=9, r=4)
    ref = functools.partial(reference, model_dirs["llama"])
    with make_engine(model_dirs, adapters_dir) as engine:
        seen = {}

        def act(event, action):
            if event.delta and "during" not in seen:
                action()
                seen["during"] = set(lorakit.adapter_names(engine.model))
            if event.final:
                seen["final"] = event

        def run(name, action):
            seen.clear()
            (job,) = engine.generation_jobs([engine.encode_prompt(PROMPTS["a"])], name, Sampling(max_tokens=30))
            engine.submit([job], lambda e: act(e, action))
            while "final" not in seen:
                time.sleep(0.01)
            return seen["final"]

        before = set(lorakit.adapter_names(engine.model))
        replaced = run("a", lambda: engine.load("a", "spare/x"))
        assert replaced.text == ref(adapters_dir / "a", PROMPTS["a"], 30)  # old weights to the end
        assert len(seen["during"]) == len(before) + 1  # both versions meanwhile
        assert len(lorakit.adapter_names(engine.model)) == len(before)  # the old one left after
        assert engine.generate([PROMPTS["a"]], "a", max_tokens=30)[0].text == ref(spare, PROMPTS["a"], 30)

        unloaded = run("b", lambda: engine.unload("b"))
        assert unloaded.completion_tokens > 1
        assert unloaded.text == ref(adapters_dir / "b", PROMPTS["a"], 30)
        assert len(seen["during"]) == len(before)  # still held while running
        assert len(lorakit.adapter_names(engine.model)) == len(before) - 1
        with pytest.raises(UnknownAdapter):
            engine.generate([PROMPTS["a"]], "b", max_tokens=2)


def test_scan_loads_new_reloads_changed_and_drops_removed(model_dirs, adapters_dir):
    with make_engine(model_dirs, adapters_dir) as engine:
        make_adapter(model_dirs["llama"], adapters_dir / "d", seed=4, r=4)
        assert engine.scan()["loaded"] == ["d"]
        before = engine.generate([PROMPTS[None]], "d", max_tokens=8)[0].text
        make_adapter(model_dirs["llama"], adapters_dir / "d", seed=5, r=2)  # rewritten in place
        assert engine.scan()["replaced"] == ["d"]
        after = engine.generate([PROMPTS[None]], "d", max_tokens=8)[0].text
        assert before != after == reference(model_dirs["llama"], adapters_dir / "d", PROMPTS[None], 8)
        shutil.rmtree(adapters_dir / "d")
        assert engine.scan()["removed"] == ["d"] and "d" not in engine.model_names()
        engine.unload("a")  # an admin unload sticks until the files change
        assert engine.scan()["loaded"] == [] and "a" not in engine.model_names()


def test_adapters_that_do_not_fit_are_refused(model_dirs, adapters_dir, tmp_path):
    import transformers as tf

    torch.manual_seed(0)
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
    lorakit.inject(wider, lorakit.LoraConfig(r=4))
    lorakit.save_adapter(wider, adapters_dir / "wide")
    make_adapter(model_dirs["bert"], adapters_dir / "bert", seed=1, task="classification", labels=["neg", "pos"], r=4)
    with make_engine(model_dirs, adapters_dir) as engine:
        assert "wide" not in engine.model_names() and "bert" not in engine.model_names()  # skipped at start
        with pytest.raises(AdapterRefused, match="shape") as shape:
            engine.load("wide", "wide")
        with pytest.raises(AdapterRefused, match="classification"):
            engine.load("bert", "bert")
        with pytest.raises(Forbidden):
            engine.load("escape", tmp_path)  # outside the adapters dir
        assert shape.value.status == 422 and engine.generate(["a b"], "a", max_tokens=2)  # still serving


def test_names_limits_and_timeouts(model_dirs, adapters_dir):
    for bad in ["", "..", "a/b", "../x", "x" * 129, "sp ace"]:
        with pytest.raises(EngineError, match="invalid adapter name"):
            check_name(bad)
    assert check_name("my.adapter-v1_2") == "my.adapter-v1_2"
    with make_engine(model_dirs, adapters_dir, max_tokens=20) as engine:
        with pytest.raises(UnknownAdapter) as unknown:
            engine.resolve("nope")
        assert unknown.value.status == 404 and unknown.value.extra["known"] == ["tiny", "a", "b", "c"]
        with pytest.raises(EngineError, match="cap of 20"):
            engine.generation_jobs([[5, 6]], None, Sampling(max_tokens=21))
        with pytest.raises(EngineError, match="context of 64"):
            engine.generation_jobs([[5] * 60], None, Sampling(max_tokens=10))
        engine.config.request_timeout_s = 0.0
        with pytest.raises(Timeout) as late:
            engine.generate(["a b"], "a", max_tokens=5)
        assert late.value.status == 504


# -- classification, failures, shutdown ---------------------------------------------------------
def test_classify_equals_the_adapter_s_own_softmax(model_dirs, tmp_path):
    """Each text through the named adapter (its own head): label and scores as the model gives them."""
    from lorakit.train.api import load_trained

    root = tmp_path / "cls"
    for name, seed in (("x", 1), ("y", 2)):
        make_adapter(model_dirs["bert"], root / name, seed=seed, task="classification", labels=["neg", "pos"], r=4)
    texts = ["the film was good", "the food was awful", "a b c"]
    engine = Engine.from_pretrained(str(model_dirs["bert"]), root, config=EngineConfig(watch_interval_s=0))
    with engine:
        results = {name: engine.classify(texts, name) for name in ("x", "y")}
    for name in ("x", "y"):
        alone = load_trained(None, root / name)
        enc = alone.tokenizer(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            probs = alone.model(**enc).logits.softmax(-1).tolist()
        for result, p in zip(results[name], probs):
            assert result["scores"] == pytest.approx({"neg": p[0], "pos": p[1]}, abs=1e-5)
            assert result["label"] == ("pos" if p[1] > p[0] else "neg")
    assert results["x"] != results["y"]


def test_a_failing_batch_fails_its_requests_and_the_engine_serves_on(model_dirs, adapters_dir, monkeypatch):
    from lorakit.serve.errors import Internal

    with make_engine(model_dirs, adapters_dir) as engine:
        decode, calls = engine._step.decode, []

        def broken_once(batch):
            calls.append(len(batch.jobs))
            if len(calls) == 1:
                raise RuntimeError("device lost")
            return decode(batch)

        monkeypatch.setattr(engine._step, "decode", broken_once)
        with pytest.raises(Internal, match="generation failed: RuntimeError: device lost") as failed:
            engine.generate([PROMPTS["a"]], "a", max_tokens=6)
        assert failed.value.status == 500
        after = engine.generate([PROMPTS["b"]], "b", max_tokens=6)[0].text
        assert engine.stats()["running"] == 0 and engine.alive
    assert after == reference(model_dirs["llama"], adapters_dir / "b", PROMPTS["b"], 6)


def test_stopping_fails_queued_and_running_requests_with_503(model_dirs, adapters_dir):
    """Stop while one request runs and others wait in the inbox: every one hears a 503, the
    worker ends, nothing is left held."""
    engine = make_engine(model_dirs, adapters_dir).start()
    events: list = []
    started = threading.Event()
    release = threading.Event()
    running = engine.generation_jobs([engine.encode_prompt(PROMPTS["a"])], "a", Sampling(max_tokens=40))

    def emit(event):
        events.append(event)
        started.set()

    engine.submit(running, emit)
    assert started.wait(10)  # the first token is out: it is running
    # Hold the worker between two steps, queue more, then stop.
    holder = threading.Thread(target=engine._call, args=(lambda: release.wait(10),))
    holder.start()
    queued = engine.generation_jobs([engine.encode_prompt(PROMPTS["b"])] * 2, "b", Sampling(max_tokens=5))
    engine.submit(queued, emit)
    stopper = threading.Thread(target=engine.stop)
    stopper.start()
    release.set()
    stopper.join(20)
    holder.join(20)
    assert not engine.alive
    errors = [e.error for e in events if e.error is not None]
    finished = [e for e in events if e.finish_reason is not None]
    assert len(errors) + len(finished) == 3
    assert errors and all(isinstance(e, Busy) and e.status == 503 and "shutting down" in e.message for e in errors)
    assert all(a["in_use"] == 0 for a in engine.adapters())  # every slot released


def test_the_server_s_chat_prompt_is_the_training_prompt(model_dirs, adapters_dir):
    """One chat formatter: a chat request's prompt tokens are exactly those causal-lm training
    puts before the response (template or none)."""
    from lorakit.train.tasks import make_task

    engine = make_engine(model_dirs, adapters_dir)
    task = make_task("causal-lm", engine.tokenizer, 64)
    for template in (
        None,
        "{% for m in messages %}c {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}d {% endif %}",
    ):
        engine.tokenizer.chat_template = template
        encoded = task.encode({"prompt": "the film", "response": "good"})
        prompt = encoded.input_ids[: encoded.labels.index(next(x for x in encoded.labels if x != -100))]
        assert engine.encode_chat([{"role": "user", "content": "the film"}]) == prompt


def test_the_registry_works_without_a_thread(model_dirs, adapters_dir):
    """Load, hold, evict and release directly, as the worker would."""
    from lorakit.serve.jobs import Job
    from lorakit.serve.registry import AdapterRegistry

    model = load_model(str(model_dirs["llama"]), "AutoModelForCausalLM").model
    evicted = []
    events = EngineEvents()
    events.on_evict = evicted.append
    registry = AdapterRegistry(model, "causal-lm", adapters_dir, name="tiny", base_names={"tiny"}, max_adapters=2,
                               events=events)  # fmt: skip
    installs, removals = registry.changes()
    assert [name for name, _, _ in installs] == ["a", "b", "c"] and removals == []
    for name, path, _ in installs[:2]:
        registry.install(name, path, from_dir=True)
    job = Job("a")
    assert registry.acquire(job) and job.slot.holds == 1  # a is held
    registry.install("c", installs[2][1], from_dir=True)  # evicts b (unheld), not a
    assert evicted == ["b"] and registry.loaded_names() == ["a", "c"]
    held_b = Job("b")
    assert registry.acquire(held_b)  # evicts c (unheld), reloads b
    assert evicted == ["b", "c"] and registry.loaded_names() == ["a", "b"]
    assert registry.acquire(Job("c")) is False  # a and b both held: c waits
    registry.release(job)
    registry.release(held_b)
    assert all(a["in_use"] == 0 for a in registry.adapters())
    assert lorakit.adapter_names(model) == [f"slot{i}" for i in (0, 3)]  # a's and b's second slot
    assert registry.resolve("tiny") is None and registry.resolve("a") == "a"


def test_a_quantised_base_serves_what_hf_generates_on_that_base(model_dirs, adapters_dir):
    """`lorakit serve --quantize nf4`: the engine's base is NF4 (bitsandbytes), and greedy text
    equals Hugging Face's generate with the adapter on the same quantised base."""
    pytest.importorskip("bitsandbytes")
    from lorakit.quantize import quantize_base

    model_dir = str(model_dirs["llama"])
    engine = Engine.from_pretrained(model_dir, adapters_dir, quantize="nf4", config=EngineConfig(watch_interval_s=0))
    assert type(engine.model.model.layers[0].mlp.up_proj).__name__ == "NF4Linear"
    names = ["a", None]
    with engine:
        out = engine.generate([PROMPTS[n] for n in names], names, max_tokens=12)
    for event, name in zip(out, names):
        tokenizer = load_tokenizer(model_dir)
        model = load_model(model_dir, "AutoModelForCausalLM").model.eval()
        quantize_base(model, "nf4")
        if name:
            lorakit.load_adapter(model, adapters_dir / name)
        enc = tokenizer(PROMPTS[name], return_tensors="pt")
        ids = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert event.text == tokenizer.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
