"""The key scope (hparams key_scope_cosine, beyond the paper): a token the gate swaps must also have a key near an
edited key of the layer. Edited keys keep firing, unrelated ones stop, however many batches accumulate; off, or
with a threshold every key passes, the gate alone decides, bit for bit."""
import pytest
import torch

from coachhook_plugin import HyperParamsError, apply_coachhook_to_model, get_state, load_coachhook, save_coachhook
from coachhook_plugin.gate import CALIBRATED, PAPER, near_edited_keys
from coachhook_plugin.hook import HookLayer
from conftest import FACTS, build_tiny, tiny_hparams

D_IN, D_OUT = 256, 48


def _one_layer(key_scope_cosine, seed=0):
    torch.manual_seed(seed)
    module = torch.nn.Linear(D_IN, D_OUT, bias=False)
    hook = HookLayer("proj", module, alpha_z=2.2, gate=CALIBRATED, key_scope_cosine=key_scope_cosine)
    hook.attach(module)
    return module, hook


def _write_batches(hook, batches, gen):
    """`batches` synthetic batches of 10 edits: keys K, and an update Δ_b = R Kᵀ(KKᵀ + I)⁻¹-like of rank 10."""
    edited = []
    for _ in range(batches):
        k = torch.randn(D_IN, 10, generator=gen)
        r = torch.randn(D_OUT, 10, generator=gen)
        hook.add_delta(r @ torch.linalg.pinv(k), r)
        hook.add_keys(k)
        edited.append(k)
    return torch.cat(edited, dim=1)


def _fires(module, hook, keys):
    """(n,) bool: whether the hook's output differs from the module's own on each key (column of `keys`)."""
    with torch.no_grad():
        hooked = module(keys.t())
        hook.detach()
        base = module(keys.t())
        hook.attach(module)
    return (hooked != base).any(dim=1)


@pytest.mark.parametrize("batches", [1, 300])
def test_edited_keys_fire_and_unrelated_keys_do_not_after_many_batches(batches):
    gen = torch.Generator().manual_seed(1)
    module, hook = _one_layer(key_scope_cosine=0.5)
    edited = _write_batches(hook, batches, gen)
    hook.ref_mean, hook.ref_std, hook.alpha = 0.0, 1.0, -1e9  # the norm gate alone would swap every token
    unrelated = torch.randn(D_IN, 200, generator=gen)
    oldest, newest = edited[:, :10], edited[:, -10:]
    near_old = oldest + 0.3 * oldest.norm(dim=0) / D_IN ** 0.5 * torch.randn(D_IN, 10, generator=gen)
    assert _fires(module, hook, oldest).all() and _fires(module, hook, newest).all()
    assert _fires(module, hook, near_old).all()  # a paraphrase-like key: cosine about 0.96
    assert not _fires(module, hook, unrelated).any()
    if batches > 1:
        assert hook.num_keys == 10 * batches and hook.num_keys > D_IN  # past the switch to the Gram
    hook.key_scope_cosine = None  # the same state without the key scope: the gate swaps the unrelated keys too
    assert _fires(module, hook, unrelated).all()


def test_fired_tokens_take_exactly_the_hook_output():
    gen = torch.Generator().manual_seed(2)
    module, hook = _one_layer(key_scope_cosine=0.5)
    edited = _write_batches(hook, 3, gen)
    hook.ref_mean, hook.ref_std, hook.alpha = 0.0, 1.0, -1e9
    mixed = torch.cat([edited[:, :4], torch.randn(D_IN, 4, generator=gen)], dim=1)
    with torch.no_grad():
        out = module(mixed.t())
        want = mixed.t() @ module.weight.t()
        want[:4] += mixed[:, :4].t() @ hook.delta.t()
    assert torch.allclose(out, want, atol=1e-4)
    assert torch.equal(out[4:], mixed[:, 4:].t() @ module.weight.t())


def test_near_edited_keys_threshold_and_empty_memory():
    unit = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]), dim=0)  # d_in 3, n 2
    keys = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 5.0], [1.0, 0.2, 0.0]])
    assert near_edited_keys(keys, unit, 0.9).tolist() == [True, False, False, True]
    assert near_edited_keys(keys, unit, 0.7).tolist() == [True, True, False, True]
    assert not near_edited_keys(keys, unit[:, :0], -1.0).any()


@pytest.mark.parametrize("gate", [PAPER, CALIBRATED])
def test_a_threshold_every_key_passes_leaves_the_gate_bit_for_bit(gpt2_tok, gate):
    ids = gpt2_tok(FACTS[0]["prompt"] + " and more words here", return_tensors="pt")["input_ids"]
    logits = {}
    for cos in (None, -0.999999):
        model = build_tiny("gpt2")
        hp = tiny_hparams("gpt2", mom2_update_weight=1e-2, gate=gate, key_scope_cosine=cos)
        for batch in (FACTS[:2], FACTS[2:]):
            apply_coachhook_to_model(model, gpt2_tok, batch, hp, progress=None)
        with torch.no_grad():
            logits[cos] = model(input_ids=ids).logits
    assert torch.equal(logits[None], logits[-0.999999])


def test_key_scope_narrows_the_swaps_on_a_tiny_model(gpt2_tok):
    """Edited prompts still fire at every layer; the swaps on the edited prompts plus unrelated text are a subset
    of the gate's own, and strictly fewer."""
    model = build_tiny("gpt2")
    hp = tiny_hparams("gpt2", mom2_update_weight=1e-2, gate=CALIBRATED, key_scope_cosine=0.9,
                      context_templates=["{}"])  # keys of the bare prompts: the prompts below meet them exactly
    for batch in (FACTS[:2], FACTS[2:]):
        apply_coachhook_to_model(model, gpt2_tok, batch, hp, progress=None)
    state = get_state(model)
    texts = [f["prompt"] for f in FACTS] + ["The weather was cold this morning, so I wore a warm coat."]
    swaps = {}
    for cos in (0.9, None):
        for h in state.layers.values():
            h.key_scope_cosine = cos
            h.alpha = -1e9  # the gate alone fires on everything
        swaps[cos] = []
        for t in texts:
            with torch.no_grad(), state.layers[hp.layers[0]].recording_decisions() as rec:
                model(input_ids=gpt2_tok(t, return_tensors="pt")["input_ids"])
            swaps[cos].append(rec[0]["swap"].reshape(-1))
    for scoped, alone in zip(swaps[0.9], swaps[None]):
        assert not (scoped & ~alone).any()
    assert all(s.any() for s in swaps[0.9][:len(FACTS)])  # every edited prompt still fires somewhere
    assert sum(int(s.sum()) for s in swaps[0.9]) < sum(int(s.sum()) for s in swaps[None])
    assert not swaps[0.9][-1].any()


def test_save_load_keeps_the_key_scope_and_refuses_a_state_without_keys(gpt2_tok, tmp_path):
    hp = tiny_hparams("gpt2", mom2_update_weight=1e-2, key_scope_cosine=0.5)
    model = build_tiny("gpt2")
    apply_coachhook_to_model(model, gpt2_tok, FACTS[:2], hp, progress=None)
    save_coachhook(model, tmp_path / "scoped")
    ids = gpt2_tok(FACTS[0]["prompt"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    fresh = build_tiny("gpt2")
    load_coachhook(fresh, tmp_path / "scoped")
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, want)
    assert all(h.key_scope_cosine == 0.5 and h._unit_keys.shape[1] == 2 for h in get_state(fresh).layers.values())

    plain = build_tiny("gpt2")
    apply_coachhook_to_model(plain, gpt2_tok, FACTS[:2], tiny_hparams("gpt2", mom2_update_weight=1e-2), progress=None)
    h = next(iter(get_state(plain).layers.values()))
    scoped = HookLayer(h.module_name, torch.nn.Linear(h.d_in, h.d_out), 2.2, key_scope_cosine=0.5)
    with pytest.raises(ValueError, match="key_scope_cosine"):
        scoped.load_state(h.state_tensors(), h.extra_state())


@pytest.mark.parametrize("bad", [1.5, -1.0, "near", True])
def test_bad_key_scope_cosine_is_refused(bad):
    with pytest.raises(HyperParamsError, match="key_scope_cosine"):
        tiny_hparams("gpt2", key_scope_cosine=bad)
