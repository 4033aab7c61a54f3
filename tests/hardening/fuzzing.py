"""Shared pieces of the fuzz tests: hypothesis settings sized for the default suite (a larger
run under `-m slow`), a per-example time limit, and a count of the cases run."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from datetime import timedelta

from hypothesis import HealthCheck, settings

# Examples per test: the default suite stays around half a minute on 2 shared cores; the
# slow run (pytest -m slow tests/hardening) or LORAKIT_FUZZ_EXAMPLES=N explores far more.
EXAMPLES = int(os.environ.get("LORAKIT_FUZZ_EXAMPLES", 0)) or None
QUICK = settings(
    max_examples=EXAMPLES or 120,
    deadline=timedelta(seconds=5),
    derandomize=EXAMPLES is None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
SLOW = settings(QUICK, max_examples=EXAMPLES or 2000, derandomize=False)

# Cases run per test, printed at the end of each module (the README's "N fuzz cases").
COUNTS: collections.Counter = collections.Counter()


@contextlib.contextmanager
def time_limit(seconds: int = 30):
    """Fail an example that runs for `seconds`: hypothesis's deadline only judges an example
    after it returns, so a real hang would otherwise stall the suite."""

    def expired(signum, frame):
        raise TimeoutError(f"a fuzz case ran for more than {seconds} s (a hang)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # reported in KiB


@contextlib.contextmanager
def peak_rss_growth() -> Iterator[Callable[[], float]]:
    """How far resident memory rose above its level at entry, at its highest inside the block.

    The process's high-water mark (VmHWM) is reset to the current RSS on entry (writing 5 to
    /proc/self/clear_refs), so an allocation below an earlier, unrelated peak still shows;
    `ru_maxrss` cannot be reset and would hide it."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    start = _status_mib("VmRSS")
    yield lambda: _status_mib("VmHWM") - start


def report(request, label: str) -> None:
    """Print the module's case counts (pytest's terminal, so it shows without -s)."""
    counts = {k: v for k, v in COUNTS.items() if k.startswith(label)}
    plugins = request.config.pluginmanager
    terminal, capture = plugins.getplugin("terminalreporter"), plugins.getplugin("capturemanager")
    if terminal is not None and counts:
        parts = ", ".join(f"{key.split(':', 1)[1]} {n}" for key, n in counts.items())
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            terminal.write_line(f"\n{label}: {sum(counts.values())} fuzz cases ({parts})")


def valid_adapter_files(directory) -> dict[str, bytes]:
    """A valid adapter's files (r=2 on q_proj, v_proj of the tiny llama), as bytes."""
    import lorakit
    from tests.conftest import tiny

    lorakit.save_adapter(lorakit.inject(tiny("llama"), lorakit.LoraConfig(r=2)), directory)
    return {path.name: path.read_bytes() for path in directory.iterdir() if path.is_file()}
