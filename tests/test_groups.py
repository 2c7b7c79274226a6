"""The per-group view a step works from (``torch_metasgd._groups``), attacked.

``step()`` keeps each group's parameters and step sizes in a cache keyed by
the group; these tests change everything that cache could go stale on (the
group dict, its list of parameters and their order, a parameter swapped for
another, the state container, the model's device or dtype, a deep copy) and
check each step against torch.optim.SGD run on the same parameters with
the step sizes written out by hand.
"""

from __future__ import annotations

import copy
import pickle
from collections import defaultdict

import pytest
import torch

from torch_metasgd import MetaSGD


def leaves(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]


def set_grads(params, seed):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


def expected_step(params, step_sizes, lr):
    """``p - lr * s * grad``, written out (no momentum, identity step sizes)."""
    return [(p - lr * s * p.grad).detach() for p, s in zip(params, step_sizes, strict=True)]


def step_and_check(opt, params, step_sizes, seed, lr=0.1):
    set_grads(params, seed)
    expected = expected_step(params, step_sizes, lr)
    opt.step()
    for p, e in zip(params, expected, strict=True):
        torch.testing.assert_close(p.detach(), e, rtol=1e-15, atol=1e-15)


def distinct_step_sizes(opt):
    with torch.no_grad():
        for i, s in enumerate(opt.meta_parameters()):
            s.fill_(1.0 + 0.25 * (i + 1))
    return [s.detach().clone() for s in opt.meta_parameters()]


@pytest.mark.parametrize("granularity", ["element", "tensor"])
def test_reordered_parameters_keep_their_own_step_sizes(granularity):
    a, b, c = leaves((3,), (3,), (3,))
    opt = MetaSGD([a, b, c], lr=0.1, granularity=granularity)
    sa, sb, sc = distinct_step_sizes(opt)
    step_and_check(opt, [a, b, c], [sa, sb, sc], seed=1)
    opt.param_groups[0]["params"].reverse()  # same shapes: only identity tells them apart
    step_and_check(opt, [a, b, c], [sa, sb, sc], seed=2)
    assert opt.step_size(a) is opt.meta_parameters()[2]


def test_a_parameter_put_into_a_group_by_hand_gets_its_own_fresh_step_size():
    a, b = leaves((3,), (3,))
    opt = MetaSGD([a], lr=0.1)
    (sa,) = distinct_step_sizes(opt)
    step_and_check(opt, [a], [sa], seed=1)
    opt.param_groups[0]["params"].append(b)
    assert torch.equal(opt.step_size(b), torch.ones(3, dtype=torch.float64))
    assert opt.step_size(b) is not opt.step_size(a)
    step_and_check(opt, [a, b], [sa, torch.ones(3, dtype=torch.float64)], seed=2)
    assert "step_size" in opt.state[b] and opt.state[b]["step_size"] is opt.step_size(b)


def test_a_parameter_swapped_for_another_of_the_same_shape_is_a_new_parameter():
    a, b, c = leaves((3,), (3,), (3,))
    opt = MetaSGD([a, b], lr=0.1, momentum=0.9)
    distinct_step_sizes(opt)
    set_grads([a, b], 1)
    opt.step()
    opt.param_groups[0]["params"][1] = c
    assert torch.equal(opt.step_size(c), torch.ones(3, dtype=torch.float64))
    set_grads([a, b, c], 2)
    buf_a = opt.state[a]["momentum_buffer"].clone()
    opt.step()
    # a keeps its buffer; c starts its own (its first direction), b is not stepped.
    torch.testing.assert_close(opt.state[a]["momentum_buffer"], 0.9 * buf_a + a.grad)
    assert torch.equal(opt.state[c]["momentum_buffer"], c.grad)
    assert opt.state[c]["momentum_buffer"] is not opt.state[b]["momentum_buffer"]


def test_a_replaced_group_dict_and_a_replaced_state_are_followed():
    a, b = leaves((2, 2), (3,))
    opt = MetaSGD([a, b], lr=0.1)
    sa, sb = distinct_step_sizes(opt)
    step_and_check(opt, [a, b], [sa, sb], seed=1)
    opt.param_groups[0] = dict(opt.param_groups[0], params=[b, a])
    step_and_check(opt, [a, b], [sa, sb], seed=2)
    opt.state = defaultdict(dict)  # a user resetting the state: the step sizes are not state
    step_and_check(opt, [a, b], [sa, sb], seed=3)
    assert opt.state[a]["step_size"] is opt.step_size(a)


def test_state_holds_the_live_step_size_that_a_user_put_there():
    """As in torch's optimizers, what is in ``state[p]`` is what the step uses."""
    (a,) = leaves((3,))
    opt = MetaSGD([a], lr=0.1)
    mine = torch.full((3,), 2.0, dtype=torch.float64, requires_grad=True)
    opt.state[a]["step_size"] = mine
    step_and_check(opt, [a], [mine.detach()], seed=1)
    assert opt.step_size(a) is mine and opt.meta_parameters() == [mine]


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("replace", ["step size", "whole entry"])
def test_a_step_size_put_into_the_state_after_steps_is_the_one_the_next_step_uses(
    momentum, replace
):
    """The pattern of a differentiable inner loop: one optimizer, its step sizes handed
    over again before each use, after it has stepped (and looked its step sizes up)."""
    a, b = leaves((3,), (2,))
    opt = MetaSGD([a, b], lr=0.1, momentum=momentum)
    _, sb = distinct_step_sizes(opt)
    set_grads([a, b], 1)
    opt.step()
    mine = torch.full((3,), 2.0, dtype=torch.float64, requires_grad=True)
    if replace == "step size":
        opt.state[a]["step_size"] = mine
    else:
        opt.state[a] = {**opt.state[a], "step_size": mine}
    if momentum == 0:
        step_and_check(opt, [a, b], [mine.detach(), sb], seed=2)
    else:
        set_grads([a, b], 2)
        before = a.detach().clone()
        buf = opt.state[a]["momentum_buffer"].clone()
        opt.step()
        expected = before - 0.1 * 2.0 * (0.9 * buf + a.grad)
        torch.testing.assert_close(a.detach(), expected, rtol=1e-15, atol=1e-15)
    assert opt.step_size(a) is mine and opt.meta_parameters()[0] is mine


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))])
def test_a_copied_optimizer_steps_its_own_parameters_with_its_own_step_sizes(copier):
    a, b = leaves((3,), (2,))
    opt = MetaSGD([a, b], lr=0.1, momentum=0.9, granularity="tensor")
    sa, sb = distinct_step_sizes(opt)
    set_grads([a, b], 1)
    opt.step()
    twin = copier(opt)
    ta, tb = twin.param_groups[0]["params"]
    assert ta is not a and twin.step_size(ta) is not opt.step_size(a)
    assert torch.equal(twin.step_size(ta), sa) and torch.equal(twin.step_size(tb), sb)
    set_grads([a, b], 2)
    set_grads([ta, tb], 2)
    opt.step()
    twin.step()
    assert torch.equal(ta, a) and torch.equal(tb, b)
    with torch.no_grad():
        twin.step_size(ta).fill_(0.0)
    assert torch.equal(opt.step_size(a), sa)


@pytest.mark.parametrize("granularity", ["element", "tensor", "group"])
def test_state_follows_a_model_cast_to_half_precision_at_the_next_step(granularity):
    model = torch.nn.Linear(3, 2)
    opt = MetaSGD(model.parameters(), lr=0.1, momentum=0.9, granularity=granularity)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    model.to(torch.bfloat16)
    opt.zero_grad()
    model(torch.randn(4, 3, dtype=torch.bfloat16)).sum().backward()
    opt.step()
    for p in model.parameters():
        assert opt.state[p]["momentum_buffer"].dtype == torch.bfloat16
        assert opt.step_size(p).dtype == torch.float32
    # Saving a checkpoint changes nothing that the next step would see.
    before = {id(p): dict(opt.state[p]) for p in model.parameters()}
    opt.state_dict()
    for p in model.parameters():
        assert all(opt.state[p][k] is v for k, v in before[id(p)].items())
