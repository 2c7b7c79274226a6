"""MetaSGD against torch's own table of SGD's configurations and errors.

``torch.testing._internal.common_optimizers.optim_db`` is the table torch's
optimizer suite (``test/test_optim.py``) is driven by. Its SGD entry lists
every configuration torch tests SGD with (``optim_inputs_func``; with the
global flags ``foreach``, ``fused`` and ``differentiable``, every
implementation) and the inputs SGD must reject. Here they run against
MetaSGD, with torch.optim.SGD as the reference: a configuration torch adds
to its table is covered without a change to this file. (It is a private
module of torch: if a release drops it, this module skips.)
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

common_optimizers = pytest.importorskip("torch.testing._internal.common_optimizers")

from torch_metasgd import MetaSGD  # noqa: E402

SGD_INFO = next(info for info in common_optimizers.optim_db if info.optim_cls is torch.optim.SGD)
CONFIGURATIONS = common_optimizers._get_optim_inputs_including_global_cliquey_kwargs(
    "cpu", torch.float64, SGD_INFO
)


def _describe(optim_input) -> str:
    flags = [k for k in ("foreach", "fused", "differentiable") if optim_input.kwargs.get(k)]
    return "-".join([optim_input.desc.replace(" ", "_"), *flags])


def _kwargs(optim_input) -> dict:
    # A fresh copy: a tensor lr is moved by the schedulers and must not be shared.
    return copy.deepcopy(optim_input.kwargs)


def _leaves(differentiable: bool, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 3, generator=g, dtype=dtype, requires_grad=True)
    bias = torch.randn(4, generator=g, dtype=dtype, requires_grad=True)
    if differentiable:
        # As torch's differentiable-optimizer tests: the step writes into non-leaf tensors.
        return [weight.clone(), bias.clone()]
    return [weight, bias]


def _run(opt, params, steps=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    trajectory = []
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) + 0.3 * p.detach()
        opt.step()
        trajectory.append([p.detach().clone() for p in params])
    return trajectory


def _configurations(fused: bool):
    return [
        pytest.param(c, id=_describe(c), marks=[pytest.mark.slow] if fused else [])
        for c in CONFIGURATIONS
        if bool(c.kwargs.get("fused")) == fused
    ]


@pytest.mark.parametrize("optim_input", _configurations(fused=False) + _configurations(fused=True))
def test_every_sgd_configuration_of_torchs_table_follows_torch_sgd(optim_input):
    differentiable = bool(optim_input.kwargs.get("differentiable"))
    expected_params = _leaves(differentiable)
    actual_params = _leaves(differentiable)
    expected = _run(torch.optim.SGD(expected_params, **_kwargs(optim_input)), expected_params)
    opt = MetaSGD(actual_params, **_kwargs(optim_input))
    actual = _run(opt, actual_params)
    for step_actual, step_expected in zip(actual, expected, strict=True):
        for a, e in zip(step_actual, step_expected, strict=True):
            torch.testing.assert_close(a, e, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize(
    "error_input",
    SGD_INFO.optim_error_inputs_func(device="cpu", dtype=torch.float32),
    ids=lambda e: e.optimizer_error_input.desc.replace(" ", "_"),
)
def test_every_error_of_torchs_table_is_raised_as_torch_sgd_raises_it(error_input):
    """The same check as torch's ``test_errors``: the error (or warning) type and message."""
    optim_input = error_input.optimizer_error_input
    on_step = error_input.error_on == common_optimizers.OptimizerErrorEnum.STEP_ERROR
    for cls in (torch.optim.SGD, MetaSGD):
        expect = (
            pytest.warns(error_input.error_type, match=error_input.error_regex)
            if issubclass(error_input.error_type, Warning)
            else pytest.raises(error_input.error_type, match=error_input.error_regex)
        )
        if on_step:
            opt = cls(optim_input.params, **optim_input.kwargs)
            with expect:
                opt.step()
        else:
            with expect:
                cls(optim_input.params, **optim_input.kwargs)


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(4, 2, 1, stride=2), nn.BatchNorm2d(2)).double()


def _train(opt, model, steps=3):
    x = torch.rand(1, 4, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()


@pytest.mark.parametrize("named_from", [False, True])
@pytest.mark.parametrize("named_to", [False, True])
@pytest.mark.parametrize("cls", [torch.optim.SGD, MetaSGD], ids=["SGD", "MetaSGD"])
def test_state_dicts_load_between_named_and_unnamed_optimizers_as_in_torch(
    cls, named_from, named_to
):
    model = _model()

    def params():
        return model.named_parameters() if named_from else model.parameters()

    opt = cls(params(), lr=0.01, momentum=0.9)
    _train(opt, model)
    state = copy.deepcopy(opt.state_dict())
    names = [n for n, _ in model.named_parameters()]
    assert state["param_groups"][0].get("param_names") == (names if named_from else None)
    other = cls(model.named_parameters() if named_to else model.parameters(), lr=0.01, momentum=0.9)
    other.load_state_dict(state)
    loaded = other.state_dict()
    assert loaded["param_groups"][0].get("param_names") == (
        names if named_from or named_to else None
    )
    for index, entry in state["state"].items():
        assert entry.keys() == loaded["state"][index].keys()
        for key, value in entry.items():
            assert torch.equal(value, loaded["state"][index][key])


def test_named_parameters_give_the_trajectory_and_step_sizes_of_unnamed_ones():
    named, plain = _model(), _model()
    a = MetaSGD(named.named_parameters(), lr=0.05, momentum=0.5, granularity="tensor")
    b = MetaSGD(plain.parameters(), lr=0.05, momentum=0.5, granularity="tensor")
    assert a.param_groups[0]["param_names"] == [n for n, _ in named.named_parameters()]
    assert "param_names" not in b.param_groups[0]
    assert [s.shape for s in a.meta_parameters()] == [torch.Size([])] * 4
    _train(a, named)
    _train(b, plain)
    for p, q in zip(named.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_group_mixing_named_and_unnamed_parameters_raises_as_in_torch():
    model = _model()
    (name, weight), (_, bias) = list(model.named_parameters())[:2]
    for cls in (torch.optim.SGD, MetaSGD):
        with pytest.raises(ValueError, match="all optimizer params should be with/without names"):
            cls([(name, weight), bias], lr=0.1)
        opt = cls([(name, weight)], lr=0.1)
        with pytest.raises(ValueError, match="all optimizer param groups should be with/without"):
            opt.add_param_group({"params": [bias]})
        assert len(opt.param_groups) == 1


def test_a_param_groups_list_extended_by_hand_has_a_deterministic_state_dict():
    """torch's ``test_state_dict_deterministic`` extends ``param_groups`` with itself."""
    params = _leaves(False)
    opt = MetaSGD(params, lr=0.1, momentum=0.9)
    _run(opt, params, steps=2)
    before = opt.state_dict()
    opt.param_groups.extend(opt.param_groups)
    after = opt.state_dict()
    assert after["param_groups"][-1] == before["param_groups"][-1]
    assert after["state"].keys() == before["state"].keys()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(opt, params, steps=1)
