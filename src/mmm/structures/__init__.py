"""One module per structure. Importing this package registers them all."""

from .base import Structure, build_structure, structure_class
from .dense import Dense
from .lowrank import LowRank
from .blockdiag import BlockDiag
from .monarch import Monarch
from .kronecker import Kronecker
from .circulant import Circulant
from .toeplitz import Toeplitz
from .ldr import LDR

__all__ = ["Structure", "build_structure", "structure_class", "Dense", "LowRank", "BlockDiag", "Monarch", "Kronecker", "Circulant", "Toeplitz", "LDR"]
