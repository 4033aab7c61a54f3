"""The experiment scripts (experiments/*.py): the subspace-similarity measure, and a clean
skip without the real data sets (no ../shared needed; nothing trains here)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
SCRIPTS = [
    "methods_table.py",
    "methods_e2e.py",
    "which_weights.py",
    "which_rank.py",
    "subspace.py",
    "task_switching.py",
    "variants.py",
    "e2e_protocol.py",
    "defaults_sweep.py",
    "methods_long.py",
    "ner_gap.py",
]


def _module(name: str):
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        spec = importlib.util.spec_from_file_location(f"experiments_{name}", EXPERIMENTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(EXPERIMENTS))


def _phi_by_formula(a1: np.ndarray, a2: np.ndarray, i: int, j: int) -> float:
    u1 = np.linalg.svd(a1)[2].T[:, :i]  # right-singular vectors, top i
    u2 = np.linalg.svd(a2)[2].T[:, :j]
    return float(np.linalg.norm(u1.T @ u2, "fro") ** 2 / min(i, j))


def test_subspace_similarity_matches_the_formula():
    subspace_similarity = _module("subspace").subspace_similarity
    rng = np.random.default_rng(0)
    a1, a2 = rng.standard_normal((4, 12)), rng.standard_normal((6, 12))
    phi = subspace_similarity(a1, a2)
    assert phi.shape == (4, 6)
    for i in range(1, 5):
        for j in range(1, 7):
            assert phi[i - 1, j - 1] == pytest.approx(_phi_by_formula(a1, a2, i, j), abs=1e-10)
    assert np.all(phi >= -1e-12) and np.all(phi <= 1 + 1e-12)


def test_subspace_similarity_on_known_subspaces():
    subspace_similarity = _module("subspace").subspace_similarity
    d = 10
    eye = np.eye(d)
    # rows scaled so the singular directions come out in a known order: e0 first, then e1, ...
    a = np.diag([5.0, 4.0, 3.0]) @ eye[:3]
    assert np.allclose(subspace_similarity(a, a), 1.0)  # same subspace: 1 everywhere
    b = np.diag([5.0, 4.0]) @ eye[5:7]
    assert np.allclose(subspace_similarity(a, b), 0.0)  # orthogonal: 0
    c = np.diag([9.0, 1.0]) @ eye[[1, 0]]  # top direction e1, then e0
    phi = subspace_similarity(a, c)
    assert phi[0, 0] == pytest.approx(0.0)  # e0 vs e1
    assert phi[0, 1] == pytest.approx(1.0)  # e0 within span(e1, e0)
    assert phi[1, 0] == pytest.approx(1.0)  # e1 within span(e0, e1)
    assert phi[2, 1] == pytest.approx(1.0)  # span(e0, e1) inside span(e0, e1, e2), / min(3, 2)
    assert subspace_similarity(c * 3, a)[0, 0] == pytest.approx(0.0)  # scale-free, argument order swaps i, j


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_skip_cleanly_without_the_data(script, tmp_path):
    env = {**os.environ, "LORAKIT_DATA": str(tmp_path / "no-such-data")}
    done = subprocess.run(
        [sys.executable, str(EXPERIMENTS / script)], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("skip:") and "not found" in done.stdout
    assert "Traceback" not in done.stderr


def test_summary_helpers():
    common = _module("common")
    mean, std, n = common.mean_std([80.0, 82.0, None])
    assert (mean, n) == (81.0, 2) and std == pytest.approx(2**0.5)
    assert common.fmt_ms(*common.mean_std([])) == "–"
    assert common.markdown_table(["a", "b"], [[1, 2]]).splitlines() == ["| a | b |", "| --- | --- |", "| 1 | 2 |"]
    assert common.key_of("sst2", common.sst2_config("lora", 1, rank=4), False) == "sst2-lora-q+v-r4-s1"
    assert common.sst2_config("full")["targets"] is None  # LoRA options only go to LoRA runs


def test_e2e_facts_are_one_key_value_per_line():
    facts = _module("e2e_protocol").facts
    mr = "name : The Eagle | eatType : coffee shop | customer rating : 5 out of 5"
    assert facts(mr) == "name: The Eagle\neatType: coffee shop\ncustomer rating: 5 out of 5"


def test_the_e2e_protocol_defaults_rows_take_nothing_from_the_anchors_recipe():
    protocol = _module("e2e_protocol")
    seeded = protocol.config_for("lorakit defaults seed 1", "train.jsonl", "eval.jsonl")
    assert seeded["seed"] == 1 and not {"lr", "rank", "alpha", "targets", "dropout"} & set(seeded)
    assert protocol.config_for("lorakit defaults, batch 4", "t", "e")["batch_size"] == 4
    assert protocol.config_for("anchor", "t", "e")["targets"] == "q_proj,v_proj"
    from lorakit.train.defaults import LORA_BY_TASK

    key = protocol.key_for("lorakit defaults seed 1", seeded, False)  # names what the defaults resolve to
    assert key.startswith("e2e-protocol-lorakit_defaults_seed_1-") and f"lr{LORA_BY_TASK['causal-lm']['lr']}" in key


def test_the_e2e_dev_split_holds_every_mr_no_training_line_shows_with_all_its_references(tmp_path, monkeypatch):
    protocol = _module("e2e_protocol")
    lines = [f"name : Place {i % 23} | area : riverside||Reference {i} of place {i % 23}." for i in range(60)]
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(protocol, "E2E", tmp_path)
    trained = {mr for mr, _ in protocol.training_lines(quick=True)}  # 32 of the 60 lines
    dev = protocol.dev_set(quick=True)
    every = {line.split("||")[0].strip() for line in lines}
    assert dev and not trained & set(dev) and trained | set(dev) == every
    for mr, refs in dev.items():
        assert refs == [line.split("||")[1] for line in lines if line.split("||")[0].strip() == mr]


def test_a_partial_e2e_protocol_run_keeps_the_rows_already_in_the_results(tmp_path, monkeypatch):
    import json

    protocol = _module("e2e_protocol")
    monkeypatch.setattr(sys.modules["common"], "RESULTS", tmp_path)
    assert protocol.previous_rows() == {}
    runs = [{"config": "anchor", "bleu_B": 54.8}, {"config": "a row since removed", "bleu_B": 1.0}]
    (tmp_path / "e2e_protocol.json").write_text(json.dumps({"runs": runs}))
    assert protocol.previous_rows() == {"anchor": runs[0]}


def test_a_partial_e2e_protocol_run_says_which_rows_it_ran(monkeypatch):
    protocol = _module("e2e_protocol")
    notes = []
    monkeypatch.setattr(protocol, "write_results", lambda name, title, tables, data, note, quick: notes.append(note))
    row = {"config": "anchor", "params": 1, "bleu_A": 61.0, "bleu_B": 54.0, "eval_loss_B": 1.7, "train_s": 60.0}
    protocol.write([row], None, 60.0, False, ["anchor"])
    protocol.write([row], None, 60.0, False)
    assert "This sitting ran anchor;" in notes[0] and "sitting" not in notes[1]


def test_the_long_methods_default_row_leaves_the_settings_to_lorakit():
    from lorakit.train import TrainConfig
    from lorakit.train.defaults import LORA_BY_TASK

    long = _module("methods_long")
    given = long.config("sst2", "lora", None, 0, 800, False)
    assert not {"lr", "rank", "alpha", "targets"} & set(given)
    config = TrainConfig(**given)
    assert config.lr == LORA_BY_TASK["classification"]["lr"] and set(config.defaults_chosen) >= {"lr", "targets"}
    swept = TrainConfig(**long.config("e2e", "adapter-p", 1e-2, 1, 584, False))
    assert (swept.lr, swept.method, swept.seed, swept.max_steps) == (1e-2, "adapter-p", 1, 584)


def test_the_long_e2e_grid_picks_its_lr_on_a_dev_split_held_out_of_train(tmp_path, monkeypatch):
    long = _module("methods_long")
    monkeypatch.setattr(long, "RUNS", tmp_path)
    if not (long.E2E / "train.txt").is_file():
        pytest.skip(f"E2E data not found at {long.E2E} (the shared data sets)")
    grid, full = long.config("e2e", "lora", 1e-3, 0, 146, False), long.config("e2e", "lora", 1e-3, 0, 584, False)
    mr = lambda path: {line.split("||")[0] for line in open(path, encoding="utf-8")}  # noqa: E731
    assert not mr(grid["data"]) & mr(grid["eval_data"]) and len(mr(grid["eval_data"])) == long.E2E_DEV_MRS
    assert mr(grid["data"]) | mr(grid["eval_data"]) == mr(long.E2E / "train.txt")
    assert grid["eval_generate"] == 0 and full["eval_generate"] == long.E2E_BLEU_MRS
    assert full["eval_data"].endswith("test.txt") and full["data"].endswith("train.txt")


def test_every_long_run_is_a_valid_train_config(tmp_path, monkeypatch):
    from lorakit.train import TrainConfig

    long = _module("methods_long")
    monkeypatch.setattr(long, "RUNS", tmp_path)
    if not (long.E2E / "train.txt").is_file():
        pytest.skip(f"E2E data not found at {long.E2E} (the shared data sets)")
    for part, (steps, *_) in long.PARTS.items():
        for method in long.DECODER_METHODS if part == "e2e" else long.ENCODER_METHODS:
            name, lr = method.split(" ")[0], None if "defaults" in method else long.GRID[0]
            for budget in (steps, steps // 4):
                config = TrainConfig(**long.config(part, name, lr, 0, budget, False))
                assert (config.method, config.max_steps) == (name, budget)


def _fake_run(trained: list[str], pairs: threading.Barrier | None = None, full: str = ""):
    """A stand-in for common.run that records the order of the runs and scores each by its lr; with
    `pairs`, runs whose key holds `full` wait at that barrier for a second one to be in flight."""

    def run(key, checkpoint_every=None, **config):
        if pairs and full in key:
            pairs.wait()
        trained.append(key)
        lr = config.get("lr", 1e-3)
        return {"metrics": {"accuracy": 90 - abs(np.log10(lr) + 3)}, "params_paper": 8, "train_runtime_s": 1.0}

    return run


def test_the_long_methods_table_is_the_same_with_parallel_jobs(monkeypatch):
    long = _module("methods_long")
    tables = {}
    for jobs in (1, 2):
        trained: list[str] = []
        # with 2 jobs, full-budget runs must train two at a time (a lone one times out at the barrier)
        pairs = threading.Barrier(2, timeout=10) if jobs == 2 else None
        monkeypatch.setattr(long, "run", _fake_run(trained, pairs, "-n800-"))
        monkeypatch.setattr(long, "POOL", long.ThreadPoolExecutor(max_workers=jobs))
        monkeypatch.setattr(long, "STARTED", {})
        *_, (tables[jobs], rows) = long.run_part("sst2", quick=False, jobs=jobs)
        assert len(trained) == len(set(trained)), "a run was trained twice"
        assert {row["lr"] for row in rows if row["method"] != "lora (defaults)"} == {1e-3}  # the grid's best
        grids = len(long.GRID) * (len(long.ENCODER_METHODS) - 1)
        if jobs == 2:  # everything that waits on nothing went first: the defaults row and every grid
            assert all("-n200-" in k or "default" in k for k in trained[: grids + len(long.SEEDS)])
    assert tables[1] == tables[2]


def test_a_run_that_checkpoints_resumes_and_keeps_its_cache_key(tmp_path, monkeypatch):
    common = _module("common")
    monkeypatch.setattr(common, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(common, "RUNS", tmp_path)
    given = []
    summary = {"tokens_per_s": 1.0, "train_runtime_s": 1.0, "wall_s": 1.0, "steps": 4, "final_eval": {}}
    monkeypatch.setattr(common, "in_child", lambda fn, config: (given.append(config) or summary, 1.0, 1.0))
    (tmp_path / "k" / "checkpoints" / "step-0000002").mkdir(parents=True)  # what a killed sitting left
    row = common.run("k", checkpoint_every=2, model="m", max_steps=4)
    assert given[0]["resume"] is True and given[0]["save_every"] == 2
    assert "resume" not in row["config"] and "save_every" not in row["config"] and row["resumed"]
    again = common.run("k", model="m", max_steps=4)  # the same run, asked for without checkpoints
    assert again == row and len(given) == 1
