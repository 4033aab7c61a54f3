"""Fuzzing the config parsers: adapter_config.json (LoraConfig.from_pretrained, and through
load_adapter) and training config files (TrainConfig.from_file: YAML, TOML, JSON). Every file
either parses or raises the parser's one error (ConfigError / AdapterLoadError /
TrainConfigError, all ValueErrors) naming the file; never another exception, a hang or a
blow-up. Unknown adapter_config.json fields are ignored (PEFT adds fields over versions);
unknown training options are refused.

    pytest tests/hardening/test_fuzz_config.py               # default suite
    pytest -m slow tests/hardening/test_fuzz_config.py       # many more cases
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

import lorakit
from lorakit.lora import delete_adapter
from lorakit.lora.config import CONFIG_NAME, ConfigError, LoraConfig
from lorakit.lora.io import AdapterConfigError, AdapterLoadError
from lorakit.train.config import TrainConfig, TrainConfigError
from tests.conftest import tiny

from .fuzzing import COUNTS, QUICK, SLOW, report, time_limit, valid_adapter_files

LORA_FIELDS = [
    "r",
    "lora_alpha",
    "target_modules",
    "lora_dropout",
    "bias",
    "use_rslora",
    "modules_to_save",
    "init_lora_weights",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "exclude_modules",
    "fan_in_fan_out",
    "task_type",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "enable_lora",
    "peft_type",
    "use_dora",
    "lora_bias",
    "layer_replication",
    "an_unknown_field",
]
TRAIN_FIELDS = [
    "model",
    "task",
    "data",
    "method",
    "targets",
    "rank",
    "alpha",
    "dropout",
    "lr",
    "epochs",
    "max_steps",
    "batch_size",
    "warmup_ratio",
    "scheduler",
    "bf16",
    "seed",
    "eval_every",
    "head_lr",
    "max-length",
    "unknown_option",
]

# Any JSON value: huge and non-finite numbers, odd strings (regex syntax, paths), nesting.
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([0, -1, 2**31, 2**64, 10**300])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
    | st.sampled_from(["q_proj", "(.*.*)*$x", "[", "../x", "all-linear", "LORA"])
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.sampled_from(["q_proj", "(", "v_.*"]), inner, max_size=4)
    ),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def model():
    return tiny("llama")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> tuple[dict, bytes]:
    files = valid_adapter_files(tmp_path_factory.mktemp("adapter"))
    return json.loads(files[CONFIG_NAME]), files["adapter_model.safetensors"]


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory, adapter) -> Path:
    directory = tmp_path_factory.mktemp("case")
    (directory / "adapter_model.safetensors").write_bytes(adapter[1])
    return directory


@pytest.fixture(scope="module", autouse=True)
def counts(request):
    yield
    report(request, "config")


def parse_adapter_config(directory: Path, label: str) -> LoraConfig | None:
    """LoraConfig.from_pretrained: a config, or None after a ConfigError naming the file."""
    COUNTS[f"config:{label}"] += 1
    with time_limit():
        try:
            return LoraConfig.from_pretrained(directory)
        except ConfigError as e:
            assert str(directory / CONFIG_NAME) in str(e), str(e)
            return None


def load(model, directory: Path) -> AdapterLoadError | None:
    with time_limit():
        try:
            lorakit.load_adapter(model, directory)
        except AdapterLoadError as e:
            assert str(directory) in str(e) and lorakit.adapter_names(model) == []
            return e
    delete_adapter(model, "default")
    return None


# -- adapter_config.json ------------------------------------------------------------------------
def adapter_config_case(model, adapter, case_dir, data):
    config = dict(adapter[0])
    for key in data.draw(st.lists(st.sampled_from(LORA_FIELDS), min_size=1, max_size=4, unique=True), label="fields"):
        config[key] = data.draw(json_values, label=key)
    (case_dir / CONFIG_NAME).write_text(json.dumps(config))  # NaN/Infinity as JSON's extension writes them
    parsed = parse_adapter_config(case_dir, "fields")
    error = load(model, case_dir)
    if parsed is None:  # a config the parser refuses never reaches the model
        assert isinstance(error, AdapterConfigError)
    else:
        assert math.isfinite(parsed.lora_alpha) and 0 <= parsed.lora_dropout < 1


@QUICK
@given(data=st.data())
def test_adapter_config_fields_of_any_type_and_size(model, adapter, case_dir, data):
    adapter_config_case(model, adapter, case_dir, data)


@QUICK
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_adapter_config_that_is_not_json(case_dir, raw):
    (case_dir / CONFIG_NAME).write_bytes(raw)
    parse_adapter_config(case_dir, "bytes")


@pytest.mark.parametrize(
    "text, message",
    [
        ("[" * 100_000 + "]" * 100_000, "RecursionError"),
        ('{"r": ' + "1" * 5000 + "}", "4300 digits"),
        ('{"r": 2, "lora_alpha": 1e999}', "lora_alpha=inf"),
        ('{"r": 2, "lora_alpha": NaN}', "lora_alpha=nan"),
        ('{"r": 10000000000000000000000000000000, "target_modules": ["q_proj"]}', "exceeds this layer"),
        ('{"r": 2, "rank_pattern": {"(": 4}}', "not a valid regular expression"),
        ('{"r": 2, "target_modules": [1, 2]}', "target_modules"),
        ('{"r": 2, "modules_to_save": "lm_head"}', "modules_to_save"),
        ('{"r": 2, "rank_pattern": [1]}', "rank_pattern"),
        ('{"r": true}', "LoraConfig.r=True"),
        ('"just a string"', "must hold a JSON object"),
        (b"\xff\xfe{}", "UnicodeDecodeError"),
    ],
    ids=[
        "deeply nested",
        "huge integer",
        "inf",
        "nan",
        "huge rank",
        "bad regex key",
        "int targets",
        "string modules_to_save",
        "list pattern",
        "bool rank",
        "not an object",
        "not utf-8",
    ],
)
def test_hostile_adapter_configs_give_one_clear_error(model, case_dir, text, message):
    (case_dir / CONFIG_NAME).write_bytes(text if isinstance(text, bytes) else text.encode())
    error = load(model, case_dir)
    assert isinstance(error, AdapterConfigError) and isinstance(error, ConfigError)
    assert message in str(error) and str(case_dir) in str(error)


def test_a_catastrophic_regex_does_not_hang(model, adapter, case_dir):
    """With `re`, "(.*.*)*$x" backtracks for hours on a module path; lorakit matches with
    `regex` under a timeout."""
    (case_dir / CONFIG_NAME).write_text(json.dumps({**adapter[0], "target_modules": "(.*.*)*$x"}))
    error = load(model, case_dir)
    assert error is not None and "matched no module" in str(error)


def test_unknown_fields_are_ignored(model, adapter, case_dir):
    (case_dir / CONFIG_NAME).write_text(json.dumps({**adapter[0], "some_future_peft_field": {"x": [1]}}))
    assert load(model, case_dir) is None


# -- training config files ------------------------------------------------------------------------
def train_config_case(tmp_dir: Path, data):
    options = {"data": "train.jsonl"}
    for key in data.draw(st.lists(st.sampled_from(TRAIN_FIELDS), max_size=4, unique=True), label="fields"):
        options[key] = data.draw(json_values, label=key)
    suffix = data.draw(st.sampled_from([".json", ".yaml"]), label="format")
    path = tmp_dir / f"train{suffix}"
    path.write_text(json.dumps(options) if suffix == ".json" else yaml.safe_dump(options))
    parse_train_config(path, "train fields")


def parse_train_config(path: Path, label: str) -> TrainConfig | None:
    COUNTS[f"config:{label}"] += 1
    with time_limit():
        try:
            return TrainConfig.from_file(path)
        except TrainConfigError as e:
            # Parse and type errors name the file; validate()'s name the option (--rank=...).
            assert str(path) in str(e) or str(e).startswith("--"), str(e)
            return None


@QUICK
@given(data=st.data())
def test_train_config_options_of_any_type(tmp_path, data):
    train_config_case(tmp_path, data)


@QUICK
@given(
    raw=st.binary(max_size=200) | st.text(max_size=200).map(str.encode),
    suffix=st.sampled_from([".yaml", ".toml", ".json"]),
)
def test_train_config_files_that_do_not_parse(tmp_path, raw, suffix):
    path = tmp_path / f"train{suffix}"
    path.write_bytes(raw)
    parse_train_config(path, "train bytes")


BOMB = "extra:\n  a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"  {n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi")
)


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("t.yaml", "data: x\nalpha: foo\n", "alpha='foo' is invalid"),
        ("t.yaml", "data: x\n1: 2\n", "mapping of option"),
        ("t.json", "[" * 100_000, "RecursionError"),
        ("t.toml", "a = " + "[" * 100_000, "RecursionError"),
        ("t.yaml", "data: x\nrank: " + "1" * 5000 + "\n", "4300 digits"),
        ("t.yaml", "data: x\n" + BOMB, "aliases"),
        ("t.yaml", "data: x\nlr: .inf\n", "lr=inf"),
        ("t.toml", 'data = "x"\nrank = 2.5\n', "rank=2.5"),
    ],
)
def test_hostile_train_configs_give_one_clear_error(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with time_limit():
        with pytest.raises(TrainConfigError, match=message):
            TrainConfig.from_file(tmp_path / name)


def test_valid_train_configs_still_parse(tmp_path):
    (tmp_path / "t.toml").write_text('data = "x"\nrank = 4\nalpha = 8\ntargets = ["query", "value"]\n')
    config = TrainConfig.from_file(tmp_path / "t.toml")
    assert (config.rank, config.alpha, config.targets) == (4, 8, ["query", "value"])


# -- the slow run --------------------------------------------------------------------------------
@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_slow_fuzz_all_configs(model, adapter, case_dir, tmp_path, data):
    if data.draw(st.booleans(), label="adapter config"):
        adapter_config_case(model, adapter, case_dir, data)
    else:
        train_config_case(tmp_path, data)
