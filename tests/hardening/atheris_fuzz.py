"""Coverage-guided fuzzing of the adapter loader with atheris (optional; not part of the test
suite). Each input is split into an adapter_config.json and an adapter_model.safetensors;
anything but a load or an AdapterLoadError is a crash atheris reports.

    pip install atheris
    python tests/hardening/atheris_fuzz.py -atheris_runs=20000 [corpus_dir]
"""

import sys
import tempfile
from pathlib import Path

import atheris
import safetensors.torch  # noqa: F401  (imported first: instrumenting torch would crawl)
import torch  # noqa: F401
import transformers  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from tests.conftest import tiny  # noqa: E402

with atheris.instrument_imports(include=["lorakit"]):
    import lorakit
    from lorakit.lora import delete_adapter
    from lorakit.lora.io import AdapterLoadError

MODEL = tiny("llama")
DIRECTORY = Path(tempfile.mkdtemp(prefix="lorakit-atheris-"))


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    (DIRECTORY / "adapter_config.json").write_bytes(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 2048)))
    (DIRECTORY / "adapter_model.safetensors").write_bytes(fdp.ConsumeBytes(fdp.remaining_bytes()))
    try:
        lorakit.load_adapter(MODEL, DIRECTORY)
    except AdapterLoadError:
        assert lorakit.adapter_names(MODEL) == []
        return
    delete_adapter(MODEL, "default")


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
