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
