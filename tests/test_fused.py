"""``MetaSGD(fused=True)``: the step compiled into one kernel (``_fused.metasgd_fused``).

Each distinct group (options, shapes, dtypes) compiles once, 1-3 s here: the
default run compiles a few; ``-m slow`` runs every option.
"""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from _options import GRANULARITIES, PARAMETRIZATIONS, sgd_cases
from torch.nn import functional as F

from torch_metasgd import MetaSGD, _fused


@functools.cache
def _compile_error() -> str | None:
    try:
        torch.compile(lambda x: x * 2, fullgraph=True)(torch.ones(2))
    except Exception as error:  # noqa: BLE001 - any failure means: no torch.compile here
        return f"{type(error).__name__}: {error}"
    return None


@pytest.fixture(autouse=True)
def _needs_compile(request):
    if "without_a_compiler" not in request.node.name and _compile_error():
        pytest.skip(f"torch.compile cannot run here ({_compile_error()})")


def _mlp(seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).to(
        dtype
    )


def _train(model, opt, steps: int, *, scaler=None, inf_at=()) -> None:
    g = torch.Generator().manual_seed(1)
    dtype = next(model.parameters()).dtype
    for k in range(steps):
        x = torch.randn(16, 4, generator=g, dtype=dtype)
        loss = F.mse_loss(model(x), x.sum(1, keepdim=True).sin())
        if k in inf_at:
            loss = loss * float("inf")
        opt.zero_grad()
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()


def _assert_same(model_a, opt_a, model_b, opt_b, **tolerance) -> None:
    for p, q in zip(model_a.parameters(), model_b.parameters(), strict=True):
        torch.testing.assert_close(p, q, **tolerance)
        torch.testing.assert_close(opt_a.step_size(p), opt_b.step_size(q), **tolerance)


SGD_CASES = {
    ",".join(f"{k}={v}" for k, v in case.items() if k != "foreach"): case
    for case in sgd_cases()
    if case["foreach"] is None
}
QUICK = "momentum=0.9,dampening=0.0,nesterov=True,weight_decay=0.1,maximize=False"


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=[] if n == QUICK else pytest.mark.slow) for n in SGD_CASES],
)
def test_fused_step_follows_torch_sgd_fused(name):
    options = {k: v for k, v in SGD_CASES[name].items() if k != "foreach"}
    model, reference = _mlp(), _mlp()
    opt = MetaSGD(model.parameters(), lr=0.05, fused=True, **options)
    torch_opt = torch.optim.SGD(reference.parameters(), lr=0.05, fused=True, **options)
    _train(model, opt, 5)
    _train(reference, torch_opt, 5)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q)


STEP_SIZE_CASES = [
    dict(granularity=g, parametrization=phi, momentum=0.9)
    for g in GRANULARITIES
    for phi in PARAMETRIZATIONS
] + [dict(lr_min=0.04, lr_max=0.06), dict(momentum=0.5, dampening=0.2, maximize=True)]


@pytest.mark.parametrize(
    "options",
    [
        pytest.param(o, marks=[] if i == 0 else pytest.mark.slow)
        for i, o in enumerate(STEP_SIZE_CASES)
    ],
)
@pytest.mark.parametrize("hypergrad_lr", [0.0, 0.1])
def test_fused_and_foreach_steps_agree_on_learned_step_sizes(options, hypergrad_lr):
    runs = []
    for fused in (False, True):
        model = _mlp()
        opt = MetaSGD(
            model.parameters(), lr=0.05, fused=fused, hypergrad_lr=hypergrad_lr, **options
        )
        opt.uniform_step_sizes_(0.03, 0.07, generator=torch.Generator().manual_seed(2))
        _train(model, opt, 6)
        runs.append((model, opt))
    _assert_same(*runs[0], *runs[1])


@pytest.mark.parametrize("hypergrad_lr", [0.0, 0.1])
def test_grad_scaler_hands_a_fused_step_its_scale_and_skips_infs(hypergrad_lr):
    # GradScaler unscales a plain step's gradients itself and skips step() on
    # infs (reading found_inf back); a fused step gets the scale and the flag.
    runs = []
    for fused in (False, True):
        model = _mlp()
        opt = MetaSGD(
            model.parameters(), lr=0.05, momentum=0.9, fused=fused, hypergrad_lr=hypergrad_lr
        )
        assert getattr(opt, "_step_supports_amp_scaling", False) == fused
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        _train(model, opt, 3, scaler=scaler)
        before = [p.detach().clone() for p in model.parameters()]
        states = [opt.step_size(p).detach().clone() for p in model.parameters()]
        _train(model, opt, 1, scaler=scaler, inf_at=(0,))
        assert scaler.get_scale() == 2.0**9
        for p, b, s in zip(model.parameters(), before, states, strict=True):
            assert torch.equal(p, b) and torch.equal(opt.step_size(p), s)
        runs.append((model, opt))
    _assert_same(*runs[0], *runs[1])


def test_an_lr_scheduler_does_not_recompile_the_fused_step():
    model = _mlp()
    opt = MetaSGD(model.parameters(), lr=0.05, momentum=0.9, fused=True)
    _train(model, opt, 3)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            _train(model, opt, 1)
            scheduler.step()


def test_a_group_of_several_dtypes_steps_in_one_fused_call_as_torch_sgd():
    # The whole group is one compiled call: inductor, not the caller, splits it by dtype.
    def leaves():
        g = torch.Generator().manual_seed(0)
        dtypes = (torch.float32, torch.float64, torch.float32)
        return [torch.randn(3, 4, generator=g, dtype=d).requires_grad_() for d in dtypes]

    ps, qs = leaves(), leaves()
    opt = MetaSGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01, fused=True)
    torch_opt = torch.optim.SGD(qs, lr=0.1, momentum=0.9, weight_decay=0.01)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        for p, q in zip(ps, qs, strict=True):
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
            q.grad = p.grad.clone()
        opt.step()
        torch_opt.step()
    for p, q in zip(ps, qs, strict=True):
        torch.testing.assert_close(p, q)


def test_a_parameter_laid_out_anew_gets_a_fused_step_for_its_strides():
    # The compiled step leaves checking its inputs' strides to dynamo's guards
    # (no size_asserts): a weight transposed in memory, same shape, must not
    # run through the kernel compiled for the contiguous one.
    model, reference = _mlp(), _mlp()
    opt = MetaSGD(model.parameters(), lr=0.05, momentum=0.9, fused=True)
    torch_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    for m, o in ((model, opt), (reference, torch_opt)):
        _train(m, o, 2)
        m[0].weight.data = m[0].weight.data.t().contiguous().t()
        _train(m, o, 3)
    assert model[0].weight.stride() == (1, 8)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_fused_rejects_foreach_and_non_floating_parameters_before_any_change():
    # A ValueError, that torch's RuntimeError for the same input catches too.
    with pytest.raises(ValueError, match="Invalid fused=True with foreach=True"):
        MetaSGD([torch.zeros(2, requires_grad=True)], fused=True, foreach=True)
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together"):
        MetaSGD([torch.zeros(2, requires_grad=True)], fused=True, foreach=True)
    a = torch.ones(2, requires_grad=True)
    z = torch.ones(2, dtype=torch.complex64, requires_grad=True)
    opt = MetaSGD([{"params": [a]}, {"params": [z]}], lr=0.1, fused=True)
    a.grad, z.grad = torch.ones(2), torch.ones(2, dtype=torch.complex64)
    with pytest.raises(ValueError, match=r"Invalid parameter for fused=True: .*complex64"):
        opt.step()
    with pytest.raises(RuntimeError, match="`fused=True` requires all the params to be floating"):
        opt.step()
    assert torch.equal(a, torch.ones(2)) and torch.equal(z, torch.ones(2, dtype=torch.complex64))


def test_fused_without_a_compiler_warns_once_and_steps_uncompiled(monkeypatch):
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(torch._inductor.config, "force_disable_caches", True)
    monkeypatch.setattr(_fused, "_compiled_fused_step", None)
    monkeypatch.setattr(_fused, "_compile_failure", None)
    torch._dynamo.reset()
    model, reference = _mlp(), _mlp()
    opt = MetaSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01, fused=True)
    with pytest.warns(RuntimeWarning, match="could not compile its step"):
        _train(model, opt, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _train(model, opt, 2)
    torch_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)
    _train(reference, torch_opt, 2)
    _train(reference, torch_opt, 2)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q)
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("hypergrad_lr", [0.0, 0.1])
def test_fused_on_cuda_follows_the_foreach_step(hypergrad_lr):
    runs = []
    for fused in (False, True):
        model = _mlp().cuda()
        opt = MetaSGD(
            model.parameters(), lr=0.05, momentum=0.9, fused=fused, hypergrad_lr=hypergrad_lr
        )
        g = torch.Generator(device="cuda").manual_seed(1)
        for _ in range(5):
            x = torch.randn(16, 4, generator=g, device="cuda")
            opt.zero_grad()
            F.mse_loss(model(x), x.sum(1, keepdim=True).sin()).backward()
            opt.step()
        runs.append((model, opt))
    _assert_same(*runs[0], *runs[1])


@pytest.mark.parametrize("hypergrad_lr", [0.0, 0.1])
@pytest.mark.parametrize("skip_at", [0, 2], ids=["first-step", "later-step"])
def test_a_fused_step_the_grad_scaler_skips_is_no_step_at_all(hypergrad_lr, skip_at):
    """The run equals one where the skipped batch never came: no state made at a skipped
    first step (with dampening a zero momentum buffer is not "no buffer"), no direction kept
    from the inf gradients, no step size moved, on any tensor."""
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(16, 4, generator=g) for _ in range(6)]
    runs = []
    for skip in (True, False):
        model = _mlp()
        opt = MetaSGD(
            model.parameters(),
            lr=0.05,
            momentum=0.9,
            dampening=0.5,
            fused=True,
            hypergrad_lr=hypergrad_lr,
            granularity="tensor",
        )
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
        for k, x in enumerate(batches):
            if k == skip_at and not skip:
                continue
            loss = F.mse_loss(model(x), x.sum(1, keepdim=True).sin())
            if k == skip_at:
                loss = loss * float("inf")
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if k == skip_at:
                assert len(opt.state) == (0 if skip_at == 0 else 4)
        runs.append((model, opt))
    (model, opt), (reference, reference_opt) = runs
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p, q)
        assert torch.equal(opt.step_size(p), reference_opt.step_size(q))
        for key, value in reference_opt.state[q].items():
            assert torch.equal(opt.state[p][key], value), key
