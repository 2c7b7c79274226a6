"""``meta_loss`` on the layers researchers use, every strategy against autograd task by task.

The reference (``_reference.per_task_meta_loss``) is the inner loop written out
with ``torch.autograd.grad(create_graph=True)``, one task at a time, in
float64: no ``torch.func``, no task-stacked network.
"""

from __future__ import annotations

import copy
import multiprocessing

import pytest
import torch
from _reference import per_task_meta_loss
from torch import nn

from torch_metasgd import MetaSGD, meta_loss

DTYPE = torch.float64
mse = nn.functional.mse_loss


def _mlp_with(layer: nn.Module, width: int = 6) -> nn.Module:
    return nn.Sequential(nn.Linear(4, width), layer, nn.Tanh(), nn.Linear(width, 1))


class _ConvThen(nn.Module):
    """A convolution, then ``norm`` on its (N, 4, 4, 4) output: normalizations of images."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = norm
        self.head = nn.Linear(64, 1)

    def forward(self, x):
        h = self.conv(x.view(-1, 1, 4, 4))
        return self.head(torch.tanh(self.norm(h)).flatten(1))


class _Sequence(nn.Module):
    """A sequence model over (N, 4, 4) inputs: 4 steps of 4 features."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        h = self.body(x.view(-1, 4, 4))
        return self.head(h[0] if isinstance(h, tuple) else h).mean(1)


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        return self.attention(x, x, x)[0]


class _Embedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(8, 4)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.embedding((x[:, 0].abs() * 3).long().clamp(max=7))))


def _tracked_instance_norm_eval() -> nn.Module:
    model = _ConvThen(nn.InstanceNorm2d(4, affine=True, track_running_stats=True))
    model.norm.running_mean.uniform_(-1, 1)
    model.norm.running_var.uniform_(0.5, 2)
    return model.eval()


#: The layers of issue 25's list, with the inputs' features: 4 (an MLP's) or 16.
LAYERS = {
    "LayerNorm": (lambda: _mlp_with(nn.LayerNorm(6)), 4),
    "LayerNorm-no-affine": (lambda: _mlp_with(nn.LayerNorm(6, elementwise_affine=False)), 4),
    "LayerNorm-images": (lambda: _ConvThen(nn.LayerNorm([4, 4, 4])), 16),
    "GroupNorm": (lambda: _mlp_with(nn.GroupNorm(2, 6)), 4),
    "GroupNorm-images": (lambda: _ConvThen(nn.GroupNorm(2, 4)), 16),
    "RMSNorm": (lambda: _mlp_with(nn.RMSNorm(6)), 4),
    "InstanceNorm-affine": (lambda: _ConvThen(nn.InstanceNorm2d(4, affine=True)), 16),
    "InstanceNorm": (lambda: _ConvThen(nn.InstanceNorm2d(4)), 16),
    "InstanceNorm-tracked-eval": (_tracked_instance_norm_eval, 16),
    "BatchNorm1d": (lambda: _mlp_with(nn.BatchNorm1d(6)), 4),
    "MultiheadAttention": (lambda: _Sequence(_Attention()), 16),
    "TransformerEncoderLayer": (
        lambda: _Sequence(nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)),
        16,
    ),
    "Embedding": (_Embedding, 4),
    "GELU": (lambda: _mlp_with(nn.GELU()), 4),
    "GELU-tanh": (lambda: _mlp_with(nn.GELU("tanh")), 4),
    "SiLU": (lambda: _mlp_with(nn.SiLU()), 4),
    "Mish": (lambda: _mlp_with(nn.Mish()), 4),
    "Dropout-eval": (lambda: _mlp_with(nn.Dropout(0.5)).eval(), 4),
}


def _problem(name: str, n_tasks: int = 3, seed: int = 0):
    make, features = LAYERS[name]
    torch.manual_seed(seed)
    model = make().to(DTYPE)
    opt = MetaSGD(model.parameters(), lr=0.5).uniform_step_sizes_(0.05, 0.2)
    g = torch.Generator().manual_seed(seed + 1)
    xs, xq = (torch.randn(n_tasks, 5, features, generator=g, dtype=DTYPE) for _ in range(2))
    ys, yq = (torch.randn(n_tasks, 5, 1, generator=g, dtype=DTYPE) for _ in range(2))
    return model, opt, (xs, ys), (xq, yq)


def _assert_close_in_norm(actual, expected, rtol=1e-9):
    """Every tensor within ``rtol`` of the norm of all of them (a gradient that is 0
    analytically, such as a bias before a normalization, is rounding noise)."""
    scale = torch.cat([e.flatten() for e in expected]).norm()
    for a, e in zip(actual, expected, strict=True):
        assert torch.linalg.vector_norm(a - e) <= rtol * scale, (a - e).abs().max()


@pytest.mark.parametrize("strategy", ["vmap", "loop", "auto"])
@pytest.mark.parametrize("layer", list(LAYERS))
def test_second_order_meta_gradient_through_common_layers_matches_autograd_per_task(
    layer, strategy
):
    model, opt, support, query = _problem(layer)
    wrt = [*model.parameters(), *opt.meta_parameters()]
    loss = meta_loss(model, opt, mse, support, query, steps=2, strategy=strategy)
    grads = torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        expected = per_task_meta_loss(model, opt, mse, support, query, steps=2)
        expected_grads = torch.autograd.grad(
            expected, wrt, allow_unused=True, materialize_grads=True
        )
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    _assert_close_in_norm(grads, expected_grads)


@pytest.mark.parametrize(
    "layer", ["LayerNorm", pytest.param("InstanceNorm-affine", marks=pytest.mark.slow)]
)
def test_compiled_meta_loss_through_a_normalization_matches_autograd_per_task(layer):
    # Compiled, every strategy runs as vmap; aot_eager compiles no kernels.
    torch._dynamo.reset()
    model, opt, support, query = _problem(layer)
    wrt = [*model.parameters(), *opt.meta_parameters()]
    compiled = torch.compile(meta_loss, backend="aot_eager")
    loss = compiled(model, opt, mse, support, query, strategy="loop")
    grads = torch.autograd.grad(loss, wrt)
    expected = per_task_meta_loss(model, opt, mse, support, query)
    _assert_close_in_norm(grads, torch.autograd.grad(expected, wrt))
    torch._dynamo.reset()


# --------------------------------------------------------------------------
# The task-stacked network ("grouped"): layouts, reused modules, what it refuses
# --------------------------------------------------------------------------


def _check_against_reference(model, opt, support, query, strategy, steps=2, reference=None):
    """meta_loss of ``model`` against the reference's, run on ``reference`` if given."""
    wrt = [*model.parameters(), *opt.meta_parameters()]
    loss = meta_loss(model, opt, mse, support, query, steps=steps, strategy=strategy)
    expected = per_task_meta_loss(reference or model, opt, mse, support, query, steps=steps)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    _assert_close_in_norm(
        torch.autograd.grad(loss, wrt, allow_unused=True, materialize_grads=True),
        torch.autograd.grad(expected, wrt, allow_unused=True, materialize_grads=True),
    )


SEQUENCE_MODELS = {
    "mlp": lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)),
    "batch-norm-over-steps": lambda: nn.Sequential(
        nn.Linear(4, 6), nn.BatchNorm1d(3), nn.Tanh(), nn.Linear(6, 1)
    ),
    "flatten": lambda: nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 3)),
}


@pytest.mark.parametrize("strategy", ["grouped", "auto", "vmap", "loop"])
@pytest.mark.parametrize("n_examples", [3, 5], ids=["N==T", "N!=T"])
@pytest.mark.parametrize("arch", list(SEQUENCE_MODELS))
def test_inputs_with_extra_dimensions_stay_within_their_task(arch, n_examples, strategy):
    # Sequences (T, N, S, F): 3 tasks, N examples of S = 3 steps of 4 features.
    torch.manual_seed(0)
    model = SEQUENCE_MODELS[arch]().to(DTYPE)
    opt = MetaSGD(model.parameters(), lr=0.5).uniform_step_sizes_(0.05, 0.2)
    g = torch.Generator().manual_seed(1)
    out_shape = (3,) if arch == "flatten" else (3, 1)
    xs, xq = (torch.randn(3, n_examples, 3, 4, generator=g, dtype=DTYPE) for _ in range(2))
    ys, yq = (torch.randn(3, n_examples, *out_shape, generator=g, dtype=DTYPE) for _ in range(2))
    _check_against_reference(model, opt, (xs, ys), (xq, yq), strategy)


class _TiedLinears(nn.Sequential):
    """Two distinct Linear modules sharing one weight (weight tying), with their own biases."""

    def __init__(self):
        first, second = nn.Linear(4, 4), nn.Linear(4, 4)
        second.weight = first.weight
        super().__init__(first, nn.Tanh(), second, nn.Tanh(), nn.Linear(4, 1))


def _reused_layer() -> nn.Module:
    shared = nn.Linear(4, 4)
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), shared, nn.Tanh(), shared, nn.Linear(4, 1))


def _reused_block() -> nn.Module:
    block = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Tanh())
    return nn.Sequential(block, block, nn.Linear(4, 1))


REUSED = {"layer": _reused_layer, "block": _reused_block, "tied-weight": _TiedLinears}


@pytest.mark.parametrize("strategy", ["grouped", "vmap", "loop", "auto"])
@pytest.mark.parametrize("arch", list(REUSED))
def test_a_module_used_twice_runs_at_every_use(arch, strategy):
    torch.manual_seed(0)
    model = REUSED[arch]().to(DTYPE)
    opt = MetaSGD(model.parameters(), lr=0.5).uniform_step_sizes_(0.05, 0.2)
    g = torch.Generator().manual_seed(1)
    xs, xq = (torch.randn(3, 5, 4, generator=g, dtype=DTYPE) for _ in range(2))
    ys, yq = (torch.randn(3, 5, 1, generator=g, dtype=DTYPE) for _ in range(2))
    _check_against_reference(model, opt, (xs, ys), (xq, yq), strategy)


class _ScaledLinear(nn.Linear):
    """A Linear whose forward does more than a Linear's."""

    def forward(self, x):
        return 2 * super().forward(x)


class _ScaledSequential(nn.Sequential):
    def forward(self, x):
        return 2 * super().forward(x)


def _with_hook() -> nn.Module:
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))
    model[1].register_forward_hook(lambda module, args, out: 2 * out)
    return model


def _weight_normed() -> nn.Module:
    linear = nn.utils.parametrizations.weight_norm(nn.Linear(4, 6))
    return nn.Sequential(linear, nn.Tanh(), nn.Linear(6, 1))


MISREAD = {
    "subclass-with-forward": lambda: nn.Sequential(_ScaledLinear(4, 6), nn.Tanh(), nn.Linear(6, 1)),
    "sequential-with-forward": lambda: _ScaledSequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)
    ),
    "forward-hook": _with_hook,
    "parametrization": _weight_normed,
}


@pytest.mark.parametrize("arch", list(MISREAD))
def test_grouped_refuses_a_layer_whose_forward_it_would_not_run_and_auto_avoids_it(arch):
    torch.manual_seed(0)
    model = MISREAD[arch]().to(DTYPE)
    opt = MetaSGD(model.parameters(), lr=0.5).uniform_step_sizes_(0.05, 0.2)
    g = torch.Generator().manual_seed(1)
    xs, xq = (torch.randn(3, 5, 4, generator=g, dtype=DTYPE) for _ in range(2))
    ys, yq = (torch.randn(3, 5, 1, generator=g, dtype=DTYPE) for _ in range(2))
    with pytest.raises(ValueError, match='strategy="grouped"'):
        meta_loss(model, opt, mse, (xs, ys), (xq, yq), strategy="grouped")
    _check_against_reference(model, opt, (xs, ys), (xq, yq), "auto")


@pytest.mark.parametrize("strategy", ["vmap", "loop", "grouped"])
def test_the_model_is_left_with_its_own_parameters_after_every_entry_point(strategy):
    # functional_call swaps a reused module's tensors back in the wrong order
    # (torch 2.13): the model would keep a task's adapted, non-leaf weight.
    from torch_metasgd import adapt, adapt_tasks, reptile_loss

    torch.manual_seed(0)
    model = _reused_layer().to(DTYPE)
    opt = MetaSGD(model.parameters(), lr=0.5)
    before = {n: p for n, p in model.named_parameters(remove_duplicate=False)}
    xs, ys = torch.randn(3, 5, 4, dtype=DTYPE), torch.randn(3, 5, 1, dtype=DTYPE)

    def failing(out, y):
        raise RuntimeError("a loss that fails")

    calls = [
        lambda: meta_loss(model, opt, mse, (xs, ys), (xs, ys), strategy=strategy),
        lambda: adapt_tasks(model, opt, mse, (xs, ys), strategy=strategy),
        lambda: reptile_loss(model, opt, mse, (xs, ys), (xs, ys), strategy=strategy),
        lambda: adapt(model, opt, mse, xs[0], ys[0]),
    ]
    for call in calls:
        call()
        call()  # the second call failed: the model's parameters were not the optimizer's
        assert dict(model.named_parameters(remove_duplicate=False)) == before
    with pytest.raises(RuntimeError, match="a loss that fails"):
        meta_loss(model, opt, failing, (xs, ys), (xs, ys), steps=2, strategy=strategy)
    assert dict(model.named_parameters(remove_duplicate=False)) == before


# --------------------------------------------------------------------------
# Float32 on the Omniglot conv net: as close to float64 as the native ops get
# --------------------------------------------------------------------------


def _conv4(ways: int = 5, hidden: int = 64) -> nn.Module:
    """benchmarks/omniglot.py's network: 4 x (Conv-BatchNorm-ReLU-MaxPool), then Linear."""
    blocks = []
    for c_in in (1, hidden, hidden, hidden):
        blocks += [
            nn.Conv2d(c_in, hidden, 3, padding=1),
            nn.BatchNorm2d(hidden, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]
    return nn.Sequential(*blocks, nn.Flatten(), nn.Linear(hidden, ways))


def _strokes(n: int, g: torch.Generator) -> torch.Tensor:
    """Omniglot-like images: three thick random-walk strokes on a 105-pixel canvas resized
    to 28 (strokes near 1, most pixels exactly 0), shape (n, 1, 28, 28)."""
    canvas = torch.zeros(n, 105, 105)
    for image in canvas:
        for _ in range(3):
            position = torch.rand(2, generator=g) * 80 + 12
            velocity = torch.randn(2, generator=g)
            for _ in range(30):
                velocity = velocity + 0.3 * torch.randn(2, generator=g)
                velocity = velocity / velocity.norm()
                position = (position + 2 * velocity).clamp(3, 101)
                r, c = int(position[0]), int(position[1])
                image[r - 2 : r + 2, c - 2 : c + 2] = 1
    return nn.functional.interpolate(
        canvas[:, None], size=(28, 28), mode="bilinear", antialias=True
    )


def _omniglot_vmap_float32_errors() -> list[float]:
    """The vmap meta-gradient's norm-relative error against float64: weights, step sizes.

    2 tasks of 5-way 1-shot with 15 queries per class, on Omniglot-like images.
    """
    torch.manual_seed(3)
    model = _conv4()
    opt = MetaSGD(model.parameters(), lr=1.0).uniform_step_sizes_(0.005, 0.1)
    g = torch.Generator().manual_seed(103)
    xs, xq = _strokes(10, g).view(2, 5, 1, 28, 28), _strokes(150, g).view(2, 75, 1, 28, 28)
    ys, yq = torch.arange(5).repeat(2, 1), torch.arange(5).repeat_interleave(15).repeat(2, 1)
    ce = nn.functional.cross_entropy
    exact = copy.deepcopy(model).double()
    exact_opt = MetaSGD(exact.parameters(), lr=1.0)
    with torch.no_grad():
        for s, s64 in zip(opt.meta_parameters(), exact_opt.meta_parameters(), strict=True):
            s64.copy_(s)
    expected = per_task_meta_loss(exact, exact_opt, ce, (xs.double(), ys), (xq.double(), yq))
    expected_grads = torch.autograd.grad(
        expected, [*exact.parameters(), *exact_opt.meta_parameters()]
    )
    loss = meta_loss(model, opt, ce, (xs, ys), (xq, yq), strategy="vmap")
    grads = torch.autograd.grad(loss, [*model.parameters(), *opt.meta_parameters()])
    n = len(list(model.parameters()))
    errors = []
    for part in (slice(0, n), slice(n, None)):
        pairs = zip(grads[part], expected_grads[part], strict=True)
        error = torch.cat([(a.double() - e).flatten() for a, e in pairs])
        scale = torch.cat([e.flatten() for e in expected_grads[part]])
        errors.append((error.norm() / scale.norm()).item())
    return errors


def test_vmap_in_float32_on_the_omniglot_conv_net_is_as_close_to_float64_as_the_loop():
    # The vmap strategy's batch norm took its mean and variance in two passes:
    # on this meta-batch its meta-gradient was 7.5e-4 off float64, where the
    # loop's and grouped's are 1e-5 and 3e-6. In a fresh process: the freed
    # memory of its float64 graphs would stay in this one's heap, and a later
    # test that measures the growth of the resident set would see none.
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        errors = pool.apply(_omniglot_vmap_float32_errors)
    assert max(errors) <= 3e-5, errors


# --------------------------------------------------------------------------
# Recurrent layers: no vmap batching rule, so "auto" runs the loop
# --------------------------------------------------------------------------


class _LastStep(nn.Module):
    """A recurrent layer over (N, 3, 4) sequences, its last hidden state through a head."""

    def __init__(self, recurrent: nn.Module):
        super().__init__()
        self.recurrent = recurrent
        self.head = nn.Linear(6, 1)

    def forward(self, x):
        sequence = x.view(-1, 3, 4)
        if isinstance(self.recurrent, nn.RNNCellBase):
            state = None
            for t in range(3):
                state = self.recurrent(sequence[:, t], state)
            h = state[0] if isinstance(state, tuple) else state
        else:
            h = self.recurrent(sequence)[0][:, -1]
        return self.head(h)


RECURRENT = {
    "LSTM": lambda: nn.LSTM(4, 6, batch_first=True),
    "GRU": lambda: nn.GRU(4, 6, batch_first=True),
    "RNN": lambda: nn.RNN(4, 6, batch_first=True),
    "LSTMCell": lambda: nn.LSTMCell(4, 6),
    "GRUCell": lambda: nn.GRUCell(4, 6),
}


def _recurrent_problem(name):
    torch.manual_seed(0)
    model = _LastStep(RECURRENT[name]()).to(DTYPE)
    opt = MetaSGD(model.parameters(), lr=0.5).uniform_step_sizes_(0.05, 0.2)
    g = torch.Generator().manual_seed(1)
    xs, xq = (torch.randn(3, 5, 12, generator=g, dtype=DTYPE) for _ in range(2))
    ys, yq = (torch.randn(3, 5, 1, generator=g, dtype=DTYPE) for _ in range(2))
    return model, opt, (xs, ys), (xq, yq)


@pytest.mark.parametrize("name", list(RECURRENT))
def test_recurrent_layers_run_as_the_loop_under_auto_and_vmap_is_refused(name):
    from torch_metasgd import reptile_loss
    from torch_metasgd.batched import _auto_strategy

    model, opt, support, query = _recurrent_problem(name)
    _check_against_reference(model, opt, support, query, "auto")
    for device in ("cpu", "cuda"):
        assert _auto_strategy(model, torch.device(device)) == "loop"
    loss = reptile_loss(model, opt, mse, support, query, steps=2)
    expected = reptile_loss(model, opt, mse, support, query, steps=2, strategy="loop")
    torch.testing.assert_close(loss, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=f'strategy="vmap" cannot run {name}.*strategy="loop"'):
        meta_loss(model, opt, mse, support, query, strategy="vmap")


def test_a_compiled_meta_loss_refuses_a_recurrent_model_naming_why():
    # Compiled, every strategy runs as vmap, which has no rule for recurrent layers.
    torch._dynamo.reset()
    model, opt, support, query = _recurrent_problem("GRU")
    compiled = torch.compile(meta_loss, backend="eager")
    with pytest.raises(ValueError, match="torch.compile.*GRU"):
        compiled(model, opt, mse, support, query)
    torch._dynamo.reset()


# --------------------------------------------------------------------------
# A torch.compile'd model: run as the module it wraps
# --------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["grouped", "vmap", "loop", "auto"])
def test_a_compiled_model_runs_as_the_module_it_wraps(strategy):
    from torch_metasgd import adapt, inner_loop, reptile_loss

    torch._dynamo.reset()
    model, opt, support, query = _problem("GELU")
    compiled = torch.compile(model, backend="aot_eager")  # no double backward
    _check_against_reference(compiled, opt, support, query, strategy, reference=model)
    reptile_loss(compiled, opt, mse, support, query, strategy=strategy)
    adapt(compiled, opt, mse, support[0][0], support[1][0])
    wrt = [*model.parameters(), *opt.meta_parameters()]
    with inner_loop(compiled, opt) as (fmodel, diffopt):
        diffopt.step(mse(fmodel(support[0][0]), support[1][0]))
        loss = mse(fmodel(query[0][0]), query[1][0])
    one_task = tuple(tuple(t[:1] for t in pair) for pair in (support, query))
    expected = per_task_meta_loss(model, opt, mse, *one_task)
    _assert_close_in_norm(torch.autograd.grad(loss, wrt), torch.autograd.grad(expected, wrt))
    torch._dynamo.reset()


# --------------------------------------------------------------------------
# Evaluation before adaptation (steps=0); several inputs and targets per task
# --------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["grouped", "vmap", "loop", "auto"])
def test_zero_steps_score_the_initial_weights(strategy):
    from torch_metasgd import adapt, adapt_tasks, reptile_loss

    model, opt, support, query = _problem("GELU")
    _check_against_reference(model, opt, support, query, strategy, steps=0)
    fast = adapt_tasks(model, opt, mse, support, steps=0, strategy=strategy)
    for name, p in model.named_parameters():
        assert torch.equal(fast[name], p.detach().expand(3, *p.shape))
        assert torch.equal(adapt(model, opt, mse, support[0][0], support[1][0], steps=0)[name], p)
    loss = reptile_loss(model, opt, mse, support, query, steps=0, strategy=strategy)
    loss.backward()
    torch.testing.assert_close(loss, per_task_meta_loss(model, opt, mse, support, query, steps=0))
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())


class _TwoInputs(nn.Module):
    """A model of two inputs, given as one argument: a (features, mask) tuple or a dict."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))

    def forward(self, inputs):
        x, mask = (inputs["x"], inputs["mask"]) if isinstance(inputs, dict) else inputs
        return self.body(x) * mask


def _two_target_loss(out, targets):
    return mse(out[:, :1], targets[0]) + mse(out[:, 1:], targets[1]["y"])


@pytest.mark.parametrize("strategy", ["vmap", "loop", "auto"])
@pytest.mark.parametrize("as_dict", [False, True], ids=["tuple", "dict"])
def test_inputs_and_targets_may_be_tuples_and_dicts_of_tensors(as_dict, strategy):
    from torch_metasgd import adapt_tasks, reptile_loss

    torch.manual_seed(0)
    model = _TwoInputs().to(DTYPE)
    opt = MetaSGD(model.parameters(), lr=0.5).uniform_step_sizes_(0.05, 0.2)
    g = torch.Generator().manual_seed(1)

    def batch():
        x = torch.randn(3, 5, 4, generator=g, dtype=DTYPE)
        mask = (torch.rand(3, 5, 2, generator=g) > 0.3).to(DTYPE)
        targets = (torch.randn(3, 5, 1, generator=g, dtype=DTYPE),)
        targets += ({"y": torch.randn(3, 5, 1, generator=g, dtype=DTYPE)},)
        return ({"x": x, "mask": mask} if as_dict else (x, mask)), targets

    support, query = batch(), batch()
    wrt = [*model.parameters(), *opt.meta_parameters()]
    loss = meta_loss(model, opt, _two_target_loss, support, query, steps=2, strategy=strategy)
    expected = per_task_meta_loss(model, opt, _two_target_loss, support, query, steps=2)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    _assert_close_in_norm(torch.autograd.grad(loss, wrt), torch.autograd.grad(expected, wrt))
    fast = adapt_tasks(model, opt, _two_target_loss, support, strategy=strategy)
    assert fast["body.0.weight"].shape == (3, 6, 4)
    reptile_loss(model, opt, _two_target_loss, support, query, strategy=strategy).backward()
    with pytest.raises(ValueError, match="leading task dimension"):
        bad = (support[0], (support[1][0][:2], support[1][1]))
        meta_loss(model, opt, _two_target_loss, bad, query, strategy=strategy)


def test_grouped_refuses_inputs_that_are_not_one_tensor():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 1)).to(DTYPE)
    opt = MetaSGD(model.parameters(), lr=0.5)
    xs, ys = torch.randn(3, 5, 4, dtype=DTYPE), torch.randn(3, 5, 1, dtype=DTYPE)
    with pytest.raises(ValueError, match='strategy="grouped" takes one tensor of inputs'):
        meta_loss(model, opt, mse, ((xs,), ys), ((xs,), ys), strategy="grouped")
