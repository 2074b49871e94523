"""The calibrated gate: per-token z against reference statistics, so it fires in KV-cached generation exactly
where it fires on the full sequence, and does not care about padding or batch composition."""
import contextlib
import math

import pytest
import torch

from coachhook_plugin import HyperParamsError, apply_coachhook_to_model, get_state
from coachhook_plugin.edit_requests import pad_right, prepare_requests
from coachhook_plugin.hook import CALIBRATED, PAPER
from coachhook_plugin.scope import calibrate_gate, calibration_prompts, compute_alpha_candidates
from conftest import FACTS, build_tiny, same_state, tiny_hparams

NOPROG = dict(progress=None)


@pytest.fixture(scope="module")
def edited(gpt2_tok):
    """A tiny GPT-2 with two consecutive batches under the calibrated gate (shared by the read-only tests)."""
    model = build_tiny("gpt2")
    hp = tiny_hparams("gpt2", mom2_update_weight=1e-2, gate="calibrated")
    infos = []
    for batch in (FACTS[:2], FACTS[2:]):
        apply_coachhook_to_model(model, gpt2_tok, batch, hp, **NOPROG)
        infos.append(get_state(model).last_info)
    return model, hp, infos


@contextlib.contextmanager
def _recording(state):
    """{layer: the list of that layer's gate decisions} while within."""
    with contextlib.ExitStack() as stack:
        yield {l: stack.enter_context(h.recording_decisions()) for l, h in state.layers.items()}


def _mid_alpha(model, state, ids):
    """Set each layer's α between the smallest and the largest z on `ids`: some tokens swap, some do not."""
    with _recording(state) as rec, torch.no_grad():
        model(input_ids=ids)
    for l, h in state.layers.items():  # α in the widest gap of the middle half: no token sits on the threshold
        z = rec[l][0]["z"].reshape(-1).sort().values
        n = z.numel()
        lo, hi = n // 4, max(n // 4 + 1, 3 * n // 4)
        i = lo + int((z[lo + 1:hi + 1] - z[lo:hi]).argmax())
        h.alpha = float((z[i] + z[i + 1]) / 2)


def test_cached_generation_gates_exactly_like_the_full_sequence(edited, gpt2_tok):
    model, hp, _ = edited
    state = get_state(model)
    prompt = gpt2_tok(FACTS[0]["prompt"] + " and also", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        full_ids = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                  max_new_tokens=6, min_new_tokens=6, pad_token_id=gpt2_tok.eos_token_id)
    saved = {l: dict(h.alphas) for l, h in state.layers.items()}
    try:
        _mid_alpha(model, state, full_ids)
        with _recording(state) as full, torch.no_grad():
            full_logits = model(input_ids=full_ids).logits[0]
        # the same tokens through the KV cache: the prompt, then one token per call
        p = prompt.shape[1]
        with _recording(state) as cached, torch.no_grad():
            out = model(input_ids=full_ids[:, :p], use_cache=True)
            cached_logits = [out.logits[0]]
            past = out.past_key_values
            for t in range(p, full_ids.shape[1]):
                out = model(input_ids=full_ids[:, t:t + 1], past_key_values=past, use_cache=True)
                past = out.past_key_values
                cached_logits.append(out.logits[0])
    finally:
        for l, h in state.layers.items():
            h.alphas = saved[l]
    for l in hp.layers:
        swap_full = full[l][0]["swap"].reshape(-1)
        swap_cached = torch.cat([r["swap"].reshape(-1) for r in cached[l]])
        assert torch.equal(swap_full, swap_cached)
        one_token_calls = torch.cat([r["swap"].reshape(-1) for r in cached[l][1:]])
        assert len(cached[l]) == 1 + full_ids.shape[1] - p
        z_full = full[l][0]["z"].reshape(-1)
        z_cached = torch.cat([r["z"].reshape(-1) for r in cached[l]])
        assert torch.allclose(z_full, z_cached, atol=1e-4)
    # the gate fires during one-token calls somewhere and stays off elsewhere
    one = torch.cat([torch.cat([r["swap"].reshape(-1) for r in cached[l][1:]]) for l in hp.layers])
    assert one.any() and not one.all()
    assert torch.allclose(full_logits, torch.cat(cached_logits), atol=1e-4)


def test_paper_gate_never_fires_on_one_token_calls(edited, gpt2_tok):
    model, hp, _ = edited
    state = get_state(model)
    state.set_gate(PAPER)
    try:
        ids = gpt2_tok(FACTS[1]["prompt"], return_tensors="pt")["input_ids"]
        with _recording(state) as rec, torch.no_grad():
            out = model(input_ids=ids[:, :-1], use_cache=True)
            model(input_ids=ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)
    finally:
        state.set_gate(CALIBRATED)
    for l in hp.layers:
        assert (rec[l][1]["z"] == -math.inf).all() and not rec[l][1]["swap"].any()


@pytest.mark.parametrize("side", ["right", "left"])
def test_calibrated_gate_ignores_padding_and_batch_composition(edited, gpt2_tok, side):
    model, hp, _ = edited
    state = get_state(model)
    short = gpt2_tok(FACTS[0]["prompt"])["input_ids"]
    long = gpt2_tok("An unrelated and much longer sentence that needs several more tokens than the other")["input_ids"]
    n, w = len(short), len(long)
    ids = torch.full((2, w), gpt2_tok.eos_token_id)
    mask = torch.zeros(2, w, dtype=torch.long)
    real = slice(0, n) if side == "right" else slice(w - n, w)
    ids[0, real], mask[0, real] = torch.tensor(short), 1
    ids[1], mask[1] = torch.tensor(long), 1
    saved = {l: dict(h.alphas) for l, h in state.layers.items()}
    try:
        _mid_alpha(model, state, torch.tensor([short]))
        for ignore in (True, False):  # the calibrated gate needs no mask at all
            state.hparams.gate_ignore_padding = ignore
            with _recording(state) as rec, torch.no_grad():
                model(input_ids=torch.tensor([short]))
                pos = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: real tokens keep positions 0..n-1
                model(input_ids=ids, attention_mask=mask, position_ids=pos)
            for l in hp.layers:
                alone, batched = rec[l][0], rec[l][1]
                assert torch.equal(alone["swap"][0], batched["swap"][0, real])
                assert torch.allclose(alone["z"][0], batched["z"][0, real], atol=1e-4)
    finally:
        state.hparams.gate_ignore_padding = True
        for l, h in state.layers.items():
            h.alphas = saved[l]


def test_reference_statistics_are_mean_and_std_of_M_on_calibration_text(edited, gpt2_tok):
    model, hp, infos = edited
    state = get_state(model)
    prompts = calibration_prompts(hp)
    ids, mask = pad_right([gpt2_tok(p)["input_ids"] for p in prompts], gpt2_tok.eos_token_id, "cpu")
    store = {}
    handles = [model.get_submodule(h.module_name).register_forward_pre_hook(
        lambda m, a, _l=l: store.__setitem__(_l, a[0])) for l, h in state.layers.items()]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)  # gates on: the same activations as calibration saw
    finally:
        for hd in handles:
            hd.remove()
    for l, h in state.layers.items():
        m = (store[l].double() @ h.delta.double().t()).norm(dim=-1)[mask.bool()]
        assert h.ref_count == int(mask.sum()) == m.numel()
        assert h.ref_mean == pytest.approx(float(m.mean()), rel=1e-5)
        assert h.ref_std == pytest.approx(float(m.std()), rel=1e-5)
        assert infos[-1]["gate_reference"][l] == (h.ref_mean, h.ref_std, h.ref_count)
    # the edit prompts stand out: their subject tokens are far above generic text
    assert all(infos[0]["by_gate"][CALIBRATED]["alpha_candidates"][l] > 3 for l in hp.layers)


def test_alpha_follows_eq19_in_each_gate(edited, gpt2_tok):
    model, hp, infos = edited
    state = get_state(model)
    for gate in (PAPER, CALIBRATED):
        a1, a2 = infos[0]["by_gate"][gate]["alpha"], infos[1]["by_gate"][gate]["alpha"]
        c2 = infos[1]["by_gate"][gate]["alpha_candidates"]
        for l in hp.layers:
            assert a1[l] == hp.alpha_z
            exp = min(a1[l], c2[l]) if math.isfinite(c2[l]) else a1[l]
            assert a2[l] == pytest.approx(exp) and a2[l] <= a1[l]
            assert state.layers[l].alphas[gate] == a2[l]
    assert infos[1]["alpha"] == infos[1]["by_gate"][CALIBRATED]["alpha"]
    # the calibrated candidate is min over prompts of max_t (M_t − μ)/σ, computed independently
    reqs = prepare_requests(FACTS[2:])
    per_prompt = []
    for r in reqs:
        store = {}
        handles = [model.get_submodule(h.module_name).register_forward_pre_hook(
            lambda m, a, _l=l: store.__setitem__(_l, a[0])) for l, h in state.layers.items()]
        with torch.no_grad():
            model(input_ids=gpt2_tok(r.prompt, return_tensors="pt")["input_ids"])
        for hd in handles:
            hd.remove()
        per_prompt.append({l: float((((store[l][0] @ h.delta.t()).norm(dim=-1) - h.ref_mean) / h.ref_std).max())
                           for l, h in state.layers.items()})
    cands = compute_alpha_candidates(model, gpt2_tok, state, reqs, gate=CALIBRATED)
    for l in hp.layers:
        assert cands[l] == pytest.approx(min(p[l] for p in per_prompt), rel=1e-4)


def test_gate_switch_and_validation(edited, gpt2_tok):
    model, hp, _ = edited
    state = get_state(model)
    with pytest.raises(HyperParamsError, match="'gate'.*'paper'.*'calibrated'"):
        tiny_hparams("gpt2", gate="zscore")
    with pytest.raises(HyperParamsError, match="gate_calibration_prompts"):
        tiny_hparams("gpt2", gate_calibration_prompts=["only one"])
    with pytest.raises(HyperParamsError, match="gate_calibration_prompts"):
        tiny_hparams("gpt2", gate_calibration_prompts=["fine", "  "])
    with pytest.raises(ValueError, match="gate must be one of"):
        state.set_gate("other")
    ids = gpt2_tok(FACTS[2]["prompt"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        cal = model(input_ids=ids).logits
        state.set_gate(PAPER)  # switching uses the paper gate's own α: no re-editing
        assert all(h.alpha == h.alphas[PAPER] for h in state.layers.values())
        paper = model(input_ids=ids).logits
        state.set_gate(CALIBRATED)
        assert torch.equal(model(input_ids=ids).logits, cal)
    assert torch.isfinite(paper).all()


def test_custom_calibration_prompts_change_the_reference(gpt2_tok):
    model = build_tiny("gpt2")
    prompts = ["A plain sentence about nothing.", "Another ordinary line of text here."]
    hp = tiny_hparams("gpt2", mom2_update_weight=1e-2, gate="calibrated", gate_calibration_prompts=prompts)
    apply_coachhook_to_model(model, gpt2_tok, FACTS[:2], hp, **NOPROG)
    state = get_state(model)
    n_tokens = sum(len(gpt2_tok(p)["input_ids"]) for p in prompts)
    assert all(h.ref_count == n_tokens for h in state.layers.values())
    before = {l: (h.ref_mean, h.ref_std) for l, h in state.layers.items()}
    calibrate_gate(model, gpt2_tok, state)  # deterministic: the same statistics again
    assert before == {l: (h.ref_mean, h.ref_std) for l, h in state.layers.items()}


def test_state_roundtrip_is_bit_exact_with_gate_statistics(edited, gpt2_tok):
    model, hp, _ = edited
    state = get_state(model)
    snap = state.snapshot()
    twin_model = build_tiny("gpt2")
    from coachhook_plugin.method import ensure_state

    twin = ensure_state(twin_model, hp)  # fresh: tensors of other shapes than the snapshot's
    twin.restore(snap)
    assert same_state(twin.snapshot(), snap)
    ids = gpt2_tok([FACTS[0]["prompt"], FACTS[3]["prompt"]], return_tensors="pt", padding=True)
    with torch.no_grad():
        for gate in (CALIBRATED, PAPER):
            state.set_gate(gate)
            twin.set_gate(gate)
            assert torch.equal(model(**ids).logits, twin_model(**ids).logits)
    state.set_gate(CALIBRATED)
