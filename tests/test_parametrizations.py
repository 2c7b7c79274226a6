"""The step-size parametrizations (``torch_metasgd._parametrizations``).

Each registry entry against its closed form written out in ``_reference``, its
inverse, and the properties the kernels rely on.
"""

from __future__ import annotations

import pytest
import torch
from _reference import ref_phi
from hypothesis import given, settings
from hypothesis import strategies as st

from torch_metasgd._parametrizations import PARAMETRIZATIONS, parametrization

# --------------------------------------------------------------------------
# Parametrizations
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", PARAMETRIZATIONS)
def test_transform_of_initial_step_size_is_one(name):
    s0 = torch.tensor(parametrization(name).initial, dtype=torch.float64)
    torch.testing.assert_close(
        parametrization(name).forward(s0),
        torch.tensor(1.0, dtype=torch.float64),
        rtol=1e-15,
        atol=0,
    )


@pytest.mark.parametrize("name", PARAMETRIZATIONS)
@settings(max_examples=30, deadline=None)
@given(s=st.lists(st.floats(-5.0, 5.0), min_size=1, max_size=8))
def test_transform_is_closed_form_and_inverted_by_inverse_transform(name, s):
    s = torch.tensor(s, dtype=torch.float64)
    x = parametrization(name).forward(s)
    torch.testing.assert_close(x, ref_phi(s, name), rtol=1e-13, atol=0)
    torch.testing.assert_close(parametrization(name).inverse(x), s, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", PARAMETRIZATIONS)
@settings(max_examples=30, deadline=None)
@given(x=st.lists(st.floats(1e-4, 1e3), min_size=1, max_size=8))
def test_inverse_transform_is_inverted_by_transform(name, x):
    x = torch.tensor(x, dtype=torch.float64)
    # torch's softplus is linear above s=20, off by up to exp(-20) / 20 relative.
    rtol = 1e-10 if name == "softplus" else 1e-12
    torch.testing.assert_close(
        parametrization(name).forward(parametrization(name).inverse(x)),
        x,
        rtol=rtol,
        atol=0,
    )


@pytest.mark.parametrize("name", PARAMETRIZATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inverse_transform_is_finite_for_large_multipliers(name, dtype):
    # A step size of 2 with lr=1e-4 is a multiplier of 2e4; float32 exp overflows at 88.
    x = torch.logspace(-6, 6, 121, dtype=dtype)
    s = parametrization(name).inverse(x)
    assert torch.isfinite(s).all()
    rtol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(parametrization(name).forward(s), x, rtol=rtol, atol=0)


@pytest.mark.parametrize("name", ["log", "softplus"])
def test_positive_parametrizations_give_positive_multipliers(name):
    s = torch.linspace(-30, 30, 61, dtype=torch.float64)
    assert (parametrization(name).forward(s) > 0).all()


@pytest.mark.parametrize("name", ["exp", "Identity", "", None, 3])
def test_unknown_parametrization_is_a_value_error_naming_it(name):
    with pytest.raises(ValueError, match=f"Invalid parametrization: {name!r}"):
        parametrization(name)


@pytest.mark.parametrize("name", PARAMETRIZATIONS)
def test_registry_flags_agree_with_the_closed_form(name):
    phi = parametrization(name)
    s = torch.linspace(-30, 30, 61, dtype=torch.float64)
    assert phi.name == name
    assert phi.positive == bool((ref_phi(s, name) > 0).all())
    assert phi.is_identity == torch.equal(ref_phi(s, name), s)
    assert phi.is_exp == torch.allclose(ref_phi(s, name), s.exp(), rtol=1e-15, atol=0)


@pytest.mark.parametrize("name", PARAMETRIZATIONS)
def test_forward_all_is_forward_of_each_tensor(name):
    phi = parametrization(name)
    tensors = [torch.linspace(-3, 3, 7, dtype=torch.float64), torch.tensor(0.5), torch.ones(2, 2)]
    for got, s in zip(phi.forward_all(tensors), tensors, strict=True):
        torch.testing.assert_close(got, ref_phi(s, name), rtol=1e-15, atol=0)
