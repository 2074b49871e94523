"""CoachHooK end to end on tiny random GPT-2 / GPT-J / Llama models (CPU, seconds)."""
import copy
import math

import pytest
import torch

import coachhook_plugin.method as method
from coachhook_plugin import (HyperParamsError, RequestError, apply_coachhook_to_model, get_state,
                              remove_coachhook)
from coachhook_plugin.hook import TEMPORARY
from coachhook_plugin.keys import compute_keys_and_hidden
from coachhook_plugin.edit_requests import prepare_requests
from conftest import FACTS, build_tiny, same_state, tiny_hparams

NOPROG = dict(progress=None)


def _logits(model, tok, text="The capital of Zorbia is a city"):
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model(input_ids=ids).logits


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_base_weights_untouched_and_detach_restores_logits(arch, gpt2_tok):
    model = build_tiny(arch)
    before_params, before_logits = _params(model), _logits(model, gpt2_tok)
    hp = tiny_hparams(arch, mom2_update_weight=1e-2)
    for batch in (FACTS[:2], FACTS[2:]):
        apply_coachhook_to_model(model, gpt2_tok, batch, hp, **NOPROG)
    after = _params(model)
    assert after.keys() == before_params.keys()
    assert all(torch.equal(after[k], before_params[k]) for k in after)
    state = get_state(model)
    assert state.step == 2 and all(h.delta.abs().sum() > 0 for h in state.layers.values())
    state.set_mode(TEMPORARY)  # hooks change the function while attached ...
    assert not torch.equal(_logits(model, gpt2_tok), before_logits)
    remove_coachhook(model)  # ... and removing them gives the base model bit for bit
    assert get_state(model) is None
    assert torch.equal(_logits(model, gpt2_tok), before_logits)


def test_single_layer_update_reaches_the_value(arch, gpt2_tok):
    """One layer, one template, tiny λ: after the update the (temporary) hidden state ≈ v."""
    model = build_tiny(arch)
    hp = tiny_hparams(arch, layers=[2], context_templates=["{}"], mom2_update_weight=1e-4)
    reqs = prepare_requests(FACTS[:2])
    block = hp.layer_module_tmp.format(2)
    _, h_before = compute_keys_and_hidden(model, gpt2_tok, reqs, ["{}"], hp.rewrite_module_tmp.format(2), block)
    apply_coachhook_to_model(model, gpt2_tok, FACTS[:2], hp, **NOPROG)
    state = get_state(model)
    V = state.last_info["values"]
    state.set_mode(TEMPORARY)
    _, h_after = compute_keys_and_hidden(model, gpt2_tok, reqs, ["{}"], hp.rewrite_module_tmp.format(2), block)
    assert (V - h_before).norm() > 1e-3
    assert (V - h_after).norm() <= 0.1 * (V - h_before).norm()


@pytest.mark.parametrize("gate", ["calibrated", "paper"])
def test_layers_share_the_residual_like_memit(gpt2_tok, gate):
    """Three layers, tiny λ: layer l fits its share of what the layers below it left, so the edited path
    reaches v, not ~2.3 v. (Each layer once saw the lower layers through validated hooks, whose gate had no
    statistics for this batch yet: every layer re-fitted the whole residual and the sum overshot.)"""
    model = build_tiny("gpt2")
    hp = tiny_hparams("gpt2", layers=[0, 1, 2], context_templates=["{}"], mom2_update_weight=1e-5, gate=gate)
    reqs = prepare_requests(FACTS[:3])
    block = hp.layer_module_tmp.format(2)
    _, h_before = compute_keys_and_hidden(model, gpt2_tok, reqs, ["{}"], hp.rewrite_module_tmp.format(2), block)
    apply_coachhook_to_model(model, gpt2_tok, FACTS[:3], hp, **NOPROG)
    state = get_state(model)
    V = state.last_info["values"]
    state.set_mode(TEMPORARY)
    _, h_after = compute_keys_and_hidden(model, gpt2_tok, reqs, ["{}"], hp.rewrite_module_tmp.format(2), block)
    assert (V - h_before).norm() > 1e-3
    assert (V - h_after).norm() <= 0.1 * (V - h_before).norm()


def test_update_is_the_closed_form_and_keys_accumulate(gpt2_tok, monkeypatch):
    model = build_tiny("gpt2")
    hp = tiny_hparams("gpt2", mom2_update_weight=0.5)
    seen = []
    real_update = method.hook_update

    def spy(R, K, C):
        seen.append((R.clone(), K.clone(), C.clone()))
        return real_update(R, K, C)

    monkeypatch.setattr(method, "hook_update", spy)
    apply_coachhook_to_model(model, gpt2_tok, FACTS[:2], hp, **NOPROG)
    state = get_state(model)
    grams = {l: h.key_gram.clone() for l, h in state.layers.items()}
    deltas = {l: h.delta.clone() for l, h in state.layers.items()}
    seen.clear()
    apply_coachhook_to_model(model, gpt2_tok, FACTS[2:], hp, **NOPROG)
    for (R, K, C), l in zip(seen, hp.layers):
        h = state.layers[l]
        K64 = K.double()
        # C_accu = λ·I + Σ earlier KKᵀ + KKᵀ (mom2_adjustment off → identity prior)
        assert torch.allclose(C, 0.5 * torch.eye(K.shape[0], dtype=torch.float64) + grams[l] + K64 @ K64.t())
        assert torch.allclose(h.key_gram, grams[l] + K64 @ K64.t())  # accumulates exactly Σ KKᵀ
        expected = R.double() @ K64.t() @ torch.linalg.inv(C)
        assert torch.allclose(h.delta.double() - deltas[l].double(), expected, atol=1e-5)
        assert h.num_keys == 4


def test_alpha_follows_eq19_and_never_increases(gpt2_tok):
    model = build_tiny("gpt2")
    hp = tiny_hparams("gpt2", mom2_update_weight=1e-2, alpha_z=2.2)
    history, cands = [], []
    batches = [FACTS[:2], FACTS[2:], [dict(prompt="The favourite food of Ola Berg is", subject="Ola Berg",
                                          target_new="rice")]]
    for batch in batches:
        apply_coachhook_to_model(model, gpt2_tok, batch, hp, **NOPROG)
        info = get_state(model).last_info
        history.append(info["alpha"])
        cands.append(info["alpha_candidates"])
    for l in hp.layers:
        assert history[0][l] == 2.2  # α_1 = α_z
        for s in (1, 2):
            expected = min(history[s - 1][l], cands[s][l]) if math.isfinite(cands[s][l]) else history[s - 1][l]
            assert history[s][l] == pytest.approx(expected)
            assert history[s][l] <= history[s - 1][l]
    assert any(history[-1][l] < 2.2 for l in hp.layers)  # the candidates did lower it


def test_alpha_candidate_is_min_of_each_prompts_max_z(gpt2_tok):
    model = build_tiny("gpt2")
    hp = tiny_hparams("gpt2", mom2_update_weight=1e-2, gate="paper")  # Eq. 18's per-sequence z
    apply_coachhook_to_model(model, gpt2_tok, FACTS[:2], hp, **NOPROG)
    state = get_state(model)
    reqs = prepare_requests(FACTS[:2])
    per_prompt = []
    for r in reqs:  # independently: M and z of each prompt at each layer
        store = {}
        handles = [model.get_submodule(h.module_name).register_forward_pre_hook(
            lambda m, a, _l=l: store.__setitem__(_l, a[0])) for l, h in state.layers.items()]
        ids = gpt2_tok(r.prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            model(input_ids=ids)
        for hd in handles:
            hd.remove()
        zs = {}
        for l, h in state.layers.items():
            m = (store[l][0] @ h.delta.t()).norm(dim=-1)
            zs[l] = float(((m - m.mean()) / m.std()).max())
        per_prompt.append(zs)
    cands = method.compute_alpha_candidates(model, gpt2_tok, state, reqs)
    for l in hp.layers:
        assert cands[l] == pytest.approx(min(p[l] for p in per_prompt), rel=1e-4)


def test_single_round_resets_state_each_batch(gpt2_tok):
    model = build_tiny("gpt2")
    hp = tiny_hparams("gpt2", consecutive=False, mom2_update_weight=1e-2)
    apply_coachhook_to_model(model, gpt2_tok, FACTS[2:], hp, **NOPROG)
    solo = {l: h.delta.clone() for l, h in get_state(model).layers.items()}
    remove_coachhook(model)
    apply_coachhook_to_model(model, gpt2_tok, FACTS[:2], hp, **NOPROG)
    apply_coachhook_to_model(model, gpt2_tok, FACTS[2:], hp, **NOPROG)
    state = get_state(model)
    assert state.step == 1
    for l, h in state.layers.items():
        assert h.num_keys == 2
        assert torch.allclose(h.delta, solo[l], atol=1e-6)  # same as editing that batch alone


def test_restore_callable_reverts_the_batch_exactly(gpt2_tok):
    model = build_tiny("gpt2")
    hp = tiny_hparams("gpt2", mom2_update_weight=1e-2)
    apply_coachhook_to_model(model, gpt2_tok, FACTS[:2], hp, **NOPROG)
    state = get_state(model)
    snap = state.snapshot()
    logits = _logits(model, gpt2_tok)
    _, restore = apply_coachhook_to_model(model, gpt2_tok, FACTS[2:], hp, **NOPROG)
    from coachhook_plugin.easyedit.registry import as_weights_copy

    weights_copy = as_weights_copy(restore, callable_restore=True)  # what EasyEdit gets, through the registry
    assert dict(weights_copy) == {}  # PyPI EasyEdit iterates it: no base weight to put back
    weights_copy()  # GitHub EasyEdit calls it
    after = state.snapshot()
    assert same_state(after, snap)
    assert torch.equal(_logits(model, gpt2_tok), logits)


BAD_REQUESTS = [
    (dict(prompt="The capital of Zorbia is", subject="Narnia", target_new="Paris"), "does not occur in prompt"),
    (dict(prompt="The capital of Zorbia is", subject="Zorbia", target_new="   "), "empty or whitespace"),
    (dict(prompt="The capital of Zorbia is", subject="", target_new="Paris"), "subject is empty"),
    (dict(prompt="The capital of Zorbia is", subject="Zorbia", target_new="Paris", ground_truth="Paris"),
     "equals the ground truth"),
    (dict(prompt=42, subject="Zorbia", target_new="Paris"), "must be a string"),
    (dict(prompt="The capital of Zorbia is " + "very " * 60, subject="Zorbia", target_new="Paris"), "max_length"),
]


@pytest.mark.parametrize("bad,message", BAD_REQUESTS)
def test_bad_request_clear_error_and_state_unchanged(gpt2_tok, bad, message):
    model = build_tiny("gpt2")
    hp = tiny_hparams("gpt2", mom2_update_weight=1e-2)
    apply_coachhook_to_model(model, gpt2_tok, FACTS[:2], hp, **NOPROG)
    snap = get_state(model).snapshot()
    with pytest.raises(ValueError, match=message):
        apply_coachhook_to_model(model, gpt2_tok, [FACTS[2], bad], hp, **NOPROG)
    after = get_state(model).snapshot()
    assert after["step"] == snap["step"]
    assert same_state(after, snap)


def test_duplicate_requests_rejected(gpt2_tok):
    model = build_tiny("gpt2")
    with pytest.raises(RequestError, match="duplicate"):
        apply_coachhook_to_model(model, gpt2_tok, [FACTS[0], dict(FACTS[0])], tiny_hparams("gpt2"), **NOPROG)
    assert get_state(model) is None  # a failed first batch leaves no hooks behind


def test_failure_mid_batch_rolls_back(gpt2_tok, monkeypatch):
    model = build_tiny("gpt2")
    hp = tiny_hparams("gpt2", mom2_update_weight=1e-2)
    apply_coachhook_to_model(model, gpt2_tok, FACTS[:2], hp, **NOPROG)
    snap = get_state(model).snapshot()
    calls = {"n": 0}
    real = method.hook_update

    def fail_second(R, K, C):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real(R, K, C)

    monkeypatch.setattr(method, "hook_update", fail_second)
    with pytest.raises(RuntimeError, match="boom"):
        apply_coachhook_to_model(model, gpt2_tok, FACTS[2:], hp, **NOPROG)
    after = get_state(model).snapshot()
    assert same_state(after, snap)
    assert after["step"] == snap["step"]


@pytest.mark.parametrize("over,message", [
    (dict(layers=[1, 9]), "out of range"),
    (dict(rewrite_module_tmp="transformer.h.{}.mlp.nope"), "not found in the model"),
])
def test_bad_hparams_for_model(gpt2_tok, over, message):
    model = build_tiny("gpt2")
    with pytest.raises(HyperParamsError, match=message):
        apply_coachhook_to_model(model, gpt2_tok, FACTS[:1], tiny_hparams("gpt2", **over), **NOPROG)
    assert get_state(model) is None


def test_non_hookable_module_is_refused(gpt2_tok):
    model = build_tiny("gpt2")
    hp = tiny_hparams("gpt2", rewrite_module_tmp="transformer.h.{}.ln_2")
    with pytest.raises(TypeError, match="not a hook-able down-projection"):
        apply_coachhook_to_model(model, gpt2_tok, FACTS[:1], hp, **NOPROG)
    assert get_state(model) is None
    assert not model._forward_pre_hooks and not model.get_submodule("transformer.h.1.mlp.c_proj")._forward_hooks


def test_gate_ignores_right_padding(gpt2_tok):
    """A prompt scores the same alone and right-padded in a batch: pad tokens stay out of the paper gate's z
    statistics (the calibrated gate decides per token and has no per-sequence statistics to pollute)."""
    model = build_tiny("gpt2")
    hp = tiny_hparams("gpt2", mom2_update_weight=1e-3, gate="paper")
    apply_coachhook_to_model(model, gpt2_tok, FACTS[:2], hp, **NOPROG)
    apply_coachhook_to_model(model, gpt2_tok, FACTS[2:], hp, **NOPROG)
    state = get_state(model)
    for h in state.layers.values():
        h.alpha = 0.5  # low enough that the gate swaps some tokens
    short = gpt2_tok(FACTS[0]["prompt"])["input_ids"]
    long = gpt2_tok("An unrelated and much longer sentence that needs several more tokens than the other")["input_ids"]
    ids = torch.full((2, len(long)), gpt2_tok.eos_token_id)
    ids[0, :len(short)] = torch.tensor(short)
    ids[1] = torch.tensor(long)
    mask = (torch.arange(len(long))[None] < torch.tensor([[len(short)], [len(long)]])).long()
    first = state.layers[min(state.layers)]  # its inputs do not depend on any other hook's decisions
    with torch.no_grad(), first.recording_decisions() as seen:
        alone = model(input_ids=torch.tensor([short])).logits[0]
        padded = model(input_ids=ids, attention_mask=mask).logits[0, :len(short)]
        hp.gate_ignore_padding = False  # the reference behaviour: pads enter mean and std
        state.hparams.gate_ignore_padding = False
        model(input_ids=ids, attention_mask=mask)
    z_alone, z_padded, z_polluted = (r["z"][0, :len(short)] for r in seen)
    assert torch.allclose(alone, padded, atol=1e-5)
    assert torch.allclose(z_alone, z_padded, atol=1e-4)
    assert not torch.allclose(z_alone, z_polluted, atol=1e-2)  # pads moved the short prompt's z-scores


def test_every_layer_update_fits_its_residual_share_with_small_lambda(arch, gpt2_tok, monkeypatch):
    model = build_tiny(arch)
    hp = tiny_hparams(arch, layers=[0, 1, 2], mom2_update_weight=1e-5)
    seen = []
    real = method.hook_update

    def spy(R, K, C):
        delta = real(R, K, C)
        seen.append((R.double(), K.double(), delta))
        return delta

    monkeypatch.setattr(method, "hook_update", spy)
    apply_coachhook_to_model(model, gpt2_tok, FACTS, hp, **NOPROG)
    assert len(seen) == 3
    for R, K, delta in seen:  # W_h K moves by R on the batch's keys: ≥ 90 % of the residual is gone
        assert (R - delta @ K).norm() <= 0.1 * R.norm()


def test_half_precision_model_keeps_dtype_and_float32_master(gpt2_tok):
    model = build_tiny("llama").to(torch.bfloat16)
    hp = tiny_hparams("llama", mom2_update_weight=1e-2)
    before = _logits(model, gpt2_tok)
    apply_coachhook_to_model(model, gpt2_tok, FACTS[:2], hp, **NOPROG)
    state = get_state(model)
    assert all(h.delta.dtype == torch.float32 and h.key_gram.dtype == torch.float64 for h in state.layers.values())
    assert all(torch.isfinite(h.delta).all() and h.delta.abs().sum() > 0 for h in state.layers.values())
    state.set_mode(TEMPORARY)
    out = _logits(model, gpt2_tok)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all() and not torch.equal(out, before)
    remove_coachhook(model)
    assert torch.equal(_logits(model, gpt2_tok), before)


def test_copy_true_edits_an_independent_copy(gpt2_tok):
    model = build_tiny("gpt2")
    hp = tiny_hparams("gpt2", mom2_update_weight=1e-2)
    apply_coachhook_to_model(model, gpt2_tok, FACTS[:2], hp, **NOPROG)
    snap = get_state(model).snapshot()
    logits = _logits(model, gpt2_tok)
    clone, _ = apply_coachhook_to_model(model, gpt2_tok, FACTS[2:], hp, copy=True, **NOPROG)
    assert clone is not model
    after = get_state(model).snapshot()  # the original is exactly as it was
    assert after["step"] == 1 and same_state(after, snap)
    assert torch.equal(_logits(model, gpt2_tok), logits)
    twin = get_state(clone)  # the copy carries the first batch and the second
    assert twin.step == 2 and all(h.num_keys == 4 for h in twin.layers.values())
    remove_coachhook(clone)
    remove_coachhook(model)
    assert torch.equal(_logits(clone, gpt2_tok), _logits(model, gpt2_tok))
