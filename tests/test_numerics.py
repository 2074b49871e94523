"""Numerics: half-precision models, α never NaN, β·I for ill-conditioned C_accu, 10,000 consecutive edits."""
import math

import pytest
import torch

from coachhook_plugin import apply_coachhook_to_model, get_state, remove_coachhook
from coachhook_plugin.hook import CALIBRATED, PAPER, VALIDATED, HookLayer, calibrated_zscores, reference_stats
from coachhook_plugin.update import accumulated_keys_for, hook_update, solve_spd
from conftest import FACTS, build_tiny, tiny_hparams


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layer_computes_in_float32_and_casts(dtype):
    torch.manual_seed(0)
    lin32 = torch.nn.Linear(16, 6)
    lin = torch.nn.Linear(16, 6).to(dtype)
    lin.load_state_dict({k: v.to(dtype) for k, v in lin32.state_dict().items()})
    h = HookLayer("lin", lin, alpha_z=1.0)
    K = torch.randn(16, 3, dtype=torch.float64)
    R = torch.randn(6, 3, dtype=torch.float64)
    h.add_delta(hook_update(R, K, accumulated_keys_for(h, torch.eye(16, dtype=torch.float64), K, 1.0)), R)
    h.add_keys(K.to(dtype))
    assert all(t.dtype == torch.float32 for t in h.state_tensors().values())
    h.mode = "temporary"
    h.attach(lin)
    x = torch.randn(2, 4, 16).to(dtype)
    with torch.no_grad():
        out = lin(x)
        base = torch.nn.functional.linear(x, lin.weight, lin.bias)
    assert out.dtype == dtype and torch.isfinite(out).all()
    expected = base + (x.float() @ h.delta.t()).to(dtype)  # Δk in float32, cast once
    assert torch.equal(out, expected)


def test_bf16_model_with_calibrated_gate(gpt2_tok):
    model = build_tiny("llama").to(torch.bfloat16)
    hp = tiny_hparams("llama", mom2_update_weight=1e-2, gate="calibrated")
    ids = gpt2_tok(FACTS[0]["prompt"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
    apply_coachhook_to_model(model, gpt2_tok, FACTS[:2], hp, progress=None)
    state = get_state(model)
    for h in state.layers.values():
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in h.state_tensors().values())
        assert math.isfinite(h.ref_mean) and h.ref_std > 0 and all(math.isfinite(a) for a in h.alphas.values())
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert after.dtype == torch.bfloat16 and torch.isfinite(after).all() and not torch.equal(after, before)
    remove_coachhook(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_z_and_alpha_are_never_nan():
    m = torch.tensor([[3.0, 3.0, 3.0]])
    assert (calibrated_zscores(m, 3.0, 0.0) == -math.inf).all()  # σ = 0: nothing swaps
    assert (calibrated_zscores(m, None, None) == -math.inf).all()  # not calibrated
    assert reference_stats(torch.tensor([[1.0]])) == (None, None, 1)  # one token: no statistics
    mean, std, n = reference_stats(m)
    assert (mean, std, n) == (3.0, 0.0, 3)  # all-equal M
    # a layer whose reference has σ = 0 never swaps and gives no finite α candidate
    lin = torch.nn.Linear(4, 2)
    h = HookLayer("lin", lin, alpha_z=2.2, gate=CALIBRATED)
    h.set_delta_dense(torch.ones(2, 4))
    h.num_keys, h.ref_mean, h.ref_std = 1, mean, std
    h.observed_max_z = []
    h.attach(lin)
    with torch.no_grad():
        x = torch.randn(1, 5, 4)
        assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
        h.gate = PAPER
        lin(torch.randn(1, 1, 4))  # one token under the paper gate: σ undefined
    assert all((z == -math.inf).all() for z in h.observed_max_z)


def test_ill_conditioned_accumulator_gets_beta_identity_with_warning():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    a = q @ torch.diag(torch.tensor([1.0, 1, 1, 1, 1, 1, 1, 1e-18], dtype=torch.float64)) @ q.t()
    a = (a + a.t()) / 2
    b = torch.randn(8, 2, generator=g, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="β·I"):
        x = solve_spd(a, b)
    assert torch.isfinite(x).all() and x.abs().max() < 1e8
    well = q @ torch.diag(torch.linspace(1, 2, 8, dtype=torch.float64)) @ q.t()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.allclose(solve_spd(well, b), torch.linalg.solve(well, b))


def test_ten_thousand_consecutive_edits_stay_finite_and_keep_the_first_batch():
    """10,000 edits in 1,000 batches of 10 through the real update, gate calibration and Eq. 19 on one hook layer
    (d_in = 64, d_out = 32: low rank → dense, keys → Gram on the way). Edit keys carry a large component in a
    small 'subject' subspace, generic (calibration) keys do not; targets are consistent, so every edit can hold."""
    g = torch.Generator().manual_seed(0)
    d_in, d_out, b, n_batches, lam = 64, 32, 10, 1000, 1.0
    lin = torch.nn.Linear(d_in, d_out)
    h = HookLayer("lin", lin, alpha_z=2.2, gate=CALIBRATED)
    h.attach(lin)
    basis, _ = torch.linalg.qr(torch.randn(d_in, 4, generator=g))
    target_change = torch.randn(d_out, 4, generator=g) @ basis.t()  # acts on the subject subspace only
    generic = 0.3 * torch.randn(1, 200, d_in, generator=g)
    prior = torch.eye(d_in, dtype=torch.float64)

    def edit_keys(n):
        return (0.3 * torch.randn(n, d_in, generator=g) + 3.0 * torch.randn(n, 4, generator=g) @ basis.t()).t()

    def targets(K):
        return (lin.weight @ K + lin.bias[:, None] + target_change @ K
                + 0.01 * torch.randn(d_out, K.shape[1], generator=g))

    alphas, first = [], None
    with torch.no_grad():
        for step in range(1, n_batches + 1):
            K = edit_keys(b)
            V = targets(K)
            if first is None:
                first = (K.clone(), V.clone())
            h.mode = "temporary"
            R = (V - lin(K.t()).t()).double()
            h.mode = VALIDATED
            C = accumulated_keys_for(h, prior, K, lam)
            h.add_delta(hook_update(R, K, C), R)
            h.add_keys(K)
            h.calibration_mask = True  # the calibration pass
            lin(generic)
            h.calibration_mask = None
            h.observed_max_z = []  # the α pass: each edit key at the end of a short generic "prompt"
            for i in range(b):
                lin(torch.cat([generic[:, :5], K[:, i][None, None]], dim=1))
            cand = float(torch.cat(h.observed_max_z).min())
            h.observed_max_z = None
            if step > 1 and math.isfinite(cand):
                h.alpha = min(h.alpha, cand)
            alphas.append(h.alpha)
    assert h.num_keys == 10_000 and h.is_dense and "key_gram" in h.state_tensors()
    assert all(torch.isfinite(t).all() for t in h.state_tensors().values())
    assert all(math.isfinite(a) for a in alphas) and all(x >= y for x, y in zip(alphas, alphas[1:]))
    K1, V1 = first
    with torch.no_grad(), h.recording_decisions() as seen:
        out = lin(K1.t()[None])[0].t()
        base = torch.nn.functional.linear(K1.t(), lin.weight, lin.bias).t()
    assert seen[0]["swap"].all()  # the gate still fires on every key of the first batch ...
    assert (out - V1).norm() <= 0.05 * (base - V1).norm()  # ... and W_h still maps them to their values
