"""MetaSGD's options as one table, in the spirit of torch's ``OptimizerInfo``.

The tests that check a path against an independent reference "for every
option" draw their options from here: the in-place step against
torch.optim.SGD and the rule written out (``test_optimizer``), the higher twin
(``test_differentiable``) and the batched path (``test_batched``). A new option
of MetaSGD is added to :data:`SGD_VALUES` or :data:`STEP_SIZE_VALUES` (and to
:func:`valid` if it constrains another), and every path's tests pick it up.
"""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import strategies as st

#: The options MetaSGD shares with torch.optim.SGD, and the values the tests
#: give them; the first value is the default.
SGD_VALUES: dict[str, tuple[Any, ...]] = {
    "momentum": (0.0, 0.5, 0.9),
    "dampening": (0.0, 0.3),
    "nesterov": (False, True),
    "weight_decay": (0.0, 0.1),
    "maximize": (False, True),
    "foreach": (None, False, True),
}
#: MetaSGD's own options. ``bounds`` are ``(lr_min, lr_max)`` as multiples of
#: ``lr``: the fresh step size ``lr`` lies inside every pair, learned ones
#: (drawn around it by the tests) fall on both sides.
STEP_SIZE_VALUES: dict[str, tuple[Any, ...]] = {
    "granularity": ("element", "tensor", "group"),
    "parametrization": ("identity", "log", "softplus"),
    "bounds": ((None, None), (0.9, None), (None, 1.1), (0.9, 1.1)),
}
GRANULARITIES = list(STEP_SIZE_VALUES["granularity"])
PARAMETRIZATIONS = list(STEP_SIZE_VALUES["parametrization"])
#: The keyword arguments torch.optim.SGD takes too.
SGD_KEYS = ("lr", *SGD_VALUES)


def valid(options: dict[str, Any]) -> bool:
    """Whether MetaSGD (and torch.optim.SGD) accept the combination."""
    if options.get("nesterov"):
        return options.get("momentum", 0) > 0 and options.get("dampening", 0) == 0
    return True


def resolve(options: dict[str, Any], lr: float) -> dict[str, Any]:
    """MetaSGD's keyword arguments: ``lr`` added, ``bounds`` turned into ``lr_min``/``lr_max``."""
    resolved = {k: v for k, v in options.items() if k != "bounds"}
    low, high = options.get("bounds", (None, None))
    if low is not None:
        resolved["lr_min"] = low * lr
    if high is not None:
        resolved["lr_max"] = high * lr
    return {"lr": lr, **resolved}


def sgd_cases() -> list[dict[str, Any]]:
    """Every valid combination of the options torch.optim.SGD shares."""
    combos = itertools.product(*SGD_VALUES.values())
    return [c for c in (dict(zip(SGD_VALUES, v, strict=True)) for v in combos) if valid(c)]


def cases(lr: float, *, skip: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """One case per value of every option (the others at their defaults), plus combinations.

    Returned as resolved keyword arguments, by name; ``skip`` leaves out
    options a path ignores (``foreach`` outside the in-place step).
    """
    named: dict[str, dict[str, Any]] = {"default": {}}
    for key, values in {**SGD_VALUES, **STEP_SIZE_VALUES}.items():
        if key in skip:
            continue
        for value in values[1:]:
            options = {key: value}
            if key == "nesterov":
                options["momentum"] = 0.9
            if key == "dampening":
                options["momentum"] = 0.8
            named[f"{key}={value}"] = options
    named["nesterov+weight_decay"] = dict(momentum=0.9, nesterov=True, weight_decay=0.05)
    named["maximize+weight_decay"] = dict(maximize=True, weight_decay=0.05)
    named["softplus+momentum"] = dict(parametrization="softplus", momentum=0.5)
    named["tensor+log+lr_max"] = dict(
        granularity="tensor", parametrization="log", bounds=(None, 1.1)
    )
    named["group+softplus+bounds"] = dict(
        granularity="group", parametrization="softplus", bounds=(0.9, 1.1)
    )
    return {name: resolve(options, lr) for name, options in named.items()}


@st.composite
def options(draw, *, lr: float | st.SearchStrategy, keys: tuple[str, ...] | None = None):
    """Any valid combination of MetaSGD's options (of ``keys`` only, if given), resolved.

    ``lr`` is a value or a strategy to draw it from.
    """
    table = {
        k: v for k, v in {**SGD_VALUES, **STEP_SIZE_VALUES}.items() if keys is None or k in keys
    }
    drawn = {k: draw(st.sampled_from(values)) for k, values in table.items()}
    if not valid(drawn):
        drawn["nesterov"] = False
    return resolve(drawn, draw(lr) if isinstance(lr, st.SearchStrategy) else lr)
