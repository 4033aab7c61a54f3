"""Load test for `lorakit serve`: mixed-adapter batches vs one adapter at a time.

    python benchmarks/serve_load.py                          # 128 requests per run (a few minutes on 2 cores)
    python benchmarks/serve_load.py --requests 16 --max-tokens 8    # a quick check that it works

For each server mode (mixed: any adapters in one batch; no-mixed: the baseline, one adapter
per batch) and each spread (requests spread round-robin over 1, 8 and 32 adapters), it
starts the real server on a loopback port, fires `--requests` greedy completions from
`--clients` concurrent clients, and records throughput (generated tokens/s, requests/s) and
p50/p99 latency. The base is SmolLM2-135M (`smollm2-135m`); the 32 adapters are random
(r=8 on q,v, B drawn at random so they really differ), made once in a temporary dir.
Both modes produce the same greedy text, so they do the same work.

Everything stays bounded: `--requests` per run, `--time-limit` seconds per run (requests
not started by then are skipped and counted), loopback only. Results go to
benchmarks/results/serve_load.json and .md.

    python benchmarks/serve_load.py --faults --requests 64 --max-tokens 16 --adapters 8

`--faults` runs the same traffic (mixed mode, over every adapter but adapter00) while
adapter00 and the base take faults: clients that hang up after the first streamed chunk, a
malformed request every `--malformed-every`th, adapter00 unloaded while requests for it are
in flight, and a client reading its stream one chunk per half second. It reports how many
requests for the other adapters failed (must be 0), the server's RSS over time, and whether
it still answers at the end; results in benchmarks/results/serve_faults.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn

import lorakit
from lorakit.models import load_model
from lorakit.serve import Engine, EngineConfig
from lorakit.serve.app import Limits, create_app

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = [
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Name three colours.",
    "Explain LoRA in one sentence.",
    "Give me a word that rhymes with cat.",
    "Count from one to five.",
]


def make_adapters(model: str, root: Path, count: int, seed: int = 0) -> None:
    """`count` random adapters (r=8 on q,v) for `model`, each in its own subdirectory."""
    base = load_model(model, "AutoModelForCausalLM").model
    lorakit.inject(base, lorakit.LoraConfig(r=8, lora_alpha=16))
    generator = torch.Generator().manual_seed(seed)
    for i in range(count):
        with torch.no_grad():
            for _, layer in lorakit.lora_layers(base):
                for params in (layer.lora_A, layer.lora_B):
                    p = params["default"]
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
        lorakit.save_adapter(base, root / f"adapter{i:02d}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The real server in a background thread, on a free loopback port."""

    def __init__(self, engine: Engine, clients: int) -> None:
        self.port = free_port()
        app = create_app(engine, Limits(max_concurrent=clients + 8))
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def request_body(name: str, i: int, max_tokens: int, scoring: bool) -> dict:
    """A greedy completion, or (`scoring`) lm-eval's loglikelihood request: the prompt and a
    continuation echoed with their logprobs, one new token."""
    prompt = PROMPTS[i % len(PROMPTS)]
    if scoring:
        prompt += " " + PROMPTS[(i + 1) % len(PROMPTS)]
        return {"model": name, "prompt": prompt, "max_tokens": 1, "echo": True, "logprobs": 1, "temperature": 0}
    return {"model": name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}


async def fire(url: str, names: list[str], clients: int, max_tokens: int, time_limit: float,
               scoring: bool = False) -> dict:  # fmt: skip
    """`clients` workers send the requests (adapter i % len(names)) until done or out of time.
    Scoring requests count the prompt tokens they score as their tokens."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(names)):
        queue.put_nowait(i)
    latencies, tokens, errors = [], 0, 0
    start = time.perf_counter()

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens, errors
        while not queue.empty() and time.perf_counter() - start < time_limit:
            i = queue.get_nowait()
            sent = time.perf_counter()
            response = await http.post("/v1/completions", json=request_body(names[i], i, max_tokens, scoring))
            if response.status_code == 200:
                latencies.append(time.perf_counter() - sent)
                tokens += response.json()["usage"]["prompt_tokens" if scoring else "completion_tokens"]
            else:
                errors += 1

    async with httpx.AsyncClient(base_url=url, timeout=time_limit + 60) as http:
        # Untimed warm-up: the first forward passes of a fresh model pay one-off setup costs.
        await http.post("/v1/completions", json={"model": "base", "prompt": PROMPTS[0], "max_tokens": 2})
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - start
    return {
        "completed": len(latencies),
        "skipped": queue.qsize(),
        "errors": errors,
        "wall_s": wall,
        "completion_tokens": tokens,
        "tokens_per_s": tokens / wall,
        "requests_per_s": len(latencies) / wall,
        "p50_s": _quantile(latencies, 0.50),
        "p99_s": _quantile(latencies, 0.99),
    }


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def run(args: argparse.Namespace, adapters_dir: Path, mixed: bool, spread: int) -> dict:
    config = EngineConfig(
        max_adapters=max(args.adapters),
        max_batch_size=args.max_batch_size,
        mixed=mixed,
        watch_interval_s=0,
        request_timeout_s=args.time_limit + 60,
    )
    engine = Engine.from_pretrained(args.model, adapters_dir, served_name="base", config=config)
    adapters = [f"adapter{i:02d}" for i in range(spread)]
    names = [adapters[i % spread] for i in range(args.requests)]
    with Server(engine, args.clients) as url:
        result = asyncio.run(fire(url, names, args.clients, args.max_tokens, args.time_limit, args.scoring))
    return {"mode": "mixed" if mixed else "no-mixed", "adapters": spread, **result}


def write(results: dict, name: str = "serve_load") -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    c = results["config"]
    setup = (
        f"{c['model']}, {c['requests']} requests per run from {c['clients']} concurrent clients, "
        + (
            "lm-eval's scoring requests (echo, logprobs 1, max_tokens 1; tokens/s: prompt tokens scored)"
            if c.get("scoring")
            else f"max_tokens {c['max_tokens']} (greedy)"
        )
        + f", max batch {c['max_batch_size']}; "
        f"{c['machine']}. Command: `{c['command']}`\n"
    )
    lines = [
        "# lorakit serve load test: mixed-adapter batches vs one adapter at a time\n",
        setup,
        "| adapters | mode | done | tokens/s | requests/s | p50 latency (s) | p99 latency (s) | wall (s) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['adapters']} | {r['mode']} | {r['completed']}/{c['requests']} | {r['tokens_per_s']:.1f} | "
            f"{r['requests_per_s']:.2f} | {_fmt(r['p50_s'])} | {_fmt(r['p99_s'])} | {r['wall_s']:.1f} |"
        )
    if results["speedup"]:
        lines += [
            "",
            "Throughput of mixed over no-mixed (tokens/s): "
            + ", ".join(f"{k} adapter(s): {v:.2f}x" for k, v in results["speedup"].items()),
        ]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


# -- fault injection ----------------------------------------------------------------------------
MALFORMED = [
    b'{"model": "adapter01", "prompt": ',
    b'{"model": "adapter01", "prompt": "a", "max_tokens": "x"}',
    b'{"model": "adapter01", "prompt": "a", "temperature": -1}',
    b"\xff\xfe garbage",
    b'{"model": "no/such", "prompt": "a"}',
]


def rss_mib() -> float:
    """This process's resident memory (the server runs in it, in a thread)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def fault_run(args: argparse.Namespace, adapters_dir: Path) -> dict:
    config = EngineConfig(
        max_adapters=max(max(args.adapters), 2),
        max_batch_size=args.max_batch_size,
        watch_interval_s=0,
        request_timeout_s=args.time_limit + 60,
    )
    engine = Engine.from_pretrained(args.model, adapters_dir, served_name="base", config=config)
    others = [f"adapter{i:02d}" for i in range(1, max(max(args.adapters), 2))]
    with Server(engine, args.clients + 8) as url:
        return asyncio.run(fire_with_faults(url, "adapter00", others, args))


async def fire_with_faults(url: str, faulted: str, others: list[str], args: argparse.Namespace) -> dict:
    """The load test's traffic on `others`, faults on `faulted` and the base, RSS sampled."""
    n = {
        "other_done": 0,
        "other_failed": 0,
        "malformed": 0,
        "malformed_not_4xx": 0,
        "disconnects": 0,
        "slow_streams": 0,
        "unloaded_in_flight": 0,
        "unloaded_in_flight_completed": 0,
    }
    rss: list[tuple[float, float]] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(args.requests):
        queue.put_nowait(i)
    start = time.perf_counter()
    busy = True

    def body(model: str, max_tokens: int, **extra) -> dict:
        return {
            "model": model,
            "prompt": PROMPTS[len(model) % len(PROMPTS)],
            "max_tokens": max_tokens,
            "temperature": 0,
            **extra,
        }

    async def client(http: httpx.AsyncClient) -> None:
        while not queue.empty() and time.perf_counter() - start < args.time_limit:
            i = queue.get_nowait()
            if i % args.malformed_every == args.malformed_every - 1:
                r = await http.post(
                    "/v1/completions",
                    content=MALFORMED[i % len(MALFORMED)],
                    headers={"content-type": "application/json"},
                )
                n["malformed"] += 1
                n["malformed_not_4xx"] += not 400 <= r.status_code < 500
                continue
            try:
                r = await http.post("/v1/completions", json=body(others[i % len(others)], args.max_tokens))
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            n["other_done" if ok else "other_failed"] += 1

    async def disconnecting(http: httpx.AsyncClient) -> None:
        while busy:
            async with http.stream("POST", "/v1/completions", json=body(faulted, 64, stream=True)) as r:
                if r.status_code == 404:  # unloaded: hang up on the base instead
                    await asyncio.sleep(0.05)
                    continue
                await anext(r.aiter_lines())
            n["disconnects"] += 1

    async def slow(http: httpx.AsyncClient) -> None:
        while busy:
            async with http.stream("POST", "/v1/completions", json=body("base", args.max_tokens, stream=True)) as r:
                async for _ in r.aiter_lines():
                    await asyncio.sleep(0.5)
            n["slow_streams"] += 1

    async def unload(http: httpx.AsyncClient) -> None:
        while queue.qsize() > args.requests * 2 // 3:  # a third of the traffic in: unload mid-run
            await asyncio.sleep(0.1)

        async def one() -> bool:
            async with http.stream("POST", "/v1/completions", json=body(faulted, args.max_tokens, stream=True)) as r:
                lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
            return r.status_code == 200 and lines[-1] == "data: [DONE]"

        running = [asyncio.create_task(one()) for _ in range(3)]
        await asyncio.sleep(0.5)
        n["unloaded_in_flight"] = len(running)
        await http.delete(f"/v1/adapters/{faulted}")
        n["unloaded_in_flight_completed"] = sum(await asyncio.gather(*running))

    async def sample(http: httpx.AsyncClient) -> None:
        while busy:
            rss.append((round(time.perf_counter() - start, 1), round(rss_mib(), 1)))
            await asyncio.sleep(0.5)

    async with httpx.AsyncClient(base_url=url, timeout=args.time_limit + 60) as http:
        await http.post("/v1/completions", json={"model": "base", "prompt": PROMPTS[0], "max_tokens": 2})
        start = time.perf_counter()
        background = [asyncio.create_task(f(http)) for f in (disconnecting, slow, sample)]
        await asyncio.gather(unload(http), *(client(http) for _ in range(args.clients)))
        busy = False
        await asyncio.gather(*background)
        health = await http.get("/health")
        answer = await http.post("/v1/completions", json=body(others[0], 4))
    mib = [m for _, m in rss]
    return {
        **n,
        "skipped": queue.qsize(),
        "wall_s": time.perf_counter() - start,
        "rss_start_mib": mib[0],
        "rss_max_mib": max(mib),
        "rss_end_mib": mib[-1],
        "rss_samples": rss,
        "answering_at_end": health.status_code == 200 and answer.status_code == 200,
    }


def write_faults(args: argparse.Namespace, r: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/serve_load.py " + " ".join(sys.argv[1:])
    (RESULTS / "serve_faults.json").write_text(json.dumps({"command": command, **r}, indent=2) + "\n")
    lines = [
        "# lorakit serve under faults\n",
        f"Command: `{command}` ({args.model}, {args.clients} clients).\n",
        "| measure | value |",
        "|---|---:|",
    ]
    for key in (
        "other_done",
        "other_failed",
        "skipped",
        "malformed",
        "malformed_not_4xx",
        "disconnects",
        "slow_streams",
        "unloaded_in_flight",
        "unloaded_in_flight_completed",
        "rss_start_mib",
        "rss_max_mib",
        "rss_end_mib",
        "answering_at_end",
        "wall_s",
    ):
        value = r[key]
        lines.append(f"| {key} | {value:.1f} |" if isinstance(value, float) else f"| {key} | {value} |")
    (RESULTS / "serve_faults.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[2:]))
    print(f"wrote {RESULTS / 'serve_faults.json'} and serve_faults.md")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--requests", type=int, default=128, help="requests per run")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--adapters", default="1,8,32", help="adapter spreads to try, comma-separated")
    parser.add_argument("--modes", default="mixed,no-mixed")
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds per run; later requests are skipped")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (on a CPU shared with other jobs, 1 is often far faster)",
    )
    parser.add_argument("--faults", action="store_true", help="the fault-injection run instead (see the docstring)")
    parser.add_argument(
        "--scoring",
        action="store_true",
        help="lm-eval's loglikelihood requests (echo, logprobs 1, max_tokens 1) instead of completions; results "
        "in serve_scoring.{json,md}, tokens/s counts scored prompt tokens",
    )
    parser.add_argument("--malformed-every", type=int, default=5, help="with --faults: every Nth request is malformed")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.adapters = [int(a) for a in args.adapters.split(",")]
    modes = [m == "mixed" for m in args.modes.split(",")]
    load = os.getloadavg()[0]
    if args.faults:
        with tempfile.TemporaryDirectory(prefix="lorakit-serve-faults-") as tmp:
            make_adapters(args.model, Path(tmp), max(max(args.adapters), 2))
            result = fault_run(args, Path(tmp))
        write_faults(args, result)
        return
    with tempfile.TemporaryDirectory(prefix="lorakit-serve-load-") as tmp:
        make_adapters(args.model, Path(tmp), max(args.adapters))
        runs = []
        for spread in args.adapters:
            for mixed in modes:
                runs.append(run(args, Path(tmp), mixed, spread))
                r = runs[-1]
                print(
                    f"{spread:>3} adapters  {r['mode']:<8}  {r['tokens_per_s']:7.1f} tok/s  "
                    f"p50 {_fmt(r['p50_s'])} s  p99 {_fmt(r['p99_s'])} s  ({r['completed']} done)",
                    flush=True,
                )
    by = {(r["mode"], r["adapters"]): r["tokens_per_s"] for r in runs}
    speedup = {
        str(a): by[("mixed", a)] / by[("no-mixed", a)]
        for a in args.adapters
        if by.get(("no-mixed", a)) and ("mixed", a) in by
    }
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (load average "
        f"{load:.1f} at the start: other jobs share them), {torch.get_num_threads()} torch thread(s), "
        f"torch {torch.__version__}"
    )
    config = {
        **{k: v for k, v in vars(args).items()},
        "machine": machine,
        "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]),
    }
    name = "serve_scoring" if args.scoring else "serve_load"
    write({"config": config, "runs": runs, "speedup": speedup}, name)
    print(f"wrote {RESULTS / name}.json and .md")


if __name__ == "__main__":
    main()
