"""Meta-SGD for PyTorch: learnable per-parameter step sizes (arXiv:1707.09835)."""

from .batched import Strategy, adapt, adapt_tasks, meta_loss, strategy_for
from .differentiable import DifferentiableMetaSGD, inner_loop
from .distributed import MetaLearner, average_gradients
from .optimizer import MetaSGD
from .reptile import ReptileLearner, reptile_loss
from .tuner import LookAhead, StepSizeTuner

__all__ = [
    "MetaSGD",
    "DifferentiableMetaSGD",
    "inner_loop",
    "meta_loss",
    "adapt",
    "adapt_tasks",
    "strategy_for",
    "Strategy",
    "reptile_loss",
    "ReptileLearner",
    "StepSizeTuner",
    "LookAhead",
    "MetaLearner",
    "average_gradients",
]
__version__ = "0.1.0"
