"""Bad input: a clear error naming the fix, and the editor state exactly as it was (each batch all-or-nothing).

Every case runs on a model that already carries one batch of edits (so "unchanged" is a real check: step,
every state tensor bit for bit, α, the undo journal, the hparams in force and the model's outputs), or on a
fresh model where the failure must leave no hooks at all.
"""
import math
import types

import pytest
import torch

from coachhook_plugin import (CoachHooKHyperParams, HyperParamsError, RequestError, StatsError,
                              apply_coachhook_to_model, get_state)
from coachhook_plugin.method import copy_model
from coachhook_plugin.stats import path_for, save_second_moment
from conftest import FACTS, build_tiny, same_state, tiny_hparams

NOPROG = dict(progress=None)
GOOD = FACTS[2]


def _hp(**over):
    return tiny_hparams("gpt2", **dict(dict(mom2_update_weight=1e-2), **over))


@pytest.fixture(scope="module")
def edited_base(gpt2_tok):
    model = build_tiny("gpt2")
    apply_coachhook_to_model(model, gpt2_tok, FACTS[:2], _hp(), **NOPROG)
    return model


@pytest.fixture
def edited(edited_base):
    return copy_model(edited_base)  # an independent copy with its own hook state


def _logits(model, tok):
    ids = tok(["The capital of Zorbia is a city", "Alice Moreau works as a pilot"], return_tensors="pt",
              padding=True)
    with torch.no_grad():
        return model(**ids).logits


def _no_hooks(model):
    return get_state(model) is None and not model._forward_pre_hooks and \
        all(not m._forward_hooks for m in model.modules())


def assert_refused(model, tok, exc, message, requests=None, hparams=None):
    """The call raises `exc` matching `message`, and the model's CoachHooK state is exactly what it was."""
    state = get_state(model)
    before = state.snapshot() if state is not None else None
    hp_before = state.hparams if state is not None else None
    journal = list(state.journal) if state is not None else None
    logits = _logits(model, tok)
    with pytest.raises(exc, match=message):
        apply_coachhook_to_model(model, tok, requests if requests is not None else [GOOD],
                                 hparams if hparams is not None else _hp(), **NOPROG)
    if state is None:
        assert _no_hooks(model)
    else:
        after = get_state(model)
        assert after is state and same_state(after.snapshot(), before) and after.step == 1
        assert after.journal == journal and after.hparams is hp_before
    assert torch.equal(_logits(model, tok), logits)


# ----------------------------------------------------------------------------------------- requests
@pytest.mark.parametrize("bad,message", [
    (dict(prompt="The capital of Zorbia is", subject="Narnia", target_new="Paris"),
     r"subject 'Narnia' does not occur in prompt .*must appear verbatim"),
    (dict(prompt="The capital of Zorbia is", subject="zorbia", target_new="Paris"), "does not occur in prompt"),
])
def test_subject_not_in_prompt(edited, gpt2_tok, bad, message):
    assert_refused(edited, gpt2_tok, RequestError, message, requests=[GOOD, bad])


@pytest.mark.parametrize("target", ["", "   ", "\t\n"])
def test_empty_or_whitespace_target(edited, gpt2_tok, target):
    bad = dict(prompt="The capital of Zorbia is", subject="Zorbia", target_new=target)
    assert_refused(edited, gpt2_tok, RequestError, r"target_new is empty or whitespace; give the new object",
                   requests=[GOOD, bad])


@pytest.mark.parametrize("target,truth", [("Paris", "Paris"), (" Paris", "Paris"), ("Lyon", ["Paris", "Lyon"]),
                                          ({"str": "Paris"}, {"str": "Paris "})])
def test_target_equal_to_ground_truth(edited, gpt2_tok, target, truth):
    bad = dict(prompt="The capital of Zorbia is", subject="Zorbia", target_new=target, ground_truth=truth)
    assert_refused(edited, gpt2_tok, RequestError, "equals the ground truth; nothing to edit", requests=[GOOD, bad])


def test_prompt_longer_than_max_length(edited, gpt2_tok):
    bad = dict(prompt="The capital of Zorbia is " + "very " * 60, subject="Zorbia", target_new="Paris")
    assert_refused(edited, gpt2_tok, ValueError, r"request 1: prompt is \d+ tokens, longer than max_length=40; "
                                                 r"shorten it or raise max_length", requests=[GOOD, bad])


@pytest.mark.parametrize("bad,message", [
    (dict(prompt=42, subject="Zorbia", target_new="Paris"), "prompt must be a string, got int"),
    (dict(prompt="The capital of Zorbia is", subject=None, target_new="Paris"), "subject must be a string, got NoneType"),
    (dict(prompt="The capital of Zorbia is", subject="Zorbia", target_new=["Paris"]), "target_new must be a string, got list"),
    (dict(prompt="The capital of Zorbia is", subject="Zorbia", target_new="Paris", ground_truth=5),
     "ground_truth must be a string"),
    ("The capital of Zorbia is Paris", "expected a dict with 'prompt', 'subject', 'target_new', got str"),
    (dict(prompt="The capital of Zorbia is", target_new="Paris"), "missing 'subject'"),
])
def test_non_string_or_missing_fields(edited, gpt2_tok, bad, message):
    assert_refused(edited, gpt2_tok, RequestError, "request 1: " + message, requests=[GOOD, bad])


def test_duplicate_requests_in_one_batch(edited, gpt2_tok):
    assert_refused(edited, gpt2_tok, RequestError, "request 1: duplicate of an earlier request in the same batch.*"
                                                   "remove the duplicate", requests=[GOOD, dict(GOOD)])
    same_fact = dict(GOOD, target_new="Spanish")  # the same prompt and subject, another target
    assert_refused(edited, gpt2_tok, RequestError, "conflicts with an earlier request.*keep one target per fact",
                   requests=[GOOD, same_fact])
    assert_refused(edited, gpt2_tok, RequestError, "no requests given", requests=[])


# ------------------------------------------------------------------------------------------ hparams
@pytest.mark.parametrize("layers", [[1, 9], [-1, 2], [4]])
def test_layer_index_out_of_range(edited, gpt2_tok, layers):
    assert_refused(edited, gpt2_tok, HyperParamsError, r"'layers': \[-?\d\] out of range for a model with 4 layers "
                                                       r"\(valid: 0\.\.3\)", hparams=_hp(layers=layers))


@pytest.mark.parametrize("field,template", [("rewrite_module_tmp", "transformer.h.{}.mlp.nope"),
                                            ("layer_module_tmp", "transformer.blocks.{}")])
def test_module_template_not_found(edited, gpt2_tok, field, template):
    assert_refused(edited, gpt2_tok, HyperParamsError,
                   rf"{field}': module '{template.format(1)}' not found in the model.*use the model's layout",
                   hparams=_hp(**{field: template}))


def test_alg_name_mismatch(edited, gpt2_tok, tmp_path):
    memit = types.SimpleNamespace(alg_name="MEMIT", layers=[1, 2], rewrite_module_tmp="transformer.h.{}.mlp.c_proj")
    assert_refused(edited, gpt2_tok, TypeError, r"hparams must be CoachHooKHyperParams, got SimpleNamespace "
                                                r"\(alg_name 'MEMIT'\)", hparams=memit)
    hp = _hp()
    hp.alg_name = "MEMIT"  # changed after construction: caught when the batch is validated
    assert_refused(edited, gpt2_tok, HyperParamsError, "alg_name.*is 'MEMIT'; set it to 'CoachHooK'", hparams=hp)
    with pytest.raises(HyperParamsError, match="alg_name is 'MEMIT'.*MEMIT's own HyperParams class"):
        CoachHooKHyperParams.from_dict(dict(_hp().to_dict(), alg_name="MEMIT"))


def test_statistics_file_missing(edited, gpt2_tok, tmp_path):
    hp = _hp(mom2_adjustment=True, stats_dir=str(tmp_path), mom2_dataset="tiny", mom2_n_samples=7)
    assert_refused(edited, gpt2_tok, StatsError, r"covariance statistics not found at .*coachhook stats", hparams=hp)
    assert_refused(build_tiny("gpt2"), gpt2_tok, StatsError, "covariance statistics not found", hparams=hp)


@pytest.mark.parametrize("shape", [7, 64])  # neither is the down-projection's 256 inputs
def test_statistics_file_of_the_wrong_shape(edited, gpt2_tok, tmp_path, shape):
    hp = _hp(mom2_adjustment=True, stats_dir=str(tmp_path), mom2_dataset="tiny", mom2_n_samples=7)
    for layer in hp.layers:
        x = torch.randn(20, shape, dtype=torch.float64)
        save_second_moment(path_for(edited, hp, hp.rewrite_module_tmp.format(layer)), x.t() @ x, 20, 7)
    assert_refused(edited, gpt2_tok, StatsError, rf"holds a \({shape}, {shape}\) matrix, but the down-projection "
                                                 rf"takes 256 inputs.*delete it or fix stats_dir", hparams=hp)


@pytest.mark.parametrize("value", [0, -5.0, math.nan, "15000x"])
def test_lambda_not_positive(edited, gpt2_tok, value):
    with pytest.raises(HyperParamsError, match="mom2_update_weight"):
        _hp(mom2_update_weight=value)  # refused when the hparams are made ...
    hp = _hp()
    hp.mom2_update_weight = value  # ... and when they were changed afterwards
    message = "must be a number" if isinstance(value, str) else r"λ must be > 0 \(paper: 15000"
    assert_refused(edited, gpt2_tok, HyperParamsError, message, hparams=hp)


@pytest.mark.parametrize("value", [0, -2.2, math.nan])
def test_alpha_z_not_positive(edited, gpt2_tok, value):
    with pytest.raises(HyperParamsError, match="alpha_z"):
        _hp(alpha_z=value)
    hp = _hp()
    hp.alpha_z = value
    assert_refused(edited, gpt2_tok, HyperParamsError, r"'alpha_z': α_z must be > 0 \(paper: 2\.2\)", hparams=hp)


class _Opaque(torch.nn.Module):
    """A down-projection that is neither nn.Linear nor transformers' Conv1D (e.g. a custom quantised kernel)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def test_model_with_no_hookable_down_projection(gpt2_tok):
    model = build_tiny("gpt2")
    for block in model.transformer.h:
        block.mlp.c_proj = _Opaque(block.mlp.c_proj)
    assert_refused(model, gpt2_tok, TypeError, r"_Opaque is not a hook-able down-projection \(need nn.Linear or "
                                               r"transformers Conv1D\); point rewrite_module_tmp at the FFN's output")


def test_failed_batch_keeps_the_hparams_in_force(edited, gpt2_tok, tmp_path):
    """A batch that fails after its hparams were taken up (here: statistics) leaves the previous ones in force."""
    hp = _hp(mom2_adjustment=True, stats_dir=str(tmp_path), gate_ignore_padding=False)
    assert_refused(edited, gpt2_tok, StatsError, "not found", hparams=hp)
    assert get_state(edited).hparams.gate_ignore_padding is True
