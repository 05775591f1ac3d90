"""One entry point: ``create_model(name)`` -> a :class:`CIRDualTower`."""

from __future__ import annotations

from typing import Any

from .config import ModelConfig, get_model_config
from .models import CIRDualTower


def create_model(name: str | ModelConfig = "small", overrides: dict[str, Any] | None = None) -> CIRDualTower:
    cfg = name if isinstance(name, ModelConfig) else get_model_config(name, overrides)
    return CIRDualTower(cfg)
