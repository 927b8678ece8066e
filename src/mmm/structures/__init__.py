"""One module per structure. Importing this package registers them all."""

from .base import Structure, build_structure, structure_class
from .dense import Dense
from .lowrank import LowRank

__all__ = ["Structure", "build_structure", "structure_class", "Dense", "LowRank"]
