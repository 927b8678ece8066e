from .op import kron_matmul

__all__ = ["kron_matmul"]
