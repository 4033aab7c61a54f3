"""The built-in callbacks, driven by a fake run: no trainer, no model."""

from __future__ import annotations

import io
import json
import sys

import pytest

from lorakit.train.callbacks import (
    JsonlLogger,
    ProgressBar,
    ReportWriter,
    TensorBoardLogger,
    default_callbacks,
    ema,
    plot_curves,
    read_metrics,
    write_report,
)
from lorakit.train.state import TrainState

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
INFO = {
    "model": "tiny-gpt2",
    "task": "sst2",
    "method": "lora r=8",
    "trainable_params": 1234,
    "total_params": 123400,
    "trainable_percent": 1.0,
    "train_examples": 800,
    "eval_examples": 200,
    "max_steps": 20,
    "output_dir": "out",
    "config": {"lr": 1e-3, "r": 8},
}


def fake_run(callbacks, steps=range(1, 21), eval_every=5, state=None) -> TrainState:
    """Drive `callbacks` like the trainer would: begin, a log per step, evals, end."""
    state = state or TrainState(max_steps=20)
    for cb in callbacks:
        cb.on_train_begin(state, INFO)
    for step in steps:
        state.step = step
        log = {
            "step": step,
            "epoch": 0,
            "loss": 2.0 / step,
            "lr": 1e-3,
            "grad_norm": 1.0,
            "tokens_per_s": 5000.0,
            "examples_per_s": 50.0,
            "elapsed_s": 0.1 * step,
        }
        state.history.append(log)
        for cb in callbacks:
            cb.on_log(state, log)
        if step % eval_every == 0:
            ev = {"step": step, "eval_loss": 1.0 / step, "eval_accuracy": 50.0 + step, "eval_perplexity": 3.0}
            state.history.append(ev)
            for cb in callbacks:
                cb.on_evaluate(state, ev)
    return state


def summary(**over) -> dict:
    return {
        "best_metric": 70.0,
        "best_step": 20,
        "metric_name": "accuracy",
        "steps": 20,
        "final_eval": {"eval_loss": 0.05, "eval_accuracy": 70.0},
        "baseline_eval": {"eval_loss": 0.69, "eval_accuracy": 48.5},
        "train_runtime_s": 125.0,
        "tokens_per_s": 5000.0,
        "adapter_dir": "out/adapter",
        "interrupted": False,
        "truncated": 3,
        **over,
    }


# ---------------------------------------------------------------- JSONL


def test_jsonl_has_exactly_the_records(tmp_path):
    state = fake_run([JsonlLogger(tmp_path)])
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == state.history
    assert len(lines) == 20 + 4


def test_jsonl_resume_drops_steps_after_checkpoint(tmp_path):
    fake_run([JsonlLogger(tmp_path)])  # crashed run got to step 20 ...
    resumed = TrainState(step=12, max_steps=20)  # ... but the checkpoint is at step 12
    fake_run([JsonlLogger(tmp_path)], steps=range(13, 21), state=resumed)
    records = read_metrics(tmp_path / "metrics.jsonl")
    log_steps = [r["step"] for r in records if "loss" in r]
    eval_steps = [r["step"] for r in records if "eval_loss" in r]
    assert log_steps == list(range(1, 21))
    assert eval_steps == [5, 10, 15, 20]
    assert not list(tmp_path.glob("*.tmp"))  # the atomic rewrite left no temp file


def test_jsonl_fresh_run_starts_a_new_file(tmp_path):
    fake_run([JsonlLogger(tmp_path)])
    fake_run([JsonlLogger(tmp_path)], steps=range(1, 4))
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_jsonl_repairs_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')  # crash mid-write
    logger = JsonlLogger(tmp_path)
    logger.on_train_begin(TrainState(step=1), INFO)
    logger.on_log(TrainState(step=2), {"step": 2, "loss": 0.5})
    assert read_metrics(path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]


# ---------------------------------------------------------------- plot


def test_plot_is_a_png(tmp_path):
    fake_run([JsonlLogger(tmp_path)])
    out = plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    assert out == tmp_path / "curves.png"
    data = out.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 10_000


def test_plot_train_loss_only(tmp_path):
    fake_run([JsonlLogger(tmp_path)], eval_every=10**9)
    assert plot_curves(tmp_path / "metrics.jsonl", tmp_path / "c.png").read_bytes().startswith(PNG_SIGNATURE)


def test_plot_nothing_to_plot(tmp_path):
    assert plot_curves(tmp_path / "missing.jsonl", tmp_path / "c.png") is None
    (tmp_path / "empty.jsonl").write_text("")
    assert plot_curves(tmp_path / "empty.jsonl", tmp_path / "c.png") is None
    assert not (tmp_path / "c.png").exists()


def test_ema():
    assert ema([], 0.9) == []
    assert ema([4.0, 4.0], 0.9) == [4.0, 4.0]  # no bias toward 0 at the start
    assert ema([0.0, 10.0], 0.75) == [0.0, 2.5]


# ---------------------------------------------------------------- report


def metric_row(text: str, name: str) -> list[str]:
    row = next(line for line in text.splitlines() if line.startswith(f"| {name}"))
    return [cell.strip() for cell in row.strip("|").split("|")]


def test_report_before_after_and_delta(tmp_path):
    s = summary()
    out = write_report(tmp_path / "report.md", INFO, s, [])
    text = out.read_text()
    _, before, after, delta = metric_row(text, "accuracy")
    assert (float(before), float(after)) == (48.5, 70.0)
    assert float(delta) == pytest.approx(70.0 - 48.5)
    _, before, after, delta = metric_row(text, "loss")
    assert float(delta) == pytest.approx(0.05 - 0.69)
    for expected in (
        "`tiny-gpt2`",
        "sst2",
        "lora r=8",
        "1,234 of 123,400 (1%)",
        "800 train / 200 eval",
        "20 of 20",
        "2m 05s",
        "5,000 tokens/s",
        "| Truncated training sequences | 3 |",
        "`out/adapter`",
        "at step 20",
    ):
        assert expected in text, expected
    assert "![curves]" not in text  # no PNG next to it


def test_report_without_baseline_uses_history_and_links_plot(tmp_path):
    (tmp_path / "curves.png").write_bytes(PNG_SIGNATURE)
    history = [{"step": 0, "eval_accuracy": 40.0}, {"step": 5, "loss": 1.0}, {"step": 10, "eval_accuracy": 65.0}]
    s = summary(final_eval=None, baseline_eval=None, interrupted=True)
    text = write_report(tmp_path / "report.md", INFO, s, history).read_text()
    assert metric_row(text, "accuracy")[1:] == ["40", "65", "+25"]
    assert "(interrupted)" in text
    assert "![curves](curves.png)" in text


def test_report_writer_end_to_end(tmp_path):
    callbacks = [JsonlLogger(tmp_path), ReportWriter(tmp_path)]
    state = fake_run(callbacks)
    for cb in callbacks:
        cb.on_train_end(state, summary())
    text = (tmp_path / "report.md").read_text()
    assert "`tiny-gpt2`" in text  # the info kept from on_train_begin
    assert "![curves](curves.png)" in text
    assert (tmp_path / "curves.png").read_bytes().startswith(PNG_SIGNATURE)


# ---------------------------------------------------------------- progress bar


def test_progress_bar_disabled_is_silent(capsys):
    bar = ProgressBar(disable=True)
    state = fake_run([bar])
    bar.on_train_end(state, summary())
    assert bar.bar is None
    assert capsys.readouterr() == ("", "")


def test_progress_bar_resumes_at_state_step():
    out = io.StringIO()
    bar = ProgressBar(disable=False, file=out)
    state = TrainState(step=12, max_steps=20)
    bar.on_train_begin(state, INFO)
    assert bar.bar.n == 12 and bar.bar.total == 20
    state.step = 13
    bar.on_log(state, {"step": 13, "loss": 0.5, "lr": 1e-3, "tokens_per_s": 5100.0})
    assert bar.bar.n == 13
    bar.on_evaluate(state, {"step": 13, "eval_accuracy": 87.25})
    bar.on_train_end(state, summary())
    text = out.getvalue()
    assert "13/20" in text
    assert "loss=0.5000" in text and "tok/s=5.1k" in text
    assert "eval @ step 13: accuracy=87.25" in text


def test_progress_bar_smooths_loss():
    bar = ProgressBar(disable=True, smoothing=0.5)
    fake_run([bar], steps=range(1, 3))  # losses 2.0, 1.0
    assert bar.loss == pytest.approx(1.5)


# ---------------------------------------------------------------- TensorBoard, wiring


def test_tensorboard_writes_the_logged_scalars(tmp_path):
    """Read the event file back with TensorBoard's own reader: every step's loss, the evals."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TensorBoardLogger(tmp_path)
    state = fake_run([tb], steps=range(1, 6))
    tb.on_train_end(state, summary())
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(step, pytest.approx(2.0 / step)) for step in range(1, 6)]
    assert [(e.step, e.value) for e in events.Scalars("eval/accuracy")] == [(5, 55.0)]


def test_tensorboard_missing_is_a_noop(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    tb = TensorBoardLogger(tmp_path)
    assert not tb.available
    state = fake_run([tb], steps=range(1, 6))
    tb.on_train_end(state, summary())
    assert not list(tmp_path.iterdir())


def test_default_callbacks(tmp_path):
    kinds = [type(cb) for cb in default_callbacks(tmp_path)]
    assert kinds == [ProgressBar, JsonlLogger, TensorBoardLogger, ReportWriter]
    assert ProgressBar not in [type(cb) for cb in default_callbacks(tmp_path, progress=False)]
