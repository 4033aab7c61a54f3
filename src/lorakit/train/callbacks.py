"""Built-in training callbacks: a progress bar, JSONL and TensorBoard logs, a plot and a report.

Everything a run leaves behind in its log directory comes from here:

    metrics.jsonl   every log and eval record, one JSON object a line (`JsonlLogger`)
    events.*        TensorBoard scalars, if `tensorboard` is installed (`TensorBoardLogger`)
    curves.png      loss and eval metrics vs step (`plot_curves`)
    report.md       what was trained, how long it took, and the scores before and after (`write_report`)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, TextIO

from tqdm.auto import tqdm

from lorakit._fs import atomic_path, atomic_write_text
from lorakit.train.state import BaseCallback, TrainState

__all__ = [
    "JsonlLogger",
    "ProgressBar",
    "ReportWriter",
    "TensorBoardLogger",
    "default_callbacks",
    "ema",
    "plot_curves",
    "read_metrics",
    "write_report",
]

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "curves.png"
REPORT_FILE = "report.md"
# Eval metrics that are not percentages; everything else eval_* is 0-100.
_RATIO_METRICS = {"loss", "perplexity"}


# ---------------------------------------------------------------- progress bar


class ProgressBar(BaseCallback):
    """A tqdm bar over the optimizer steps with smoothed loss, learning rate and tokens/s.

    `disable=None` lets tqdm hide the bar when the output is not a terminal; eval lines are
    still printed then, so batch-job logs show progress. `disable=True` is fully silent.
    """

    def __init__(self, disable: bool | None = None, file: TextIO | None = None, smoothing: float = 0.9):
        self.disable = disable
        self.file = file
        self.smoothing = smoothing
        self.bar: tqdm | None = None
        self.loss: float | None = None  # EMA of the training loss: raw per-step loss is too jumpy to read

    def on_train_begin(self, state: TrainState, info: dict[str, Any]) -> None:
        total = state.max_steps or info.get("max_steps") or None
        # `initial` makes a resumed run start at its step and keeps tqdm's rate (and ETA) honest.
        self.bar = tqdm(
            total=total,
            initial=state.step,
            unit="step",
            desc="train",
            dynamic_ncols=True,
            disable=self.disable,
            file=self.file,
        )
        self.loss = None

    def on_log(self, state: TrainState, record: dict[str, Any]) -> None:
        if self.bar is None:
            return
        if (loss := record.get("loss")) is not None:
            self.loss = loss if self.loss is None else self.smoothing * self.loss + (1 - self.smoothing) * loss
        postfix = {
            "loss": None if self.loss is None else f"{self.loss:.4f}",
            "lr": _sci(record.get("lr")),
            "tok/s": _si(record.get("tokens_per_s")),
        }
        self.bar.set_postfix({k: v for k, v in postfix.items() if v is not None}, refresh=False)
        # Advance to the record's step rather than by 1, so sparse logging still lands right.
        self.bar.update(max(0, record.get("step", state.step) - self.bar.n))

    def on_evaluate(self, state: TrainState, record: dict[str, Any]) -> None:
        if self.disable is True:
            return
        scores = "  ".join(
            f"{k.removeprefix('eval_')}={_num(v)}"
            for k, v in record.items()
            if k.startswith("eval_") and isinstance(v, (int, float))
        )
        tqdm.write(f"eval @ step {record.get('step', state.step)}: {scores}", file=self.file)

    def on_train_end(self, state: TrainState, summary: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# ---------------------------------------------------------------- JSONL


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file ([] if missing); a torn line from a crash is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in records if isinstance(r, dict)]


class JsonlLogger(BaseCallback):
    """Appends every log and eval record to `<log_dir>/metrics.jsonl`, one flushed line each.

    At train begin the file is rewritten (atomically) to the records up to the state's step:
    a resumed run drops what was logged after its checkpoint, so no step appears twice, and
    a fresh run (step 0) starts an empty file.
    """

    def __init__(self, log_dir: str | Path):
        self.path = Path(log_dir) / METRICS_FILE

    def on_train_begin(self, state: TrainState, info: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            return
        keep = [r for r in read_metrics(self.path) if state.step and r.get("step", 0) <= state.step]
        # Always rewrite, even if nothing was dropped: a torn last line (no newline) would
        # otherwise swallow the next appended record.
        atomic_write_text(self.path, "".join(_json_line(r) for r in keep))

    def on_log(self, state: TrainState, record: dict[str, Any]) -> None:
        self._append(record)

    def on_evaluate(self, state: TrainState, record: dict[str, Any]) -> None:
        self._append(record)

    def _append(self, record: dict[str, Any]) -> None:
        # Open per record: nothing to leak if training dies, and the line is on disk at once.
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(_json_line(record))
            f.flush()


def _json_line(record: dict[str, Any]) -> str:
    # Tensors and numpy scalars sneak into records; `.item()` makes them plain numbers.
    return json.dumps(record, default=lambda o: o.item() if hasattr(o, "item") else str(o)) + "\n"


# ---------------------------------------------------------------- TensorBoard


class TensorBoardLogger(BaseCallback):
    """Writes train/* and eval/* scalars to `log_dir`; a silent no-op without `tensorboard`."""

    def __init__(self, log_dir: str | Path):
        self.log_dir = Path(log_dir)
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self._writer_cls = None
        else:
            self._writer_cls = SummaryWriter

    @property
    def available(self) -> bool:
        return self._writer_cls is not None

    def on_train_begin(self, state: TrainState, info: dict[str, Any]) -> None:
        if not self.available:
            return
        # purge_step hides events a crashed run wrote after the checkpoint we resume from.
        self.writer = self._writer_cls(str(self.log_dir), purge_step=state.step or None)
        if config := info.get("config"):
            text = "```\n" + json.dumps(config, indent=2, default=str) + "\n```"
            self.writer.add_text("config", text, state.step)

    def on_log(self, state: TrainState, record: dict[str, Any]) -> None:
        self._scalars("train/", record, lambda k: True)

    def on_evaluate(self, state: TrainState, record: dict[str, Any]) -> None:
        self._scalars("eval/", record, lambda k: k.startswith("eval_"))

    def on_train_end(self, state: TrainState, summary: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def _scalars(self, prefix: str, record: dict[str, Any], wanted) -> None:
        if self.writer is None:
            return
        step = record.get("step", 0)
        for key, value in record.items():
            if key != "step" and wanted(key) and _is_number(value):
                self.writer.add_scalar(prefix + key.removeprefix("eval_"), value, step)


# ---------------------------------------------------------------- plot


def ema(values: list[float], alpha: float) -> list[float]:
    """Exponential moving average, started at the first value (so it has no bias toward 0)."""
    out: list[float] = []
    for v in values:
        out.append(v if not out else alpha * out[-1] + (1 - alpha) * v)
    return out


def plot_curves(metrics_jsonl: str | Path, out_png: str | Path) -> Path | None:
    """Plot training loss (raw and smoothed) and eval metrics vs step; None if nothing to plot.

    Panel 1: training loss, with eval loss on the same axes for comparison. Panel 2 (if any):
    the percentage metrics, and perplexity on its own right-hand axis since its scale differs.
    """
    records = read_metrics(metrics_jsonl)
    train = [(r["step"], r["loss"]) for r in records if _is_number(r.get("loss")) and "step" in r]
    evals: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for k, v in r.items():
            if k.startswith("eval_") and _is_number(v) and "step" in r:
                evals.setdefault(k.removeprefix("eval_"), []).append((r["step"], v))
    if not train and not evals:
        return None

    # The object API with an explicit Agg canvas: no pyplot global state, no backend switch
    # in the user's process (a notebook keeps its own backend), safe off the main thread.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    others = [k for k in evals if k != "loss"]
    fig = Figure(figsize=(7, 6 if others else 3.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 if others else 1, 1, sharex=True, squeeze=False)[:, 0]

    ax = axes[0]
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="train loss")
        span = max(2, len(losses) // 10)  # smooth more when there are more points
        ax.plot(steps, ema(list(losses), 1 - 2 / (span + 1)), color="tab:blue", label="train loss (EMA)")
    if "loss" in evals:
        ax.plot(*zip(*evals["loss"]), "o-", color="tab:orange", label="eval loss")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)

    if others:
        ax = axes[1]
        lines = [ax.plot(*zip(*evals[k]), "o-", label=f"{k} (%)")[0] for k in others if k not in _RATIO_METRICS]
        if lines:
            ax.set_ylabel("%")
        if "perplexity" in evals:
            pax = ax.twinx() if lines else ax
            lines += pax.plot(*zip(*evals["perplexity"]), "s--", color="tab:gray", label="perplexity")
            pax.set_ylabel("perplexity")
        ax.legend(lines, [ln.get_label() for ln in lines], loc="best")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")

    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=120)  # the temp name ends in .tmp: say the format
    return out_png


# ---------------------------------------------------------------- report


def write_report(
    out_md: str | Path, info: dict[str, Any], summary: dict[str, Any], history: list[dict[str, Any]]
) -> Path:
    """Write a short markdown report of a run; `history` fills in evals the summary lacks."""
    out_md = Path(out_md)
    evals = [r for r in history if any(k.startswith("eval_") for k in r)]
    final = summary.get("final_eval") or (evals[-1] if evals else {})
    # An eval at step 0 is by definition the score before training.
    baseline = summary.get("baseline_eval") or next((r for r in evals if r.get("step") == 0), {})

    lines = ["# LoRA fine-tuning report", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in _overview(info, summary) if value is not None]
    if final or baseline:
        lines += ["", "## Evaluation", "", *_metrics_table(baseline, final)]
    if summary.get("best_metric") is not None:
        lines += [
            "",
            f"Best {summary.get('metric_name', 'metric')}: **{_num(summary['best_metric'])}** "
            f"at step {summary.get('best_step')}.",
        ]
    if (out_md.parent / PLOT_FILE).exists():
        lines += ["", f"![curves]({PLOT_FILE})"]
    if config := info.get("config"):
        lines += [
            "",
            "<details><summary>Configuration</summary>",
            "",
            "```json",
            json.dumps(config, indent=2, sort_keys=True, default=str),
            "```",
            "",
            "</details>",
        ]
    atomic_write_text(out_md, "\n".join(lines) + "\n")
    return out_md


def _overview(info: dict[str, Any], summary: dict[str, Any]) -> list[tuple[str, str | None]]:
    """(label, value) rows of the report's first table; None values are left out."""
    trainable, total = info.get("trainable_params"), info.get("total_params")
    percent = info.get("trainable_percent")
    if percent is None and trainable is not None and total:
        percent = 100 * trainable / total
    params = None
    if trainable is not None:
        params = f"{trainable:,}" + (f" of {total:,}" if total else "")
        params += f" ({percent:.3g}%)" if percent is not None else ""
    data = None
    if info.get("train_examples") is not None:
        data = f"{info['train_examples']:,} train / {info.get('eval_examples') or 0:,} eval examples"
    steps, max_steps = summary.get("steps"), info.get("max_steps")
    if steps is not None:
        steps = f"{steps:,}" + (f" of {max_steps:,}" if max_steps else "")
        steps += " (interrupted)" if summary.get("interrupted") else ""
    runtime, tps = summary.get("train_runtime_s"), summary.get("tokens_per_s")
    return [
        ("Model", _code(info.get("model"))),
        ("Task", info.get("task")),
        ("Method", info.get("method")),
        ("Trainable parameters", params),
        ("Data", data),
        ("Steps", steps),
        ("Runtime", _duration(runtime) if runtime is not None else None),
        ("Throughput", f"{tps:,.0f} tokens/s" if tps is not None else None),
        ("Truncated training sequences", f"{summary.get('truncated', 0):,}"),
        ("Adapter", _code(summary.get("adapter_dir"))),
    ]


def _metrics_table(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Markdown rows: metric | before | after | delta (after - before)."""
    names = [k.removeprefix("eval_") for k in {**after, **before} if k != "step"]
    before = {k.removeprefix("eval_"): v for k, v in before.items()}
    after = {k.removeprefix("eval_"): v for k, v in after.items()}
    rows = ["| Metric | Before | After | Δ |", "|---|---:|---:|---:|"]
    for name in dict.fromkeys(names):  # ordered, deduplicated (eval_x and x are the same metric)
        b, a = before.get(name), after.get(name)
        delta = f"{a - b:+.4g}" if _is_number(a) and _is_number(b) else "–"
        unit = "" if name in _RATIO_METRICS else " (%)"
        rows.append(f"| {name}{unit} | {_num(b)} | {_num(a)} | {delta} |")
    return rows


# ---------------------------------------------------------------- wiring


class ReportWriter(BaseCallback):
    """At train end, writes `curves.png` and `report.md` into `log_dir` (from `metrics.jsonl`)."""

    def __init__(self, log_dir: str | Path):
        self.log_dir = Path(log_dir)
        self.info: dict[str, Any] = {}

    def on_train_begin(self, state: TrainState, info: dict[str, Any]) -> None:
        self.info = dict(info)

    def on_train_end(self, state: TrainState, summary: dict[str, Any]) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        png = self.log_dir / PLOT_FILE
        if plot_curves(self.log_dir / METRICS_FILE, png) is None:
            png.unlink(missing_ok=True)  # don't let the report link a stale plot from an earlier run
        write_report(self.log_dir / REPORT_FILE, self.info, summary, state.history)


def default_callbacks(log_dir: str | Path, progress: bool = True) -> list[BaseCallback]:
    """The standard set: progress bar (if `progress`), JSONL, TensorBoard, and plot + report."""
    callbacks: list[BaseCallback] = [ProgressBar()] if progress else []
    # JsonlLogger precedes ReportWriter: the report plots the file the logger writes.
    return callbacks + [JsonlLogger(log_dir), TensorBoardLogger(log_dir), ReportWriter(log_dir)]


# ---------------------------------------------------------------- formatting


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _num(v: Any) -> str:
    """Compact number: 4 significant digits, thousands separators for big values, '–' if missing."""
    if not _is_number(v):
        return "–"
    if math.isfinite(v) and abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.4g}"


def _sci(v: Any) -> str | None:
    return f"{v:.2e}" if _is_number(v) else None


def _si(v: Any) -> str | None:
    if not _is_number(v):
        return None
    return f"{v / 1000:.1f}k" if abs(v) >= 1000 else f"{v:.0f}"


def _code(v: Any) -> str | None:
    return f"`{v}`" if v is not None else None


def _duration(seconds: float) -> str:
    """4.2s, 12m 03s, 1h 02m 03s."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(round(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"
