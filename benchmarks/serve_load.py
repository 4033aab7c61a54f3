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
PROMPTS = ["Write a haiku about the sea.", "What is the capital of France?", "Name three colours.",
           "Explain LoRA in one sentence.", "Give me a word that rhymes with cat.", "Count from one to five."]


def make_adapters(model: str, root: Path, count: int, seed: int = 0) -> None:
    """`count` random adapters (r=8 on q,v) for `model`, each in its own subdirectory."""
    base = load_model(model, "causal-lm").model
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


async def fire(url: str, names: list[str], clients: int, max_tokens: int, time_limit: float) -> dict:
    """`clients` workers send the requests (adapter i % len(names)) until done or out of time."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(names)):
        queue.put_nowait(i)
    latencies, tokens, errors = [], 0, 0
    start = time.perf_counter()

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens, errors
        while not queue.empty() and time.perf_counter() - start < time_limit:
            i = queue.get_nowait()
            body = {"model": names[i], "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                    "temperature": 0}
            sent = time.perf_counter()
            response = await http.post("/v1/completions", json=body)
            if response.status_code == 200:
                latencies.append(time.perf_counter() - sent)
                tokens += response.json()["usage"]["completion_tokens"]
            else:
                errors += 1

    async with httpx.AsyncClient(base_url=url, timeout=time_limit + 60) as http:
        # Untimed warm-up: the first forward passes of a fresh model pay one-off setup costs.
        await http.post("/v1/completions", json={"model": "base", "prompt": PROMPTS[0], "max_tokens": 2})
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
    wall = time.perf_counter() - start
    return {"completed": len(latencies), "skipped": queue.qsize(), "errors": errors, "wall_s": wall,
            "completion_tokens": tokens, "tokens_per_s": tokens / wall, "requests_per_s": len(latencies) / wall,
            "p50_s": _quantile(latencies, 0.50), "p99_s": _quantile(latencies, 0.99)}


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def run(args: argparse.Namespace, adapters_dir: Path, mixed: bool, spread: int) -> dict:
    config = EngineConfig(max_adapters=max(args.adapters), max_batch_size=args.max_batch_size, mixed=mixed,
                          watch_interval_s=0, request_timeout_s=args.time_limit + 60)
    engine = Engine.from_pretrained(args.model, adapters_dir, served_name="base", config=config)
    adapters = [f"adapter{i:02d}" for i in range(spread)]
    names = [adapters[i % spread] for i in range(args.requests)]
    with Server(engine, args.clients) as url:
        result = asyncio.run(fire(url, names, args.clients, args.max_tokens, args.time_limit))
    return {"mode": "mixed" if mixed else "no-mixed", "adapters": spread, **result}


def write(results: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve_load.json").write_text(json.dumps(results, indent=2) + "\n")
    c = results["config"]
    setup = (f"{c['model']}, {c['requests']} requests per run from {c['clients']} concurrent clients, "
             f"max_tokens {c['max_tokens']} (greedy), max batch {c['max_batch_size']}; "
             f"{c['machine']}. Command: `{c['command']}`\n")
    lines = ["# lorakit serve load test: mixed-adapter batches vs one adapter at a time\n", setup,
             "| adapters | mode | done | tokens/s | requests/s | p50 latency (s) | p99 latency (s) | wall (s) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in results["runs"]:
        lines.append(f"| {r['adapters']} | {r['mode']} | {r['completed']}/{c['requests']} | {r['tokens_per_s']:.1f} | "
                     f"{r['requests_per_s']:.2f} | {_fmt(r['p50_s'])} | {_fmt(r['p99_s'])} | {r['wall_s']:.1f} |")
    if results["speedup"]:
        lines += ["", "Throughput of mixed over no-mixed (tokens/s): " +
                  ", ".join(f"{k} adapter(s): {v:.2f}x" for k, v in results["speedup"].items())]
    (RESULTS / "serve_load.md").write_text("\n".join(lines) + "\n")


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
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (on a CPU shared with other jobs, 1 is often far faster)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.adapters = [int(a) for a in args.adapters.split(",")]
    modes = [m == "mixed" for m in args.modes.split(",")]
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="lorakit-serve-load-") as tmp:
        make_adapters(args.model, Path(tmp), max(args.adapters))
        runs = []
        for spread in args.adapters:
            for mixed in modes:
                runs.append(run(args, Path(tmp), mixed, spread))
                r = runs[-1]
                print(f"{spread:>3} adapters  {r['mode']:<8}  {r['tokens_per_s']:7.1f} tok/s  "
                      f"p50 {_fmt(r['p50_s'])} s  p99 {_fmt(r['p99_s'])} s  ({r['completed']} done)", flush=True)
    by = {(r["mode"], r["adapters"]): r["tokens_per_s"] for r in runs}
    speedup = {str(a): by[("mixed", a)] / by[("no-mixed", a)] for a in args.adapters
               if by.get(("no-mixed", a)) and ("mixed", a) in by}
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (load average "
               f"{load:.1f} at the start: other jobs share them), {torch.get_num_threads()} torch thread(s), "
               f"torch {torch.__version__}")
    config = {**{k: v for k, v in vars(args).items()}, "machine": machine,
              "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:])}
    write({"config": config, "runs": runs, "speedup": speedup})
    print(f"wrote {RESULTS / 'serve_load.json'} and serve_load.md")


if __name__ == "__main__":
    main()
