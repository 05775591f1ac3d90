"""Plain ``nn.Module``s (no Lightning imports): vision towers and the shared Q-Former dual tower."""

from .dual_tower import CIRDualTower
from .vision import build_vision_tower

__all__ = ["CIRDualTower", "build_vision_tower"]
