"""alpha_rule (issue 16, beyond the paper): `running_min` is Eq. 19 and stays the default; `recomputed` sets α after
every batch to the min over the stored edit prompts of all batches of their max z under the current Δ (minus
alpha_margin), so it can rise again and every edit keeps firing. α is checked against a hand-run forward: keys
read at each hooked module, M = ‖Δk‖ and z written out."""
import json
import math

import pytest
import torch

from coachhook_plugin import (HyperParamsError, PersistenceError, apply_coachhook_to_model, get_state,
                              load_coachhook, save_coachhook, undo_coachhook)
from coachhook_plugin import method, scope
from coachhook_plugin.gate import (ALPHA_RULES, CALIBRATED, GATES, PAPER, alpha_next, alpha_prompt_sample,
                                   alpha_recomputed, sequence_max_z)
from coachhook_plugin.hparams import ALPHA_RULES as HPARAMS_ALPHA_RULES
from coachhook_plugin.persistence import META_KEY, read_coachhook
from conftest import FACTS, build_tiny, tiny_hparams

NOPROG = dict(progress=None)
MORE = [dict(prompt="The favourite food of Ola Berg is", subject="Ola Berg", target_new="rice"),
        dict(prompt="The river Quenta flows into the", subject="Quenta", target_new="Atlantic")]
BATCHES = [FACTS[:2], FACTS[2:], MORE]


MARGIN = 0.05  # alpha_margin of the recomputed run


def _hp(**over):
    return tiny_hparams("gpt2", mom2_update_weight=1e-2, batch_size=2, **over)


def _ids(tok, batches):
    return [tuple(tok(r["prompt"])["input_ids"]) for b in batches for r in b]


def _hand_max_z(model, state, prompt_ids, gate):
    """{layer: [max z of each prompt]} from a forward of each prompt alone under `gate`, with the hooks acting:
    each hooked module's input keys are read, M = ‖Δk‖ and z (Eq. 18, or against μ, σ) computed here."""
    out = {l: [] for l in state.layers}
    saved = {l: h.gate for l, h in state.layers.items()}
    state.set_gate(gate)
    try:
        for ids in prompt_ids:
            keys = {}
            handles = [model.get_submodule(h.module_name).register_forward_pre_hook(
                lambda m, a, _l=l: keys.__setitem__(_l, a[0][0].double())) for l, h in state.layers.items()]
            try:
                with torch.no_grad():
                    model(input_ids=torch.tensor([list(ids)]))
            finally:
                for hd in handles:
                    hd.remove()
            for l, h in state.layers.items():
                m = (keys[l] @ h.delta.double().t()).norm(dim=-1)
                z = (m - m.mean()) / m.std() if gate == PAPER else (m - h.ref_mean) / h.ref_std
                out[l].append(float(z.max()))
    finally:
        for l, h in state.layers.items():
            h.gate = saved[l]
    return out


def _alphas(state):
    return {l: dict(h.alphas) for l, h in state.layers.items()}


# ----------------------------------------------------------------------------------------- the default: Eq. 19
def test_default_is_eq19_and_never_runs_the_recomputed_pass(gpt2_tok, monkeypatch):
    hp = _hp()
    assert (hp.alpha_rule, hp.alpha_margin, hp.alpha_prompts_max) == ("running_min", 0.0, 256)
    assert ALPHA_RULES == HPARAMS_ALPHA_RULES

    def refuse(*a, **k):
        raise AssertionError("running_min must not run the recomputed α pass")

    monkeypatch.setattr(method, "recompute_alphas", refuse)
    model = build_tiny("gpt2")
    before = None
    for s, batch in enumerate(BATCHES, start=1):
        apply_coachhook_to_model(model, gpt2_tok, batch, hp, **NOPROG)
        state = get_state(model)
        for g in GATES:
            for l, h in state.layers.items():
                cand = state.last_info["by_gate"][g]["alpha_candidates"][l]
                assert h.alphas[g] == (hp.alpha_z if before is None else alpha_next(before[l][g], cand, s))
        before = _alphas(state)
    # the prompts are kept under either rule (the rule can be switched on an edited model)
    assert state.alpha_prompts == _ids(gpt2_tok, BATCHES)
    assert "alpha_prompts" not in state.last_info


# ----------------------------------------------------------------------------------------- recomputed
@pytest.fixture(scope="module")
def recomputed_run(gpt2_tok):
    """Three consecutive batches under alpha_rule recomputed; α of both gates and a snapshot after each."""
    model = build_tiny("gpt2")
    # a margin keeps the weakest prompt off the threshold: at margin 0 its swap is decided by float rounding, which
    # the thread count changes, and the layers above then see other keys
    hp = _hp(alpha_rule="recomputed", alpha_margin=MARGIN)
    history = []
    for b, batch in enumerate(BATCHES):
        apply_coachhook_to_model(model, gpt2_tok, batch, hp, **NOPROG)
        state = get_state(model)
        hand = {g: _hand_max_z(model, state, _ids(gpt2_tok, BATCHES[:b + 1]), g) for g in GATES}
        history.append({"alphas": _alphas(state), "hand": hand, "info": state.last_info})
    return model, hp, history


def test_recomputed_alpha_is_the_min_over_every_stored_prompt(recomputed_run, gpt2_tok):
    model, hp, history = recomputed_run
    for s, h in enumerate(history, start=1):
        assert h["info"]["alpha_prompts"] == 2 * s  # every prompt so far (cap 256 not reached)
        for g in GATES:
            for l in hp.layers:
                expected = min(h["hand"][g][l])
                assert h["alphas"][l][g] == pytest.approx(expected - MARGIN, rel=1e-4, abs=1e-5)
                assert h["info"]["by_gate"][g]["alpha_candidates"][l] == pytest.approx(expected, rel=1e-4, abs=1e-5)
    # not Eq. 19: the first batch does not keep α_z, and the calibrated α sits far above it on this model
    assert all(history[0]["alphas"][l][CALIBRATED] > 4.0 for l in hp.layers)
    assert all(history[0]["alphas"][l][PAPER] != hp.alpha_z for l in hp.layers)


def test_recomputed_alpha_can_rise_between_batches(recomputed_run):
    _, hp, history = recomputed_run
    rises = [(l, g) for l in hp.layers for g in GATES
             if history[2]["alphas"][l][g] > history[1]["alphas"][l][g] + 0.05]
    assert (1, PAPER) in rises and (1, CALIBRATED) in rises, rises  # Eq. 19 could never do this


def test_every_stored_edit_prompt_fires_after_later_batches(gpt2_tok):
    """With a margin every stored prompt swaps a token at every layer under both gates after the last batch; under
    Eq. 19 on the same edits an earlier edit prompt no longer fires somewhere (its z fell below a stale α)."""
    fires = {}
    for rule, over in (("recomputed", dict(alpha_margin=0.05)), ("running_min", {})):
        model = build_tiny("gpt2")
        hp = _hp(alpha_rule=rule, **over)
        for batch in BATCHES:
            apply_coachhook_to_model(model, gpt2_tok, batch, hp, **NOPROG)
        state = get_state(model)
        fires[rule] = {}
        for g in GATES:
            hand = _hand_max_z(model, state, _ids(gpt2_tok, BATCHES), g)
            for l, h in state.layers.items():
                fires[rule][(g, l)] = [z >= h.alphas[g] for z in hand[l]]
                if rule == "recomputed":  # the margin is there in the numbers too
                    assert min(hand[l]) - h.alphas[g] == pytest.approx(0.05, abs=1e-4)
    assert all(all(f) for f in fires["recomputed"].values()), fires["recomputed"]
    assert not all(all(f) for f in fires["running_min"].values())


def test_margin_lowers_alpha_by_exactly_the_margin(gpt2_tok):
    got = {}
    for margin in (0.0, 0.25):
        model = build_tiny("gpt2")
        apply_coachhook_to_model(model, gpt2_tok, FACTS[:2], _hp(alpha_rule="recomputed", alpha_margin=margin),
                                 **NOPROG)
        state = get_state(model)
        got[margin] = (_alphas(state), {l: h.delta.clone() for l, h in state.layers.items()})
    for l in (1, 2):
        assert torch.equal(got[0.0][1][l], got[0.25][1][l])  # the same Δ: α does not enter the first batch
        for g in GATES:
            assert got[0.0][0][l][g] - got[0.25][0][l][g] == pytest.approx(0.25, abs=1e-6)


def test_prompt_sample_is_the_newest_half_and_a_seeded_sample():
    assert alpha_prompt_sample(10, 2, None, seed=3) == list(range(10))
    assert alpha_prompt_sample(10, 2, 10, seed=3) == list(range(10))
    picked = alpha_prompt_sample(10, 2, 4, seed=3)
    assert len(picked) == 4 and picked[2:] == [8, 9] and all(i < 8 for i in picked[:2]) and picked == sorted(picked)
    assert alpha_prompt_sample(10, 2, 4, seed=3) == picked  # the seed decides (the step: reproducible on load)
    assert len({tuple(alpha_prompt_sample(10, 2, 4, seed=s)) for s in range(20)}) > 3
    assert alpha_prompt_sample(10, 3, 5, seed=0)[2:] == [7, 8, 9]  # newest ⌈5/2⌉ = 3
    assert alpha_prompt_sample(10, 6, 4, seed=0) == [4, 5, 6, 7, 8, 9]  # a batch larger than the cap: all of it
    assert alpha_prompt_sample(100, 10, 1, seed=0) == list(range(90, 100))


def test_capped_pass_is_the_min_over_the_sampled_prompts(gpt2_tok):
    model = build_tiny("gpt2")
    # with a margin, the weakest prompt's max z is not exactly at α, where float noise decides whether it fires
    hp = _hp(alpha_rule="recomputed", alpha_prompts_max=3, alpha_margin=MARGIN)
    for batch in BATCHES:
        apply_coachhook_to_model(model, gpt2_tok, batch, hp, **NOPROG)
    state = get_state(model)
    assert state.last_info["alpha_prompts"] == 3
    ids = _ids(gpt2_tok, BATCHES)
    picked = alpha_prompt_sample(6, 2, 3, seed=3)
    assert picked[1:] == [4, 5]
    for g in GATES:
        hand = _hand_max_z(model, state, [ids[i] for i in picked], g)
        for l, h in state.layers.items():
            assert h.alphas[g] == pytest.approx(min(hand[l]) - MARGIN, rel=1e-4, abs=1e-5)


def test_sequence_max_z_leaves_padding_out_and_alpha_recomputed_ignores_non_finite():
    z = torch.tensor([[1.0, 3.0, 9.0], [2.0, 0.5, 7.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert sequence_max_z(z, mask).tolist() == [3.0, 7.0]  # the pad token's z = 9 is not the first prompt's max
    assert sequence_max_z(z).tolist() == [9.0, 7.0]
    assert alpha_recomputed(torch.tensor([3.0, 7.0, -math.inf]), 0.5) == 2.5
    assert alpha_recomputed(torch.tensor([-math.inf]), 0.5) == math.inf


def test_recomputed_pass_leaves_the_hooks_as_they_were(recomputed_run, gpt2_tok):
    model, hp, _ = recomputed_run
    state = get_state(model)
    before = {l: (h.gate, h.mode) for l, h in state.layers.items()}
    hooks = {l: len(model.get_submodule(h.module_name)._forward_hooks) for l, h in state.layers.items()}
    alphas = _alphas(state)
    try:
        cands = method.recompute_alphas(model, gpt2_tok, state, _ids(gpt2_tok, BATCHES), PAPER, MARGIN)
        for l, h in state.layers.items():
            assert (h.gate, h.mode) == before[l] and h.alpha_margin is None and h.recomputed_max_z is None
            assert len(model.get_submodule(h.module_name)._forward_hooks) == hooks[l]  # the stop hook is gone
            assert h.alphas[PAPER] == pytest.approx(cands[l] - MARGIN)
            assert h.alphas[CALIBRATED] == alphas[l][CALIBRATED]
        assert state._mask is None
    finally:
        for l, h in state.layers.items():
            h.alphas = dict(alphas[l])


# ----------------------------------------------------------------------------------------- state: save/load/undo
def test_stored_prompts_survive_save_load_and_the_next_batch_matches(gpt2_tok, tmp_path):
    hp = _hp(alpha_rule="recomputed", alpha_prompts_max=3)
    model = build_tiny("gpt2")
    for batch in BATCHES[:2]:
        apply_coachhook_to_model(model, gpt2_tok, batch, hp, **NOPROG)
    path = save_coachhook(model, tmp_path / "s.safetensors")
    header, snap = read_coachhook(path)
    assert header["alpha_prompts"] == [list(p) for p in _ids(gpt2_tok, BATCHES[:2])]
    twin = build_tiny("gpt2")
    state = load_coachhook(twin, path)
    assert state.alpha_prompts == _ids(gpt2_tok, BATCHES[:2]) and state.hparams.alpha_rule == "recomputed"
    for m in (model, twin):  # the third batch samples old prompts with the step as seed: the same on both
        apply_coachhook_to_model(m, gpt2_tok, BATCHES[2], hp, **NOPROG)
    assert _alphas(get_state(twin)) == _alphas(get_state(model))
    assert get_state(twin).alpha_prompts == _ids(gpt2_tok, BATCHES)


def _rewrite_header(path, change):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = json.loads(f.metadata()[META_KEY])
    change(header)
    save_file(tensors, str(path), metadata={META_KEY: json.dumps(header)})


def test_a_file_from_before_the_option_loads_with_no_prompts(gpt2_tok, tmp_path):
    model = build_tiny("gpt2")
    apply_coachhook_to_model(model, gpt2_tok, FACTS[:2], _hp(), **NOPROG)
    path = save_coachhook(model, tmp_path / "old.safetensors")

    def as_before(header):
        del header["alpha_prompts"]
        for k in ("alpha_rule", "alpha_margin", "alpha_prompts_max"):
            del header["hparams"][k]

    _rewrite_header(path, as_before)
    state = load_coachhook(build_tiny("gpt2"), path)
    assert state.alpha_prompts == [] and state.hparams.alpha_rule == "running_min" and state.step == 1
    _rewrite_header(path, lambda h: h.__setitem__("alpha_prompts", [[1, 2], "x"]))
    with pytest.raises(PersistenceError, match="damaged: 'alpha_prompts'"):
        load_coachhook(build_tiny("gpt2"), path)


def test_undo_puts_the_prompts_back_and_redo_gives_the_same_alpha(gpt2_tok):
    model = build_tiny("gpt2")
    hp = _hp(alpha_rule="recomputed", undo_depth=2)
    for batch in BATCHES:
        apply_coachhook_to_model(model, gpt2_tok, batch, hp, **NOPROG)
    state = get_state(model)
    after3 = _alphas(state)
    undo_coachhook(model)
    assert state.alpha_prompts == _ids(gpt2_tok, BATCHES[:2]) and state.step == 2
    apply_coachhook_to_model(model, gpt2_tok, BATCHES[2], hp, **NOPROG)
    assert _alphas(state) == after3 and state.alpha_prompts == _ids(gpt2_tok, BATCHES)
    _, restore = apply_coachhook_to_model(model, gpt2_tok, FACTS[:1], hp, **NOPROG)
    restore()  # EasyEdit's roll-back of one batch
    assert _alphas(state) == after3 and state.alpha_prompts == _ids(gpt2_tok, BATCHES)


def test_single_round_keeps_only_the_batch(gpt2_tok):
    model = build_tiny("gpt2")
    hp = _hp(alpha_rule="recomputed", consecutive=False)
    for batch in BATCHES[:2]:
        apply_coachhook_to_model(model, gpt2_tok, batch, hp, **NOPROG)
    assert get_state(model).alpha_prompts == _ids(gpt2_tok, BATCHES[1:2])


# ----------------------------------------------------------------------------------------- bad values
@pytest.mark.parametrize("over,message", [
    (dict(alpha_rule="recompute"), r"'alpha_rule': must be one of \('running_min', 'recomputed'\)"),
    (dict(alpha_margin=0.5), r"only applies with alpha_rule: recomputed; set alpha_rule: recomputed, or "
                             r"alpha_margin: 0"),
    (dict(alpha_rule="recomputed", alpha_margin=-0.1), r"'alpha_margin': must be a finite number >= 0"),
    (dict(alpha_rule="recomputed", alpha_margin=math.nan), r"'alpha_margin': must be a finite number >= 0"),
    (dict(alpha_rule="recomputed", alpha_margin="0.5x"), r"'alpha_margin': must be a finite number >= 0"),
    (dict(alpha_prompts_max=0), r"'alpha_prompts_max': must be an integer >= 1 .* or null for all of them"),
    (dict(alpha_prompts_max=2.5), r"'alpha_prompts_max': must be an integer >= 1"),
    (dict(alpha_rule="recomputed", gate_ignore_padding=False), r"needs gate_ignore_padding: true; set "
                                                                r"gate_ignore_padding: true, or alpha_rule: "
                                                                r"running_min"),
])
def test_bad_values_are_rejected_with_the_fix(over, message):
    with pytest.raises(HyperParamsError, match=message):
        _hp(**over)


def test_yaml_values_arrive_as_numbers(tmp_path):
    from coachhook_plugin import CoachHooKHyperParams

    hp = _hp()
    d = dict(hp.to_dict(), alpha_rule="recomputed", alpha_margin="0.5", alpha_prompts_max="64")
    got = CoachHooKHyperParams.from_dict(d)
    assert (got.alpha_rule, got.alpha_margin, got.alpha_prompts_max) == ("recomputed", 0.5, 64)
    assert CoachHooKHyperParams.from_dict(dict(d, alpha_prompts_max=None)).alpha_prompts_max is None


def test_padding_of_the_alpha_pass_never_sets_alpha(recomputed_run, gpt2_tok, monkeypatch):
    """The calibrated gate gives pad tokens a finite z: padding the short prompts with the edited subject's own
    token makes that z large, and it must still not count as the prompt's max (α = the real tokens' min max z)."""
    model, hp, history = recomputed_run
    state = get_state(model)
    ids = _ids(gpt2_tok, BATCHES)
    subject_token = gpt2_tok(" Zorbia")["input_ids"][-1]
    monkeypatch.setattr(scope, "pad_id_of", lambda tok: subject_token)
    alphas = _alphas(state)
    try:
        for g in GATES:
            cands = method.recompute_alphas(model, gpt2_tok, state, ids, g, MARGIN)
            for l in hp.layers:
                assert cands[l] == pytest.approx(min(history[2]["hand"][g][l]), rel=1e-4, abs=1e-5)
    finally:
        for l, h in state.layers.items():
            h.alphas = dict(alphas[l])


def test_a_run_checkpointed_before_the_option_resumes(gpt2_tok, tmp_path, monkeypatch):
    """`coachhook edit --resume` compares the hparams with the interrupted run's: fields that run's version did not
    have yet count as their defaults, so adding alpha_rule does not refuse every older run."""
    from coachhook_plugin.runs import STATE_FILE, edit_run

    records = [dict(case_id=i, prompt=f["prompt"], subject=f["subject"], target_new=f["target_new"])
               for i, f in enumerate(FACTS)]
    (tmp_path / "data.json").write_text(json.dumps(records))
    hp, model, out = _hp(v_num_grad_steps=2), build_tiny("gpt2"), tmp_path / "run"
    real, calls = method.apply_coachhook_to_model, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(method, "apply_coachhook_to_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        edit_run(hp, tmp_path / "data.json", out, model_and_tok=(model, gpt2_tok), log=lambda s: None)

    def as_before(header):
        for k in ("alpha_rule", "alpha_margin", "alpha_prompts_max"):
            del header["hparams"][k]

    _rewrite_header(out / STATE_FILE, as_before)
    done = edit_run(hp, tmp_path / "data.json", out, resume=True, model_and_tok=(build_tiny("gpt2"), gpt2_tok),
                    log=lambda s: None)
    assert done["complete"] and done["batches_done"] == 2
    with pytest.raises(Exception, match="hparams alpha_rule differ"):  # a real change is still refused
        edit_run(_hp(v_num_grad_steps=2, alpha_rule="recomputed"), tmp_path / "data.json", out, resume=True,
                 model_and_tok=(build_tiny("gpt2"), gpt2_tok), log=lambda s: None)
