"""Plain ``nn.Module``s (no Lightning imports): vision towers and the shared Q-Former dual tower."""

from .build import InitSource, NetworkSpec, build_network
from .dual_tower import CIRDualTower
from .vision import build_vision_tower

__all__ = ["CIRDualTower", "InitSource", "NetworkSpec", "build_network", "build_vision_tower"]
