"""Closed forms shared by the tests, written independently of torch_metasgd."""

import math

import torch


def ref_phi(s: torch.Tensor, parametrization: str) -> torch.Tensor:
    """The parametrizations in closed form: s, exp(s), log(1 + exp(s)) / log(2)."""
    if parametrization == "identity":
        return s
    if parametrization == "log":
        return torch.exp(s)
    return torch.log1p(torch.exp(s)) / math.log(2.0)


def ref_inward_clamp(alpha: torch.Tensor, lr_min, lr_max) -> torch.Tensor:
    """``clamp(alpha, lr_min, lr_max)`` whose gradient passes at a bound only inward.

    Written by hand: a straight-through clamp (the gradient always passes),
    and a hook that zeroes it where a descent step (``-grad``) would push an
    out-of-bounds ``alpha`` further out.
    """
    clamped = alpha + (alpha.clamp(lr_min, lr_max) - alpha).detach()
    if clamped.requires_grad:
        value = alpha.detach()

        def block_outward(grad):
            below = value < lr_min if lr_min is not None else torch.zeros_like(value, dtype=bool)
            above = value > lr_max if lr_max is not None else torch.zeros_like(value, dtype=bool)
            return torch.where((below & (grad > 0)) | (above & (grad < 0)), 0.0, grad)

        clamped.register_hook(block_outward)
    return clamped
