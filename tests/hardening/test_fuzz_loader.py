"""Fuzzing the adapter loader with untrusted files: truncated and bit-flipped files, hostile
safetensors headers, NaN weights, wrong dtypes and shapes, keys that look like paths, and
pickle files. Every case either loads or raises AdapterLoadError naming the directory, leaves
the model untouched when it fails, and never hangs or allocates more than the file holds.

    pytest tests/hardening/test_fuzz_loader.py               # default suite (~120 cases per test)
    pytest -m slow tests/hardening/test_fuzz_loader.py       # 2000 per test
"""

from __future__ import annotations

import json
import os
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import save_file

import lorakit
from lorakit.lora import delete_adapter
from lorakit.lora.io import WEIGHT_DTYPES, AdapterConfigError, AdapterLoadError
from tests.conftest import tiny

from .fuzzing import COUNTS, QUICK, SLOW, peak_rss_growth, report, time_limit, valid_adapter_files

WEIGHTS, CONFIG, PICKLE = "adapter_model.safetensors", "adapter_config.json", "adapter_model.bin"
DTYPES = [
    "BOOL",
    "U8",
    "I8",
    "I16",
    "U16",
    "I32",
    "U32",
    "I64",
    "U64",
    "F16",
    "BF16",
    "F32",
    "F64",
    "F8_E4M3",
    "F8_E5M2",
    "F8_E8M0",
    "F4",
    "C64",
    "XYZ",
]


@pytest.fixture(scope="module")
def model():
    return tiny("llama")


@pytest.fixture(scope="module")
def original(tmp_path_factory) -> dict[str, bytes]:
    """A valid adapter's files (r=2 on q_proj, v_proj of the tiny llama), as bytes."""
    files = valid_adapter_files(tmp_path_factory.mktemp("original"))
    return {name: files[name] for name in (WEIGHTS, CONFIG)}


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory) -> Path:
    """One directory every example rewrites (hypothesis runs examples one at a time)."""
    return tmp_path_factory.mktemp("case")


@pytest.fixture(scope="module", autouse=True)
def counts(request):
    yield
    report(request, "loader")


def write(directory: Path, files: dict[str, bytes]) -> Path:
    for name in (WEIGHTS, CONFIG, PICKLE):
        (directory / name).unlink(missing_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory


def attempt(model, directory: Path, label: str, **kw) -> AdapterLoadError | None:
    """Load; None if it loaded (then unload again). Anything but AdapterLoadError naming the
    directory propagates and fails the test; a failed load must leave the model as it was."""
    COUNTS[f"loader:{label}"] += 1
    with time_limit():
        try:
            lorakit.load_adapter(model, directory, **kw)
        except AdapterLoadError as e:
            assert str(directory) in str(e), str(e)
            assert lorakit.adapter_names(model) == []
            assert not any("lora_" in k for k in model.state_dict())
            return e
    delete_adapter(model, "default")
    return None


def safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def header_length(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


# -- truncation and bit flips ---------------------------------------------------------------------
def truncation_case(model, original, case_dir, data):
    name = data.draw(st.sampled_from([WEIGHTS, CONFIG]), label="file")
    cut = data.draw(st.integers(0, len(original[name]) - 1), label="cut")
    error = attempt(model, write(case_dir, {**original, name: original[name][:cut]}), "truncated")
    if name == WEIGHTS:  # a shorter safetensors file is always inconsistent with its header
        assert error is not None and "not a readable safetensors file" in str(error)


def bit_flip_case(model, original, case_dir, data):
    name = data.draw(st.sampled_from([WEIGHTS, CONFIG]), label="file")
    raw = bytearray(original[name])
    # Half the flips land in the safetensors header, where they are most interesting.
    end = header_length(raw) if name == WEIGHTS and data.draw(st.booleans(), label="in header") else len(raw)
    for position in data.draw(st.lists(st.integers(0, end - 1), min_size=1, max_size=8), label="positions"):
        raw[position] ^= 1 << data.draw(st.integers(0, 7), label="bit")
    error = attempt(model, write(case_dir, {**original, name: bytes(raw)}), "bit flip")
    if name == CONFIG and not parses(bytes(raw)):  # a flip that still parses may just name other modules
        assert isinstance(error, AdapterConfigError) and isinstance(error, lorakit.ConfigError)
        assert "is not valid JSON" in str(error)


def parses(raw: bytes) -> bool:
    try:
        json.loads(raw.decode("utf-8"))
        return True
    except ValueError:
        return False


@QUICK
@given(data=st.data())
def test_truncated_files(model, original, case_dir, data):
    truncation_case(model, original, case_dir, data)


@QUICK
@given(data=st.data())
def test_bit_flips(model, original, case_dir, data):
    bit_flip_case(model, original, case_dir, data)


# -- hostile safetensors headers ------------------------------------------------------------------
sizes = st.one_of(st.integers(0, 64), st.sampled_from([2**31, 2**32, 10**12, 2**63 - 1, 2**64 - 1]))


@st.composite
def hostile_headers(draw, keys: list[str]) -> tuple[dict, bytes]:
    """Headers whose shapes, dtypes and offsets need not agree with each other or the data."""
    header = {}
    for key in draw(st.lists(st.sampled_from(keys) | st.text(max_size=20), min_size=1, max_size=5, unique=True)):
        header[key] = {
            "dtype": draw(st.sampled_from(DTYPES)),
            "shape": draw(st.lists(sizes, max_size=4)),
            "data_offsets": draw(st.lists(sizes, min_size=2, max_size=2)),
        }
    if draw(st.booleans()):
        header["__metadata__"] = draw(
            st.dictionaries(st.text(max_size=5), st.text(max_size=5) | st.integers(), max_size=2)
        )
    return header, bytes(draw(st.integers(0, 256)))


@QUICK
@given(data=st.data())
def test_hostile_safetensors_headers(model, original, case_dir, data):
    keys = sorted(load_file_from_bytes(original[WEIGHTS]))
    header, payload = data.draw(hostile_headers(keys), label="header")
    files = {CONFIG: original[CONFIG], WEIGHTS: safetensors_bytes(header, payload)}
    with peak_rss_growth() as growth:
        attempt(model, write(case_dir, files), "header")
    assert growth() < 200  # never an allocation the file does not back


def load_file_from_bytes(data: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(data)


@pytest.mark.parametrize(
    "header, payload, why",
    [
        ({"k": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 16]}}, bytes(16), "invalid shape"),
        ({"k": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}}, bytes(16), "overflow"),
        ({"k": {"dtype": "F32", "shape": [4], "data_offsets": [0, 10**12]}}, bytes(16), "invalid shape"),
        (
            {
                "k": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                "j": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
            },
            bytes(16),
            "invalid offset",
        ),
    ],
    ids=["10^12 elements", "shape overflow", "offset past the end", "overlapping"],
)
def test_huge_or_inconsistent_headers_are_refused_before_allocating(model, original, case_dir, header, payload, why):
    files = {CONFIG: original[CONFIG], WEIGHTS: safetensors_bytes(header, payload)}
    with peak_rss_growth() as growth:
        error = attempt(model, write(case_dir, files), "header")
    assert error is not None and why in str(error)
    assert growth() < 50  # 10^12 floats would be 4 TB


def test_header_length_past_the_end_and_tiny_files(model, original, case_dir):
    for raw in (struct.pack("<Q", 10**15) + b"{}", struct.pack("<Q", 100) + b"{}", b"\x01", b""):
        error = attempt(model, write(case_dir, {CONFIG: original[CONFIG], WEIGHTS: raw}), "header")
        assert error is not None and "not a readable safetensors file" in str(error)


def test_zero_sized_tensor_with_a_huge_shape_is_a_shape_error(model, original, case_dir):
    state = load_file_from_bytes(original[WEIGHTS])
    key = sorted(state)[0]
    state[key] = torch.empty(10**12, 0)  # valid safetensors, no bytes needed
    save_file(state, str(case_dir / "staging.safetensors"))
    error = attempt(
        model,
        write(case_dir, {CONFIG: original[CONFIG], WEIGHTS: (case_dir / "staging.safetensors").read_bytes()}),
        "header",
    )
    assert error is not None and "(1000000000000, 0)" in str(error)


# -- valid files with hostile contents ------------------------------------------------------------
TENSOR_DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int8,
    torch.int32,
    torch.int64,
    torch.bool,
    torch.uint8,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]
PATHLIKE = [
    "../../etc/passwd",
    "/abs/path.lora_A.weight",
    "base_model.model.model/layers/0",
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight/../x",
    "..",
    "\\windows\\x",
    "a\x00b",
    "base_model.model.model.layers.99.self_attn.q_proj.lora_A.weight",
    "model.layers.0.self_attn.q_proj.lora_A.weight",
]


@st.composite
def hostile_states(draw, state: dict[str, torch.Tensor]):
    """The real tensors, each maybe renamed, dropped, reshaped, recast or poisoned, plus extras."""
    out = {}
    for key, value in sorted(state.items()):  # sorted: safetensors' own order varies run to run
        action = draw(st.sampled_from(["keep", "keep", "drop", "rename", "reshape", "dtype", "poison"]))
        if action == "drop":
            continue
        if action == "rename":
            key = draw(st.sampled_from(PATHLIKE) | st.text(min_size=1, max_size=30))
        elif action == "reshape":
            value = torch.zeros(draw(st.lists(st.integers(0, 40), max_size=3)))
        elif action == "dtype":
            value = value.to(draw(st.sampled_from(TENSOR_DTYPES)))
        elif action == "poison":
            value = value.clone()
            value.view(-1)[draw(st.integers(0, value.numel() - 1))] = draw(
                st.sampled_from([float("nan"), float("inf"), -float("inf")])
            )
        out[key] = value
    for key in draw(st.lists(st.sampled_from(PATHLIKE), max_size=2, unique=True)):
        out[key] = torch.ones(2, 2)
    return out


def expected_to_load(state: dict[str, torch.Tensor], good: dict[str, torch.Tensor]) -> bool:
    return set(state) == set(good) and all(
        v.shape == good[k].shape and v.dtype in WEIGHT_DTYPES and bool(torch.isfinite(v.float()).all())
        for k, v in state.items()
    )


def hostile_state_case(model, original, case_dir, data):
    good = load_file_from_bytes(original[WEIGHTS])
    state = data.draw(hostile_states(good), label="state")
    save_file(state, str(case_dir / "staging.safetensors"))
    error = attempt(
        model,
        write(case_dir, {CONFIG: original[CONFIG], WEIGHTS: (case_dir / "staging.safetensors").read_bytes()}),
        "contents",
    )
    assert (error is None) == expected_to_load(state, good), error
    if error is not None and set(state) == set(good) and all(v.shape == good[k].shape for k, v in state.items()):
        assert "dtype" in str(error) or "NaN or infinite" in str(error)


@QUICK
@given(data=st.data())
def test_hostile_tensors_keys_dtypes_shapes_and_values(model, original, case_dir, data):
    hostile_state_case(model, original, case_dir, data)


@pytest.mark.parametrize(
    "value, message",
    [
        (float("nan"), "NaN or infinite"),
        (float("inf"), "NaN or infinite"),
        (torch.int32, "dtype torch.int32"),
        (torch.bool, "dtype torch.bool"),
        (torch.float8_e4m3fn, "dtype torch.float8_e4m3fn"),
    ],
)
def test_nan_weights_and_wrong_dtypes_are_refused_at_load(model, original, case_dir, value, message):
    """Decision: a non-finite or non-float weight never enters the model (refused at load,
    so merge and serve never see one)."""
    state = load_file_from_bytes(original[WEIGHTS])
    key = sorted(state)[-1]
    if isinstance(value, float):
        state[key][0, 0] = value
    else:
        state[key] = state[key].to(value)
    save_file(state, str(case_dir / "staging.safetensors"))
    error = attempt(
        model,
        write(case_dir, {CONFIG: original[CONFIG], WEIGHTS: (case_dir / "staging.safetensors").read_bytes()}),
        "contents",
    )
    assert error is not None and message in str(error) and key in str(error)


def test_float64_and_half_weights_load(model, original, case_dir):
    state = load_file_from_bytes(original[WEIGHTS])
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        save_file({k: v.to(dtype) for k, v in state.items()}, str(case_dir / "staging.safetensors"))
        assert (
            attempt(
                model,
                write(case_dir, {CONFIG: original[CONFIG], WEIGHTS: (case_dir / "staging.safetensors").read_bytes()}),
                "contents",
            )
            is None
        )


# -- pickle -----------------------------------------------------------------------------------------
class Exploit:
    """Unpickling this runs a shell command, unless the unpickler refuses it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def pickle_bytes(obj, directory: Path, **kw) -> bytes:
    torch.save(obj, directory / "staging.bin", **kw)
    return (directory / "staging.bin").read_bytes()


def test_pickle_is_refused_by_default_and_read_weights_only_when_allowed(model, original, case_dir):
    state = load_file_from_bytes(original[WEIGHTS])
    directory = write(case_dir, {CONFIG: original[CONFIG], PICKLE: pickle_bytes(state, case_dir)})
    error = attempt(model, directory, "pickle")
    assert error is not None and "pickle can run code" in str(error) and "allow_pickle=True" in str(error)
    assert attempt(model, directory, "pickle", allow_pickle=True) is None


def test_malicious_pickle_does_not_run_even_when_allowed(model, original, case_dir, tmp_path):
    marker = tmp_path / "exploited"
    for payload in ({"x": Exploit(marker)}, Exploit(marker)):
        directory = write(case_dir, {CONFIG: original[CONFIG], PICKLE: pickle_bytes(payload, case_dir)})
        for allow in (False, True):
            error = attempt(model, directory, "pickle", allow_pickle=allow)
            assert error is not None
        assert "could not be read safely" in str(error)
    assert not marker.exists()


def test_pickle_of_the_wrong_shape_or_format_is_refused(model, original, case_dir):
    state = load_file_from_bytes(original[WEIGHTS])
    cases = [
        ("does not hold a {name: tensor} dict", pickle_bytes(list(state.values()), case_dir)),
        ("does not hold a {name: tensor} dict", pickle_bytes({1: torch.zeros(1), "a": 3}, case_dir)),
        # the legacy format allocates each storage at its declared size before reading it
        ("not in torch.save's zip format", pickle_bytes(state, case_dir, _use_new_zipfile_serialization=False)),
        ("not in torch.save's zip format", b"garbage"),
    ]
    # The shape of a zip bomb: the same archive with its records deflated.
    torch.save(state, case_dir / "staging.bin")
    with (
        zipfile.ZipFile(case_dir / "staging.bin") as z,
        zipfile.ZipFile(case_dir / "bomb.bin", "w", zipfile.ZIP_DEFLATED) as w,
    ):
        for info in z.infolist():
            w.writestr(info.filename, z.read(info.filename))
    cases.append(("compressed or oversized", (case_dir / "bomb.bin").read_bytes()))
    for message, raw in cases:
        error = attempt(model, write(case_dir, {CONFIG: original[CONFIG], PICKLE: raw}), "pickle", allow_pickle=True)
        assert error is not None and message in str(error), str(error)


def test_truncated_pickle_is_refused_cleanly(model, original, case_dir):
    """Every cut of a torch.save file (even with the opt-in) is refused with AdapterLoadError
    naming the file, and leaves the model as it was (`attempt` checks both)."""
    raw = pickle_bytes(load_file_from_bytes(original[WEIGHTS]), case_dir)
    for cut in range(0, len(raw), max(1, len(raw) // 40)):
        files = {CONFIG: original[CONFIG], PICKLE: raw[:cut]}
        error = attempt(model, write(case_dir, files), "pickle", allow_pickle=True)
        assert error is not None, f"a file cut to {cut} of {len(raw)} bytes loaded"


# -- the slow run: the same properties, many more cases --------------------------------------------
@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_slow_fuzz_all(model, original, case_dir, data):
    case = data.draw(st.sampled_from([truncation_case, bit_flip_case, hostile_state_case]), label="kind")
    case(model, original, case_dir, data)
