"""The GPU paths, run where CUDA is (the device check) and skipped elsewhere: a whole run
with --device cuda against the same run on the CPU, packed attention with SDPA on CUDA, and
mixed-adapter batches on CUDA. (Resume with the GPU's own RNG is test_trainer.py's cuda case.)"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.train import TrainConfig, train
from lorakit.train.packing import use_packed_attention
from lorakit.train.tasks import make_task

from .conftest import MODEL_FOR_TASK
from .test_fast_paths import ROWS, tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_a_cuda_run_gives_the_cpu_run_s_adapter(task, model_dirs, data_files, tmp_path):
    runs = {}
    for device in ("cpu", "cuda"):
        train_file, dev_file = data_files[task]
        config = TrainConfig(model=str(model_dirs[MODEL_FOR_TASK[task]]), task=task, data=str(train_file),
                             eval_data=str(dev_file), output=str(tmp_path / device), batch_size=8, lr=1e-2,
                             max_steps=8, rank=4, max_length=32, device=device)  # fmt: skip
        result = train(config, callbacks=[])
        runs[device] = ([r["loss"] for r in result.state.history if "loss" in r],
                        load_file(tmp_path / device / "adapter_model.safetensors"))  # fmt: skip
    assert runs["cuda"][0] == pytest.approx(runs["cpu"][0], rel=1e-3)
    for key, tensor in runs["cpu"][1].items():
        torch.testing.assert_close(runs["cuda"][1][key], tensor, rtol=1e-3, atol=1e-4)


def test_packed_sdpa_on_cuda_has_the_padded_batch_s_loss_and_gradients(tmp_path):
    model, tok = tiny(tmp_path, "llama")
    model.set_attn_implementation("sdpa")
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.cuda()
    task = make_task("causal-lm", tok, 32)
    encoded = task.encode_all(ROWS)

    def loss_and_grads(batch):
        model.zero_grad()
        batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        loss = task.loss_sum(model(**task.model_inputs(batch, model)), batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    padded_loss, padded_grads = loss_and_grads(task.collate(encoded))
    use_packed_attention(model, True)
    packed = task.collate(encoded, packed=True)
    assert packed["input_ids"].shape[0] == 1
    packed_loss, packed_grads = loss_and_grads(packed)
    use_packed_attention(model, False)
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-4, atol=1e-4)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-3, atol=1e-5, msg=name)


def test_mixed_batch_on_cuda_equals_one_adapter_at_a_time(tmp_path):
    model, tok = tiny(tmp_path, "llama")
    for i, name in enumerate(("a", "b", "c")):
        torch.manual_seed(i)
        lorakit.inject(model, lorakit.LoraConfig(r=2 + i, init_lora_weights=False), adapter_name=name)
    model.cuda().eval()
    ids = torch.randint(5, 30, (4, 7), device="cuda")
    names = ["b", None, "a", "c"]
    with torch.no_grad(), lorakit.mixed_batch(model, names):
        mixed = model(input_ids=ids).logits
    for row, name in enumerate(names):
        with torch.no_grad():
            if name is None:
                with lorakit.disable_adapters(model):
                    alone = model(input_ids=ids[row : row + 1]).logits
            else:
                lorakit.set_adapter(model, name)
                alone = model(input_ids=ids[row : row + 1]).logits
        torch.testing.assert_close(mixed[row : row + 1], alone, rtol=1e-4, atol=1e-5)
