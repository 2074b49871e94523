"""The state's representation: low-rank Δ and stored keys while small, dense after; same outputs either way;
bytes grow as designed and never pass the dense bound; profiling's table is what the real code allocates."""
import pytest
import torch

from coachhook_plugin.hook import CALIBRATED, PAPER, TEMPORARY, VALIDATED, HookLayer
from coachhook_plugin.profiling import dense_bound_bytes, simulate_layer_bytes, state_bytes_table
from coachhook_plugin.update import accumulated_keys_for, hook_update

D_IN, D_OUT = 24, 8  # low rank while r·32 < 192 (r ≤ 5); keys while n < 24


def _layer(seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(D_IN, D_OUT)
    return lin, HookLayer("lin", lin, alpha_z=1.0)


def _batches(n_batches, b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        yield torch.randn(D_IN, b, generator=g), torch.randn(D_OUT, b, generator=g, dtype=torch.float64)


def _step(h, K, R, lam=0.5):
    C = accumulated_keys_for(h, torch.eye(D_IN, dtype=torch.float64), K, lam)
    d = hook_update(R, K, C)
    h.add_delta(d, R)
    h.add_keys(K)
    return d


def test_low_rank_then_dense_equals_dense_accumulation_and_gates_identically():
    lin, h = _layer()
    _, ref = _layer()
    dense_sum = torch.zeros(D_OUT, D_IN, dtype=torch.float64)
    gram = torch.zeros(D_IN, D_IN, dtype=torch.float64)
    seen_low = seen_dense = False
    x = torch.randn(3, 7, D_IN)
    x[1, 4] *= 8  # an outlier key
    for K, R in _batches(8):
        C_expected = 0.5 * torch.eye(D_IN, dtype=torch.float64) + gram + K.double() @ K.double().t()
        assert torch.allclose(accumulated_keys_for(h, torch.eye(D_IN, dtype=torch.float64), K, 0.5), C_expected)
        dense_sum += _step(h, K, R)
        gram += K.double() @ K.double().t()
        assert torch.allclose(h.delta.double(), dense_sum, atol=1e-5)
        assert torch.allclose(h.key_gram, gram, rtol=1e-6, atol=1e-5)
        assert h.is_dense or h.rank <= h.num_keys  # each batch adds rank ≤ its size
        # every state tensor has exactly the layout's shape and dtype
        lay = h.layout(h.num_keys, h.rank)
        assert {k: (tuple(t.shape), t.dtype) for k, t in h.state_tensors().items()} == lay
        if not h.is_dense:
            seen_low = True
            u = h.state_tensors()["delta_u"]
            assert torch.allclose(u.t() @ u, torch.eye(u.shape[1]), atol=1e-6)  # U orthonormal: M = ‖Vᵀk‖
        else:
            seen_dense = True
        # the same Δ held dense gives the same outputs and the same swaps under both gates and modes
        ref.set_delta_dense(h.delta)
        m = (x.reshape(-1, D_IN).double() @ dense_sum.t()).norm(dim=-1)
        stats = float(m.median()), float(m.std())  # reference statistics that put the threshold mid-way
        ref.num_keys, (ref.ref_mean, ref.ref_std) = h.num_keys, stats
        h.ref_mean, h.ref_std = stats
        for mode in (TEMPORARY, VALIDATED):
            for gate in (PAPER, CALIBRATED):
                h.mode = ref.mode = mode
                h.gate = ref.gate = gate
                h.handle = None
                h.attach(lin)
                with torch.no_grad(), h.recording_decisions() as seen_h:
                    a = lin(x)
                h.detach()
                ref.attach(lin)
                with torch.no_grad(), ref.recording_decisions() as seen_ref:
                    b = lin(x)
                ref.detach()
                assert torch.allclose(a, b, atol=1e-5)
                if mode == VALIDATED:
                    assert torch.equal(seen_h[0]["swap"], seen_ref[0]["swap"])
                    assert seen_h[0]["swap"].any() and not seen_h[0]["swap"].all()
    assert seen_low and seen_dense
    assert h.num_keys == 16 and "keys" in h.state_tensors()  # 16 < d_in keys: still stored as keys


def test_keys_switch_to_gram_after_d_in_and_bytes_never_pass_the_dense_bound():
    _, h = _layer()
    sizes = []
    for K, R in _batches(20, b=3):
        _step(h, K, R)
        sizes.append((h.num_keys, h.state_nbytes(), set(h.state_tensors())))
        assert h.state_nbytes() <= dense_bound_bytes(D_IN, D_OUT)
    assert sizes[0][2] == {"delta_u", "delta_v", "keys"}
    assert sizes[-1][2] == {"delta", "key_gram"} and sizes[-1][0] == 60
    assert sizes[-1][1] == dense_bound_bytes(D_IN, D_OUT)
    # while low rank with keys, bytes grow linearly: 4·b·(d_out + 2·d_in) per batch of b
    assert sizes[1][1] - sizes[0][1] == 4 * 3 * (D_OUT + 2 * D_IN)
    assert [n for n, _, t in sizes if "key_gram" in t][0] >= D_IN > [n for n, _, t in sizes if "keys" in t][-1]


def test_profiling_table_is_what_the_real_code_allocates():
    counts = (0, 2, 6, 12, 30)
    sim = simulate_layer_bytes(D_IN, D_OUT, counts, batch_size=2)
    _, h = _layer()
    done = 0
    for K, R in _batches(15):
        _step(h, K, R)
        done += 2
        if done in counts:
            assert sim[done]["bytes"] == h.state_nbytes()
            assert sim[done]["tensors"] == {k: list(t.shape) for k, t in h.state_tensors().items()}
    table = state_bytes_table()
    gptj = table["gpt-j-6b"]
    assert gptj["per_edits"][1000] <= 2e9  # issue 6: GPT-J shapes ≤ 2 GB at 1,000 edits
    for v in table.values():
        per = [v["per_edits"][n] for n in sorted(v["per_edits"])]
        assert per[0] == 0 and all(a <= b for a, b in zip(per, per[1:])) and per[-1] <= v["dense_bound"]
    assert table["gpt2-xl"]["dense_bound"] == 5 * (4 * 6400 ** 2 + 4 * 1600 * 6400)  # the reference's 1.0 GB


def test_load_state_takes_other_shapes_and_reproduces_outputs_exactly():
    lin, h = _layer()
    for K, R in _batches(2):
        _step(h, K, R)
    h.ref_mean, h.ref_std, h.gate, h.alpha = 0.1, 0.05, CALIBRATED, 0.7
    tensors = {k: t.clone() for k, t in h.state_tensors().items()}
    extra = dict(h.extra_state())
    _, fresh = _layer()
    for K, R in _batches(6, seed=5):  # dense, different content
        _step(fresh, K, R)
    assert fresh.is_dense and not h.is_dense
    fresh.load_state(tensors, extra)
    assert fresh.extra_state() == extra
    assert all(torch.equal(fresh.state_tensors()[k], tensors[k]) for k in tensors)
    x = torch.randn(2, 5, D_IN)
    outs = []
    for layer in (h, fresh):
        layer.attach(lin)
        with torch.no_grad():
            outs.append(lin(x))
        layer.detach()
    assert torch.equal(outs[0], outs[1])


def test_priors_are_shared_between_states(gpt2_tok):
    from coachhook_plugin import apply_coachhook_to_model, get_state
    from conftest import FACTS, build_tiny, tiny_hparams

    hp = tiny_hparams("gpt2", mom2_update_weight=1e-2, layers=[1])
    models = [build_tiny("gpt2"), build_tiny("gpt2")]
    for m in models:
        apply_coachhook_to_model(m, gpt2_tok, FACTS[:1], hp, progress=None)
    a, b = (get_state(m) for m in models)
    assert a.priors[1] is b.priors[1]  # one d_in × d_in matrix, however many editors


def test_latency_ratios_run_side_by_side_and_leave_hooks_attached(gpt2_tok):
    from coachhook_plugin import get_state
    from coachhook_plugin.profiling import bench_speed, format_report
    from conftest import build_tiny, tiny_hparams

    model = build_tiny("gpt2", n_layer=2)
    hp = tiny_hparams("gpt2", layers=[0, 1])
    rep = bench_speed(model, gpt2_tok, hp, n_edits=300, batch_size=50, reps=2, batch=2, seq_len=8,
                      gen_prompt_len=4, new_tokens=3, table=False)
    state = get_state(model)
    assert rep["synthesized"] and all(h.num_keys == 300 and h.is_dense for h in state.layers.values())
    assert all(h.handle is not None for h in state.layers.values())  # left attached
    for gate in ("paper", "calibrated"):
        for mode in ("prompt", "generate"):
            r = rep["latency"][gate][mode]
            assert len(r["times"]["pre"]) == len(r["times"]["post"]) == 2 and r["ratio"] > 0
    assert rep["state_bytes"] == state.state_nbytes() > 0
    assert "ratio" in format_report(rep)
