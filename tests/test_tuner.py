"""``StepSizeTuner``: step sizes learned against held-out data in a training loop.

Checked against an unroll written out by hand and differentiated by autograd.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.nn import functional as F

from torch_metasgd import MetaSGD, StepSizeTuner

DTYPE = torch.float64


def _lookahead_problem():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(40, 3, generator=g, dtype=DTYPE)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=DTYPE) + 0.1 * torch.randn(
        40, 1, generator=g, dtype=DTYPE
    )
    train = [(x[i : i + 8], y[i : i + 8]) for i in range(0, 24, 8)]
    held_out = (x[24:], y[24:])
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).to(DTYPE)
    return model, train, held_out


def _mse(model, batch):
    return F.mse_loss(model(batch[0]), batch[1])


def _unrolled_held_out_loss(model, log_alphas, train, held_out, lr):
    """Hand-written unroll: theta_j = theta_{j-1} - lr * exp(s) * grad, from the model's weights."""
    w, b = (p.detach().clone().requires_grad_() for p in model.parameters())
    for x, y in train:
        gw, gb = torch.autograd.grad(F.mse_loss(x @ w.T + b, y), [w, b], create_graph=True)
        w = w - lr * log_alphas[0].exp() * gw
        b = b - lr * log_alphas[1].exp() * gb
    return F.mse_loss(held_out[0] @ w.T + b, held_out[1])


def test_lookahead_moves_step_sizes_along_the_held_out_meta_gradient():
    model, train, held_out = _lookahead_problem()
    lr, meta_lr = 0.05, 0.5
    opt = MetaSGD(model.parameters(), lr=lr, parametrization="log")
    s_before = [s.detach().clone() for s in opt.meta_parameters()]
    meta_opt = torch.optim.SGD(opt.meta_parameters(), lr=meta_lr)
    lookahead = StepSizeTuner(
        model, opt, _mse, held_out, every=len(train), unroll=len(train), meta_optimizer=meta_opt
    )
    weights = [p.detach().clone() for p in model.parameters()]

    log_alphas = [s.clone().requires_grad_() for s in s_before]
    before = _unrolled_held_out_loss(model, log_alphas, train, held_out, lr)
    expected_grads = torch.autograd.grad(before, log_alphas)

    results = [lookahead.step(batch) for batch in train]
    assert results[:-1] == [None] * (len(train) - 1)
    torch.testing.assert_close(results[-1], before.detach())
    for s, s0, g in zip(opt.meta_parameters(), s_before, expected_grads, strict=True):
        torch.testing.assert_close(s.detach(), s0 - meta_lr * g)
    after = _unrolled_held_out_loss(
        model, [s.detach() for s in opt.meta_parameters()], train, held_out, lr
    )
    assert after < before
    # The unroll ran on copies: the weights and their gradients are untouched.
    for p, w in zip(model.parameters(), weights, strict=True):
        assert torch.equal(p.detach(), w)
        assert p.grad is None


def test_lookahead_adds_two_lines_to_a_training_loop_and_lowers_held_out_loss():
    def train(with_lookahead: bool):
        model, train, held_out = _lookahead_problem()
        opt = MetaSGD(model.parameters(), lr=0.01, parametrization="log")
        if with_lookahead:
            lookahead = StepSizeTuner(model, opt, _mse, held_out, every=2, unroll=2, meta_lr=0.1)
        for _ in range(3):
            for batch in train:
                opt.zero_grad()
                _mse(model, batch).backward()
                opt.step()
                if with_lookahead:
                    lookahead.step(batch)
        return _mse(model, held_out).item(), opt.meta_parameters()

    plain_loss, _ = train(False)
    loss, step_sizes = train(True)
    assert all((s != 0).all() for s in step_sizes)
    assert loss < 0.95 * plain_loss


def test_lookahead_cycles_an_iterable_of_held_out_batches():
    model, train, held_out = _lookahead_problem()
    opt = MetaSGD(model.parameters(), lr=0.05, parametrization="log")
    held_out_batches = [(held_out[0][:8], held_out[1][:8]), (held_out[0][8:], held_out[1][8:])]
    frozen = torch.optim.SGD(opt.meta_parameters(), lr=0.0)
    lookahead = StepSizeTuner(
        model, opt, _mse, held_out_batches, every=1, unroll=1, meta_optimizer=frozen
    )
    losses = [lookahead.step(train[0]) for _ in range(4)]
    torch.testing.assert_close(losses[0], losses[2])
    torch.testing.assert_close(losses[1], losses[3])
    assert not torch.equal(losses[0], losses[1])


def test_lookahead_rejects_invalid_arguments():
    model, _, held_out = _lookahead_problem()
    opt = MetaSGD(model.parameters())
    with pytest.raises(ValueError, match="Invalid every value: 0"):
        StepSizeTuner(model, opt, _mse, held_out, every=0)
    with pytest.raises(ValueError, match="Invalid unroll value: 0"):
        StepSizeTuner(model, opt, _mse, held_out, unroll=0)
    with pytest.raises(ValueError, match="Invalid meta_lr value: -1"):
        StepSizeTuner(model, opt, _mse, held_out, meta_lr=-1)
    with pytest.raises(TypeError, match="MetaSGD"):
        StepSizeTuner(model, torch.optim.SGD(model.parameters(), lr=0.1), _mse, held_out)


# --------------------------------------------------------------------------
# Everything is checked when StepSizeTuner is built
# --------------------------------------------------------------------------


def _state(opt):
    return [s.detach().clone() for s in opt.meta_parameters()], copy.deepcopy(opt.state_dict())


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(every=2.5), "Invalid every value: 2.5"),
        (dict(every=True), "Invalid every value: True"),
        (dict(unroll=0.5), "Invalid unroll value: 0.5"),
        (dict(meta_lr=math.inf), "Invalid meta_lr value: inf"),
        (dict(meta_lr=math.nan), "Invalid meta_lr value: nan"),
        (dict(held_out=(torch.zeros(0, 3), torch.zeros(0, 1))), "empty batch"),
        (dict(held_out=()), "empty batch"),
        (dict(held_out=[]), "empty batch"),
        (dict(held_out=iter([(torch.ones(2, 3), torch.ones(2, 1))])), "list_iterator"),
        (
            dict(
                held_out=torch.utils.data.DataLoader(
                    torch.utils.data.TensorDataset(torch.zeros(0, 3))
                )
            ),
            "no batch",
        ),
        (dict(held_out=3), "Invalid held_out: int"),
    ],
    ids=lambda v: str(v)[:30],
)
def test_lookahead_rejects_bad_arguments_before_training(change, message):
    model, _, held_out = _lookahead_problem()
    opt = MetaSGD(model.parameters(), lr=0.05, parametrization="log")
    before = _state(opt)
    kwargs = {"held_out": held_out, **change}
    with pytest.raises(ValueError, match=message):
        StepSizeTuner(model, opt, _mse, kwargs.pop("held_out"), **kwargs)
    after = _state(opt)
    assert all(torch.equal(a, b) for a, b in zip(after[0], before[0], strict=True))


def test_lookahead_rejects_online_step_sizes_a_foreign_model_and_a_partial_meta_optimizer():
    model, _, held_out = _lookahead_problem()
    online = MetaSGD(model.parameters(), lr=0.05, hypergrad_lr=0.1)
    with pytest.raises(ValueError, match="hypergrad_lr=0.1"):
        StepSizeTuner(model, online, _mse, held_out)
    other = torch.nn.Linear(3, 1).to(DTYPE)
    opt = MetaSGD(model.parameters(), lr=0.05, parametrization="log")
    with pytest.raises(ValueError, match="not a parameter of the Linear model"):
        StepSizeTuner(other, opt, _mse, held_out)
    partial = torch.optim.SGD(opt.meta_parameters()[:1], lr=0.1)
    with pytest.raises(ValueError, match="does not hold 1 of the 2 step sizes"):
        StepSizeTuner(model, opt, _mse, held_out, meta_optimizer=partial)


def test_lookahead_updates_step_sizes_when_stepped_inside_no_grad():
    model, train, held_out = _lookahead_problem()
    opt = MetaSGD(model.parameters(), lr=0.05, parametrization="log")
    before = [s.detach().clone() for s in opt.meta_parameters()]
    lookahead = StepSizeTuner(model, opt, _mse, held_out, every=1, unroll=1, meta_lr=0.1)
    with torch.no_grad():
        loss = lookahead.step(train[0])
    assert loss is not None and torch.isfinite(loss)
    assert all(not torch.equal(s, b) for s, b in zip(opt.meta_parameters(), before, strict=True))


def test_a_dict_held_out_batch_is_one_batch_as_its_tuple_is():
    model, train, held_out = _lookahead_problem()

    def run(as_batch, loss_fn):
        work = copy.deepcopy(model)
        opt = MetaSGD(work.parameters(), lr=0.05, parametrization="log")
        lookahead = StepSizeTuner(work, opt, loss_fn, as_batch(held_out), every=1, unroll=1)
        return [lookahead.step(as_batch(train[0])) for _ in range(2)], opt.meta_parameters()

    as_tuple = run(lambda b: b, _mse)
    as_dict = run(lambda b: {"x": b[0], "y": b[1]}, lambda m, b: F.mse_loss(m(b["x"]), b["y"]))
    for a, b in zip([*as_tuple[0], *as_tuple[1]], [*as_dict[0], *as_dict[1]], strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="empty batch"):
        StepSizeTuner(model, MetaSGD(model.parameters()), _mse, {"x": torch.zeros(0, 3)})


def test_the_old_name_lookahead_still_works_with_a_future_warning():
    from torch_metasgd import LookAhead

    model = torch.nn.Linear(3, 1)
    opt = MetaSGD(model.parameters(), lr=0.1, parametrization="log")
    held_out = (torch.randn(8, 3), torch.randn(8, 1))
    with pytest.warns(FutureWarning, match="renamed StepSizeTuner"):
        tuner = LookAhead(model, opt, lambda m, b: F.mse_loss(m(b[0]), b[1]), held_out)
    assert isinstance(tuner, StepSizeTuner)


def test_the_step_sizes_of_a_param_group_added_later_are_tuned_as_if_there_from_the_start():
    torch.manual_seed(0)
    first, second = torch.nn.Linear(3, 4), torch.nn.Linear(4, 1)
    model = torch.nn.Sequential(first, torch.nn.Tanh(), second)
    loss_fn = lambda m, b: F.mse_loss(m(b[0]), b[1])  # noqa: E731
    held_out = (torch.randn(16, 3), torch.randn(16, 1))
    batch = (torch.randn(8, 3), torch.randn(8, 1))

    late = MetaSGD(first.parameters(), lr=0.1, parametrization="log")
    late_tuner = StepSizeTuner(model, late, loss_fn, held_out, every=1, unroll=1, meta_lr=0.1)
    late.add_param_group({"params": list(second.parameters())})
    early = MetaSGD(
        [{"params": list(first.parameters())}, {"params": list(second.parameters())}],
        lr=0.1,
        parametrization="log",
    )
    early_tuner = StepSizeTuner(model, early, loss_fn, held_out, every=1, unroll=1, meta_lr=0.1)
    late_tuner.step(batch)
    early_tuner.step(batch)
    for s, t in zip(late.meta_parameters(), early.meta_parameters(), strict=True):
        assert not torch.equal(t, torch.zeros_like(t))
        torch.testing.assert_close(s, t, rtol=0, atol=0)


def test_a_given_meta_optimizer_missing_a_later_groups_step_sizes_raises():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    opt = MetaSGD(model[0].parameters(), lr=0.1)
    outer = torch.optim.SGD(opt.meta_parameters(), lr=0.1)
    loss_fn = lambda m, b: F.mse_loss(m(b[0]), b[1])  # noqa: E731
    held_out = (torch.randn(16, 3), torch.randn(16, 1))
    tuner = StepSizeTuner(model, opt, loss_fn, held_out, every=1, meta_optimizer=outer)
    opt.add_param_group({"params": list(model[1].parameters())})
    with pytest.raises(ValueError, match="does not hold 2 of the 4 step sizes"):
        tuner.step((torch.randn(8, 3), torch.randn(8, 1)))
