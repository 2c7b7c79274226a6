"""Loading a ``MetaSGD`` state dict: torch.optim's load, but for two things.

``torch.optim.Optimizer.load_state_dict`` casts every floating-point state
tensor to its parameter's dtype and replaces the state with copies. The step
sizes must instead keep their own dtype (float32 for a bfloat16 parameter)
and be written into the live tensors, which an outer optimizer may hold; the
online rule's running magnitudes keep their dtype too. So the last
load-state-dict pre-hook (after any a user registered, so that those may
rewrite every entry) checks the dict and sets those entries aside, and
:func:`restore` puts them back once torch has loaded the rest.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from itertools import chain
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ._step_sizes import STATE_KEY
from ._validation import validate_state_dict

__all__ = ["lending_step_sizes", "setting_aside", "restore"]

#: State that keeps its own dtype through a load, not its parameter's.
_OWN_DTYPE = (STATE_KEY, "hypergrad_scale")


@contextmanager
def lending_step_sizes(
    state: dict[Tensor, dict[str, Any]], step_sizes: Iterable[tuple[Tensor, Tensor]]
) -> Iterator[None]:
    """While torch's ``state_dict()`` packs the state (and its hooks run), every parameter of
    ``step_sizes`` (``(parameter, step size)`` pairs) has its step size in its state entry,
    also one that has no state yet: in new entries, so that the live ones are as they were
    after the block (torch's state dict holds the entries themselves)."""
    lent = {}
    for p, s in step_sizes:
        entry = state.get(p)
        if entry is None or STATE_KEY not in entry:
            lent[p] = entry
            state[p] = {**(entry or {}), STATE_KEY: s}
    try:
        yield
    finally:
        for p, entry in lent.items():
            if entry is None:
                del state[p]
            else:
                state[p] = entry


@contextmanager
def setting_aside(opt: Optimizer, live: list[list[Tensor]]) -> Iterator[dict[str, Any]]:
    """While a load runs, a last pre-hook that checks the state dict (raising before anything
    changes), completes its groups with this optimizer's options, and takes out the entries
    of :data:`_OWN_DTYPE` into the dict yielded (with the saved parameter order)."""
    kept: dict[str, Any] = {}

    def set_aside(optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
        validate_state_dict(optimizer.param_groups, live, state_dict)
        groups = [
            {**{k: v for k, v in group.items() if k not in ("params", "param_names")}, **saved}
            for group, saved in zip(optimizer.param_groups, state_dict["param_groups"], strict=True)
        ]
        state = {}
        kept["entries"] = {}
        for index, entry in state_dict["state"].items():
            kept["entries"][index] = {k: v for k, v in entry.items() if k in _OWN_DTYPE}
            state[index] = {k: v for k, v in entry.items() if k not in _OWN_DTYPE}
        kept["order"] = [index for group in groups for index in group["params"]]
        return {**state_dict, "state": state, "param_groups": groups}

    handle = opt.register_load_state_dict_pre_hook(set_aside)
    try:
        yield kept
    finally:
        handle.remove()


@torch.no_grad()
def restore(opt: Optimizer, live: list[list[Tensor]], kept: dict[str, Any]) -> None:
    """After the load: every parameter's state holds its live step size, with the loaded
    value written into it, and the entries set aside in their step size's dtype and device."""
    params = chain.from_iterable(group["params"] for group in opt.param_groups)
    for index, p, s in zip(kept["order"], params, chain.from_iterable(live), strict=True):
        own = kept["entries"].get(index, {})
        entry = opt.state[p]
        if STATE_KEY in own:
            s.copy_(own[STATE_KEY])
        entry[STATE_KEY] = s
        for key, value in own.items():
            if key != STATE_KEY:
                entry[key] = value.to(device=s.device, dtype=s.dtype)
    for group in opt.param_groups:
        if group["momentum"] != 0 and not group["nesterov"]:
            # Checkpoints of older versions kept the last direction beside the
            # momentum buffer that it equals.
            for p in group["params"]:
                opt.state[p].pop("hypergrad_direction", None)
