"""The gate's one home (gate.py: Eq. 17–19 as functions; HookLayer's context managers): each piece on numbers
that differ if it is wrong, both implementations of the swap (gather on CPU, masked matmul elsewhere) on CPU,
and the passes that switch gate or mode leave every hook layer exactly as they found it."""
import math

import pytest
import torch

from coachhook_plugin import gate as gate_mod
from coachhook_plugin import apply_coachhook_to_model, get_state, hook as hook_mod
from coachhook_plugin.edit_requests import prepare_requests
from coachhook_plugin.gate import (CALIBRATED, PAPER, TEMPORARY, VALIDATED, add_swapped, alpha_candidate, alpha_next,
                                   deviation_norms, gathers_swapped_rows, swapped_tokens)
from coachhook_plugin.hook import HookLayer
from coachhook_plugin.scope import calibrate_gate, compute_alpha_candidates
from conftest import FACTS, build_tiny, tiny_hparams


def test_eq17_deviation_norms_per_token():
    y = torch.tensor([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0], [1.0, 0.0], [0.0, 0.0], [5.0, 12.0]])
    m = deviation_norms(y, torch.Size([2, 3, 7]))  # two sequences of three tokens
    assert torch.equal(m, torch.tensor([[5.0, 1.0, 10.0], [1.0, 0.0, 13.0]]))
    assert deviation_norms(y, torch.Size([6, 7])).shape == (1, 6)  # an un-batched (T, d) input: one sequence


def test_eq18_swaps_where_z_reaches_alpha():
    z = torch.tensor([[0.5, 1.0, 1.5, -math.inf]])
    assert swapped_tokens(z, 1.0).tolist() == [[False, True, True, False]]


def test_eq19_alpha_candidate_and_update():
    assert alpha_candidate(torch.tensor([2.5, 1.75, -math.inf, 3.0])) == 1.75  # min over prompts, -inf ignored
    assert alpha_candidate(torch.tensor([math.nan, -math.inf])) == math.inf
    assert alpha_candidate(torch.empty(0)) == math.inf
    assert alpha_next(2.2, 1.5, step=1) == 2.2  # the first batch keeps α_1 = α_z
    assert alpha_next(2.2, 1.5, step=2) == 1.5  # later: min(α_{s−1}, α_c)
    assert alpha_next(1.2, 1.5, step=3) == 1.2
    assert alpha_next(2.2, math.inf, step=2) == 2.2  # no finite candidate: unchanged


def test_swap_branch_is_chosen_by_device_type():
    assert gathers_swapped_rows("cpu") is True
    assert gathers_swapped_rows("cuda") is False and gathers_swapped_rows("mps") is False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("low_rank", [True, False])
def test_gathered_and_masked_swaps_give_the_same_output(dtype, low_rank):
    g = torch.Generator().manual_seed(0)
    n, d_out, r = 10, 6, 3
    out = torch.randn(n, d_out, generator=g).to(dtype)
    u = torch.linalg.qr(torch.randn(d_out, r, generator=g, dtype=torch.float64))[0].float() if low_rank else None
    y = torch.randn(n, r if low_rank else d_out, generator=g)
    swap = torch.tensor([0, 1, 0, 0, 1, 1, 0, 0, 0, 1], dtype=torch.bool)
    full = y @ u.t() if low_rank else y
    expected = out.float() + swap[:, None].float() * full
    gathered = add_swapped(out, y, u, swap, gather=True)
    masked = add_swapped(out, y, u, swap, gather=False)
    assert gathered.dtype == masked.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert torch.allclose(gathered.float(), expected, atol=tol) and torch.allclose(masked.float(), expected, atol=tol)
    assert torch.equal(gathered[~swap], out[~swap]) and torch.equal(masked[~swap], out[~swap])
    assert not torch.allclose(gathered[swap].float(), out[swap].float())  # the swapped rows did move
    none = torch.zeros(n, dtype=torch.bool)
    assert torch.equal(add_swapped(out, y, u, none, gather=True), out)
    assert torch.equal(add_swapped(out, y, u, none, gather=False), out)


def _low_rank_hooked_linear(d_in=12, d_out=6):
    torch.manual_seed(0)
    lin = torch.nn.Linear(d_in, d_out)
    hook = HookLayer("lin", lin, alpha_z=1.0)
    keys = torch.randn(d_in, 2)
    residual = torch.randn(d_out, 2, dtype=torch.float64)
    hook.add_delta(residual @ torch.randn(2, d_in, dtype=torch.float64), residual)
    hook.add_keys(keys)
    assert not hook.is_dense and hook.rank == 2
    hook.attach(lin)
    return lin, hook


def test_forward_hook_gives_the_same_output_with_the_masked_branch_forced_on_cpu(monkeypatch):
    lin, hook = _low_rank_hooked_linear()
    x = 0.05 * torch.randn(3, 9, 12)
    x[0, 4] = 3.0  # outlier keys: large ‖Δk‖, so some tokens swap and some do not
    x[2, 7] = -2.5
    with torch.no_grad(), hook.recording_decisions() as seen:
        gathered = lin(x)
        monkeypatch.setattr(hook_mod, "gathers_swapped_rows", lambda device_type: False)
        masked = lin(x)
        plain = torch.nn.functional.linear(x, lin.weight, lin.bias)
    swap = seen[0]["swap"]
    assert torch.equal(seen[1]["swap"], swap) and swap.any() and not swap.all()
    assert torch.allclose(gathered, masked, atol=1e-6)
    assert torch.equal(gathered[~swap], plain[~swap])
    assert not torch.allclose(gathered[swap], plain[swap])


def test_context_managers_put_everything_back_even_on_error():
    lin, hook = _low_rank_hooked_linear()
    hook.gate, hook.mode = PAPER, VALIDATED
    hook.ref_mean, hook.ref_std, hook.ref_count = 0.5, 0.25, 7
    with pytest.raises(RuntimeError):
        with hook.gating(gate=CALIBRATED, mode=TEMPORARY):
            assert (hook.gate, hook.mode) == (CALIBRATED, TEMPORARY)
            raise RuntimeError("boom")
    assert (hook.gate, hook.mode) == (PAPER, VALIDATED)
    with hook.recording_max_z() as max_z, torch.no_grad():
        lin(torch.randn(2, 5, 12))
    assert len(max_z) == 1 and max_z[0].shape == (2,) and hook.observed_max_z is None
    x = torch.randn(2, 5, 12)
    with hook.calibrating(True) as h, torch.no_grad():
        assert (h.gate, h.mode, h.ref_mean) == (CALIBRATED, VALIDATED, None)  # old statistics dropped first
        lin(x)
    m = (x.reshape(-1, 12) @ hook._v).norm(dim=-1).double()
    assert hook.ref_mean == pytest.approx(float(m.mean()), rel=1e-6)
    assert hook.ref_std == pytest.approx(float(m.std()), rel=1e-5) and hook.ref_count == 10
    assert (hook.gate, hook.mode, hook.calibration_mask) == (PAPER, VALIDATED, None)


def test_alpha_and_calibration_passes_leave_the_hooks_as_they_were(gpt2_tok):
    model = build_tiny("gpt2")
    hp = tiny_hparams("gpt2", gate=PAPER)
    apply_coachhook_to_model(model, gpt2_tok, FACTS[:2], hp, progress=None)
    state = get_state(model)
    before = {l: (h.gate, h.mode, dict(h.alphas)) for l, h in state.layers.items()}
    cands = compute_alpha_candidates(model, gpt2_tok, state, prepare_requests(FACTS[2:]), gate=CALIBRATED)
    assert all(math.isfinite(c) for c in cands.values())
    ref = calibrate_gate(model, gpt2_tok, state)
    assert all(mean is not None and std > 0 for mean, std, _ in ref.values())
    for l, h in state.layers.items():
        assert (h.gate, h.mode, dict(h.alphas)) == before[l]
        assert h.observed_max_z is None and h.calibration_mask is None
    assert state._mask is None


def test_eq19_in_the_batch_loop(gpt2_tok):
    """The α a second batch leaves is alpha_next(α after batch 1, the batch's candidate) for each gate."""
    model = build_tiny("gpt2")
    hp = tiny_hparams("gpt2")
    apply_coachhook_to_model(model, gpt2_tok, FACTS[:2], hp, progress=None)
    state = get_state(model)
    first = {l: dict(h.alphas) for l, h in state.layers.items()}
    assert all(a == hp.alpha_z for alphas in first.values() for a in alphas.values())  # α_1 = α_z
    apply_coachhook_to_model(model, gpt2_tok, FACTS[2:], hp, progress=None)
    info = state.last_info
    for g in gate_mod.GATES:
        for l, h in state.layers.items():
            cand = info["by_gate"][g]["alpha_candidates"][l]
            assert h.alphas[g] == alpha_next(first[l][g], cand, 2) == min(first[l][g], cand)
