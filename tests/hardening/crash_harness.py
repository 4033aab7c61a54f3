"""Crash-safety harness: SIGKILL a real `lorakit train` run at many points, resume it each
time, and check that nothing a crash can leave behind is ever broken.

A kill point is either a named point inside a checkpoint write (LORAKIT_TEST_KILL_AT, see
lorakit._fs.crash_point: the process kills itself exactly there) or a random wall-clock time.
After every kill:
  * every checkpoints/step-N directory is complete and loadable (all four parts parse);
  * the next `--resume` run starts from the newest of them;
and once a run completes, its adapter equals an uninterrupted run's (same seed) to fp32
round-off, and no temp file is left over.

Each run is the real CLI (`lorakit.cli.main`, argv and all) in a forked child of one process
that has imported torch and transformers once: a kill point costs a fraction of a second
instead of a fresh interpreter's few seconds. `run_subprocess` does the same through
`python -m lorakit`, for the path a user takes.

    python -m tests.hardening.crash_harness --points 40      # prints the kill points survived
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from lorakit._fs import KILL_ENV
from lorakit.lora.config import LoraConfig
from lorakit.lora.io import WEIGHTS_NAME, read_adapter_weights
from lorakit.train.trainer import CHECKPOINTS, STATE_FILE

STEPS, SAVE_EVERY = 24, 2
KILLED = -signal.SIGKILL

# Named points inside a checkpoint write, in the order one checkpoint reaches them (":N" = the
# N-th time in that run). "write.tmp_written" is inside every atomic file write (temp file
# complete, not yet renamed): the task file, the adapter files, trainer_state.json.
HOOK_POINTS = [
    "write.tmp_written:1",
    "checkpoint.adapter_written:1",
    "write.tmp_written:3",
    "checkpoint.params_written:1",
    "checkpoint.optimizer_written:1",
    "write.tmp_written:4",
    "checkpoint.before_rename:1",
    "checkpoint.renamed:1",
    "checkpoint.pruning:1",
    "checkpoint.before_rename:2",
    "checkpoint.renamed:2",
    "checkpoint.pruning:2",
]


@dataclass
class Job:
    model: Path
    data: Path

    def argv(self, output: Path, steps: int = STEPS) -> list[str]:
        return [
            "train",
            "--model",
            str(self.model),
            "--data",
            str(self.data),
            "--output",
            str(output),
            "--max-steps",
            str(steps),
            "--save-every",
            str(SAVE_EVERY),
            "--batch-size",
            "4",
            "--lr",
            "1e-2",
            "--rank",
            "4",
            "--dropout",
            "0.1",
            "--max-length",
            "32",
            "--warmup-ratio",
            "0",
            "--resume",
            "--quiet",
        ]


def prepare(root: Path) -> Job:
    """A tiny random BERT and a tiny sentiment file (the ones tests/train uses), and a warm
    parent: what a run imports lazily is imported here once, so every forked run starts fast."""
    from tests.train.conftest import make_model_dir, sentiment_rows, write_jsonl

    root.mkdir(parents=True, exist_ok=True)
    job = Job(make_model_dir(root, "bert"), write_jsonl(root / "train.jsonl", sentiment_rows(64, 0)))
    torch.set_num_threads(1)  # no thread pool is started before the forks
    import matplotlib

    import lorakit.cli  # noqa: F401,E401

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (the run's final plot)

    from lorakit.models import load_model, load_tokenizer

    load_model(str(job.model), "AutoModelForSequenceClassification", label_names=["neg", "pos"])
    load_tokenizer(str(job.model))
    return job


# -- running a child ---------------------------------------------------------------------------
def run_forked(
    target: Callable[[], None], log: Path, kill_at: str | None = None, kill_after_s: float | None = None
) -> int:
    """Run `target` in a forked child; SIGKILL it after `kill_after_s` or let it SIGKILL itself
    at crash point `kill_at`. Returns the exit code (-9 when killed)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            with open(log, "ab") as f:
                os.dup2(f.fileno(), 1)
                os.dup2(f.fileno(), 2)
            # Python-level streams too (under pytest they are capture objects, not fds 1 and 2).
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            if kill_at:
                os.environ[KILL_ENV] = kill_at
            torch.set_num_threads(1)  # the same arithmetic in every run, and fork-safe
            target()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    if kill_after_s is not None:
        deadline = time.monotonic() + kill_after_s
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.002)
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def cli(argv: list[str], record: Path | None = None) -> Callable[[], None]:
    """The real `lorakit` entry point with `argv`; with `record`, each resume appends the step
    it resumed at (the harness checks it is the newest checkpoint's)."""

    def target() -> None:
        if record is not None:
            from lorakit.train.trainer import Trainer

            resume = Trainer._resume

            def recording(self) -> None:
                resume(self)
                with open(record, "a") as f:
                    f.write(f"{self.state.step}\n")

            Trainer._resume = recording
        from lorakit.cli import main

        sys.argv = ["lorakit", *argv]
        main()

    return target


def run_subprocess(argv: list[str], kill_at: str | None = None, timeout: float = 300) -> int:
    """`python -m lorakit ...` in a fresh interpreter (what a user runs)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({KILL_ENV: kill_at} if kill_at else {})}
    env.pop("LORAKIT_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "lorakit", *argv], env=env, capture_output=True, timeout=timeout
    ).returncode


# -- what must hold after a kill ----------------------------------------------------------------
def checkpoint_steps(output: Path) -> list[int]:
    root = output / CHECKPOINTS
    return sorted(int(p.name.removeprefix("step-")) for p in root.glob("step-*")) if root.is_dir() else []


def check_checkpoints(output: Path) -> list[str]:
    """Problems with the checkpoints in `output` ([] when every step-N is complete and loadable)."""
    problems = []
    for step in checkpoint_steps(output):
        path = output / CHECKPOINTS / f"step-{step:07d}"
        try:
            state = json.loads((path / STATE_FILE).read_text())
            assert state["step"] == step, f"trainer_state.json says step {state['step']}"
            params = load_file(str(path / "trainable.safetensors"))
            assert params and all(torch.isfinite(t).all() for t in params.values()), "empty or non-finite parameters"
            blob = torch.load(path / "training_state.pt", weights_only=True)
            assert {"optimizer", "scheduler", "rng"} <= set(blob), f"training_state.pt holds {sorted(blob)}"
            LoraConfig.from_pretrained(path / "adapter")
            assert read_adapter_weights(path / "adapter"), "empty adapter"
        except Exception as e:  # any failure to read is what this harness exists to catch
            problems.append(f"{path.name}: {type(e).__name__}: {e}")
    if (output / WEIGHTS_NAME).exists():  # the output adapter, once written, must stay readable too
        try:
            LoraConfig.from_pretrained(output)
            read_adapter_weights(output)
        except Exception as e:
            problems.append(f"output adapter: {type(e).__name__}: {e}")
    return problems


def leftovers(output: Path) -> list[str]:
    """Temp files and directories a finished run should not leave behind."""
    found = (
        [p.name for p in (output / CHECKPOINTS).iterdir() if not p.name.startswith("step-")]
        if (output / CHECKPOINTS).is_dir()
        else []
    )
    return found + [
        p.name for d in (output, output / "logs") if d.is_dir() for p in d.iterdir() if p.name.endswith(".tmp")
    ]


def adapter_difference(a: Path, b: Path) -> str | None:
    """None when the two adapters are equal to fp32 round-off, else what differs."""
    ta, tb = load_file(str(a / WEIGHTS_NAME)), load_file(str(b / WEIGHTS_NAME))
    if set(ta) != set(tb):
        return f"different keys: {sorted(set(ta) ^ set(tb))[:3]}"
    for key in ta:
        try:
            torch.testing.assert_close(ta[key], tb[key], rtol=1e-6, atol=1e-7)
        except AssertionError as e:
            return f"{key}: {e}"
    return None


# -- the campaign --------------------------------------------------------------------------------
@dataclass
class Report:
    kills: list[str] = field(default_factory=list)  # kill points survived
    failures: list[str] = field(default_factory=list)
    runs_completed: int = 0
    bitwise_equal: bool = True

    def to_dict(self) -> dict:
        return {
            "kill_points_survived": len(self.kills) if not self.failures else 0,
            "kills": len(self.kills),
            "failures": self.failures,
            "completed_runs": self.runs_completed,
            "final_adapters_bitwise_equal": self.bitwise_equal,
        }


def reference_run(job: Job, root: Path) -> tuple[Path, float]:
    """The uninterrupted run every interrupted one must reproduce; returns its output and wall time."""
    out = root / "reference"
    t0 = time.perf_counter()
    rc = run_forked(cli(job.argv(out)), root / "reference.log")
    if rc != 0:
        raise RuntimeError(f"the reference run failed (exit {rc}); see {root / 'reference.log'}")
    return out, time.perf_counter() - t0


def campaign(
    job: Job, reference: Path, workdir: Path, points: list[tuple[str, object]], report: Report, wall: float = 0.0
) -> int:
    """Train into a fresh output, killed at `points` in turn, resuming after each, until a run
    completes. A point is ("hook", name) or ("time", u): a kill after u (in [0, 1]) of what the
    run has left to do, estimated from the uninterrupted run's `wall` time. Returns how many
    points were used (a point the run finished before is not a kill)."""
    out, record, log = workdir / "out", workdir / "resumed.txt", workdir / "runs.log"
    workdir.mkdir(parents=True, exist_ok=True)
    used = 0
    for kind, value in [*points, ("final", None)]:
        newest = (checkpoint_steps(out) or [0])[-1]
        resumes_before = _lines(record)
        # About 40% of a run is start-up and the final save/plot, the rest its steps.
        delay = value * wall * (0.4 + 0.6 * (STEPS - newest) / STEPS) if kind == "time" else None
        rc = run_forked(cli(job.argv(out), record), log, kill_at=value if kind == "hook" else None, kill_after_s=delay)
        resumed = _lines(record)[len(resumes_before) :]
        label = f"time={delay:.3f}s (from step {newest})" if kind == "time" else f"{kind}={value}"
        if resumed and int(resumed[0]) != newest:
            report.failures.append(
                f"{workdir.name} {label}: resumed at step {resumed[0]}, newest checkpoint was {newest}"
            )
        if rc == 0:
            break
        used += 1
        if rc != KILLED:
            report.failures.append(f"{workdir.name} {label}: exit code {rc}, see {log}")
            return used
        problems = check_checkpoints(out)
        report.failures.extend(f"{workdir.name} after {label}: {p}" for p in problems)
        report.kills.append(label)
    else:
        report.failures.append(f"{workdir.name}: the final, uninterrupted run did not complete; see {log}")
        return used
    report.runs_completed += 1
    diff = adapter_difference(reference, out)
    if diff:
        report.failures.append(f"{workdir.name}: final adapter differs from the uninterrupted run: {diff}")
    elif (reference / WEIGHTS_NAME).read_bytes() != (out / WEIGHTS_NAME).read_bytes():
        report.bitwise_equal = False
    if leftovers(out):
        report.failures.append(f"{workdir.name}: temp files left over: {leftovers(out)}")
    return used


def _lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def run_harness(root: Path, points: int, seed: int = 0, hooks: list[str] | None = None) -> dict:
    """At least `points` kills: every named hook point once, the rest at random times."""
    t0 = time.perf_counter()
    job = prepare(root / "job")
    reference, wall = reference_run(job, root)
    report = Report()
    hooks = HOOK_POINTS if hooks is None else hooks
    campaign(job, reference, root / "hooks", [("hook", h) for h in hooks], report)
    rng = random.Random(seed)
    n = 0
    while len(report.kills) < points and n < 4 * points:  # bounded: a too-fast run cannot loop forever
        times = [("time", rng.uniform(0.02, 0.95)) for _ in range(points - len(report.kills))]
        campaign(job, reference, root / f"random-{n}", times, report, wall)
        n += 1
    return {
        **report.to_dict(),
        "points": report.kills,
        "hook_kills": sum(k.startswith("hook") for k in report.kills),
        "random_kills": sum(k.startswith("time") for k in report.kills),
        "uninterrupted_run_s": round(wall, 2),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


# -- interrupted writes of single artefacts: merge and save_adapter ------------------------------
def tree_digest(path: Path) -> dict[str, str]:
    """{relative file: sha256} of a directory: equal digests = byte-identical directories."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, default=40, help="kill points (at least; named hooks + random times)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random kill times")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    args = parser.parse_args()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="lorakit-crash-"))
    result = run_harness(root, args.points, args.seed)
    print(json.dumps(result, indent=2))
    print(
        f"survived {result['kill_points_survived']} of {result['kills']} kill points "
        f"({result['hook_kills']} inside checkpoint writes, {result['random_kills']} at random times); "
        f"{result['completed_runs']} resumed runs equal the uninterrupted one; {result['wall_s']} s"
    )
    sys.exit(1 if result["failures"] else 0)


if __name__ == "__main__":
    main()
