"""The batched value optimisation computes what MEMIT's one-request-at-a-time loop computes."""
import pytest
import torch

from coachhook_plugin import apply_coachhook_to_model, get_state
from coachhook_plugin.edit_requests import prepare_requests
from coachhook_plugin.values import compute_values
from conftest import FACTS, build_tiny, tiny_hparams
from value_oracle import compute_value


# Loss thresholds at which, on these seeded models (init range 0.3, so that δ moves the loss), one request
# stops at step 0, another mid-way (gpt2: step 7, gptj: 5, llama: 4) and the rest run all 12 steps.
MIDWAY_STOP = {"gpt2": 12.0, "gptj": 12.45, "llama": 13.43}


@pytest.mark.parametrize("early_stop", [False, True])
def test_batched_values_equal_sequential(arch, gpt2_tok, early_stop):
    model = build_tiny(arch, init_range=0.3)
    hp = tiny_hparams(arch, v_num_grad_steps=12, v_loss_stop=MIDWAY_STOP[arch] if early_stop else 0.0, v_lr=0.5)
    reqs = prepare_requests(FACTS)
    block = hp.layer_module_tmp.format(hp.layers[-1])
    templates = ["{}", "Hello. {}", "I think that {}"]
    plain = torch.stack([compute_value(model, gpt2_tok, r, hp, block, templates) for r in reqs], dim=1)
    fast = compute_values(model, gpt2_tok, reqs, hp, block, templates)
    assert fast.shape == plain.shape
    assert torch.allclose(fast, plain, rtol=1e-3, atol=1e-4), (fast - plain).abs().max()


def test_batched_and_plain_paths_make_the_same_edit(gpt2_tok):
    states = []
    for batched in (True, False):
        model = build_tiny("gpt2")
        hp = tiny_hparams("gpt2", v_batched=batched, mom2_update_weight=1e-2)
        apply_coachhook_to_model(model, gpt2_tok, FACTS, hp, progress=None)
        states.append({l: h.delta.clone() for l, h in get_state(model).layers.items()})
    for l in states[0]:
        assert torch.allclose(states[0][l], states[1][l], rtol=1e-3, atol=1e-5)


def test_batch_of_one_equals_the_one_request_loop(gpt2_tok):
    """`v_batched: false` runs `compute_values` on one request at a time: each equals MEMIT's loop (the oracle)."""
    model = build_tiny("gpt2", init_range=0.3)
    hp = tiny_hparams("gpt2", v_num_grad_steps=12, v_loss_stop=MIDWAY_STOP["gpt2"], v_lr=0.5)
    block = hp.layer_module_tmp.format(hp.layers[-1])
    templates = ["{}", "Hello. {}"]
    for r in prepare_requests(FACTS):
        one = compute_values(model, gpt2_tok, [r], hp, block, templates)[:, 0]
        plain = compute_value(model, gpt2_tok, r, hp, block, templates)
        assert torch.allclose(one, plain, rtol=1e-3, atol=1e-4), (one - plain).abs().max()


def test_steps_run_the_upper_blocks_from_the_fact_token_on(arch, gpt2_tok):
    """After the one full pass, each step feeds the blocks above the value layer only the positions from each
    sequence's fact token to the last one its loss reads (the earlier ones come from the kept keys and values):
    the rewrite rows in one pass, the KL rows (their fact token only) in another."""
    from coachhook_plugin.values import _value_batch

    model = build_tiny(arch, init_range=0.3)
    hp = tiny_hparams(arch, v_num_grad_steps=3, v_loss_stop=0.0, v_lr=0.5)
    reqs = prepare_requests(FACTS)
    templates = ["{}", "Hello. {}"]
    block = hp.layer_module_tmp.format(hp.layers[-1])
    above = getattr(model, "transformer", None) or model.model
    top = (above.h if hasattr(above, "h") else above.layers)[-1]
    widths = []
    handle = top.register_forward_hook(lambda mod, args, out: widths.append(
        (out[0] if isinstance(out, tuple) else out).shape[1]))
    try:
        compute_values(model, gpt2_tok, reqs, hp, block, templates)
    finally:
        handle.remove()
    batches = [_value_batch(gpt2_tok, r, templates) for r in reqs]
    full = max(len(s) for seqs, _, _, _ in batches for s in seqs)
    span = max(len(s) - i for seqs, lookups, _, _ in batches for s, i in zip(seqs[:-1], lookups[:-1]))
    assert widths == [full] + [span, 1] * 3
    assert span < full
