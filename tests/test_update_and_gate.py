"""The closed-form update (Eq. 13) and the gate (Eq. 16–18) on hand-built inputs."""
import math

import pytest
import torch

from coachhook_plugin.hook import TEMPORARY, VALIDATED, HookLayer, paper_zscores
from coachhook_plugin.update import accumulated_keys_for, hook_update


def c_accu(prior, keys, lam, earlier=None):
    """C_accu through the package's own path: a hook layer that has seen the `earlier` keys (d_in × m)."""
    hook = HookLayer("lin", torch.nn.Linear(prior.shape[0], 3), alpha_z=1.0)
    if earlier is not None:
        hook.add_keys(earlier)
    return accumulated_keys_for(hook, prior, keys, lam)


def test_update_matches_independent_closed_form():
    g = torch.Generator().manual_seed(0)
    d_in, d_out, n = 12, 7, 3
    K = torch.randn(d_in, n, generator=g)
    R = torch.randn(d_out, n, generator=g)
    A = torch.randn(d_in, d_in, generator=g)
    prior = (A @ A.t() / d_in).double()
    earlier = torch.randn(d_in, 5, generator=g)  # float32, as a hook layer stores keys: exact in float64
    gram = earlier.double() @ earlier.double().t()
    lam = 3.0
    delta = hook_update(R, K, c_accu(prior, K, lam, earlier))
    expected = R.double() @ K.double().t() @ torch.linalg.inv(lam * prior + gram + K.double() @ K.double().t())
    assert torch.allclose(delta, expected, rtol=1e-9, atol=1e-10)


def test_update_drives_residual_to_zero_with_small_lambda():
    g = torch.Generator().manual_seed(1)
    K = torch.randn(16, 4, generator=g)
    R = torch.randn(8, 4, generator=g)
    delta = hook_update(R, K, c_accu(torch.eye(16), K, 1e-4))
    left = R.double() - delta @ K.double()
    assert left.norm() <= 0.1 * R.norm()
    # with a large λ the update is damped instead
    big = hook_update(R, K, c_accu(torch.eye(16), K, 1e4))
    assert (big @ K.double()).norm() < 0.01 * R.norm()


def test_singular_accumulator_gets_beta_identity_with_warning():
    K = torch.zeros(6, 2)
    K[0, 0] = 1.0
    with pytest.warns(RuntimeWarning, match="β·I"):
        delta = hook_update(torch.ones(3, 2), K, c_accu(torch.zeros(6, 6), K, 1.0))
    assert torch.isfinite(delta).all()


def test_zscores_are_the_unbiased_standardisation():
    m = torch.tensor([[1.0, 2.0, 3.0, 10.0], [4.0, 4.0, 4.0, 4.0]])
    z = paper_zscores(m)
    ref = (m[0] - m[0].mean()) / m[0].std(unbiased=True)
    assert torch.allclose(z[0], ref)
    assert torch.isinf(z[1]).all() and (z[1] < 0).all()  # σ = 0: nobody swaps, no NaN
    one = paper_zscores(torch.tensor([[5.0]]))  # a single token: σ undefined
    assert not torch.isnan(one).any() and (one == -math.inf).all()


def test_zscores_ignore_padding():
    m = torch.tensor([[1.0, 2.0, 9.0, 100.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0, 0]], dtype=torch.bool)
    z = paper_zscores(m, mask)
    ref = (m[0, :3] - m[0, :3].mean()) / m[0, :3].std()
    assert torch.allclose(z[0, :3], ref)
    assert (z[0, 3:] == -math.inf).all()


def _hooked_linear(d_in=5, d_out=3, alpha=1.0):
    torch.manual_seed(0)
    lin = torch.nn.Linear(d_in, d_out)
    hook = HookLayer("lin", lin, alpha_z=alpha)
    hook.set_delta_dense(torch.randn(d_out, d_in))
    hook.num_keys = 1
    hook.attach(lin)
    return lin, hook


def test_temporary_mode_uses_hook_weight_for_every_token():
    lin, hook = _hooked_linear()
    hook.mode = TEMPORARY
    x = torch.randn(2, 6, 5)
    w_h = hook.hook_weight(lin)
    assert torch.allclose(lin(x), x @ w_h.t() + lin.bias, atol=1e-6)


def test_validated_mode_swaps_exactly_the_outlier_tokens():
    lin, hook = _hooked_linear(alpha=1.0)
    hook.mode = VALIDATED
    x = 0.01 * torch.randn(1, 8, 5)
    x[0, 5] = torch.tensor([3.0, -2.0, 1.0, 4.0, 2.0])  # an "edited key": large ‖Δk‖
    with torch.no_grad():
        out = lin(x)
        w0 = lin.weight
        p = x @ w0.t() + lin.bias  # P = W_0 k
        o = x @ hook.hook_weight(lin).t() + lin.bias  # O = W_h k
        m = (o - p).norm(dim=-1)[0]
        z = (m - m.mean()) / m.std(unbiased=True)
    swapped = z >= hook.alpha
    assert swapped.sum() == 1 and swapped[5]
    assert torch.allclose(out[0, swapped], o[0, swapped], atol=1e-6)
    assert torch.equal(out[0, ~swapped], p[0, ~swapped])
    # raise α above the outlier's z: nothing swaps, the output is W_0's exactly
    hook.alpha = float(z.max()) + 0.01
    with torch.no_grad():
        assert torch.equal(lin(x), p)


def test_detach_restores_module_exactly():
    lin, hook = _hooked_linear()
    hook.mode = TEMPORARY
    x = torch.randn(2, 4, 5)
    with torch.no_grad():
        hooked = lin(x)
        hook.detach()
        plain = lin(x)
        ref = x @ lin.weight.t() + lin.bias
    assert not torch.allclose(hooked, plain)
    assert torch.equal(plain, torch.nn.functional.linear(x, lin.weight, lin.bias))
    assert torch.allclose(plain, ref, atol=1e-6)
