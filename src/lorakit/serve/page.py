"""The page `lorakit serve` answers at `/`: the adapters it knows (base, variant, rank, targets,
size, training loss from the adapter's own logs) and a playground that sends one prompt to
several adapters at once and streams their answers side by side. Plain HTML and JS, no build."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from ..lora.config import ConfigError, LoraConfig
from ..train.callbacks import METRICS_FILE, read_metrics
from .engine import Engine


def page() -> str:
    return files(__package__).joinpath("page.html").read_text(encoding="utf-8")


def adapter_cards(engine: Engine) -> dict:
    """{"base": served name, "adapters": [one card per known adapter]}."""
    return {"base": engine.name, "adapters": [card(a["name"], Path(a["path"]), engine.name) for a in engine.adapters()]}


def card(name: str, path: Path, base: str) -> dict:
    try:
        config = LoraConfig.from_pretrained(path)
    except (ConfigError, FileNotFoundError):
        return {"name": name, "base": base, "variant": "?", "rank": "", "targets": "", "size": 0, "loss": []}
    targets = (
        config.target_modules if isinstance(config.target_modules, str) else ", ".join(config.target_modules or [])
    )
    targets = ", ".join(filter(None, [targets, *(config.target_parameters or [])]))
    variant = "DoRA" if config.use_dora else "LoRA"
    records = read_metrics(path / "logs" / METRICS_FILE)
    loss = [[r["step"], r["loss"]] for r in records if isinstance(r.get("loss"), (int, float)) and "step" in r]
    return {
        "name": name,
        "base": config.base_model_name_or_path or base,
        "variant": variant,
        "rank": config.r,
        "targets": targets,
        "size": sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
        "loss": loss,
    }
