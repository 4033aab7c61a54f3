"""Every CLI verb on tiny local models, and the one-red-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from typer.testing import CliRunner

from lorakit.cli import app

from .train.conftest import MODEL_FOR_TASK, data_files, model_dirs  # noqa: F401  (fixtures)

runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def train_args(model_dirs, data_files, task, out, *extra):
    train_file, dev_file = data_files[task]
    return [
        "train",
        "--model",
        model_dirs[MODEL_FOR_TASK[task]],
        "--task",
        task,
        "--data",
        train_file,
        "--eval-data",
        dev_file,
        "--output",
        out,
        "--max-steps",
        "12",
        "--batch-size",
        "8",
        "--lr",
        "1e-2",
        "--rank",
        "4",
        "--max-length",
        "32",
        "--quiet",
        *extra,
    ]


@pytest.fixture
def trained_run(model_dirs, data_files, tmp_path):
    out = tmp_path / "cls"
    result = invoke(*train_args(model_dirs, data_files, "classification", out))
    assert result.exit_code == 0, result.output
    return out, result


@pytest.fixture
def trained(trained_run):
    return trained_run[0]


def _scores(adapter, data) -> dict:
    """The oracle for the CLI's figures: the library's own evaluation of the saved adapter."""
    from lorakit.train.api import evaluate, load_trained

    return evaluate(load_trained(None, adapter), str(data))


def test_train_prints_scores_and_writes_an_adapter_dir(trained_run, data_files):
    out, result = trained_run
    assert (out / "adapter_model.safetensors").is_file()
    assert (out / "logs" / "metrics.jsonl").is_file() and (out / "logs" / "report.md").is_file()
    assert (out / "logs" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The printed table's "after" column is the saved adapter's score on the eval data.
    scores = _scores(out, data_files["classification"][1])
    row = next(line.split() for line in result.stdout.splitlines() if line.strip().startswith("accuracy"))
    assert row[-1] == f"{scores['accuracy']:.2f}"
    assert f"adapter: {out}" in result.stdout


def test_eval_json_reports_the_adapter_s_scores(trained, data_files):
    result = invoke("eval", "--adapter", trained, "--data", data_files["classification"][1], "--json")
    scores = json.loads(result.stdout)
    expected = _scores(trained, data_files["classification"][1])
    assert set(scores) >= {"accuracy", "f1", "loss"}
    assert scores == pytest.approx(expected, rel=1e-6)


def test_predict_writes_one_prediction_per_input(trained, data_files, tmp_path):
    out = tmp_path / "preds.jsonl"
    invoke("predict", "--adapter", trained, "--data", data_files["classification"][1], "--output", out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 24 and {r["prediction"] for r in rows} <= {"neg", "pos"}


def test_inspect(trained):
    from lorakit.inspect_adapter import describe

    result = invoke("inspect", trained)
    assert "rank" in result.stdout and "PEFT compatible" in result.stdout and "yes" in result.stdout
    assert "classification" in result.stdout
    info = describe(trained)  # a classifier: its new head trains in full
    assert info["vLLM"].startswith("no: vLLM does not load modules_to_save (classifier)")
    assert "classifier" in info["llama.cpp (lorakit export --format gguf)"]
    assert "is trained as full weights" in info["llama.cpp (lorakit export --format gguf)"]


def test_merge_writes_a_plain_model(trained, tmp_path, data_files):
    import transformers

    out = tmp_path / "merged"
    invoke("merge", "--adapter", trained, "--output", out)
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    assert not any("lora" in k for k in merged.state_dict())
    # Same predictions as the adapter on top of the base.
    from lorakit.train.api import load_trained

    ref = load_trained(None, trained)
    enc = ref.tokenizer(["the film was very good", "the food was very awful"], return_tensors="pt", padding=True)
    import torch

    with torch.no_grad():
        torch.testing.assert_close(merged.eval()(**enc).logits, ref.model(**enc).logits, rtol=1e-4, atol=1e-5)


def test_combine_of_one_adapter_at_half_and_half_is_that_adapter(trained, tmp_path):
    """0.5·ΔW + 0.5·ΔW = ΔW: the combined adapter (SVD, rank 8 >= the input's 4, so exact)
    has the input's ΔW in every layer and the input's head."""
    import lorakit
    from lorakit.train.api import load_trained

    out = tmp_path / "combined"
    invoke("combine", "--adapter", trained, "--adapter", trained, "--weight", "0.5", "--weight", "0.5",
           "--output", out, "--combination", "svd", "--rank", "8")  # fmt: skip
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 8
    loaded = load_trained(None, [trained, out])
    one, both = lorakit.adapter_names(loaded.model)
    for _, layer in lorakit.lora_layers(loaded.model):
        torch.testing.assert_close(layer.delta_weight(both), layer.delta_weight(one), rtol=1e-4, atol=1e-6)
    enc = loaded.tokenizer(["the film was very good"], return_tensors="pt")
    logits = {}
    for name in (one, both):
        lorakit.set_adapter(loaded.model, name)
        with torch.no_grad():
            logits[name] = loaded.model(**enc).logits
    torch.testing.assert_close(logits[both], logits[one], rtol=1e-4, atol=1e-5)


def test_train_dora_trains_the_magnitude_and_merges_to_the_same_model(model_dirs, data_files, tmp_path):
    import transformers

    import lorakit
    from lorakit.inspect_adapter import describe
    from lorakit.lora.io import read_adapter_weights
    from lorakit.train.api import load_trained

    out = tmp_path / "dora"
    result = invoke(*train_args(model_dirs, data_files, "causal-lm", out, "--dora"))
    assert result.exit_code == 0, result.output
    assert json.loads((out / "adapter_config.json").read_text())["use_dora"] is True
    magnitudes = {k: v for k, v in read_adapter_weights(out).items() if k.endswith("lora_magnitude_vector")}
    trained = load_trained(None, out)
    layer = next(layer for _, layer in lorakit.lora_layers(trained.model))
    start = layer.base_weight().float().norm(dim=1)  # DoRA's magnitude starts at ‖W0‖ per row
    assert magnitudes and not torch.allclose(layer.lora_magnitude_vector["default"], start, atol=1e-4)
    info = describe(out)
    assert info["variant"].startswith("DoRA") and info["vLLM"].startswith("no: vLLM does not run DoRA")
    assert invoke("merge", "--adapter", out, "--output", tmp_path / "merged").exit_code == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = trained.tokenizer(["a b c d"], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, trained.model(ids).logits, rtol=1e-4, atol=1e-5)


def test_generate_one_adapter_per_prompt(model_dirs, data_files, tmp_path):
    from lorakit.train.api import load_trained

    outs = []
    for i in range(2):
        out = tmp_path / f"lm{i}"
        # Wq,Wv at lr 1e-3: 12 steps leave these tiny adapters generating text (with the defaults one
        # of them learns to end every answer at once, and an empty line would match anything)
        invoke(*train_args(model_dirs, data_files, "causal-lm", out, "--seed", str(i), "--targets", "q_proj,v_proj",
                           "--lr", "1e-3"))  # fmt: skip
        outs.append(out)
    prompts = ["a b c", "d c b"]
    result = invoke("generate", "--adapter", outs[0], "--adapter", outs[1], "--prompt", prompts[0],
                    "--prompt", prompts[1], "--max-new-tokens", "4")  # fmt: skip
    assert result.exit_code == 0, result.output
    # Oracle: each adapter alone on its own prompt (no mixed batch), greedy.
    expected = []
    for out, prompt in zip(outs, prompts):
        alone = load_trained(None, out)
        expected.append(alone.task.generate(alone.model, [prompt], max_new_tokens=4)[0])
    assert all(expected), expected  # the adapters do generate (an empty line would match anything)
    assert result.stdout.split("\n")[:5] == [prompts[0], expected[0], "", prompts[1], expected[1]]


def test_config_file_and_flag_override(model_dirs, data_files, tmp_path):
    train_file, dev_file = data_files["classification"]
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "model": str(model_dirs["bert"]),
                "data": str(train_file),
                "max-steps": 3,
                "rank": 2,
                "output": str(tmp_path / "from-file"),
            }
        )
    )
    result = invoke("train", "--config", cfg, "--rank", "4", "--quiet")
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "from-file" / "adapter_config.json").read_text())
    assert saved["r"] == 4


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lorakit", *map(str, args)], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--data", "nowhere.jsonl", "--output", "{tmp}/x"], "nowhere.jsonl"),
        (["train", "--data", "{train}", "--rank", "0"], "--rank=0 is invalid"),
        (["train", "--data", "{train}", "--task", "translation"], "--task='translation' is invalid"),
        (["train", "--data", "{train}", "--lr", "5"], "--lr=5.0 is invalid"),
        (["eval", "--adapter", "{tmp}/none", "--data", "{train}"], "adapter_config.json"),
    ],
)
def test_bad_input_is_one_red_line(args, message, data_files, tmp_path):
    args = [a.format(tmp=tmp_path, train=data_files["classification"][0]) for a in args]
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


def test_missing_column_names_the_option(model_dirs, data_files, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"blurb": "good", "label": "pos"}) + "\n")
    result = run_cli("train", "--model", model_dirs["bert"], "--data", bad, "--output", tmp_path / "o", "--quiet")
    assert result.returncode == 2 and "--text-field" in result.stderr


def test_unseen_eval_label_is_refused(model_dirs, data_files, tmp_path):
    dev = tmp_path / "dev.jsonl"
    dev.write_text(json.dumps({"text": "the film", "label": "neutral"}) + "\n")
    result = run_cli(
        "train",
        "--model",
        model_dirs["bert"],
        "--data",
        data_files["classification"][0],
        "--eval-data",
        dev,
        "--output",
        tmp_path / "o",
        "--quiet",
    )
    assert result.returncode == 2 and "neutral" in result.stderr


def test_export_writes_a_gguf_lora_and_an_ollama_modelfile(tmp_path, monkeypatch):
    """On a base that is a GGUF file: the GGUF LoRA reads back equal to the adapter, and the
    Modelfile points Ollama at the base's GGUF and the adapter's."""
    import lorakit
    from lorakit.models import load_model

    from .gguf_files import tiny_llama_gguf

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    base = tiny_llama_gguf(tmp_path / "base", "Q8_0")
    model = lorakit.inject(load_model(str(base), "AutoModelForCausalLM").model, lorakit.LoraConfig(r=4))
    with torch.no_grad():
        for _, layer in lorakit.lora_layers(model):
            layer.lora_B["default"].normal_()
    lorakit.save_adapter(model, tmp_path / "adapter")
    # (an adapter saved by lorakit.save_adapter records the dequantised cache as its base: name the GGUF)
    assert invoke("export", tmp_path / "adapter", "--output", tmp_path / "a.gguf", "--model", base).exit_code == 0
    again = lorakit.load_adapter(load_model(str(base), "AutoModelForCausalLM").model, tmp_path / "a.gguf")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    out = invoke("export", tmp_path / "adapter", "--format", "ollama", "--output", tmp_path / "ollama", "--model", base)
    out = out.output
    assert (tmp_path / "ollama" / "Modelfile").read_text() == f"FROM {base.resolve()}\nADAPTER ./adapter.gguf\n"
    assert "ollama create adapter -f" in out
    from lorakit.inspect_adapter import describe

    info = describe(tmp_path / "adapter")
    assert info["vLLM"] == "yes" and info["llama.cpp (lorakit export --format gguf)"] == "yes"
    info = describe(tmp_path / "a.gguf")
    assert (info["architecture"], info["rank"], info["adapted tensors"]) == ("llama", "4", 4)  # q, v x 2 blocks
    # the way back: merging the GGUF file gives the model merging the PEFT directory gives
    for source, out in ((tmp_path / "a.gguf", "from-gguf"), (tmp_path / "adapter", "from-peft")):
        invoke("merge", "--adapter", source, "--model", base, "--output", tmp_path / out)
    a, b = (load_model(str(tmp_path / out), "AutoModelForCausalLM").model for out in ("from-gguf", "from-peft"))
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids=ids).logits, b(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="--outtype 'q4' is not one of f32, f16, bf16, q8_0"):
        invoke("export", tmp_path / "adapter", "--output", tmp_path / "x.gguf", "--outtype", "q4")
