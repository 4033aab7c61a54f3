"""Crash safety: SIGKILL at many points (inside checkpoint writes and at random times) never
leaves a broken checkpoint, resume continues from the newest one and ends at the adapter of an
uninterrupted run; an interrupted `merge` or `save_adapter` leaves the old files intact.

The harness is tests/hardening/crash_harness.py (also a script: --points 40)."""

from __future__ import annotations

import os
import random
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.lora.io import CONFIG_NAME, WEIGHTS_NAME
from tests.conftest import tiny

from .crash_harness import (
    HOOK_POINTS,
    KILLED,
    adapter_difference,
    check_checkpoints,
    checkpoint_steps,
    cli,
    leftovers,
    prepare,
    reference_run,
    run_forked,
    run_harness,
    run_subprocess,
    tree_digest,
)

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the harness forks its runs")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return prepare(tmp_path_factory.mktemp("crash-job"))


@pytest.fixture(scope="module")
def reference(job, tmp_path_factory):
    out, _ = reference_run(job, tmp_path_factory.mktemp("crash-ref"))
    return out


def test_training_survives_20_kill_points(tmp_path):
    result = run_harness(tmp_path, points=20, seed=0)
    assert result["failures"] == [], result["failures"]
    assert result["kills"] >= 20
    assert result["hook_kills"] == len(HOOK_POINTS)  # every named point inside a checkpoint write was hit
    assert result["random_kills"] >= 20 - len(HOOK_POINTS)
    assert result["completed_runs"] >= 2  # each campaign ended equal to the uninterrupted run


@pytest.mark.slow
def test_training_survives_60_kill_points(tmp_path):
    result = run_harness(tmp_path, points=60, seed=1)
    assert result["failures"] == [] and result["kills"] >= 60, result


def test_the_checks_catch_a_broken_checkpoint(job, tmp_path):
    """The harness's 'complete and loadable' check is not vacuous: a truncated file fails it."""
    out = tmp_path / "out"
    assert run_forked(cli(job.argv(out, steps=4)), tmp_path / "log") == 0
    assert check_checkpoints(out) == [] and checkpoint_steps(out) == [2, 4]
    broken = out / "checkpoints" / "step-0000004" / "trainable.safetensors"
    broken.write_bytes(broken.read_bytes()[:100])
    assert [p.split(":")[0] for p in check_checkpoints(out)] == ["step-0000004"]


def test_real_cli_process_killed_mid_checkpoint_resumes_to_the_same_adapter(job, reference, tmp_path):
    out = tmp_path / "out"
    # Dies with checkpoint 6 half-written: its parameters saved, its optimizer state not yet.
    assert run_subprocess(job.argv(out), kill_at="checkpoint.params_written:3") == KILLED
    assert checkpoint_steps(out) == [2, 4] and check_checkpoints(out) == []
    assert any(p.name.startswith(".step-0000006") for p in (out / "checkpoints").iterdir())  # the torn one, hidden
    assert run_subprocess(job.argv(out)) == 0
    assert adapter_difference(reference, out) is None
    assert leftovers(out) == []


def scaled_copy(adapter_dir, dest, factor):
    shutil.copytree(adapter_dir, dest)
    tensors = load_file(str(dest / WEIGHTS_NAME))
    save_file({k: v * factor for k, v in tensors.items()}, str(dest / WEIGHTS_NAME), metadata={"format": "pt"})
    return dest


def test_interrupted_merge_leaves_the_old_output_intact(reference, tmp_path):
    import transformers

    v2 = scaled_copy(reference, tmp_path / "v2", 2.0)
    merged, log = tmp_path / "merged", tmp_path / "merge.log"

    def merge(adapter, output=merged, **kill):
        return run_forked(cli(["merge", "--adapter", str(adapter), "--output", str(output)]), log, **kill)

    assert merge(v2, tmp_path / "merged-v2") == 0
    new = tree_digest(tmp_path / "merged-v2")
    assert merge(reference) == 0
    old = tree_digest(merged)
    assert old != new
    for point in ("merge.written", "replace_dir.before_swap"):
        assert merge(v2, kill_at=point) == KILLED
        assert tree_digest(merged) == old, point
    assert merge(v2, kill_at="replace_dir.swapped") == KILLED  # swapped in whole, old one not yet deleted
    assert tree_digest(merged) == new
    assert merge(reference) == 0 and tree_digest(merged) == old
    t0 = time.perf_counter()
    assert merge(v2, tmp_path / "timing") == 0
    wall = time.perf_counter() - t0
    rng = random.Random(0)
    for _ in range(4):  # random times: the output is always one whole version
        merge(v2 if rng.random() < 0.5 else reference, kill_after_s=rng.uniform(0.1, 1.0) * wall)
        assert tree_digest(merged) in (old, new)
    assert merge(v2) == 0 and tree_digest(merged) == new
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]  # leftovers cleared
    transformers.AutoModelForSequenceClassification.from_pretrained(merged)


def test_interrupted_save_adapter_leaves_the_old_file_intact(tmp_path):
    model = lorakit.inject(tiny("bert"), lorakit.LoraConfig(r=4, init_lora_weights=False))
    target, log = tmp_path / "adapter", tmp_path / "save.log"
    lorakit.save_adapter(model, target)
    old = (target / WEIGHTS_NAME).read_bytes()
    config = (target / CONFIG_NAME).read_bytes()
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.lora_B["default"].mul_(-1)
    new = (lorakit.save_adapter(model, tmp_path / "new") / WEIGHTS_NAME).read_bytes()
    assert new != old
    # Killed with the new weights written to a temp file, not yet renamed: the old file stays.
    assert run_forked(lambda: lorakit.save_adapter(model, target), log, kill_at="write.tmp_written:1") == KILLED
    assert (target / WEIGHTS_NAME).read_bytes() == old and (target / CONFIG_NAME).read_bytes() == config
    # Killed between the two files: weights new, config still the (unchanged) old one.
    assert run_forked(lambda: lorakit.save_adapter(model, target), log, kill_at="write.tmp_written:2") == KILLED
    assert (target / WEIGHTS_NAME).read_bytes() == new and (target / CONFIG_NAME).read_bytes() == config

    def flip_forever():  # each save writes the other version
        while True:
            with torch.no_grad():
                for _, layer in lorakit.lora_layers(model):
                    layer.lora_B["default"].mul_(-1)
            lorakit.save_adapter(model, target)

    rng = random.Random(0)
    for _ in range(6):
        assert run_forked(flip_forever, log, kill_after_s=rng.uniform(0.01, 0.3)) == KILLED
        assert (target / WEIGHTS_NAME).read_bytes() in (old, new)
        assert (target / CONFIG_NAME).read_bytes() == config
    lorakit.load_adapter(tiny("bert"), target)  # loadable (finite, complete)
