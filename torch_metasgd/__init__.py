"""Meta-SGD for PyTorch: learnable per-parameter step sizes (arXiv:1707.09835)."""

from .batched import adapt, adapt_tasks, meta_loss
from .differentiable import DifferentiableMetaSGD, inner_loop
from .distributed import MetaLearner, average_gradients
from .lookahead import LookAhead
from .optimizer import MetaSGD
from .reptile import ReptileLearner, reptile_loss

__all__ = [
    "MetaSGD",
    "DifferentiableMetaSGD",
    "inner_loop",
    "meta_loss",
    "adapt",
    "adapt_tasks",
    "reptile_loss",
    "ReptileLearner",
    "LookAhead",
    "MetaLearner",
    "average_gradients",
]
__version__ = "0.1.0"
