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


def task_slice(tree, t: int):
    """Task ``t`` of a batch whose tensor leaves (in tuples, lists, dicts) lead with the task."""
    if isinstance(tree, torch.Tensor):
        return tree[t]
    if isinstance(tree, dict):
        return {k: task_slice(v, t) for k, v in tree.items()}
    return type(tree)(task_slice(v, t) for v in tree)


def _first_leaf(tree) -> torch.Tensor:
    if isinstance(tree, torch.Tensor):
        return tree
    return _first_leaf(next(iter(tree.values() if isinstance(tree, dict) else tree)))


def plain_meta_sgd_step_sizes(opt) -> dict[int, torch.Tensor]:
    """``alpha = lr * s`` by parameter id, for an optimizer with the default options only."""
    alphas = {}
    for group, step_sizes in zip(opt.param_groups, opt.step_sizes_by_group(), strict=True):
        assert group["parametrization"] == "identity" and group["lr_min"] is None
        assert group["lr_max"] is None and not group["momentum"] and not group["weight_decay"]
        for p, s in zip(group["params"], step_sizes, strict=True):
            alphas[id(p)] = group["lr"] * s
    return alphas


def per_task_meta_loss(model, opt, loss_fn, support, query, steps=1, first_order=False):
    """The mean query loss after ``steps`` plain Meta-SGD steps, one task at a time.

    Written out with ``torch.autograd.grad(create_graph=True)`` on a copy of the
    model (its buffers may be written): theta <- theta - lr * s * grad, a
    parameter without a gradient left as it is, the model called on each
    task's inputs as its one argument.
    """
    import copy

    from torch.func import functional_call

    work = copy.deepcopy(model)
    alphas = plain_meta_sgd_step_sizes(opt)
    initial = dict(model.named_parameters())
    trained = [n for n, p in initial.items() if id(p) in alphas and p.requires_grad]
    losses = []
    for t in range(_first_leaf(query).shape[0]):
        params = dict(initial)
        for _ in range(steps):
            out = functional_call(work, params, (task_slice(support[0], t),))
            loss = loss_fn(out, task_slice(support[1], t))
            grads = torch.autograd.grad(
                loss, [params[n] for n in trained], create_graph=not first_order, allow_unused=True
            )
            for n, g in zip(trained, grads, strict=True):
                if g is not None:
                    params[n] = params[n] - alphas[id(initial[n])] * g
        out = functional_call(work, params, (task_slice(query[0], t),))
        losses.append(loss_fn(out, task_slice(query[1], t)))
    return torch.stack(losses).mean()
