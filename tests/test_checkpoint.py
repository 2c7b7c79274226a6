"""MetaSGD's state and checkpoints: lazy state, ``state_dict``/``load_state_dict`` with torch's
hooks, and ``torch.distributed.checkpoint`` (one process; tests/test_distributed.py has two).

A resumed run is compared with the uninterrupted one, bitwise: a checkpoint
that silently drops a momentum buffer or the online rule's state resumes
close but not equal.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from torch_metasgd import MetaSGD

CONFIGS = {
    "momentum": dict(momentum=0.9),
    "dampening-wd": dict(momentum=0.9, dampening=0.3, weight_decay=0.01),
    "online-element": dict(momentum=0.9, hypergrad_lr=0.1, parametrization="log"),
    "online-tensor-nesterov": dict(
        momentum=0.9, nesterov=True, hypergrad_lr=0.1, granularity="tensor"
    ),
    "online-group": dict(hypergrad_lr=0.1, granularity="group", parametrization="softplus"),
}


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))


def train(m: nn.Module, opt: MetaSGD, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 4, generator=g)
        opt.zero_grad()
        m(x).sub(x[:, :1].sin()).square().mean().backward()
        opt.step()


def assert_same_run(m1, o1, m2, o2):
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(p, q)
        assert torch.equal(o1.step_size(p), o2.step_size(q))
        assert o1.state[p].keys() == o2.state[q].keys()
        for key, value in o1.state[p].items():
            assert torch.equal(value, o2.state[q][key]), key


# --------------------------------------------------------------------------
# Lazy state
# --------------------------------------------------------------------------


def test_state_is_made_at_a_parameters_first_step_and_step_sizes_exist_before():
    m = model()
    opt = MetaSGD(m.parameters(), lr=0.1, momentum=0.9)
    assert len(opt.state) == 0
    outer = torch.optim.Adam(opt.meta_parameters())
    opt.uniform_step_sizes_(0.05, 0.2)
    for p in m.parameters():
        opt.step_size(p), opt.effective_lr(p)
    saved = opt.state_dict()
    assert len(opt.state) == 0, "reading the step sizes or saving made state"
    assert sorted(saved["state"]) == [0, 1, 2, 3]
    assert all(entry.keys() == {"step_size"} for entry in saved["state"].values())
    first, second = list(m.parameters())[:2]
    first.grad = torch.ones_like(first)
    opt.step()
    assert list(opt.state) == [first]
    assert opt.state[first].keys() == {"step_size", "momentum_buffer"}
    assert (
        opt.state[first]["step_size"] is opt.step_size(first) is outer.param_groups[0]["params"][0]
    )
    assert second not in opt.state


def test_a_state_dict_saved_before_any_step_resumes_as_the_uninterrupted_run():
    m = model()
    opt = MetaSGD(m.parameters(), lr=0.05, momentum=0.9).uniform_step_sizes_(0.01, 0.1)
    buffer = io.BytesIO()
    torch.save((m.state_dict(), opt.state_dict()), buffer)
    train(m, opt, 4, seed=1)
    buffer.seek(0)
    weights, state = torch.load(buffer, weights_only=True)
    resumed = model(5)
    resumed.load_state_dict(weights)
    resumed_opt = MetaSGD(resumed.parameters(), lr=0.05, momentum=0.9)
    resumed_opt.load_state_dict(state)
    train(resumed, resumed_opt, 4, seed=1)
    assert_same_run(m, opt, resumed, resumed_opt)


# --------------------------------------------------------------------------
# load_state_dict
# --------------------------------------------------------------------------


def test_a_load_state_dict_pre_hook_rewrites_every_entry_the_step_sizes_too():
    m = model()
    opt = MetaSGD(m.parameters(), lr=0.1, momentum=0.9)
    train(m, opt, 2, seed=1)
    saved = copy.deepcopy(opt.state_dict())
    other = MetaSGD(model(3).parameters(), lr=0.1, momentum=0.9)
    seen_after = []

    def double(optimizer, state_dict):
        for entry in state_dict["state"].values():
            for key in entry:
                entry[key] = entry[key] * 2

    other.register_load_state_dict_pre_hook(double)
    other.register_load_state_dict_post_hook(lambda o: seen_after.append(o.state_dict()))
    other.load_state_dict(copy.deepcopy(saved))
    for index, p in enumerate(other.param_groups[0]["params"]):
        assert torch.equal(other.step_size(p), 2 * saved["state"][index]["step_size"])
        assert torch.equal(
            other.state[p]["momentum_buffer"], 2 * saved["state"][index]["momentum_buffer"]
        )
    assert torch.equal(seen_after[0]["state"][0]["step_size"], 2 * saved["state"][0]["step_size"])


BAD_SAVED_OPTIONS = [
    dict(lr=math.nan),
    dict(lr=-0.1),
    dict(hypergrad_lr=-1.0),
    dict(lr_max=-0.5),
    dict(nesterov=True, dampening=0.5),
    dict(fused=True, foreach=True),
    dict(lr=torch.tensor([0.1, 0.2])),
    dict(granularity="layer"),
]


@pytest.mark.parametrize("bad", BAD_SAVED_OPTIONS, ids=lambda b: ",".join(b))
def test_load_state_dict_rejects_options_the_constructor_rejects_and_changes_nothing(bad):
    m = model()
    opt = MetaSGD(m.parameters(), lr=0.1, momentum=0.9)
    train(m, opt, 2, seed=1)
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0].update(bad)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="Invalid|granularity|Nesterov"):
        opt.load_state_dict(saved)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for index, entry in before["state"].items():
        assert all(torch.equal(v, after["state"][index][k]) for k, v in entry.items())


@pytest.mark.parametrize("granularity", ["element", "tensor", "group"])
def test_the_running_magnitude_of_a_half_precision_parameter_stays_float32_through_a_load(
    granularity,
):
    scalar = nn.Parameter(torch.tensor(3.0, dtype=torch.float16))
    vector = nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = MetaSGD([scalar, vector], lr=0.01, hypergrad_lr=0.1, granularity=granularity)
    for _ in range(3):
        scalar.grad = torch.tensor(60000.0, dtype=torch.float16)
        vector.grad = torch.ones(4, dtype=torch.bfloat16)
        opt.step()
    saved = opt.state_dict()
    assert saved["state"][0]["hypergrad_scale"].dtype == torch.float32
    assert math.isfinite(saved["state"][0]["hypergrad_scale"])  # 60000**2 overflows float16
    other = MetaSGD(
        [nn.Parameter(scalar.detach().clone()), nn.Parameter(vector.detach().clone())],
        lr=0.01,
        hypergrad_lr=0.1,
        granularity=granularity,
    )
    other.load_state_dict(copy.deepcopy(saved))
    for p in other.param_groups[0]["params"]:
        assert other.state[p]["hypergrad_scale"].dtype == torch.float32
        assert other.step_size(p).dtype == torch.float32


# --------------------------------------------------------------------------
# torch.distributed.checkpoint, one process
# --------------------------------------------------------------------------


def dcp_round_trip(m, opt, make, flatten: bool, directory: str):
    """Save ``m``/``opt`` with DCP, and resume into fresh ones as its documentation shows."""
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    state = {
        "model": get_model_state_dict(m),
        "optim": get_optimizer_state_dict(m, opt, options=options),
    }
    dcp.save(state, checkpoint_id=directory)
    fresh_model, fresh_opt = make()
    target = {
        "model": get_model_state_dict(fresh_model),
        "optim": get_optimizer_state_dict(fresh_model, fresh_opt, options=options),
    }
    dcp.load(target, checkpoint_id=directory)
    set_model_state_dict(fresh_model, target["model"])
    set_optimizer_state_dict(fresh_model, fresh_opt, target["optim"], options=options)
    return fresh_model, fresh_opt


@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flattened"])
@pytest.mark.parametrize("options", CONFIGS.values(), ids=CONFIGS.keys())
def test_a_dcp_checkpoint_resumes_as_the_uninterrupted_run(options, flatten, tmp_path):
    def make():
        m = model(seed=7)
        return m, MetaSGD(m.parameters(), lr=0.05, **options)

    m, opt = make()
    opt.uniform_step_sizes_(0.02, 0.08)
    train(m, opt, 5, seed=1)
    resumed, resumed_opt = dcp_round_trip(m, opt, make, flatten, str(tmp_path))
    train(m, opt, 5, seed=2)
    train(resumed, resumed_opt, 5, seed=2)
    assert_same_run(m, opt, resumed, resumed_opt)


@pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flattened"])
def test_a_torch_sgd_dcp_checkpoint_resumes_into_metasgd_with_a_partial_load(flatten, tmp_path):
    from torch.distributed.checkpoint import DefaultLoadPlanner

    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    m = model()
    sgd = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    train(m, sgd, 3, seed=1)
    state = {
        "model": get_model_state_dict(m),
        "optim": get_optimizer_state_dict(m, sgd, options=options),
    }
    dcp.save(state, checkpoint_id=str(tmp_path))
    train(m, sgd, 3, seed=2)

    resumed = model(5)
    opt = MetaSGD(resumed.parameters(), lr=0.05, momentum=0.9)
    target = {
        "model": get_model_state_dict(resumed),
        "optim": get_optimizer_state_dict(resumed, opt, options=options),
    }
    # MetaSGD's own entries (step sizes, options) are not in SGD's checkpoint: they keep
    # the fresh optimizer's values.
    dcp.load(
        target, checkpoint_id=str(tmp_path), planner=DefaultLoadPlanner(allow_partial_load=True)
    )
    set_model_state_dict(resumed, target["model"])
    set_optimizer_state_dict(resumed, opt, target["optim"], options=options)
    train(resumed, opt, 3, seed=2)
    for p, q in zip(m.parameters(), resumed.parameters(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
        assert torch.equal(opt.step_size(q), torch.ones_like(q))


def test_a_flattened_torch_sgd_state_dict_loads_once_completed_with_metasgds_own():
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    m = model()
    sgd = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    train(m, sgd, 3, seed=1)
    flat_sgd = get_optimizer_state_dict(m, sgd, options=options)
    # As a fresh model would: DCP warms an optimizer up only where no gradient is set.
    m.zero_grad(set_to_none=True)
    opt = MetaSGD(m.parameters(), lr=0.05, momentum=0.9)
    with pytest.raises(KeyError, match="granularity"):
        set_optimizer_state_dict(m, opt, copy.deepcopy(flat_sgd), options=options)
    completed = {**get_optimizer_state_dict(m, opt, options=options), **flat_sgd}
    set_optimizer_state_dict(m, opt, completed, options=options)
    for p in m.parameters():
        assert torch.equal(opt.state[p]["momentum_buffer"], sgd.state[p]["momentum_buffer"])


def test_accelerates_save_state_and_load_state_resume_as_the_uninterrupted_run(tmp_path):
    """Hugging Face accelerate (as Lightning and the HF Trainer) saves ``state_dict()`` and
    calls ``load_state_dict``: a run resumed through it equals the uninterrupted one."""
    accelerate = pytest.importorskip("accelerate")
    options = dict(lr=0.05, momentum=0.9, hypergrad_lr=0.1)

    def prepared(seed):
        accelerator = accelerate.Accelerator(cpu=True)
        m = model(seed)
        return accelerator, *accelerator.prepare(m, MetaSGD(m.parameters(), **options))

    def train_with(accelerator, m, opt, steps, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            opt.zero_grad()
            accelerator.backward(m(torch.randn(16, 4, generator=g)).square().mean())
            opt.step()

    accelerator, m, opt = prepared(0)
    train_with(accelerator, m, opt, 3, seed=1)
    accelerator.save_state(str(tmp_path))
    train_with(accelerator, m, opt, 3, seed=2)
    accelerator, resumed, resumed_opt = prepared(5)
    accelerator.load_state(str(tmp_path))
    train_with(accelerator, resumed, resumed_opt, 3, seed=2)
    assert_same_run(m, opt.optimizer, resumed, resumed_opt.optimizer)


def test_a_lightning_run_resumed_from_its_checkpoint_is_the_uninterrupted_run(tmp_path):
    """Lightning's ``Trainer.fit(ckpt_path=...)`` restores the optimizer through
    ``state_dict()``/``load_state_dict``: momentum, online state and step sizes resume."""
    lightning = pytest.importorskip("lightning")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 4, generator=g)
    batches = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, x[:, :1].sin()), batch_size=16
    )

    class Regression(lightning.LightningModule):
        def __init__(self, seed):
            super().__init__()
            self.net = model(seed)

        def training_step(self, batch, _):
            inputs, targets = batch
            return (self.net(inputs) - targets).square().mean()

        def configure_optimizers(self):
            return MetaSGD(self.parameters(), lr=0.05, momentum=0.9, hypergrad_lr=0.1)

    def fit(module, epochs, **kwargs):
        trainer = lightning.Trainer(
            accelerator="cpu",
            max_epochs=epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, batches, **kwargs)
        return trainer

    uninterrupted = Regression(0)
    fit(uninterrupted, 4)
    interrupted = Regression(0)
    fit(interrupted, 2).save_checkpoint(tmp_path / "two_epochs.ckpt")
    resumed = Regression(5)
    trainer = fit(resumed, 4, ckpt_path=tmp_path / "two_epochs.ckpt")
    assert_same_run(
        uninterrupted.net,
        uninterrupted.trainer.optimizers[0],
        resumed.net,
        trainer.optimizers[0],
    )


def test_meta_learning_paths_read_the_optimizer_without_making_its_state():
    """DCP warms an optimizer up (and so records what state it has) only if its state is
    empty: reading step sizes and buffers for an inner loop must not make (empty) entries."""
    from torch.nn import functional as F

    from torch_metasgd import StepSizeTuner, adapt, adapt_tasks, inner_loop, meta_loss

    m = model()
    opt = MetaSGD(m.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(3, 5, 4), torch.randn(3, 5, 1)
    meta_loss(m, opt, F.mse_loss, (x, y), (x, y)).backward()
    adapt_tasks(m, opt, F.mse_loss, (x, y))
    adapt(m, opt, F.mse_loss, x[0], y[0])
    with inner_loop(m, opt) as (fmodel, diffopt):
        diffopt.step(F.mse_loss(fmodel(x[0]), y[0]))
    tuner = StepSizeTuner(m, opt, lambda f, b: F.mse_loss(f(b[0]), b[1]), (x[0], y[0]), every=1)
    tuner.step((x[1], y[1]))
    opt.state_dict()
    assert len(opt.state) == 0
