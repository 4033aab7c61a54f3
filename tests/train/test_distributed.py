"""Two processes with gloo on CPU (torchrun): the same loss curve and adapter as one process
with the same global batch, for DDP and FSDP; a dead rank stops the job; resume works with
another number of processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.train import TrainConfig, train

from .conftest import MODEL_FOR_TASK


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def options(model_dirs, data_files, task, out: Path, **kw) -> dict:
    train_file, dev_file = data_files[task]
    base = dict(
        model=str(model_dirs[MODEL_FOR_TASK[task]]),
        task=task,
        data=str(train_file),
        eval_data=str(dev_file),
        output=str(out),
        batch_size=8,
        grad_accum=2,
        lr=1e-2,
        max_steps=8,
        rank=4,
        eval_every=4,
        max_length=32,
        warmup_ratio=0.0,
    )
    return {**base, **kw}


def torchrun(opts: dict, nproc: int = 2, wait: bool = True, **extra) -> subprocess.Popen | subprocess.CompletedProcess:
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        "-m",
        "lorakit",
        "train",
        "--quiet",
    ]
    for key, value in {**opts, **extra}.items():
        if value is True:
            args.append(f"--{key.replace('_', '-')}")
        elif value is not None:
            args += [f"--{key.replace('_', '-')}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORAKIT_DIST_TIMEOUT": "60"}
    if not wait:
        return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=240)


def curve(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def evals(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval_loss" in r]


def assert_same_adapter(a: Path, b: Path, bf16: bool = False) -> None:
    left, right = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert left.keys() == right.keys() and left
    for key in left:
        if bf16:  # rounding differs per element, and Adam's normalised steps amplify it on
            assert (left[key] - right[key]).norm() <= 0.15 * right[key].norm(), key  # near-zero gradients
        else:
            torch.testing.assert_close(left[key], right[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "strategy,task,bf16,quantize",
    [
        ("ddp", "classification", False, None),
        ("fsdp", "classification", False, None),
        ("ddp", "causal-lm", False, None),
        ("fsdp", "causal-lm", True, None),
        ("ddp", "causal-lm", False, "nf4"),  # QLoRA: each rank quantises the same blocks
    ],
)
def test_two_processes_equal_one(strategy, task, bf16, quantize, model_dirs, data_files, tmp_path):
    from lorakit.train.callbacks import default_callbacks

    if quantize:
        pytest.importorskip("bitsandbytes")
    flags = {"bf16": True} if bf16 else {}
    flags |= {"quantize": quantize, "targets": "all-linear"} if quantize else {}
    single = options(model_dirs, data_files, task, tmp_path / "single", **flags)
    train(TrainConfig(**single), callbacks=default_callbacks(tmp_path / "single" / "logs", progress=False))
    run = torchrun(options(model_dirs, data_files, task, tmp_path / "multi", **flags), distributed=strategy)
    assert run.returncode == 0, run.stderr[-3000:]
    rel = 1e-2 if bf16 else 1e-4  # bf16 rounds each rank's half-batch differently from the whole batch
    assert curve(tmp_path / "multi") == pytest.approx(curve(tmp_path / "single"), rel=rel)
    for a, b in zip(evals(tmp_path / "multi"), evals(tmp_path / "single")):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=rel)
    assert_same_adapter(tmp_path / "multi", tmp_path / "single", bf16)
    checkpoint = max((tmp_path / "multi" / "checkpoints").iterdir())
    assert load_file(checkpoint / "adapter" / "adapter_model.safetensors")  # written once, never empty


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_a_dead_rank_stops_the_job_and_resume_works(model_dirs, data_files, tmp_path):
    out = tmp_path / "job"
    opts = options(
        model_dirs,
        data_files,
        "classification",
        out,
        max_steps=400,
        eval_every=None,
        save_every=2,
        batch_size=4,
        grad_accum=1,
    )
    job = torchrun(opts, wait=False)
    deadline = time.time() + 120
    while not list((out / "checkpoints").glob("step-*")) and time.time() < deadline:
        time.sleep(0.5)
    assert job.poll() is None, job.stderr.read()[-2000:]
    workers = children(job.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    _, stderr = job.communicate(timeout=120)  # a hang guard: the job must end, not merely slowly
    assert job.returncode != 0
    assert "Signals.SIGKILL" in stderr or "exitcode" in stderr
    done = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    # Resume with one process instead of two: the checkpoint holds whole tensors.
    resumed = train(TrainConfig(**{**opts, "max_steps": done + 4, "resume": True}), callbacks=[])
    assert resumed.state.step == done + 4 and not resumed.summary["interrupted"]


def test_nproc_shortcut_launches_torchrun(model_dirs, data_files, tmp_path):
    opts = options(model_dirs, data_files, "classification", tmp_path / "np", max_steps=2, eval_every=None)
    args = [sys.executable, "-m", "lorakit", "train", "--nproc", "2", "--quiet"]
    for key, value in opts.items():
        if value is not None:
            args += [f"--{key.replace('_', '-')}", str(value)]
    run = subprocess.run(args, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "torch.distributed.run" in run.stderr and "--nproc_per_node=2" in run.stderr
    assert "all-reduced per step" in run.stdout
    assert (tmp_path / "np" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_resume_equals_an_uninterrupted_run(strategy, model_dirs, data_files, tmp_path):
    """Two processes train 4 steps and stop; two processes resume to 8. Same adapter as one
    uninterrupted process (a constant learning rate, so the schedule does not depend on
    where the first run was told to stop)."""
    kw = dict(max_steps=8, save_every=2, eval_every=None, scheduler="constant")
    train(TrainConfig(**options(model_dirs, data_files, "classification", tmp_path / "single", **kw)), callbacks=[])
    multi = tmp_path / "multi"
    first = torchrun(options(model_dirs, data_files, "classification", multi, **{**kw, "max_steps": 4}),
                     distributed=strategy)  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = torchrun(options(model_dirs, data_files, "classification", multi, resume=True, **kw),
                       distributed=strategy)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # The step-8 checkpoints (the output dir keeps the best adapter by eval, and the stopped
    # run evaluated at its step 4, which the uninterrupted run never did).
    step8 = Path("checkpoints") / "step-0000008" / "adapter"
    assert_same_adapter(multi / step8, tmp_path / "single" / step8)


def test_uneven_eval_shards_score_as_one_process(model_dirs, data_files, tmp_path):
    """15 eval sentences over 2 ranks: one rank pads its shard; the gathered tags come back in
    order, so entity F1 and loss equal the single process's."""
    from lorakit.train.callbacks import default_callbacks

    kw = dict(max_steps=2, eval_every=None, max_eval_examples=15)
    single = tmp_path / "single"
    train(TrainConfig(**options(model_dirs, data_files, "ner", single, **kw)),
          callbacks=default_callbacks(single / "logs", progress=False))  # fmt: skip
    run = torchrun(options(model_dirs, data_files, "ner", tmp_path / "multi", **kw))
    assert run.returncode == 0, run.stderr[-3000:]
    (multi,), (single,) = evals(tmp_path / "multi")[-1:], evals(tmp_path / "single")[-1:]
    assert multi["eval_f1"] == pytest.approx(single["eval_f1"]) and multi["eval_precision"] == single["eval_precision"]
    assert multi["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-4)


def test_fsdp_saves_a_root_level_adapter_after_an_evaluation(model_dirs, data_files, tmp_path):
    """A LoRA on the pooler lives in FSDP's root unit, which stays gathered after a forward; the
    best-so-far save after an evaluation crashed the process group until units were resharded."""
    out = tmp_path / "pooler"
    opts = options(model_dirs, data_files, "classification", out, targets="query,value,pooler.dense", eval_every=2,
                   max_steps=4)  # fmt: skip
    done = torchrun(opts, distributed="fsdp")
    assert done.returncode == 0, done.stderr[-3000:]
    from safetensors.torch import load_file

    keys = load_file(out / "adapter_model.safetensors")
    assert any("pooler.dense.lora_A" in k for k in keys) and any("query.lora_B" in k for k in keys)
