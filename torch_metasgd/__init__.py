"""Meta-SGD for PyTorch: learnable per-parameter step sizes (arXiv:1707.09835)."""

from .optimizer import MetaSGD

__all__ = ["MetaSGD"]
__version__ = "0.1.0"
